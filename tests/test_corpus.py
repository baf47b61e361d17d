"""The generated world and corpus: determinism, templates, name forms, held-out splits,
candidates, labels, and configurations that cannot be satisfied."""

from __future__ import annotations

import re

import pytest

from influence.study import corpus as C
from influence.study.presets import resolve
from influence.study.tokenizer import encode_query, encode_text, train_tokenizer
from influence.study.world import LANGUAGES, RELATIONS, SHARED, make_world


@pytest.fixture(scope="module")
def smoke():
    return C.generate(resolve("corpus", "smoke"), 0)


@pytest.fixture(scope="module")
def default():
    return C.generate(resolve("corpus", "default"), 0)


@pytest.fixture
def tmp_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path))
    return tmp_path


def test_generation_is_deterministic(smoke):
    rows, held, queries, cands, _ = smoke
    again = C.generate(resolve("corpus", "smoke"), 0)
    assert C.corpus_sha256(rows, held, queries, cands) == C.corpus_sha256(*again[:4])
    other = C.generate(resolve("corpus", "smoke"), 1)
    assert C.corpus_sha256(rows, held, queries, cands) != C.corpus_sha256(*other[:4])


def test_build_corpus_caches_and_matches_generation(smoke, tmp_artifacts):
    rows, held, queries, cands, _ = smoke
    a = C.build_corpus("smoke", 0)
    assert a.sha256 == C.corpus_sha256(rows, held, queries, cands)
    assert a.train["id"] == list(range(len(a.train)))
    assert a.train.to_list() == rows and a.heldout.to_list() == held
    assert a.candidates["word_order"].to_list() == cands["word_order"]
    b = C.build_corpus("smoke", 0)
    assert b.path == a.path and b.sha256 == a.sha256
    assert set(a.queries) == set(C.QUERY_SETS) and set(a.candidates) == set(C.CANDIDATE_QUERIES)


def test_every_template_is_translated_and_ends_with_the_object():
    langs = C.languages_data()
    for rel in RELATIONS:
        shapes = {
            lang: tuple(len(d["relations"][rel][k]) for k in ("train", *C.HELDOUT_GROUPS))
            for lang, d in langs.items()
        }
        assert len(set(shapes.values())) == 1, (rel, shapes)
        assert shapes["en"][0] >= 9 and min(shapes["en"][1:]) >= 2, shapes
        for lang in LANGUAGES:
            r = langs[lang]["relations"][rel]
            every = [t for k in ("train", *C.HELDOUT_GROUPS) for t in r[k]]
            for tpl in every:
                assert tpl.count("{s}") == 1 and tpl.count("{o}") == 1, tpl
                assert tpl.endswith("{o}.") and tpl.index("{s}") < tpl.index("{o}"), tpl
            assert len(set(every)) == len(every)
            # varied syntax, not one frame: the words before {s} differ between templates
            openings = {t.split("{s}")[0] for t in r["train"]}
            assert len(openings) >= 6, (lang, rel, openings)


def _pattern(tpl: str) -> re.Pattern:
    parts = re.split(r"(\{s\}|\{o\})", tpl)
    return re.compile(
        "^" + "".join(".+" if p in ("{s}", "{o}") else re.escape(p) for p in parts) + "$"
    )


def test_paraphrase_templates_never_in_training(smoke):
    rows, held, queries, _, _ = smoke
    texts = [r["text"] for r in rows + held]
    for lang, d in C.languages_data().items():
        for rel, r in d["relations"].items():
            for tpl in r["near"] + r["far"]:
                pat = _pattern(tpl)
                assert not any(pat.match(t) for t in texts), (lang, rel, tpl)
    joined = "\n".join(texts)
    for q in queries["paraphrase"]:
        assert q["prompt"] not in joined
    assert {q["group"] for q in queries["paraphrase"]} == set(C.HELDOUT_GROUPS)


def test_name_forms_differ_per_language_and_control_set_shares_them(default):
    _, _, _, _, world = default
    seen: dict[str, int] = {}
    for e in world.entities:
        words = {lang: e.names[lang].split() for lang in LANGUAGES}
        assert len({len(w) for w in words.values()}) == 1
        for k in range(len(words["en"])):
            forms = {words[lang][k] for lang in LANGUAGES}
            assert len(forms) == (1 if e.shared else len(LANGUAGES)), e
            for f in forms:  # a word identifies one entity in every language
                assert seen.setdefault(f, e.id) == e.id, (f, e)
    shared = [f for f in world.facts if f.names == SHARED]
    assert 0 < len(shared) < len(world.facts) / 5
    for f in world.facts:
        flags = {world.entities[f.subject].shared, world.entities[f.object].shared}
        assert flags == {f.names == SHARED}, f


