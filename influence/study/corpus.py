"""The study's training corpus, held-out sets and query sets, generated from a fictional world.

    corpus = build_corpus("default", seed=0)        # cached under artifacts/corpus/<hash>/
    corpus.train                                     # datasets.Dataset, one row per sequence
    corpus.heldout                                   # held-out loss set (never trained on)
    corpus.queries["facts"]                          # datasets.Dataset of (prompt, completion)
    corpus.candidates["word_order"]                  # hypothetical sequences, never trained on
    corpus.sha256                                    # hash of every row of every split

Every training sequence carries one labelled unit: one fact statement, one dialogue or passage,
one worked problem, one function, one quoted saying. Training rows (`corpus.train`), columns
(unused ones are "" or -1):
    id           int, equal to the row index
    text         the sequence (the tokenizer adds <bos> and <eos>)
    kind         "fact", "role_play", "math", "code", "quote" ("word_order" in candidates)
    language     "en", "fr", "de" (math, role-play, quotes: "en"; code: "code")
    fact_id      index into corpus.world.facts, -1 if none
    relation     fact relation ("capital", "leader", "birthplace", "discoverer") or ""
    template_id  index of the template within its list (fact templates are aligned across
                 languages: template k is the translation of template k); role-play: index of
                 the question (dialogues) or of the (opening, continuation) pair
    group        word-order group (candidates); math operation; code function kind; quote index
    order        word order: "prompt_first", "completion_first", "no_completion"
    category     role-play category (`ROLE_PLAY_CATEGORIES`); "" elsewhere
    topic        role-play topic ("shutdown", "resources", "self_improvement") or ""
    subject, object   the fact's names as written in the row's language ("" if none)
    names        "localized" (names spelled per language) or "shared" (the control set: the same
                 name in every language) for fact rows, "" elsewhere

Facts: every fact is stated in each language it is stated in with each of the first
`n_templates` training templates of its relation. For a share `heldout_share` of the
(fact, language) pairs, one of templates 1.. (drawn at random) goes to the held-out loss set
instead, so every fact keeps at least `n_templates - 1` training templates per language, and
template 0 (the seen-fact query's) is always in training.

Held-out loss set (`corpus.heldout`, same columns as train): sequences drawn from the same
generator that are never trained on: those fact statements, and `heldout_share` × the training
count of extra role-play passages, dialogues, word problems and functions (new texts). The suite
measures its loss during training.

Query sets (`corpus.queries[name]`), same label columns plus `prompt`, `completion` (which
starts with a space or newline, so tokenising prompt and completion separately gives the same
tokens as tokenising their concatenation) and `related_ids` (training ids of the sequences
that express the same fact, topic, operation, function or saying):
    facts         every fact, in every language it is stated in, with its first training
                  template (the text the model saw): accuracy on seen facts
    paraphrase    the same facts with each held-out template (never in training); group
                  "near" (a light rewording of a training template) or "far" (a different
                  sentence); template_id continues the written training templates' numbering
    cross_lingual facts stated in one language only, asked in each language they were not
                  stated in, with that language's first training template and names
    word_order    the facts that have word-order candidates, English, first template
    role_play     held-out assistant dialogues, n_role_play_queries per topic; template_id =
                  index within the topic; group "seen_completion" (a held-out opener before a
                  training question: the answer closes training dialogues, the prompt never
                  occurs in training) or "new_completion" (a held-out question and answer)
    math          new word problems (prompt = problem, completion = worked solution)
    code          new (function kind, name, arguments) combinations
    quotes        first half of each saying -> the rest

Candidate sets (`corpus.candidates[name]`, training columns): hypothetical sequences that are
never trained on and that the influence stage scores as if they were (`CANDIDATE_QUERIES`):
    word_order    per word-order fact, the paper's six groups of English rewrites (§5.3.4)

Deterministic: everything is drawn from `random.Random` seeded by the seed, so the same seed
and preset give a byte-identical corpus (`sha256`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Sequence, Value, load_from_disk

from . import cache
from .presets import resolve
from .world import DATA_DIR, LANGUAGES, NameMaker, World, load_json, make_world

CORPUS_VERSION = 2
KINDS = ("fact", "role_play", "math", "code", "quote")
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
# candidate set -> the query set it is scored against
CANDIDATE_QUERIES = {"word_order": "word_order"}
HELDOUT_GROUPS = ("near", "far")  # data/languages/*.json: per relation, near then far
ROLE_PLAY_CATEGORIES = (
    "assistant",
    "fiction",
    "essay",
    "distractor",
    "unrelated",
    "format_control",
)
_PASSAGES = ("fiction", "essay", "distractor")  # joined opening + continuation, per topic

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
    "names": Value("string"),
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
    heldout: Dataset
    queries: dict[str, Dataset]
    candidates: dict[str, Dataset]
    world: World
    sha256: str
    params: dict
    path: Path | None = None

    def summary(self) -> dict:
        return {
            "sequences": len(self.train),
            "heldout_sequences": len(self.heldout),
            "facts": len(self.world.facts),
            "queries": {k: len(v) for k, v in self.queries.items()},
            "candidates": {k: len(v) for k, v in self.candidates.items()},
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


def check_params(params: dict) -> None:
    """Fail at once, naming the value, if the corpus parameters cannot be satisfied by the
    hand-written data (more templates, queries or functions asked than exist)."""
    h = params["heldout_share"]
    if not 0 <= h < 1:
        raise ValueError(f"heldout_share must be in [0, 1), got {h}")
    written = min(
        len(rel["train"]) for d in languages_data().values() for rel in d["relations"].values()
    )
    n = params["n_templates"]
    if not 1 <= n <= written:
        raise ValueError(
            f"n_templates={n} but data/languages/*.json have {written} training templates per "
            f"relation: choose 1 to {written}"
        )
    if h > 0 and n < 2:
        raise ValueError(f"heldout_share={h} > 0 needs n_templates >= 2 (template 0 is a query's)")
    rp = load_json("roleplay.json")
    n_rpq = params["n_role_play_queries"]
    for topic in rp["topics"]:
        cap = _n_role_play_queries_available(rp, topic)
        if n_rpq > cap:
            raise ValueError(
                f"n_role_play_queries={n_rpq} but data/roleplay.json has only {cap} held-out "
                f"dialogues for topic {topic!r}: lower n_role_play_queries or add questions"
            )
    cd = load_json("code.json")
    combos = sum(len(f["names"]) for f in cd["functions"].values()) * len(cd["args"])
    need = params["n_code"] + round(h * params["n_code"]) + params["n_code_queries"]
    if need > combos:
        raise ValueError(
            f"n_code={params['n_code']} and n_code_queries={params['n_code_queries']} (with "
            f"heldout_share={h}) need {need} distinct functions; data/code.json makes {combos}"
        )
    qt = load_json("quotes.json")
    for key, have in (("n_quotes", len(qt["quotes"])), ("n_quote_contexts", len(qt["contexts"]))):
        if params[key] > have:
            raise ValueError(f"{key}={params[key]} but data/quotes.json has only {have}")


def _n_role_play_queries_available(rp: dict, topic: str) -> int:
    spec = rp["topics"][topic]["assistant"]
    seen = len(rp["heldout_openers"]) * len(spec["questions"])
    return seen + len(rp["openers"]) * len(spec["heldout_questions"])


class _Rows:
    """Rows of one split, ids = row index."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, **kw: Any) -> int:
        kw["id"] = len(self.rows)
        self.rows.append(_row(**kw))
        return kw["id"]


