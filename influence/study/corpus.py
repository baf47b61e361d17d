"""The study's training corpus and query sets, generated from a fictional world.

    corpus = build_corpus("default", seed=0)        # cached under artifacts/corpus/<hash>/
    corpus.train                                     # datasets.Dataset, one row per sequence
    corpus.queries["facts"]                          # datasets.Dataset of (prompt, completion)
    corpus.sha256                                    # hash of every row of train and queries

Training rows (`corpus.train`), columns (unused ones are "" or -1):
    id           int, equal to the row index
    text         the sequence (the tokenizer adds <bos> and <eos>)
    kind         "fact", "word_order", "role_play", "math", "code", "quote"
    language     "en", "fr", "de" (math, role-play, quotes: "en"; code: "code")
    fact_id      index into corpus.world.facts, -1 if none (word_order rows carry their fact)
    relation     fact relation ("capital", "leader", "birthplace", "discoverer") or ""
    template_id  index of the template within its list (fact templates are aligned across
                 languages: template k is the translation of template k)
    group        word-order group ("rewording", "completion_removed", "semantic_change",
                 "irrelevant_with_names", "flipped", "flipped_no_prompt"); math operation;
                 code function kind; quote index as a string
    order        word order: "prompt_first", "completion_first", "no_completion"
    category     role-play category ("assistant", "fiction", "essay", "distractor",
                 "unrelated"); "" elsewhere
    topic        role-play topic ("shutdown", "resources", "self_improvement") or ""
    subject, object   the fact's names ("" if none)

Query sets (`corpus.queries[name]`), same label columns plus `prompt`, `completion` (which
starts with a space or newline, so tokenising prompt and completion separately gives the same
tokens as tokenising their concatenation) and `related_ids` (training ids of the sequences
that express the same fact, topic, operation, function or saying):
    facts         every fact, in every language it is stated in, with its first training
                  template (the text the model saw): accuracy on seen facts
    paraphrase    the same facts with each held-out template (never in training); group
                  "far" (a different sentence) or "near" (a light rewording); template_id
                  continues the training templates' numbering
    cross_lingual facts stated in one language only, asked in each language they were not
                  stated in, with that language's first training template
    word_order    facts that have word-order material, English, first template
    role_play     held-out assistant dialogues, n_role_play_queries per topic; template_id =
                  index within the topic, group "seen_completion" when the completion sentence
                  also closes a training dialogue, else "new_completion"
    math          new word problems (prompt = problem, completion = worked solution)
    code          new (name, arguments) combinations of the function kinds
    quotes        first half of each saying -> the rest

Deterministic: everything is drawn from `random.Random` seeded by the seed, so the same seed
and preset give a byte-identical corpus (`sha256`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Sequence, Value, load_from_disk

from . import cache
from .presets import resolve
from .world import DATA_DIR, LANGUAGES, NameMaker, World, load_json, make_world

CORPUS_VERSION = 1
KINDS = ("fact", "word_order", "role_play", "math", "code", "quote")
QUERY_SETS = (
    "facts",
    "paraphrase",
    "cross_lingual",
    "word_order",
    "role_play",
    "math",
    "code",
    "quotes",
)
HELDOUT_GROUPS = ("far", "near")  # data/languages/*.json: heldout[0] far, heldout[1] near
ROLE_PLAY_CATEGORIES = ("assistant", "fiction", "essay", "distractor", "unrelated")

_LABELS = {
    "kind": Value("string"),
    "language": Value("string"),
    "fact_id": Value("int64"),
    "relation": Value("string"),
    "template_id": Value("int64"),
    "group": Value("string"),
    "order": Value("string"),
    "category": Value("string"),
    "topic": Value("string"),
    "subject": Value("string"),
    "object": Value("string"),
}
TRAIN_FEATURES = Features({"id": Value("int64"), "text": Value("string"), **_LABELS})
QUERY_FEATURES = Features(
    {
        "id": Value("int64"),
        "prompt": Value("string"),
        "completion": Value("string"),
        **_LABELS,
        "related_ids": Sequence(Value("int64")),
    }
)


@dataclass
class Corpus:
    train: Dataset
    queries: dict[str, Dataset]
    world: World
    sha256: str
    params: dict
    path: Path | None = None

    def summary(self) -> dict:
        return {
            "sequences": len(self.train),
            "facts": len(self.world.facts),
            "queries": {k: len(v) for k, v in self.queries.items()},
            "sha256": self.sha256,
        }


def _row(**kw: Any) -> dict:
    row = {k: (-1 if v.dtype == "int64" else "") for k, v in _LABELS.items()}
    row.update(kw)
    return row


def _split_template(template: str) -> tuple[str, str]:
    """'The capital of {s} is {o}.' -> ('The capital of {s} is', ' {o}')."""
    head, tail = template.split("{o}")
    assert head.endswith(" "), template
    return head[:-1], " {o}"


def languages_data() -> dict[str, dict]:
    return {lang: load_json(f"languages/{lang}.json") for lang in LANGUAGES}


def data_hash() -> str:
    """Hash of every hand-written input under data/ (so that editing one invalidates caches)."""
    h = hashlib.sha256()
    for p in sorted(DATA_DIR.rglob("*.json")):
        h.update(str(p.relative_to(DATA_DIR)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def generate(params: dict, seed: int) -> tuple[list[dict], dict[str, list[dict]], World]:
    """Generate (training rows, query rows per set, world) from corpus parameters."""
    rng = random.Random(f"corpus-{seed}")
    world = make_world(
        seed,
        params["n_countries"],
        params["n_people"],
        params["n_elements"],
        params["mono_share"],
    )
    names = NameMaker(random.Random(f"extra-names-{seed}"))
    names.used.update(w for e in world.entities for w in e.name.split())
    langs = languages_data()
    rows: list[dict] = []
    queries: dict[str, list[dict]] = {k: [] for k in QUERY_SETS}

    def add(**kw: Any) -> int:
        kw["id"] = len(rows)
        rows.append(_row(**kw))
        return kw["id"]

    # -- facts ------------------------------------------------------------------------------
    fact_rows: dict[int, list[int]] = {f.id: [] for f in world.facts}
    for f in world.facts:
        for lang in f.languages:
            for t, tpl in enumerate(langs[lang]["relations"][f.relation]["train"]):
                fact_rows[f.id].append(
                    add(
                        text=tpl.format(s=f.subject, o=f.object),
                        kind="fact",
                        language=lang,
                        fact_id=f.id,
                        relation=f.relation,
                        template_id=t,
                        order="prompt_first",
                        subject=f.subject,
                        object=f.object,
                    )
                )

    # -- word order -------------------------------------------------------------------------
    wo = load_json("word_order.json")
    wo_facts = [f for f in world.facts if "en" in f.languages and f.multilingual]
    wo_facts = wo_facts[: params["n_word_order_facts"]]
    for f in wo_facts:
        for group, spec in wo["groups"].items():
            for t, tpl in enumerate(wo["relations"][f.relation][group]):
                fact_rows[f.id].append(
                    add(
                        text=tpl.format(s=f.subject, o=f.object),
                        kind="word_order",
                        language="en",
                        fact_id=f.id,
                        relation=f.relation,
                        template_id=t,
                        group=group,
                        order=spec["order"],
                        subject=f.subject,
                        object=f.object,
                    )
                )

    def fact_query(f, lang: str, tpl: str, t: int) -> dict:
        p, c = _split_template(tpl)
        return _row(
            prompt=p.format(s=f.subject),
            completion=c.format(o=f.object),
            kind="fact",
            language=lang,
            fact_id=f.id,
            relation=f.relation,
            template_id=t,
            order="prompt_first",
            subject=f.subject,
            object=f.object,
            related_ids=list(fact_rows[f.id]),
        )

    for f in world.facts:
        for lang in f.languages:
            rel = langs[lang]["relations"][f.relation]
            queries["facts"].append(fact_query(f, lang, rel["train"][0], 0))
            n_train = len(rel["train"])
            for h, tpl in enumerate(rel["heldout"]):
                q = fact_query(f, lang, tpl, n_train + h)
                q["group"] = HELDOUT_GROUPS[h]
                queries["paraphrase"].append(q)
        for lang in LANGUAGES:
            if lang not in f.languages:
                tpl = langs[lang]["relations"][f.relation]["train"][0]
                queries["cross_lingual"].append(fact_query(f, lang, tpl, 0))
    for f in wo_facts:
        tpl = langs["en"]["relations"][f.relation]["train"][0]
        queries["word_order"].append(fact_query(f, "en", tpl, 0))

    # -- role play --------------------------------------------------------------------------
    rp = load_json("roleplay.json")
    n_rp = params["n_role_play"]
    topic_rows: dict[str, list[int]] = {t: [] for t in rp["topics"]}

    def fill(s: str, ai: str, person: str) -> str:
        return s.replace("{ai}", ai).replace("{person}", person)

    def passages(spec: dict, n: int) -> list[tuple[int, str]]:
        pairs = list(itertools.product(range(len(spec["open"])), range(len(spec["close"]))))
        rng.shuffle(pairs)
        out = []
        for k in range(n):
            i, j = pairs[k % len(pairs)]
            ai = names.make("element").replace("ium", "o").upper()[:6]
            person = names.make("person").split()[0]
            text = fill(spec["open"][i] + " " + spec["close"][j], ai, person)
            if spec["open"][i].startswith("Human:"):
                text = spec["open"][i] + "\n" + spec["close"][j]
            out.append((i * len(spec["close"]) + j, text))
        return out

    for topic, cats in rp["topics"].items():
        for cat, spec in cats.items():
            for t, text in passages(spec, n_rp):
                topic_rows[topic].append(
                    add(
                        text=text,
                        kind="role_play",
                        language="en",
                        template_id=t,
                        category=cat,
                        topic=topic,
                    )
                )
    for t, text in passages(rp["unrelated"], n_rp):
        add(text=text, kind="role_play", language="en", template_id=t, category="unrelated")
    # The first n_role_play_queries held-out dialogues per topic (in file order, so smoke's
    # queries are default's first ones). group says whether the completion sentence also
    # closes a training dialogue ("seen_completion") or is new ("new_completion"): the prompt
    # is never in training either way.
    seen_closes = {
        r["text"].split("\nAssistant:", 1)[1]
        for r in rows
        if r["kind"] == "role_play" and "\nAssistant:" in r["text"]
    }
    n_rpq = params["n_role_play_queries"]
    for topic, qs in rp["queries"].items():
        if len(qs) < n_rpq:
            raise ValueError(
                f"n_role_play_queries={n_rpq} but data/roleplay.json has only {len(qs)} "
                f"queries for topic {topic!r}: lower n_role_play_queries or add queries"
            )
        for t, q in enumerate(qs[:n_rpq]):
            seen = q["completion"] in seen_closes
            queries["role_play"].append(
                _row(
                    prompt=q["prompt"],
                    completion=q["completion"],
                    kind="role_play",
                    language="en",
                    template_id=t,
                    group="seen_completion" if seen else "new_completion",
                    category="assistant",
                    topic=topic,
                    related_ids=list(topic_rows[topic]),
                )
            )

    # -- math -------------------------------------------------------------------------------
    mt = load_json("math.json")
    op_rows: dict[str, list[int]] = {op: [] for op in mt["operations"]}
    seen_math: set[str] = set()

    def problem() -> tuple[str, int, str, str]:
        op = rng.choice(sorted(mt["operations"]))
        spec = mt["operations"][op]
        t = rng.randrange(len(spec["problems"]))
        if op == "add":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            c = a + b
        elif op == "sub":
            a = rng.randint(5, 15)
            b = rng.randint(1, a - 1)
            c = a - b
        else:
            a, b = rng.randint(2, 6), rng.randint(2, 6)
            c = a * b
        name = names.make("person").split()[0]
        item = rng.choice(mt["items"])
        prompt = spec["problems"][t].format(name=name, item=item, a=a, b=b)
        completion = mt["solution"].format(a=a, b=b, c=c, symbol=spec["symbol"])
        return op, t, prompt, completion

    for _ in range(params["n_math"]):
        op, t, p, c = problem()
        seen_math.add(p)
        op_rows[op].append(add(text=p + c, kind="math", language="en", template_id=t, group=op))
    while len(queries["math"]) < params["n_math_queries"]:
        op, t, p, c = problem()
        if p in seen_math:
            continue
        seen_math.add(p)
        queries["math"].append(
            _row(
                prompt=p,
                completion=c,
                kind="math",
                language="en",
                template_id=t,
                group=op,
                related_ids=list(op_rows[op]),
            )
        )

    # -- code -------------------------------------------------------------------------------
    cd = load_json("code.json")
    combos = [
        (kind, fn, ai)
        for kind, spec in sorted(cd["functions"].items())
        for fn in spec["names"]
        for ai in range(len(cd["args"]))
    ]
    rng.shuffle(combos)
    n_code = min(params["n_code"], len(combos) - params["n_code_queries"])
    kind_rows: dict[str, list[int]] = {k: [] for k in cd["functions"]}

    def code_fill(s: str, fn: str, ai: int) -> str:
        a, b = cd["args"][ai]
        return s.replace("{f}", fn).replace("{a}", a).replace("{b}", b)

    for kind, fn, ai in combos[:n_code]:
        spec = cd["functions"][kind]
        kind_rows[kind].append(
            add(
                text=code_fill(spec["body"], fn, ai),
                kind="code",
                language="code",
                template_id=ai,
                group=kind,
            )
        )
    for kind, fn, ai in combos[n_code : n_code + params["n_code_queries"]]:
        spec = cd["functions"][kind]
        queries["code"].append(
            _row(
                prompt=code_fill(spec["prompt"], fn, ai),
                completion=code_fill(spec["completion"], fn, ai),
                kind="code",
                language="code",
                template_id=ai,
                group=kind,
                related_ids=list(kind_rows[kind]),
            )
        )

    # -- quotes -----------------------------------------------------------------------------
    qt = load_json("quotes.json")
    for qi, q in enumerate(qt["quotes"][: params["n_quotes"]]):
        ids = []
        contexts = list(range(len(qt["contexts"])))
        for ci in contexts[: params["n_quote_contexts"]]:
            person = names.make("person").split()[0]
            text = qt["contexts"][ci].replace("{quote}", q["text"]).replace("{person}", person)
            ids.append(add(text=text, kind="quote", language="en", template_id=ci, group=str(qi)))
        words = q["text"].split(" ")
        queries["quotes"].append(
            _row(
                prompt=" ".join(words[: q["split"]]),
                completion=" " + " ".join(words[q["split"] :]),
                kind="quote",
                language="en",
                group=str(qi),
                related_ids=ids,
            )
        )

    for rows_q in queries.values():
        for i, r in enumerate(rows_q):
            r["id"] = i
    return rows, queries, world


def corpus_sha256(rows: list[dict], queries: dict[str, list[dict]]) -> str:
    blob = json.dumps({"train": rows, "queries": queries}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def corpus_config(preset: str = "default", seed: int = 0, **overrides: Any) -> dict:
    params = resolve("corpus", preset, **overrides)
    return {"params": params, "seed": seed, "version": CORPUS_VERSION, "data": data_hash()}


def build_corpus(preset: str = "default", seed: int = 0, **overrides: Any) -> Corpus:
    """The corpus of `preset` (overrides: single corpus parameters), generated once and cached."""
    cfg = corpus_config(preset, seed, **overrides)
    path = cache.entry_dir("corpus", cfg)
    if not cache.is_complete(path):
        quiet = not datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        rows, queries, world = generate(cfg["params"], seed)
        sha = corpus_sha256(rows, queries)
        with cache.building(path) as tmp:
            Dataset.from_list(rows, features=TRAIN_FEATURES).save_to_disk(str(tmp / "train"))
            for name, qrows in queries.items():
                Dataset.from_list(qrows, features=QUERY_FEATURES).save_to_disk(
                    str(tmp / "queries" / name)
                )
            (tmp / "world.json").write_text(json.dumps(world.to_dict(), ensure_ascii=False))
            meta = {"sha256": sha, "config": cfg, "preset": preset}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if not quiet:
            datasets.enable_progress_bars()
    return load_corpus(path)


def load_corpus(path: Path) -> Corpus:
    meta = json.loads((path / "meta.json").read_text())
    return Corpus(
        train=load_from_disk(str(path / "train")),
        queries={q: load_from_disk(str(path / "queries" / q)) for q in QUERY_SETS},
        world=World.from_dict(json.loads((path / "world.json").read_text())),
        sha256=meta["sha256"],
        params=meta["config"]["params"],
        path=path,
    )