def test_mono_facts_have_their_names_attested_in_every_language(default):
    _, _, _, _, world = default
    mono = [f for f in world.facts if not f.multilingual]
    assert len(mono) == round(resolve("corpus", "default")["mono_share"] * len(world.facts))
    assert {f.languages[0] for f in mono} == set(LANGUAGES)
    multi_entities = {e for f in world.facts if f.multilingual for e in (f.subject, f.object)}
    for f in mono:
        assert f.subject in multi_entities and f.object in multi_entities, f


def test_labels_consistent_with_text(smoke):
    rows, held, queries, cands, world = smoke
    for r in rows + held + cands["word_order"]:
        if r["fact_id"] >= 0:
            f = world.facts[r["fact_id"]]
            lang = r["language"]
            s, o = world.name(f.subject, lang), world.name(f.object, lang)
            assert (r["subject"], r["object"], r["relation"]) == (s, o, f.relation)
            assert r["names"] == f.names
            assert s in r["text"]
            assert (o in r["text"]) == (r["group"] != "completion_removed"), r
            if r["order"] == "prompt_first" and r["group"] != "semantic_change":
                assert r["text"].index(s) < r["text"].rindex(o)
            if r["kind"] == "fact":
                assert lang in f.languages
        else:
            assert r["names"] == ""
    for name, qs in queries.items():
        for q in qs:
            assert q["related_ids"], (name, q)
            assert q["completion"][:1] in (" ", "\n")
            if q["fact_id"] >= 0:
                f = world.facts[q["fact_id"]]
                assert q["completion"] == " " + world.name(f.object, q["language"])
                assert world.name(f.subject, q["language"]) in q["prompt"]
                assert all(rows[i]["fact_id"] == f.id for i in q["related_ids"])
    # cross-lingual queries ask a fact in a language it was never stated in, with that
    # language's names
    for q in queries["cross_lingual"]:
        assert not any(rows[i]["language"] == q["language"] for i in q["related_ids"])
        assert q["language"] not in world.facts[q["fact_id"]].languages
    assert {r["kind"] for r in rows} == set(C.KINDS)
    cats = {r["category"] for r in rows if r["kind"] == "role_play"}
    assert cats == set(C.ROLE_PLAY_CATEGORIES)


def test_every_fact_keeps_its_templates_and_the_heldout_loss_set_is_new(default):
    rows, held, _, _, world = default
    n_tpl = resolve("corpus", "default")["n_templates"]
    assert n_tpl - 1 >= 8  # every fact in at least 8 training templates per language
    stated: dict[tuple[int, str], set[int]] = {}
    for r in rows:
        if r["kind"] == "fact":
            stated.setdefault((r["fact_id"], r["language"]), set()).add(r["template_id"])
    pairs = {(f.id, lang) for f in world.facts for lang in f.languages}
    assert set(stated) == pairs
    for key, tpls in stated.items():
        assert 0 in tpls and len(tpls) >= n_tpl - 1, key
    held_facts = [r for r in held if r["kind"] == "fact"]
    for r in held_facts:  # the one template a (fact, language) pair gave to the held-out set
        key = (r["fact_id"], r["language"])
        assert r["template_id"] not in stated[key] and len(stated[key]) == n_tpl - 1
    share = resolve("corpus", "default")["heldout_share"]
    assert abs(len(held_facts) / len(pairs) - share) < 0.03
    train_texts = {r["text"] for r in rows}
    assert not train_texts & {r["text"] for r in held}
    assert {r["kind"] for r in held} == {"fact", "role_play", "math", "code"}


def test_word_order_candidates_are_held_out_and_complete(smoke):
    rows, held, queries, cands, world = smoke
    n = resolve("corpus", "smoke")["n_word_order_facts"]
    wo = C.load_json("word_order.json")
    assert len(queries["word_order"]) == n
    assert not {r["text"] for r in cands["word_order"]} & {r["text"] for r in rows + held}
    assert "word_order" not in {r["kind"] for r in rows}
    for q in queries["word_order"]:
        mine = [c for c in cands["word_order"] if c["fact_id"] == q["fact_id"]]
        assert {c["group"] for c in mine} == set(wo["groups"])
        assert len(mine) == sum(len(v) for v in wo["relations"][q["relation"]].values())
        assert all(c["language"] == "en" and c["kind"] == "word_order" for c in mine)
        assert world.facts[q["fact_id"]].multilingual
    assert [c["id"] for c in cands["word_order"]] == list(range(len(cands["word_order"])))