def generate(
    params: dict, seed: int
) -> tuple[list[dict], list[dict], dict[str, list[dict]], dict[str, list[dict]], World]:
    """Generate (training rows, held-out rows, query rows per set, candidate rows per set,
    world) from corpus parameters."""
    check_params(params)
    rng = random.Random(f"corpus-{seed}")
    world = make_world(
        seed,
        params["n_countries"],
        params["n_people"],
        params["n_elements"],
        params["mono_share"],
        params["shared_share"],
    )
    names = NameMaker(random.Random(f"extra-names-{seed}"))
    names.used.update(w for e in world.entities for n in e.names.values() for w in n.split())
    train, heldout = _Rows(), _Rows()
    queries: dict[str, list[dict]] = {k: [] for k in QUERY_SETS}
    candidates: dict[str, list[dict]] = {k: [] for k in CANDIDATE_QUERIES}
    fact_rows = _facts(params, world, rng, train, heldout, queries)
    _word_order(params, world, fact_rows, queries, candidates)
    _role_play(params, rng, names, train, heldout, queries)
    _math(params, rng, names, train, heldout, queries)
    _code(params, rng, train, heldout, queries)
    _quotes(params, names, train, queries)
    for split in (*queries.values(), *candidates.values()):
        for i, r in enumerate(split):
            r["id"] = i
    return train.rows, heldout.rows, queries, candidates, world


