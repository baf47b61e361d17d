"""Notebook 03 (RQ3): does what the most influential sequences share with a query move from
surface tokens to meaning as the models grow?

    lab = labeled_top_k(st, k=10)                     # top-k rows with relation to the query
    comp = composition_by_type(lab)                   # shares per query type × model, with CIs
    trend = paired_trend(per_query_values, "xs", "l") # smallest vs largest model, per query
    ov = overlap_table(st, tokenizer, k=10)           # token overlap: top-k vs the corpus

Query types: facts (the seen template), paraphrases near and far (held-out templates), math
and code. Relations are read from the corpus labels (`influence.study.relations`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from influence.filtering import bm25_scores

from . import relations as R

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


def labeled_top_k(
    st: Any, k: int, query_sets: Sequence[str] = ("facts", "paraphrase", "math", "code")
) -> pd.DataFrame:
    """Every model's top-k training sequences of every query of `query_sets` (only positive
    scores: the paper studies positively influential sequences), with `relation`, `level`,
    `query_type` and `params` columns."""
    params = model_params(st)
    out = []
    for qs in query_sets:
        if qs not in st.query_sets:
            continue
        q = st.queries(qs)
        qt = query_types(q, qs)
        for m in st.models:
            lab = R.label_top_k(st.top_k(m, qs, k), q)
            lab["query_type"] = qt.loc[lab["query"].to_numpy()].to_numpy()
            lab["params"] = params[m]
            out.append(lab[lab["score"] > 0])
    if not out:
        raise ValueError(f"none of {list(query_sets)} was scored; scored: {st.query_sets}")
    return pd.concat(out, ignore_index=True)


def kind_of_type(query_type: str) -> str:
    return KIND_OF_SET[QUERY_TYPES[query_type][0]]


def composition_by_type(labeled: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Shares of each relation category per query type × model (bootstrap over queries)."""
    out = []
    for qt, sub in labeled.groupby("query_type", sort=False):
        order = R.categories(kind_of_type(qt))
        c = R.composition(sub, by=["model"], order=order, n_boot=n_boot, seed=seed)
        c.insert(0, "query_type", qt)
        out.append(c)
    return pd.concat(out, ignore_index=True)


def per_query_share(labeled: pd.DataFrame, query_type: str, cats: Sequence[str]) -> pd.DataFrame:
    """[query × model] share of a query's top-k rows whose relation is in `cats`."""
    sub = labeled[labeled["query_type"] == query_type]
    hit = sub["relation"].isin(list(cats)).astype(float)
    return hit.groupby([sub["query"], sub["model"]]).mean().unstack("model")


def paired_trend(values: pd.DataFrame, small: str, large: str, tol: float = 1e-12) -> dict:
    """Per-query paired comparison of column `large` against column `small` (rows = queries,
    only those present in both): mean difference, how many rise/fall/tie, the Wilcoxon
    signed-rank p-value (two-sided; ties dropped) and a word: "rises", "falls",
    "no clear change" (p ≥ 0.05) or "too few queries" (< 6 untied pairs: no test can reach
    p < 0.05)."""
    v = values[[small, large]].dropna()
    d = (v[large] - v[small]).to_numpy()
    up, down = int((d > tol).sum()), int((d < -tol).sum())
    res = {
        "n": len(d),
        "mean_small": float(v[small].mean()) if len(v) else float("nan"),
        "mean_large": float(v[large].mean()) if len(v) else float("nan"),
        "mean_diff": float(d.mean()) if len(d) else float("nan"),
        "rises": up,
        "falls": down,
        "ties": len(d) - up - down,
        "p": float("nan"),
    }
    if up + down < 6:
        res["word"] = "too few queries"
        return res
    res["p"] = float(stats.wilcoxon(d[np.abs(d) > tol]).pvalue)
    if res["p"] >= 0.05:
        res["word"] = "no clear change"
    else:
        res["word"] = "rises" if res["mean_diff"] > 0 else "falls"
    return res


def direction(values: Sequence[float]) -> str:
    """'rises'/'falls' with every size, or the overall direction 'not monotonically'."""
    v = list(values)
    pairs = list(zip(v, v[1:], strict=False))
    if len(v) < 2:
        return "has one size only"
    if all(b >= a for a, b in pairs) and v[-1] > v[0]:
        return "rises with every size"
    if all(b <= a for a, b in pairs) and v[-1] < v[0]:
        return "falls with every size"
    if v[-1] == v[0]:
        return "ends where it started"
    return ("rises" if v[-1] > v[0] else "falls") + " overall, not monotonically"


