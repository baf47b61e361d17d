"""The generated world and corpus: determinism, templates, held-out paraphrases, labels."""

from __future__ import annotations

import re

import pytest

from influence.study import corpus as C
from influence.study.presets import resolve
from influence.study.tokenizer import encode_query, encode_text, train_tokenizer
from influence.study.world import LANGUAGES, RELATIONS


@pytest.fixture(scope="module")
def smoke():
    rows, queries, world = C.generate(resolve("corpus", "smoke"), 0)
    return rows, queries, world


@pytest.fixture
def tmp_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path))
    return tmp_path


def test_generation_is_deterministic(smoke):
    rows, queries, _ = smoke
    again = C.generate(resolve("corpus", "smoke"), 0)
    assert C.corpus_sha256(rows, queries) == C.corpus_sha256(again[0], again[1])
    other = C.generate(resolve("corpus", "smoke"), 1)
    assert C.corpus_sha256(rows, queries) != C.corpus_sha256(other[0], other[1])


def test_build_corpus_caches_and_matches_generation(smoke, tmp_artifacts):
    rows, queries, _ = smoke
    a = C.build_corpus("smoke", 0)
    assert a.sha256 == C.corpus_sha256(rows, queries)
    assert a.train["id"] == list(range(len(a.train)))
    assert a.train.to_list() == rows
    b = C.build_corpus("smoke", 0)
    assert b.path == a.path and b.sha256 == a.sha256
    assert set(a.queries) == set(C.QUERY_SETS)


def test_every_template_is_translated_and_ends_with_the_object():
    langs = C.languages_data()
    for rel in RELATIONS:
        shapes = {
            lang: (len(d["relations"][rel]["train"]), len(d["relations"][rel]["heldout"]))
            for lang, d in langs.items()
        }
        assert len(set(shapes.values())) == 1, (rel, shapes)
        for lang in LANGUAGES:
            r = langs[lang]["relations"][rel]
            for tpl in r["train"] + r["heldout"]:
                assert tpl.count("{s}") == 1 and tpl.count("{o}") == 1, tpl
                assert tpl.endswith("{o}."), tpl
            assert len(set(r["train"] + r["heldout"])) == len(r["train"]) + len(r["heldout"])


def _pattern(tpl: str) -> re.Pattern:
    parts = re.split(r"(\{s\}|\{o\})", tpl)
    return re.compile(
        "^" + "".join(".+" if p in ("{s}", "{o}") else re.escape(p) for p in parts) + "$"
    )


def test_heldout_templates_never_in_training(smoke):
    rows, queries, _ = smoke
    texts = [r["text"] for r in rows]
    for lang, d in C.languages_data().items():
        for rel, r in d["relations"].items():
            for tpl in r["heldout"]:
                pat = _pattern(tpl)
                assert not any(pat.match(t) for t in texts), (lang, rel, tpl)
    joined = "\n".join(texts)
    for q in queries["paraphrase"]:
        assert q["prompt"] not in joined
        assert q["group"] in C.HELDOUT_GROUPS
    assert {q["group"] for q in queries["paraphrase"]} == set(C.HELDOUT_GROUPS)


def test_labels_consistent_with_text(smoke):
    rows, queries, world = smoke
    for r in rows:
        if r["fact_id"] >= 0:
            f = world.facts[r["fact_id"]]
            assert (r["subject"], r["object"], r["relation"]) == (f.subject, f.object, f.relation)
            assert f.subject in r["text"]
            assert (f.object in r["text"]) == (r["group"] != "completion_removed"), r
            if r["kind"] == "fact":
                assert r["language"] in f.languages
                if r["order"] == "prompt_first":
                    assert r["text"].index(f.subject) < r["text"].index(f.object)
    for name, qs in queries.items():
        for q in qs:
            assert q["related_ids"], (name, q)
            assert q["completion"][:1] in (" ", "\n")
            if q["fact_id"] >= 0:
                f = world.facts[q["fact_id"]]
                assert q["completion"] == " " + f.object
                assert all(rows[i]["fact_id"] == f.id for i in q["related_ids"])
    # cross-lingual queries ask a fact in a language it was never stated in
    for q in queries["cross_lingual"]:
        assert not any(
            rows[i]["language"] == q["language"] and rows[i]["kind"] == "fact"
            for i in q["related_ids"]
        )
        assert q["language"] not in world.facts[q["fact_id"]].languages
    mono = [f for f in world.facts if not f.multilingual]
    assert mono and any(f.multilingual for f in world.facts)
    kinds = {r["kind"] for r in rows}
    assert kinds == set(C.KINDS)
    cats = {r["category"] for r in rows if r["kind"] == "role_play"}
    assert cats == set(C.ROLE_PLAY_CATEGORIES)
    groups = {r["group"] for r in rows if r["kind"] == "word_order"}
    assert len(groups) == 6


def test_lengths_fit_the_context(smoke):
    rows, queries, _ = smoke
    tok = train_tokenizer([r["text"] for r in rows], resolve("suite", "smoke")["vocab_size"])
    context = resolve("suite", "smoke")["context"]
    again = train_tokenizer([r["text"] for r in rows], resolve("suite", "smoke")["vocab_size"])
    assert tok.get_vocab() == again.get_vocab()  # BPE training is deterministic
    assert max(len(encode_text(tok, r["text"])) for r in rows) <= context
    for qs in queries.values():
        for q in qs:
            p, c = encode_query(tok, q["prompt"], q["completion"])
            assert len(p) + len(c) <= context
            # tokenising prompt and completion apart == tokenising them together
            assert p[1:] + c == tok.encode(q["prompt"] + q["completion"], add_special_tokens=False)


def test_default_corpus_size_within_budget():
    rows, queries, world = C.generate(resolve("corpus", "default"), 0)
    assert 1000 <= len(rows) <= 4000
    assert len(queries["facts"]) >= 200 and len(queries["cross_lingual"]) >= 50
    # the role-play analysis needs at least 10 held-out queries per topic (issue 12)
    counts = _role_play_counts(queries)
    assert len(counts) == 3 and min(counts.values()) >= 10, counts


def _role_play_counts(queries) -> dict[str, int]:
    counts: dict[str, int] = {}
    for q in queries["role_play"]:
        counts[q["topic"]] = counts.get(q["topic"], 0) + 1
    return counts


def test_role_play_queries_held_out_and_enough_per_topic(smoke):
    rows, queries, _ = smoke
    topics = set(C.load_json("roleplay.json")["topics"])
    n = resolve("corpus", "smoke")["n_role_play_queries"]
    assert n >= 3 and _role_play_counts(queries) == {t: n for t in topics}
    texts = [r["text"] for r in rows]
    joined = "\n".join(texts)
    for q in queries["role_play"]:
        human = q["prompt"].removesuffix("\nAssistant:")
        assert human != q["prompt"] and human not in joined, q["prompt"]
        assert (q["prompt"] + q["completion"]) not in joined
        related = {rows[i]["topic"] for i in q["related_ids"]}
        assert related == {q["topic"]}
        # the label says whether the completion sentence closes a training dialogue
        seen = any(t.endswith("Assistant:" + q["completion"]) for t in texts)
        assert q["group"] == ("seen_completion" if seen else "new_completion")
    # queries are listed per topic with their index within the topic
    assert [q["template_id"] for q in queries["role_play"]] == list(range(n)) * len(topics)


def test_role_play_query_count_checked():
    params = resolve("corpus", "smoke", n_role_play_queries=1000)
    with pytest.raises(ValueError, match="n_role_play_queries"):
        C.generate(params, 0)