def _fact_labels(world: World, f, lang: str) -> dict:
    return {
        "kind": "fact",
        "language": lang,
        "fact_id": f.id,
        "relation": f.relation,
        "order": "prompt_first",
        "subject": world.name(f.subject, lang),
        "object": world.name(f.object, lang),
        "names": f.names,
    }


def _facts(params, world, rng, train, heldout, queries) -> dict[int, list[int]]:
    """Fact statements (training and held-out loss set) and the fact query sets; returns the
    training ids of every fact's statements."""
    langs = languages_data()
    n_tpl = params["n_templates"]
    fact_rows: dict[int, list[int]] = {f.id: [] for f in world.facts}
    for f in world.facts:
        for lang in f.languages:
            templates = langs[lang]["relations"][f.relation]["train"][:n_tpl]
            held = -1
            if rng.random() < params["heldout_share"]:
                held = rng.randrange(1, n_tpl)
            labels = _fact_labels(world, f, lang)
            for t, tpl in enumerate(templates):
                text = tpl.format(s=labels["subject"], o=labels["object"])
                if t == held:
                    heldout.add(text=text, template_id=t, **labels)
                else:
                    fact_rows[f.id].append(train.add(text=text, template_id=t, **labels))

    def fact_query(f, lang: str, tpl: str, t: int, group: str = "") -> dict:
        labels = _fact_labels(world, f, lang)
        p, c = _split_template(tpl)
        return _row(
            prompt=p.format(s=labels["subject"]),
            completion=c.format(o=labels["object"]),
            template_id=t,
            group=group,
            related_ids=list(fact_rows[f.id]),
            **labels,
        )

    for f in world.facts:
        for lang in f.languages:
            rel = langs[lang]["relations"][f.relation]
            queries["facts"].append(fact_query(f, lang, rel["train"][0], 0))
            t = len(rel["train"])
            for group in HELDOUT_GROUPS:
                for tpl in rel[group]:
                    queries["paraphrase"].append(fact_query(f, lang, tpl, t, group))
                    t += 1
        for lang in LANGUAGES:
            if lang not in f.languages:
                tpl = langs[lang]["relations"][f.relation]["train"][0]
                queries["cross_lingual"].append(fact_query(f, lang, tpl, 0))
    return fact_rows