# -- token overlap -----------------------------------------------------------------------------
def token_sets(tokenizer: Any, texts: Sequence[str]) -> list[set[int]]:
    """Set of the tokenizer's ids of each text (no special tokens)."""
    return [set(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
    u = len(a | b)
    return len(a & b) / u if u else 0.0


def overlap_table(
    st: Any,
    tokenizer: Any,
    k: int,
    query_sets: Sequence[str] = ("facts", "paraphrase", "math", "code"),
) -> pd.DataFrame:
    """Per model × query: token overlap of the query (prompt + completion) with its top-k
    positively influential sequences against the whole corpus (what random sequences give on
    average). Columns: jaccard_top, jaccard_corpus (mean Jaccard of token sets), bm25_pct
    (mean percentile of the top-k sequences' BM25 score among all sequences, 0.5 = random;
    BM25 as the paper's filter: k1 = 1.5, binary term frequency)."""
    train = st.train_frame()
    tsets = token_sets(tokenizer, train["text"].tolist())
    params = model_params(st)
    recs = []
    for qs in query_sets:
        if qs not in st.query_sets:
            continue
        q = st.queries(qs)
        qt = query_types(q, qs)
        texts = (q["prompt"] + q["completion"]).tolist()
        qsets = token_sets(tokenizer, texts)
        jac = np.array([[jaccard(a, b) for b in tsets] for a in qsets])
        bm = bm25_scores([sorted(s) for s in qsets], [sorted(s) for s in tsets]).numpy()
        # percentile of each sequence's BM25 score within its query's row (ties: average rank)
        pct = stats.rankdata(bm, axis=1) / bm.shape[1]
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
    frame: pd.DataFrame, value: str, by: Sequence[str] = ("query_type", "model"), **boot: Any
) -> pd.DataFrame:
    """Mean of `value` per group with a bootstrap interval over the group's rows (queries)."""
    recs = []
    for key, sub in frame.groupby(list(by), sort=False):
        mean, lo, hi = R.bootstrap_mean(sub[value].to_numpy(), **boot)
        recs.append(
            {**dict(zip(by, key, strict=True)), "mean": float(mean), "low": float(lo),
             "high": float(hi), "n": len(sub)}
        )  # fmt: skip
    return pd.DataFrame(recs)


# -- magnitudes and examples -------------------------------------------------------------------
def max_per_copy(
    st: Any, query_sets: Sequence[str] = ("facts", "paraphrase", "math", "code")
) -> pd.DataFrame:
    """Per model × query: the largest per-copy influence (nats per added copy) on the query."""
    params = model_params(st)
    recs = []
    for qs in query_sets:
        if qs not in st.query_sets:
            continue
        qt = query_types(st.queries(qs), qs)
        for m in st.models:
            mx = st.per_copy(m, qs).max(dim=1).values.double().numpy()
            for i, v in enumerate(mx):
                recs.append(
                    {"model": m, "params": params[m], "query_type": qt.iloc[i], "query": i,
                     "max_per_copy": float(v)}
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


def plot_composition(comp: pd.DataFrame, params: dict[str, int], k: int):
    """Stacked bars of the relation shares per model (x: parameters), one panel per type."""
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(comp["query_type"]))
    fig, axes = plt.subplots(1, len(types), figsize=(3.2 * len(types), 4.6), squeeze=False)
    colors = {
        R.SAME_WORDS: "#4c72b0",
        R.OTHER_WORDS: "#55a868",
        R.SHARES_NAME: "#dd8452",
        R.SAME_RELATION: "#ccb974",
        R.UNRELATED: "#bbbbbb",
        "same operation": "#55a868",
        "same function kind": "#55a868",
        "other": "#bbbbbb",
    }
    models = list(params)
    shown: set[tuple[str, ...]] = set()
    for ax, qt in zip(axes[0], types, strict=True):
        sub = comp[comp["query_type"] == qt]
        bottom = np.zeros(len(models))
        for cat in R.categories(kind_of_type(qt)):
            c = sub[sub["category"] == cat].set_index("model").reindex(models)["share"].fillna(0)
            ax.bar(range(len(models)), c, bottom=bottom, color=colors[cat], label=cat)
            bottom += c.to_numpy()
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([f"{m}\n{params[m] / 1e3:,.0f}k" for m in models], fontsize=8)
        ax.set_title(qt, fontsize=10)
        ax.set_ylim(0, 1)
        cats = R.categories(kind_of_type(qt))
        if cats not in shown:  # one legend per set of categories, below the panel
            shown.add(cats)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
    axes[0][0].set_ylabel(f"share of top-{k} positive influences")
    fig.supxlabel("model (parameters)")
    fig.tight_layout()
    return fig


# -- verdicts ----------------------------------------------------------------------------------
def verdict(trend: dict, expected: str) -> tuple[str, str]:
    """(verdict, reason) of a `paired_trend` result against the paper's direction `expected`
    ("rises" or "falls"): agrees when the paired test shows that direction; partly when the
    mean moves that way without p < 0.05; disagrees when it moves the other way; not
    comparable when there are too few queries."""
    if expected not in ("rises", "falls"):
        raise ValueError(f"expected must be 'rises' or 'falls', got {expected!r}")
    w, d, p = trend["word"], trend["mean_diff"], trend["p"]
    counts = f"{trend['rises']} up, {trend['falls']} down, {trend['ties']} tied"
    if w == "too few queries":
        return "not comparable", f"too few queries with a change ({counts})"
    if w == expected:
        return "agrees", ""
    same_sign = (d > 0) == (expected == "rises") and d != 0
    if w == "no clear change" and same_sign:
        return "partly", f"moves that way but not significantly ({counts}, Wilcoxon p = {p:.2g})"
    return "disagrees", f"{counts} (mean change {d:+.3g}, Wilcoxon p = {p:.2g})"


def overall_verdict(verdicts: Sequence[str]) -> str:
    """One verdict for several findings: agrees/disagrees/not comparable when all comparable
    ones say so, partly otherwise."""
    v = [x for x in verdicts if x != "not comparable"]
    if not v:
        return "not comparable"
    if all(x == "agrees" for x in v):
        return "agrees"
    if all(x == "disagrees" for x in v):
        return "disagrees"
    return "partly"


def trend_phrase(word: str) -> str:
    """A `paired_trend` word as a verb phrase ("rises", "shows no clear change", ...)."""
    return {
        "no clear change": "shows no clear change",
        "too few queries": "has too few queries that change to test",
    }.get(word, word)