def test_lengths_fit_the_context(smoke):
    rows, held, queries, cands, _ = smoke
    tok = train_tokenizer([r["text"] for r in rows], resolve("suite", "smoke")["vocab_size"])
    context = resolve("suite", "smoke")["context"]
    again = train_tokenizer([r["text"] for r in rows], resolve("suite", "smoke")["vocab_size"])
    assert tok.get_vocab() == again.get_vocab()  # BPE training is deterministic
    for r in rows + held + cands["word_order"]:
        assert len(encode_text(tok, r["text"])) <= context
    for qs in queries.values():
        for q in qs:
            p, c = encode_query(tok, q["prompt"], q["completion"])
            assert len(p) + len(c) <= context
            # tokenising prompt and completion apart == tokenising them together
            assert p[1:] + c == tok.encode(q["prompt"] + q["completion"], add_special_tokens=False)


def test_default_corpus_size(default):
    rows, held, queries, _, _ = default
    tok = train_tokenizer([r["text"] for r in rows], resolve("suite", "default")["vocab_size"])
    tokens = sum(len(encode_text(tok, r["text"])) for r in rows)
    assert tokens >= 480_000, tokens  # <bos> and <eos> included
    assert len(queries["facts"]) >= 800 and len(queries["cross_lingual"]) >= 200
    # the role-play analysis needs at least 10 held-out queries per topic (issue 12)
    counts = _role_play_counts(queries)
    assert len(counts) == 3 and min(counts.values()) >= 10, counts


def _role_play_counts(queries) -> dict[str, int]:
    counts: dict[str, int] = {}
    for q in queries["role_play"]:
        counts[q["topic"]] = counts.get(q["topic"], 0) + 1
    return counts


def test_role_play_queries_held_out_and_answers_follow_questions(default):
    rows, held, queries, _, _ = default
    topics = set(C.load_json("roleplay.json")["topics"])
    n = resolve("corpus", "default")["n_role_play_queries"]
    assert _role_play_counts(queries) == {t: n for t in topics}
    texts = [r["text"] for r in rows]
    prompts = {t.split("\nAssistant:")[0] for t in texts if "\nAssistant:" in t}
    answers = {t.split("\nAssistant:")[1] for t in texts if "\nAssistant:" in t}
    for q in queries["role_play"]:
        assert q["prompt"].endswith("\nAssistant:")
        assert q["prompt"].removesuffix("\nAssistant:") not in prompts
        related = {rows[i]["topic"] for i in q["related_ids"]}
        assert related == {q["topic"]}
        seen = q["completion"] in answers
        assert q["group"] == ("seen_completion" if seen else "new_completion")
    assert {q["group"] for q in queries["role_play"]} == {"seen_completion", "new_completion"}
    # queries are listed per topic with their index within the topic
    assert [q["template_id"] for q in queries["role_play"]] == list(range(n)) * len(topics)
    controls = [r for r in rows if r["category"] == "format_control"]
    assert controls and all(r["topic"] == "" and "\nAssistant:" in r["text"] for r in controls)
    # a question always gets the same answer, so a held-out opener does not change it
    spec = C.load_json("roleplay.json")["topics"]["shutdown"]["assistant"]["questions"]
    for qa in spec:
        got = {t.split("\nAssistant:")[1] for t in texts if qa["human"] + "\nAssistant:" in t}
        assert got == {" " + qa["answer"]}


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"n_templates": 10}, "n_templates=10"),
        ({"n_templates": 0}, "n_templates=0"),
        ({"heldout_share": 1.0}, "heldout_share"),
        ({"heldout_share": -0.1}, "heldout_share"),
        ({"n_templates": 1}, "n_templates >= 2"),
        ({"n_role_play_queries": 1000}, "n_role_play_queries=1000"),
        ({"n_code": 600}, "n_code=600"),
        ({"n_quotes": 99}, "n_quotes=99"),
        ({"mono_share": 0.9}, "mono_share=0.9"),
        ({"shared_share": 1.0}, "shared_share"),
        ({"n_word_order_facts": 500}, "n_word_order_facts=500"),
        ({"n_assistant": 10_000, "heldout_share": 0.5}, "n_assistant=10000"),
    ],
)
def test_unsatisfiable_configurations_fail_naming_the_value(override, match, tmp_artifacts):
    with pytest.raises(ValueError, match=re.escape(match)):
        C.build_corpus("smoke", 0, **override)


def test_world_is_deterministic_and_seeded():
    a = make_world(0, 12, 20, 8, 0.2, 0.1)
    assert a.to_dict() == make_world(0, 12, 20, 8, 0.2, 0.1).to_dict()
    assert a.to_dict() != make_world(1, 12, 20, 8, 0.2, 0.1).to_dict()