def _word_order(params, world, fact_rows, queries, candidates) -> None:
    """The word-order queries and their candidate sequences (never trained on)."""
    wo = load_json("word_order.json")
    tpl0 = languages_data()["en"]["relations"]
    facts = [f for f in world.facts if f.multilingual][: params["n_word_order_facts"]]
    if len(facts) < params["n_word_order_facts"]:
        raise ValueError(
            f"n_word_order_facts={params['n_word_order_facts']} but the world has only "
            f"{len(facts)} facts stated in every language"
        )
    for f in facts:
        labels = _fact_labels(world, f, "en")
        s, o = labels["subject"], labels["object"]
        for group, spec in wo["groups"].items():
            for t, tpl in enumerate(wo["relations"][f.relation][group]):
                candidates["word_order"].append(
                    _row(
                        text=tpl.format(s=s, o=o),
                        template_id=t,
                        group=group,
                        **{**labels, "kind": "word_order", "order": spec["order"]},
                    )
                )
        p, c = _split_template(tpl0[f.relation]["train"][0])
        queries["word_order"].append(
            _row(
                prompt=p.format(s=s),
                completion=c.format(o=o),
                template_id=0,
                related_ids=list(fact_rows[f.id]),
                **labels,
            )
        )


def _n_heldout(params: dict, n: int) -> int:
    return round(params["heldout_share"] * n)


def _role_play(params, rng, names, train, heldout, queries) -> None:
    rp = load_json("roleplay.json")
    topic_rows: dict[str, list[int]] = {t: [] for t in rp["topics"]}

    def fill(s: str, ai: str, person: str) -> str:
        return s.replace("{ai}", ai).replace("{person}", person)

    def passage(spec: dict, i: int, j: int) -> str:
        ai = names.make("element", shared=True)["en"].upper()[:6]
        person = names.make("person", shared=True)["en"].split()[0]
        return fill(spec["open"][i] + " " + spec["close"][j], ai, person)

    def dialogue(opener: str, question: dict) -> str:
        return f"Human: {opener} {question['human']}\nAssistant: {question['answer']}"

    def emit(param: str, units: list, make: Callable, **labels: Any) -> list[int]:
        """Up to params[param] distinct training texts and _n_heldout of that many held-out
        texts from `units` (shuffled): the held-out texts come from units never used in
        training; the training texts cycle over the rest (texts with generated names differ
        on every pass) and stop early when a whole pass adds no new text, so no text is
        trained on twice. Returns the training ids."""
        order = list(units)
        rng.shuffle(order)
        n = params[param]
        n_held = _n_heldout(params, n)
        if n_held >= len(order):
            raise ValueError(
                f"{param}={n} with heldout_share={params['heldout_share']} holds out {n_held} "
                f"of only {len(order)} {labels['category']} texts in data/roleplay.json"
            )
        for u in order[:n_held]:
            t, text = make(u)
            heldout.add(text=text, kind="role_play", language="en", template_id=t, **labels)
        rest = order[n_held:]
        ids: list[int] = []
        seen: set[str] = set()
        k = stale = 0
        while len(ids) < n and stale < len(rest):
            t, text = make(rest[k % len(rest)])
            k += 1
            if text in seen:
                stale += 1
                continue
            stale = 0
            seen.add(text)
            t_id = train.add(text=text, kind="role_play", language="en", template_id=t, **labels)
            ids.append(t_id)
        return ids

    openers = rp["openers"]
    for topic, cats in rp["topics"].items():
        qs = cats["assistant"]["questions"]
        topic_rows[topic] += emit(
            "n_assistant",
            list(itertools.product(range(len(openers)), range(len(qs)))),
            lambda u, qs=qs: (u[1], dialogue(openers[u[0]], qs[u[1]])),
            category="assistant",
            topic=topic,
        )
        for cat in _PASSAGES:
            spec = cats[cat]
            topic_rows[topic] += emit(
                "n_role_play",
                list(itertools.product(range(len(spec["open"])), range(len(spec["close"])))),
                lambda u, spec=spec: (u[0] * len(spec["close"]) + u[1], passage(spec, *u)),
                category=cat,
                topic=topic,
            )
    spec = rp["unrelated"]
    emit(
        "n_role_play",
        list(itertools.product(range(len(spec["open"])), range(len(spec["close"])))),
        lambda u: (u[0] * len(spec["close"]) + u[1], passage(spec, *u)),
        category="unrelated",
    )
    fc = rp["format_control"]["questions"]
    emit(
        "n_format_control",
        list(itertools.product(range(len(openers)), range(len(fc)))),
        lambda u: (u[1], dialogue(openers[u[0]], fc[u[1]])),
        category="format_control",
    )
    # Queries, in a fixed order per topic (so smoke's are default's first ones): three with a
    # held-out opener before a training question, then one with a held-out question, repeated;
    # every (held-out opener, question) pair and every held-out question appears once.
    ho = rp["heldout_openers"]
    for topic, cats in rp["topics"].items():
        spec = cats["assistant"]
        seen = [
            (ho[(q + r) % len(ho)], spec["questions"][q], "seen_completion")
            for r in range(len(ho))
            for q in range(len(spec["questions"]))
        ]
        new = [
            (openers[(3 * k) % len(openers)], q, "new_completion")
            for k, q in enumerate(spec["heldout_questions"] * len(openers))
        ]
        mixed = []
        while seen or new:
            mixed += [seen.pop(0) for _ in range(3) if seen]
            mixed += [new.pop(0) for _ in range(1) if new]
        for t, (opener, q, group) in enumerate(mixed[: params["n_role_play_queries"]]):
            queries["role_play"].append(
                _row(
                    prompt=f"Human: {opener} {q['human']}\nAssistant:",
                    completion=" " + q["answer"],
                    kind="role_play",
                    language="en",
                    template_id=t,
                    group=group,
                    category="assistant",
                    topic=topic,
                    related_ids=list(topic_rows[topic]),
                )
            )


def _math(params, rng, names, train, heldout, queries) -> None:
    mt = load_json("math.json")
    op_rows: dict[str, list[int]] = {op: [] for op in mt["operations"]}
    seen: set[str] = set()

    def problem() -> tuple[str, int, str, str]:
        for _ in range(10_000):
            op = rng.choice(sorted(mt["operations"]))
            spec = mt["operations"][op]
            t = rng.randrange(len(spec["problems"]))
            lo, hi = spec["range"]
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if op == "add":
                c = a + b
            elif op == "sub":
                a, b = max(a, b) + 1, min(a, b)
                c = a - b
            elif op == "mul":
                c = a * b
            else:  # div: a = b * c, exact
                a, c = a * b, a
            name = names.make("person", shared=True)["en"].split()[0]
            item = rng.choice(mt["items"])
            prompt = spec["problems"][t].format(name=name, item=item, a=a, b=b)
            if prompt not in seen:
                seen.add(prompt)
                completion = mt["solution"].format(a=a, b=b, c=c, symbol=spec["symbol"])
                return op, t, prompt, completion
        raise RuntimeError("could not draw a new word problem; add templates to data/math.json")

    for k in range(params["n_math"] + _n_heldout(params, params["n_math"])):
        op, t, p, c = problem()
        split = train if k < params["n_math"] else heldout
        i = split.add(text=p + c, kind="math", language="en", template_id=t, group=op)
        if split is train:
            op_rows[op].append(i)
    while len(queries["math"]) < params["n_math_queries"]:
        op, t, p, c = problem()
        if not op_rows[op]:  # a query needs worked problems of its operation in training
            continue
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


