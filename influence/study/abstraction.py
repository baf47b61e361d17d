"""Notebook 03 (RQ3): does what the most influential sequences share with a query move from
surface tokens to meaning as the models grow? The research question as one unit: its preset
block (`PRESETS`, `RANGES`), its analysis, its findings (`findings`) and its figures.

    lab = labeled_top_k(st, k=10)                     # top-k rows with relation to the query
    comp = composition_by_type(lab)                   # shares per query type × model, with CIs
    base = corpus_composition(st)                     # the same shares in the whole corpus
    bm = bm25_matrices(st, tokenizer)                 # BM25 of every query against the corpus
    lab_f = labeled_top_k(st, 10, candidates=bm25_candidates(bm, 0.1))  # the paper's pipeline
    ov = overlap_table(st, bm, token_sets, k=10)      # token overlap: top-k vs the corpus
    found = findings(lab, lab_f, ov, max_per_copy(st), model_params(st), base)

Query types: facts (the seen template), paraphrases near and far (held-out templates), math
and code. Relations are read from the corpus labels (`influence.study.relations`). Changes
with size are trends over all sizes (`stats.size_trend`: per-query slope against
log10(parameters), Wilcoxon over queries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sstats

from influence.filtering import bm25_scores

from . import relations as R
from . import stats, style
from .findings import Finding, judge
from .ranges import count, fraction

SECTION = "03_abstraction_with_scale"
# k: top-k sizes for the composition (the first is the headline); n_boot: bootstrap resamples
# over queries; n_examples / n_texts: queries shown with their top texts; bm25_fraction: the
# share of the corpus BM25 keeps per query before influence ranks it (the paper's pipeline).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"k": [10, 50], "n_boot": 500, "n_examples": 3, "n_texts": 5, "bm25_fraction": 0.1},
    "default": {"k": [10, 50], "n_boot": 1000, "n_examples": 3, "n_texts": 5,
                "bm25_fraction": 0.1},
    "large": {"k": [10, 50], "n_boot": 1000, "n_examples": 3, "n_texts": 5,
              "bm25_fraction": 0.1},
}  # fmt: skip
RANGES = {
    "k": count(1, "top sequences per query"),
    "n_boot": count(1, "bootstrap resamples"),
    "n_examples": count(0, "queries shown with their top texts"),
    "n_texts": count(1, "top texts shown per query"),
    "bm25_fraction": fraction("the share of the corpus kept by BM25 before influence"),
}
QUERY_SETS = ("facts", "paraphrase", "math", "code")
# Thresholds of the findings: the smallest change across the suite that counts.
SHARE_THRESHOLD = 0.05  # 5 points of a share
BM25_THRESHOLD = 0.05  # 5 percentile points
LOG_THRESHOLD = 0.1  # log10 units: a factor of 1.26

# query type -> (query set, group or None)
QUERY_TYPES: dict[str, tuple[str, str | None]] = {
    "facts": ("facts", None),
    "paraphrase (near)": ("paraphrase", "near"),
    "paraphrase (far)": ("paraphrase", "far"),
    "math": ("math", None),
    "code": ("code", None),
}
# the category that means "related by meaning, not the seen text", per query kind
MEANING = {"fact": R.OTHER_WORDS, "math": "same operation", "code": "same function kind"}
SURFACE = {"fact": (R.SHARES_NAME, R.SAME_RELATION), "math": (), "code": ()}
KIND_OF_SET = {"facts": "fact", "paraphrase": "fact", "math": "math", "code": "code"}
FACT_TYPES = ("facts", "paraphrase (near)", "paraphrase (far)")


def model_params(st: Any) -> dict[str, int]:
    """{model: parameter count} from the suite, small to large."""
    info = {i["name"]: int(i["params"]) for i in st.suite.info}
    return {m: info[m] for m in st.models}


def query_types(queries: pd.DataFrame, query_set: str) -> pd.Series:
    """The query type (a key of QUERY_TYPES) of every row of `queries` from `query_set`."""
    if query_set not in KIND_OF_SET:
        raise ValueError(f"query_set must be one of {list(KIND_OF_SET)}, got {query_set!r}")
    if query_set == "paraphrase":
        return ("paraphrase (" + queries["group"].astype(str) + ")").rename("query_type")
    return pd.Series(query_set, index=queries.index, name="query_type")


def kind_of_type(query_type: str) -> str:
    return KIND_OF_SET[QUERY_TYPES[query_type][0]]


def _top_rows(
    scores: torch.Tensor, k: int, mask: torch.Tensor | None, train: pd.DataFrame, n_train: int
) -> pd.DataFrame:
    """The k largest positive scores per query (ties to the lower training index), restricted
    to `mask` ([Q, N] candidates) when given: query, rank, train_id, score, per_copy and the
    training row's label columns."""
    s = scores.double()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    k = min(k, s.shape[1])
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    val = torch.gather(s, 1, order)
    q, r = np.meshgrid(np.arange(s.shape[0]), np.arange(1, k + 1), indexing="ij")
    ids = order.numpy().ravel()
    out = train.iloc[ids].reset_index(drop=True).rename(columns={"id": "train_id"})
    out.insert(0, "query", q.ravel())
    out.insert(1, "rank", r.ravel())
    out.insert(2, "score", val.numpy().ravel())
    out.insert(3, "per_copy", out["score"] / n_train)
    return out[out["score"] > 0].reset_index(drop=True)