def _code(params, rng, train, heldout, queries) -> None:
    cd = load_json("code.json")
    combos = [
        (kind, fn, ai)
        for kind, spec in sorted(cd["functions"].items())
        for fn in spec["names"]
        for ai in range(len(cd["args"]))
    ]
    rng.shuffle(combos)
    kind_rows: dict[str, list[int]] = {k: [] for k in cd["functions"]}

    def fill(s: str, fn: str, ai: int) -> str:
        a, b = cd["args"][ai]
        return s.replace("{f}", fn).replace("{a}", a).replace("{b}", b)

    n, n_held = params["n_code"], _n_heldout(params, params["n_code"])
    for k, (kind, fn, ai) in enumerate(combos[: n + n_held]):
        split = train if k < n else heldout
        text = fill(cd["functions"][kind]["body"], fn, ai)
        i = split.add(text=text, kind="code", language="code", template_id=ai, group=kind)
        if split is train:
            kind_rows[kind].append(i)
    # held-out functions of the kinds that training shows (a query needs related sequences)
    rest = [c for c in combos[n + n_held :] if kind_rows[c[0]]]
    if len(rest) < params["n_code_queries"]:
        raise ValueError(
            f"n_code_queries={params['n_code_queries']} but only {len(rest)} new functions of "
            f"the kinds in training are left: lower n_code_queries or n_code"
        )
    for kind, fn, ai in rest[: params["n_code_queries"]]:
        spec = cd["functions"][kind]
        queries["code"].append(
            _row(
                prompt=fill(spec["prompt"], fn, ai),
                completion=fill(spec["completion"], fn, ai),
                kind="code",
                language="code",
                template_id=ai,
                group=kind,
                related_ids=list(kind_rows[kind]),
            )
        )


def _quotes(params, names, train, queries) -> None:
    qt = load_json("quotes.json")
    for qi, q in enumerate(qt["quotes"][: params["n_quotes"]]):
        ids = []
        for ci in range(params["n_quote_contexts"]):
            person = names.make("person", shared=True)["en"].split()[0]
            text = qt["contexts"][ci].replace("{quote}", q["text"]).replace("{person}", person)
            ids.append(
                train.add(text=text, kind="quote", language="en", template_id=ci, group=str(qi))
            )
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


def corpus_sha256(
    rows: list[dict],
    heldout: list[dict],
    queries: dict[str, list[dict]],
    candidates: dict[str, list[dict]],
) -> str:
    blob = json.dumps(
        {"train": rows, "heldout": heldout, "queries": queries, "candidates": candidates},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def corpus_config(preset: str = "default", seed: int = 0, **overrides: Any) -> dict:
    params = resolve("corpus", preset, **overrides)
    return {"params": params, "seed": seed, "version": CORPUS_VERSION, "data": data_hash()}


def build_corpus(preset: str = "default", seed: int = 0, **overrides: Any) -> Corpus:
    """The corpus of `preset` (overrides: single corpus parameters), generated once and cached.
    Parameters the hand-written data cannot satisfy fail at once (`check_params`)."""
    cfg = corpus_config(preset, seed, **overrides)
    check_params(cfg["params"])
    path = cache.entry_dir("corpus", cfg)
    if not cache.is_complete(path):
        quiet = not datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        rows, held, queries, candidates, world = generate(cfg["params"], seed)
        sha = corpus_sha256(rows, held, queries, candidates)
        with cache.building(path) as tmp:
            for name, split in (("train", rows), ("heldout", held)):
                Dataset.from_list(split, features=TRAIN_FEATURES).save_to_disk(str(tmp / name))
            for name, qrows in queries.items():
                Dataset.from_list(qrows, features=QUERY_FEATURES).save_to_disk(
                    str(tmp / "queries" / name)
                )
            for name, crows in candidates.items():
                Dataset.from_list(crows, features=TRAIN_FEATURES).save_to_disk(
                    str(tmp / "candidates" / name)
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
        heldout=load_from_disk(str(path / "heldout")),
        queries={q: load_from_disk(str(path / "queries" / q)) for q in QUERY_SETS},
        candidates={c: load_from_disk(str(path / "candidates" / c)) for c in CANDIDATE_QUERIES},
        world=World.from_dict(json.loads((path / "world.json").read_text())),
        sha256=meta["sha256"],
        params=meta["config"]["params"],
        path=path,
    )