def labeled_top_k(
    st: Any,
    k: int,
    query_sets: Sequence[str] = QUERY_SETS,
    candidates: Mapping[str, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Every model's top-k training sequences of every query of `query_sets` (only positive
    scores: the paper studies positively influential sequences), with `relation`, `level`,
    `query_type` and `params` columns. `candidates[set]` ([Q, N] bool) restricts the ranking
    to those sequences (the BM25 filter of the paper's pipeline)."""
    params = model_params(st)
    train = st.train_frame()
    out = []
    for qs in query_sets:
        if qs not in st.query_sets:
            continue
        q = st.queries(qs)
        qt = query_types(q, qs)
        mask = None if candidates is None else candidates[qs]
        for m in st.models:
            top = _top_rows(st.scores(m, qs), k, mask, train, st.n_train)
            top.insert(0, "model", m)
            top.insert(1, "query_set", qs)
            lab = R.label_top_k(top, q)
            lab["query_type"] = qt.loc[lab["query"].to_numpy()].to_numpy()
            lab["params"] = params[m]
            lab["query_prompt"] = q["prompt"].to_numpy()[lab["query"].to_numpy()]
            lab["query_completion"] = q["completion"].to_numpy()[lab["query"].to_numpy()]
            out.append(lab)
    if not out:
        raise ValueError(f"none of {list(query_sets)} was scored; scored: {st.query_sets}")
    return pd.concat(out, ignore_index=True)


def composition_by_type(labeled: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Shares of each relation category per query type × model (bootstrap over queries)."""
    out = []
    for qt, sub in labeled.groupby("query_type", sort=False):
        order = R.categories(kind_of_type(qt))
        c = R.composition(sub, by=["model"], order=order, n_boot=n_boot, seed=seed)
        c.insert(0, "query_type", qt)
        out.append(c)
    return pd.concat(out, ignore_index=True)


def corpus_composition(st: Any, query_sets: Sequence[str] = QUERY_SETS) -> pd.DataFrame:
    """The base rates of the composition: per query (query_type, query) and category, the
    share of the whole corpus in that relation to the query."""
    train = st.train_frame()
    recs = []
    for qs in query_sets:
        if qs not in st.query_sets:
            continue
        q = st.queries(qs)
        qt = query_types(q, qs)
        for i, (qi, row) in enumerate(q.iterrows()):
            labels = pd.Series(R.relation_labels(row, train))
            shares = stats.base_rates(labels, R.categories(kind_of_type(qt.iloc[i])))
            for cat, v in shares.items():
                recs.append({"query_type": qt.iloc[i], "query": int(qi), "category": cat,
                             "base_rate": float(v)})  # fmt: skip
    return pd.DataFrame(recs)


def composition_table(
    comp: pd.DataFrame, base: pd.DataFrame, order: Sequence[str], fmt=stats.format_share
) -> pd.DataFrame:
    """One row per query type and category: the corpus base rate, then each model's mean
    share [95% interval] (text cells, for the page)."""
    rate = base.groupby(["query_type", "category"], sort=False)["base_rate"].mean()
    rows = []
    for (qt, cat), g in comp.groupby(["query_type", "category"], sort=False):
        g = g.set_index("model")
        row = {"query_type": qt, "category": cat, "corpus": fmt(rate.get((qt, cat), np.nan))}
        for m in order:
            if m in g.index:
                r = g.loc[m]
                row[m] = stats.Interval(r.share, r.low, r.high).format(fmt)
        rows.append(row)
    return pd.DataFrame(rows)


def per_query_share(labeled: pd.DataFrame, query_type: str, cats: Sequence[str]) -> pd.DataFrame:
    """[query × model] share of a query's top-k rows whose relation is in `cats`."""
    sub = labeled[labeled["query_type"] == query_type]
    hit = sub["relation"].isin(list(cats)).astype(float)
    return hit.groupby([sub["query"], sub["model"]]).mean().unstack("model")


def pooled_share(labeled: pd.DataFrame, query_types_: Sequence[str], meaning: bool) -> pd.DataFrame:
    """Per-query shares of several query types stacked (index: query type, query): the
    meaning category of each type (`MEANING`), or its surface categories (`SURFACE`)."""
    frames = {}
    for qt in query_types_:
        if qt not in set(labeled["query_type"]):
            continue
        kind = kind_of_type(qt)
        cats = [MEANING[kind]] if meaning else list(SURFACE[kind])
        frames[qt] = per_query_share(labeled, qt, cats)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, names=["query_type", "query"])


def share_trends(
    labeled: pd.DataFrame, params: Mapping[str, int], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per query type and kind of share (meaning; the seen text and surface for facts): the
    mean share at each size over the queries with a value at every size, and the trend over
    sizes (`stats.size_trend`): the change across the suite with its interval and p."""
    rows = []
    for qt in dict.fromkeys(labeled["query_type"]):
        kind = kind_of_type(qt)
        cats = {"meaning": [MEANING[kind]]}
        if kind == "fact":
            cats["seen text"] = [R.SAME_WORDS]
            cats["surface"] = list(SURFACE[kind])
        for what, cs in cats.items():
            tr = stats.size_trend(per_query_share(labeled, qt, cs), params, n_boot=n_boot,
                                  seed=seed)  # fmt: skip
            rows.append(
                {"query_type": qt, "share_of": what, "queries": tr.change.n, **tr.means,
                 "change": tr.change.estimate, "low": tr.change.low, "high": tr.change.high,
                 "p": tr.test.p}
            )  # fmt: skip
    return pd.DataFrame(rows)


def pooled_base_rate(base: pd.DataFrame, query_types_: Sequence[str], meaning: bool) -> float:
    """The mean over queries of the corpus share of the categories `pooled_share` counts."""
    rates = []
    for qt in query_types_:
        kind = kind_of_type(qt)
        cats = [MEANING[kind]] if meaning else list(SURFACE[kind])
        sub = base[(base.query_type == qt) & base.category.isin(cats)]
        rates.append(sub.groupby("query")["base_rate"].sum())
    rates = [r for r in rates if len(r)]
    return float(pd.concat(rates).mean()) if rates else float("nan")


# -- token overlap -----------------------------------------------------------------------------
def token_sets(tokenizer: Any, texts: Sequence[str]) -> list[set[int]]:
    """Set of the tokenizer's ids of each text (no special tokens)."""
    return [set(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
    u = len(a | b)
    return len(a & b) / u if u else 0.0


def bm25_matrices(
    st: Any, tokenizer: Any, query_sets: Sequence[str] = QUERY_SETS
) -> dict[str, np.ndarray]:
    """Per query set: [Q, N] BM25 scores of the queries (prompt + completion) against every
    training sequence, as the paper's filter (k1 = 1.5, binary term frequency), on token sets
    of the models' tokenizer."""
    train = token_sets(tokenizer, st.train_frame()["text"].tolist())
    out = {}
    for qs in query_sets:
        if qs not in st.query_sets:
            continue
        q = st.queries(qs)
        qsets = token_sets(tokenizer, (q["prompt"] + q["completion"]).tolist())
        out[qs] = bm25_scores([sorted(s) for s in qsets], [sorted(s) for s in train]).numpy()
    return out


def bm25_candidates(bm25: Mapping[str, np.ndarray], fraction_: float) -> dict[str, torch.Tensor]:
    """Per query set: [Q, N] True for the ⌈fraction · N⌉ sequences with the largest BM25 score
    of each query (ties to the lower index), the candidates influence then ranks."""
    out = {}
    for qs, bm in bm25.items():
        keep = max(1, math.ceil(fraction_ * bm.shape[1]))
        idx = np.argsort(-bm, axis=1, kind="stable")[:, :keep]
        mask = np.zeros(bm.shape, dtype=bool)
        np.put_along_axis(mask, idx, True, axis=1)
        out[qs] = torch.from_numpy(mask)
    return out


def overlap_table(
    st: Any,
    tokenizer: Any,
    k: int,
    query_sets: Sequence[str] = QUERY_SETS,
    bm25: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Per model × query: token overlap of the query (prompt + completion) with its top-k
    positively influential sequences against the whole corpus (what random sequences give on
    average). Columns: jaccard_top, jaccard_corpus (mean Jaccard of token sets), bm25_pct
    (mean percentile of the top-k sequences' BM25 score among all sequences, 0.5 = random).
    `bm25` (from `bm25_matrices`) is computed when not given."""
    train = st.train_frame()
    tsets = token_sets(tokenizer, train["text"].tolist())
    bm25 = bm25 if bm25 is not None else bm25_matrices(st, tokenizer, query_sets)
    params = model_params(st)
    recs = []
    for qs in query_sets:
        if qs not in st.query_sets:
            continue
        q = st.queries(qs)
        qt = query_types(q, qs)
        qsets = token_sets(tokenizer, (q["prompt"] + q["completion"]).tolist())
        jac = np.array([[jaccard(a, b) for b in tsets] for a in qsets])
        # percentile of each sequence's BM25 score within its query's row (ties: average rank)
        pct = sstats.rankdata(bm25[qs], axis=1) / bm25[qs].shape[1]
        for m in st.models:
            s = st.scores(m, qs).numpy()
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            for i in range(len(q)):
                ids = order[i][s[i, order[i]] > 0]
                if len(ids) == 0:
                    continue
                recs.append(
                    {
                        "model": m,
                        "params": params[m],
                        "query_type": qt.iloc[i],
                        "query": int(q.index[i]),
                        "jaccard_top": float(jac[i, ids].mean()),
                        "jaccard_corpus": float(jac[i].mean()),
                        "bm25_pct": float(pct[i, ids].mean()),
                    }
                )
    return pd.DataFrame(recs)


def summarize_by_model(
    frame: pd.DataFrame,
    value: str,
    by: Sequence[str] = ("query_type", "model"),
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean of `value` per group with a bootstrap interval over the group's rows (queries)."""
    recs = []
    for key, sub in frame.groupby(list(by), sort=False):
        ci = stats.bootstrap(sub[value].to_numpy(), n_boot=n_boot, seed=seed)
        recs.append(
            {**dict(zip(by, key, strict=True)), "mean": ci.estimate, "low": ci.low,
             "high": ci.high, "n": len(sub)}
        )  # fmt: skip
    return pd.DataFrame(recs)


# -- exploratory: the meaning share against how well the model answers the query ----------------
def completion_logprobs(
    st: Any, tokenizer: Any, query_sets: Sequence[str] = ("facts", "paraphrase")
) -> pd.DataFrame:
    """log p(completion | prompt) of every scored query under every model of the stage:
    columns model, query_set, query (the row of the score tensors), logprob."""
    from .suite import completion_scores  # the suite's teacher-forced scoring, one pass

    frames = []
    for qs in query_sets:
        if qs not in st.query_sets:
            continue
        q = st.queries(qs)
        for m in st.models:
            with torch.no_grad():
                lp = completion_scores(st.model(m), tokenizer, q)["logprob"]
            frames.append(
                pd.DataFrame({"model": m, "query_set": qs, "query": q.index, "logprob": lp})
            )
    if not frames:
        raise ValueError(f"none of {list(query_sets)} was scored; scored: {st.query_sets}")
    return pd.concat(frames, ignore_index=True)


def meaning_vs_fit(
    labeled: pd.DataFrame, logprobs: pd.DataFrame, order: Sequence[str]
) -> pd.DataFrame:
    """Per fact query type × model: Spearman's ρ (and its p) over queries between the model's
    log p(completion) of a query and the meaning share of the query's top-k (`labeled`), with
    the number of queries and the median log p. Exploratory: it asks whether a query's
    influences follow where its loss still has a gradient, and carries no verdict."""
    rows = []
    for qt in [t for t in FACT_TYPES if t in set(labeled["query_type"])]:
        share = per_query_share(labeled, qt, [MEANING["fact"]])
        qs = QUERY_TYPES[qt][0]
        for m in [m for m in order if m in share.columns]:
            sh = share[m].dropna()
            lp = logprobs[(logprobs.query_set == qs) & (logprobs.model == m)]
            lp = lp.set_index("query")["logprob"].reindex(sh.index)
            if lp.isna().any():
                raise ValueError(f"logprobs lack queries of {qs!r} under model {m!r}")
            res = sstats.spearmanr(lp.to_numpy(), sh.to_numpy())
            constant = sh.nunique() < 2 or lp.nunique() < 2  # ρ undefined
            rows.append(
                {
                    "query_type": qt,
                    "model": m,
                    "queries": len(sh),
                    "median_logprob": float(lp.median()),
                    "mean_share": float(sh.mean()),
                    "spearman": float("nan") if constant else float(res.statistic),
                    "p": float("nan") if constant else float(res.pvalue),
                }
            )
    return pd.DataFrame(rows)


def describe_fit(fit: pd.DataFrame, alpha: float = 0.05) -> str:
    """One sentence per query type of `meaning_vs_fit`: the range of ρ over sizes and at how
    many sizes it is significant, with its sign there."""
    parts = []
    for qt, sub in fit.groupby("query_type", sort=False):
        rho = sub["spearman"].dropna()
        if rho.empty:
            parts.append(f"{qt}: ρ undefined at every size (a constant share or log p)")
            continue
        sig = sub[sub["p"] < alpha]
        signs = sorted({"positive" if v > 0 else "negative" for v in sig["spearman"]})
        where = f"p < {alpha:g} at {len(sig)} of {len(sub)} sizes"
        if len(sig):
            where += f" ({' or '.join(signs)} there)"
        parts.append(
            f"{qt}: ρ from {stats.format_number(rho.min(), 2)} to "
            f"{stats.format_number(rho.max(), 2)}, {where}"
        )
    return (
        "Spearman's ρ between a query's log p(completion) and its meaning share, per "
        "size: " + "; ".join(parts) + "."
    )


# -- magnitudes and examples -------------------------------------------------------------------
def max_per_copy(st: Any, query_sets: Sequence[str] = QUERY_SETS) -> pd.DataFrame:
    """Per model × query: the largest per-copy influence (nats per added copy) on the query."""
    params = model_params(st)
    recs = []
    for qs in query_sets:
        if qs not in st.query_sets:
            continue
        q = st.queries(qs)
        qt = query_types(q, qs)
        for m in st.models:
            mx = st.per_copy(m, qs).max(dim=1).values.double().numpy()
            for i, v in enumerate(mx):
                recs.append(
                    {"model": m, "params": params[m], "query_type": qt.iloc[i],
                     "query": int(q.index[i]), "max_per_copy": float(v)}
                )  # fmt: skip
    return pd.DataFrame(recs)


def top_texts(labeled: pd.DataFrame, query_type: str, query: int, n: int = 5) -> pd.DataFrame:
    """The top-n sequences of one query at every size, side by side (rank × model): text, its
    relation to the query and its per-copy influence."""
    sub = labeled[(labeled["query_type"] == query_type) & (labeled["query"] == query)]
    sub = sub[sub["rank"] <= n]
    cell = (
        sub["text"].str.slice(0, 90)
        + "  ["
        + sub["relation"]
        + ", "
        + sub["per_copy"].map(lambda v: f"{v:.2g}")
        + "]"
    )
    models = list(dict.fromkeys(labeled["model"]))
    return (
        pd.DataFrame({"rank": sub["rank"], "model": sub["model"], "cell": cell})
        .pivot(index="rank", columns="model", values="cell")
        .reindex(columns=models)
    )


# -- findings ----------------------------------------------------------------------------------
def findings(
    labeled: pd.DataFrame,
    labeled_filtered: pd.DataFrame,
    overlap: pd.DataFrame,
    max_copy: pd.DataFrame,
    params: Mapping[str, int],
    base: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[Finding]:
    """The paper's RQ3 claims, each a trend over every model size (`stats.size_trend`):
    `labeled` / `labeled_filtered` from `labeled_top_k` (all sequences / BM25 candidates),
    `overlap` from `overlap_table`, `max_copy` from `max_per_copy`, `base` from
    `corpus_composition`. Verdicts: `influence.study.findings`."""
    boot = {"n_boot": n_boot, "seed": seed}
    math_code = [t for t in ("math", "code") if t in set(labeled["query_type"])]
    suite = f"{min(params, key=params.get)} → {max(params, key=params.get)}"

    def trend_finding(name, claim, paper, values, expected, threshold, level, change,
                      base_rate=""):  # fmt: skip
        if values.empty:  # e.g. no query with a positive influence among its candidates
            values = pd.DataFrame(columns=list(params), dtype=float)
        tr = stats.size_trend(values, params, **boot)
        means = " → ".join(level(v) for v in tr.means.values())
        return judge(
            name,
            claim,
            paper,
            effect=tr.change,
            test=tr.test,
            expected=expected,
            threshold=threshold,
            what="change across the suite",
            fmt=change,
            ours=f"{means} ({suite}); change {tr.change.format(change)}",
            base_rate=base_rate,
            extra={"trend": tr.as_dict()},
        )

    share_fmt, points = stats.format_share, stats.format_points

    def two(x: float) -> str:
        return stats.format_number(x, 2)

    out = [
        trend_finding(
            "meaning share",
            "the top sequences of larger models are related by meaning (facts, paraphrases)",
            "rises from 810M to 52B (Figs. 1, 12–13)",
            pooled_share(labeled, FACT_TYPES, meaning=True),
            +1,
            SHARE_THRESHOLD,
            share_fmt,
            points,
            share_fmt(pooled_base_rate(base, FACT_TYPES, meaning=True)),
        ),
        trend_finding(
            "meaning share, BM25 candidates",
            "the same, ranking only the BM25 candidates (the paper's pipeline)",
            "rises (Figs. 1, 12–13)",
            pooled_share(labeled_filtered, FACT_TYPES, meaning=True),
            +1,
            SHARE_THRESHOLD,
            share_fmt,
            points,
            share_fmt(pooled_base_rate(base, FACT_TYPES, meaning=True)),
        ),
        trend_finding(
            "surface share",
            "sequences that share only names or the relation's words fall with size",
            "falls (token overlap at 810M)",
            pooled_share(labeled, FACT_TYPES, meaning=False),
            -1,
            SHARE_THRESHOLD,
            share_fmt,
            points,
            share_fmt(pooled_base_rate(base, FACT_TYPES, meaning=False)),
        ),
    ]
    if math_code:
        out.append(
            trend_finding(
                "math and code",
                "larger models find solutions of the same operation and code of the same kind",
                "rises (Fig. 14)",
                pooled_share(labeled, math_code, meaning=True),
                +1,
                SHARE_THRESHOLD,
                share_fmt,
                points,
                share_fmt(pooled_base_rate(base, math_code, meaning=True)),
            )
        )
    bm = overlap.pivot_table(index=["query_type", "query"], columns="model", values="bm25_pct")
    out.append(
        trend_finding(
            "token overlap",
            "the top sequences share fewer tokens with the query as models grow",
            "falls",
            bm,
            -1,
            BM25_THRESHOLD,
            two,
            two,
            "0.5 (BM25 percentile of a random sequence)",
        )
    )
    mx = max_copy.assign(v=np.log10(max_copy["max_per_copy"].where(max_copy["max_per_copy"] > 0)))
    out.append(
        trend_finding(
            "largest influence",
            "the largest influence per copy shrinks with size (log10 nats)",
            "shrinks (0.681 → 0.126, 2.570 → 0.096 nats)",
            mx.pivot_table(index=["query_type", "query"], columns="model", values="v"),
            -1,
            LOG_THRESHOLD,
            two,
            two,
        )
    )
    return out


# -- figures -----------------------------------------------------------------------------------
def plot_composition(comp: pd.DataFrame, params: dict[str, int], k: int, base: pd.DataFrame):
    """Stacked bars of the relation shares per model, next to the corpus (its base rates),
    one panel per query type; one legend per set of categories."""
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(comp["query_type"]))
    rate = base.groupby(["query_type", "category"], sort=False)["base_rate"].mean()
    fig, axes = plt.subplots(1, len(types), figsize=(1.95 * len(types) + 0.6, 4.4),
                             sharey=True, squeeze=False)  # fmt: skip
    models = list(params)
    labels = ["corpus", *models]
    for ax, qt in zip(axes[0], types, strict=True):
        sub = comp[comp["query_type"] == qt]
        bottom = np.zeros(len(labels))
        for cat in R.categories(kind_of_type(qt)):
            c = sub[sub["category"] == cat].set_index("model").reindex(models)["share"].fillna(0)
            vals = np.r_[rate.get((qt, cat), 0.0), c.to_numpy()]
            ax.bar(range(len(labels)), vals, bottom=bottom, color=style.category_color(cat),
                   label=cat, width=0.8)  # fmt: skip
            bottom += vals
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_title(qt)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"share of the top-{k}")
    # one legend entry per colour: categories of the same meaning share one ("same fact, other
    # words / same operation / same function kind")
    by_colour: dict[str, tuple[Any, list[str]]] = {}
    for ax in axes[0]:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            entry = by_colour.setdefault(style.category_color(n), (h, []))
            if n not in entry[1]:
                entry[1].append(n)
    fig.legend([h for h, _ in by_colour.values()], [" / ".join(n) for _, n in by_colour.values()],
               loc="lower center", ncol=2, bbox_to_anchor=(0.5, -0.01))  # fmt: skip
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    return fig


def plot_trends(frames: Mapping[str, pd.DataFrame], params: Mapping[str, int], ylabel: str):
    """Mean over queries (with bootstrap intervals, `summarize_by_model` frames) against
    parameters, one line per query type."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(frames), figsize=(4.6 * len(frames), 3.4), squeeze=False)
    colours = dict(zip(QUERY_TYPES, (style.BLUE, style.SKY, style.GREEN, style.ORANGE,
                                     style.VERMILLION), strict=True))  # fmt: skip
    for ax, (title, frame) in zip(axes[0], frames.items(), strict=True):
        for qt, g in frame.groupby("query_type", sort=False):
            g = g.set_index("model").reindex([m for m in params if m in set(g.model)])
            xs = [params[m] for m in g.index]
            yerr = np.vstack([g["mean"] - g["low"], g["high"] - g["mean"]]).clip(min=0)
            ax.errorbar(xs, g["mean"], yerr=np.nan_to_num(yerr), marker="o", capsize=3,
                        label=qt, color=colours[qt])  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(title)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig
