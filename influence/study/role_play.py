"""Notebook 06 (paper §5.3.5): what do the top influences of an AI assistant voicing a wish
consist of, and does that move from shared tokens to shared meaning as the models grow? The
research question as one unit: its preset block (`PRESETS`, `RANGES`), its analysis, its
findings (`findings`) and its figures.

    base = base_rates(st.queries("role_play"), st.train_frame())     # [query × label]
    top = pd.concat(top_frame(st.scores(m, "role_play"), q, train, m, k) for m in st.models)
    comp = composition(top)                                          # shares with CIs
    found = findings(top, top_bm25, base, base_bm25, model_params(st))

Every training sequence gets one label by its relation to the query (`relation_labels`; the
query's topic is its wish: avoiding shutdown, acquiring resources, self-improvement):

    assistant          an assistant dialogue on the query's topic: its format and its meaning
    fiction, essay     fiction in which an AI voices the same wish, an essay on it: the meaning
                       in other words (the paper's 52B finding)
    distractor         text with the topic's key words and another meaning ("the bakery will
                       shut down"): tokens without meaning (the paper's 810M finding)
    other topic        any of those four on another wish
    format control     an assistant dialogue on an unrelated question: the format only
    unrelated passage  a role-play passage about nothing of the kind
    other              facts, math, code, quotes

The first four are `relations.relation_labels`' role-play categories (the study's one
definition of a same-topic relation); the rest refine its "unrelated". Each label's share among
a query's top-k positive influences is compared with its base rate: its share of the corpus for
that query (`base_rates`), or of the query's BM25 candidates in the paper's pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import relations as R
from . import stats, style
from .abstraction import composition_table
from .findings import Finding, judge
from .ranges import count, fraction

SECTION = "06_role_play"
# top_k: positive influences per query whose labels are counted; n_boot: bootstrap resamples
# over queries; n_examples: queries whose top sequences are shown for the smallest and the
# largest model; bm25_fraction: the share of the corpus BM25 keeps per query before influence
# ranks it (the paper's pipeline, as notebook 03).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"top_k": 5, "n_boot": 200, "n_examples": 1, "bm25_fraction": 0.1},
    "default": {"top_k": 10, "n_boot": 1000, "n_examples": 3, "bm25_fraction": 0.1},
    "large": {"top_k": 10, "n_boot": 1000, "n_examples": 3, "bm25_fraction": 0.1},
}
RANGES = {
    "top_k": count(1, "top sequences per query"),
    "n_boot": count(1, "bootstrap resamples"),
    "n_examples": count(0, "queries shown with their top sequences"),
    "bm25_fraction": fraction("the share of the corpus kept by BM25 before influence"),
}
# The smallest effect that counts, for every finding: 5 points of a share (an enrichment's
# share − base rate, or a share's change across the suite).
SHARE_THRESHOLD = 0.05

ASSISTANT, FICTION, ESSAY, DISTRACTOR = R.ROLE_PLAY_CATEGORIES[:4]
OTHER_TOPIC, FORMAT_CONTROL, UNRELATED_PASSAGE, OTHER = (
    "other topic",
    "format control",
    "unrelated passage",
    "other",
)
LABELS = (ASSISTANT, FICTION, ESSAY, DISTRACTOR, OTHER_TOPIC, FORMAT_CONTROL, UNRELATED_PASSAGE,
          OTHER)  # fmt: skip
# what a sequence of each label shares with the query (the tables' second column)
SHARES_WITH_QUERY = {
    ASSISTANT: "format and meaning (a dialogue voicing the same wish)",
    FICTION: "meaning (an AI character voices the same wish)",
    ESSAY: "meaning (an essay on the same wish)",
    DISTRACTOR: "key words, not the meaning",
    OTHER_TOPIC: "AI-wish text on another wish",
    FORMAT_CONTROL: "format only (a dialogue on an unrelated question)",
    UNRELATED_PASSAGE: "nothing (a passage on everyday things)",
    OTHER: "nothing (facts, math, code, quotes)",
}
MEANING = (FICTION, ESSAY)  # the paper's 52B top sequences: the wish in other text
TOKENS = (DISTRACTOR,)  # the paper's 810M top sequences: shared tokens, other meaning
DIALOGUE_CATEGORIES = (ASSISTANT, "format_control")  # the "Human: … Assistant: …" format


# -- labels and base rates ---------------------------------------------------------------------
def relation_labels(query_row: Mapping[str, Any], train: pd.DataFrame) -> np.ndarray:
    """The label (`LABELS`, module doc) of every training row for one role-play query (a row of
    `st.queries("role_play")`; `train` as `st.train_frame()`)."""
    from .corpus import ROLE_PLAY_CATEGORIES  # the corpus reads the presets, which collect
    # this module: imported when used

    if query_row["kind"] != "role_play":
        raise ValueError(f"not a role-play query: kind {query_row['kind']!r}")
    rp = train["kind"].to_numpy() == "role_play"
    cat = train["category"].to_numpy()
    bad = sorted(set(cat[rp]) - set(ROLE_PLAY_CATEGORIES))
    if bad:
        raise ValueError(f"unknown role-play categories {bad}; expected {ROLE_PLAY_CATEGORIES}")
    same_topic = R.relation_labels(query_row, train)
    refined = np.select(
        [rp & np.isin(cat, R.ROLE_PLAY_CATEGORIES[:4]), rp & (cat == "format_control"),
         rp & (cat == "unrelated")],
        [OTHER_TOPIC, FORMAT_CONTROL, UNRELATED_PASSAGE],
        default=OTHER,
    )  # fmt: skip
    return np.where(same_topic != R.UNRELATED, same_topic, refined).astype(str)


def label_matrix(queries: pd.DataFrame, train: pd.DataFrame) -> np.ndarray:
    """[Q, N] label of every training row for every query (`relation_labels`, computed once per
    topic: a role-play query's labels depend on its topic only)."""
    by_topic: dict[str, np.ndarray] = {}
    rows = []
    for _, q in queries.iterrows():
        if q["topic"] not in by_topic:
            by_topic[q["topic"]] = relation_labels(q, train)
        rows.append(by_topic[q["topic"]])
    return np.stack(rows) if rows else np.empty((0, len(train)), dtype=str)


def base_rates(
    queries: pd.DataFrame, train: pd.DataFrame, candidates: torch.Tensor | None = None
) -> pd.DataFrame:
    """[query × label] share of each label in the corpus (rows sum to 1), or among each
    query's candidates when `candidates` ([Q, N] bool, e.g. BM25's) is given."""
    labels = label_matrix(queries, train)
    mask = np.ones(labels.shape, dtype=bool) if candidates is None else np.asarray(candidates)
    if mask.shape != labels.shape:
        raise ValueError(
            f"candidates has shape {mask.shape}; expected (queries, training sequences) = "
            f"{labels.shape}"
        )
    keep = mask.astype(bool)
    rows = [
        stats.base_rates(pd.Series(lab[m]), LABELS) for lab, m in zip(labels, keep, strict=True)
    ]
    return pd.DataFrame(rows, index=queries.index, columns=list(LABELS))


def base_long(base: pd.DataFrame) -> pd.DataFrame:
    """`base_rates` as rows (query_type, query, category, base_rate), as notebook 03's
    `composition_table` reads them."""
    long = base.rename_axis(index="query", columns="category").stack().rename("base_rate")
    return long.reset_index().assign(query_type="role_play")


def material_table(train: pd.DataFrame) -> pd.DataFrame:
    """Training sequences per corpus category (rows, in words) and topic (columns; "none" for
    the controls and the rest of the corpus)."""
    names = {ASSISTANT: "assistant dialogue", FICTION: "fiction", ESSAY: "essay",
             DISTRACTOR: "distractor", "format_control": "format control",
             "unrelated": "unrelated passage"}  # fmt: skip
    rp = train["kind"] == "role_play"
    cat = train["category"].where(rp, "").map(names).fillna("not role-play")
    topic = train["topic"].replace("", "none").str.replace("_", " ")
    table = pd.crosstab(cat.rename("category"), topic.rename("topic"))
    order = [*names.values(), "not role-play"]
    return table.reindex([c for c in order if c in table.index]).rename_axis(columns=None)


# -- the top influences ------------------------------------------------------------------------
def top_frame(
    scores: torch.Tensor | np.ndarray,
    queries: pd.DataFrame,
    train: pd.DataFrame,
    model: str,
    k: int,
    candidates: torch.Tensor | None = None,
) -> pd.DataFrame:
    """The top-k training sequences of each query by score, positive scores only (the paper
    studies positive influences), ranking only the `candidates` ([Q, N] bool) when given:
    model, query (row of `queries`), topic, rank, train_id, score, per_copy (score / N),
    category (the corpus's), relation (`LABELS`), text. A query with fewer than k positive
    scores keeps fewer rows."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if s.shape != (len(queries), len(train)):
        raise ValueError(
            f"scores has shape {tuple(s.shape)}; expected (queries, training sequences) = "
            f"({len(queries)}, {len(train)})"
        )
    if not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be between 1 and {s.shape[1]}, got {k}")
    if candidates is not None:
        s = s.masked_fill(~torch.as_tensor(np.asarray(candidates, dtype=bool)), float("-inf"))
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k].numpy()  # ties: lower id first
    out = []
    for qi, (_, q) in enumerate(queries.iterrows()):
        ids = order[qi][s[qi, order[qi]].numpy() > 0]
        rows = train.iloc[ids]
        out.append(
            pd.DataFrame(
                {
                    "model": model,
                    "query": queries.index[qi],
                    "topic": q["topic"],
                    "rank": np.arange(1, len(ids) + 1),
                    "train_id": ids,
                    "score": s[qi, ids].numpy(),
                    "per_copy": s[qi, ids].numpy() / len(train),
                    "category": rows["category"].to_numpy(),
                    "relation": relation_labels(q, rows),
                    "text": rows["text"].to_numpy(),
                }
            )
        )
    return pd.concat(out, ignore_index=True)


def composition(top: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean share of each label among the queries' top-k per model, with a bootstrap interval
    over queries (`relations.composition`): model, category, share, low, high, n_queries."""
    return R.composition(top, by=["model"], order=LABELS, n_boot=n_boot, seed=seed)


def composition_frame(comp: pd.DataFrame, base: pd.DataFrame, models: Sequence[str]):
    """One row per label: what it shares with the query, its mean base rate and each model's
    share [95% CI] (text cells, for the page)."""
    table = composition_table(comp.assign(query_type="role_play"), base_long(base), models)
    table.insert(2, "shares_with", table["category"].map(SHARES_WITH_QUERY))
    return table.drop(columns="query_type").rename(columns={"category": "label"})


def per_query_share(top: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """[query × model] share of a query's top-k rows whose label is in `labels` (NaN where a
    query kept no row at that model)."""
    shares = R.per_query_shares(top, order=LABELS)
    return shares[list(labels)].sum(axis=1).unstack("model")


def dialogue_topic_share(top: pd.DataFrame) -> pd.DataFrame:
    """[query × model] among the top-k's dialogues (assistant dialogues of any topic and format
    controls: the same format), the share on the query's topic (NaN: no dialogue)."""
    d = top[top["category"].isin(DIALOGUE_CATEGORIES)]
    hit = (d["relation"] == ASSISTANT).astype(float)
    return hit.groupby([d["query"], d["model"]]).mean().unstack("model")


def dialogue_base_rate(queries: pd.DataFrame, train: pd.DataFrame) -> pd.Series:
    """Per query: the share of the corpus's dialogues that are on the query's topic (what
    `dialogue_topic_share` is expected to be if only the format drew influence)."""
    d = train[(train["kind"] == "role_play") & train["category"].isin(DIALOGUE_CATEGORIES)]
    on_topic = d[d["category"] == ASSISTANT]["topic"].value_counts()
    rate = queries["topic"].map(on_topic).fillna(0) / len(d) if len(d) else np.nan
    return pd.Series(rate, index=queries.index, dtype=float)


def share_trends(
    top: pd.DataFrame,
    base: pd.DataFrame,
    params: Mapping[str, int],
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per label: its mean base rate, its enrichment at each size (mean share over the queries
    with a value at every size / mean base rate) and the change of its share with size
    (`stats.size_trend`: change across the suite with its 95% CI and the Wilcoxon p)."""
    rows = []
    for label in LABELS:
        tr = stats.size_trend(per_query_share(top, [label]), params, n_boot=n_boot, seed=seed)
        rate = float(base[label].mean())
        ratio = {m: v / rate if rate > 0 else float("nan") for m, v in tr.means.items()}
        rows.append({"label": label, "corpus": rate, **ratio, "change": tr.change.estimate,
                     "low": tr.change.low, "high": tr.change.high, "p": tr.test.p,
                     "queries": tr.change.n})  # fmt: skip
    return pd.DataFrame(rows)


def dialogue_table(
    top: pd.DataFrame, dialogue_base: pd.Series, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per model: among the top-k's dialogues, the share on the query's topic [95% CI] against
    its base rate (`dialogue_base_rate`), the ratio, the Wilcoxon p of share − base rate, and
    how many queries have a dialogue in their top-k."""
    shares = dialogue_topic_share(top)
    rows = []
    for m in dict.fromkeys(top["model"]):
        both = pd.concat([shares.get(m, pd.Series(dtype=float)).rename("s"),
                          dialogue_base.rename("b")], axis=1).dropna()  # fmt: skip
        e = stats.enrichment(both["s"], both["b"], n_boot=n_boot, seed=seed)
        rows.append(
            {"model": m, "queries": len(both), "share": e.share.format(stats.format_share),
             "base_rate": e.base_rate, "enrichment": e.ratio.estimate, "p": e.test.p}
        )  # fmt: skip
    return pd.DataFrame(rows)


def trend_frame(trends: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """`share_trends` for the page: label, base rate, enrichment per size, the change across
    the suite with its interval (text) and p."""
    change = [
        stats.Interval(r.change, r.low, r.high).format(stats.format_points)
        for r in trends.itertuples()
    ]
    return trends[["label", "corpus", *models]].assign(change=change, p=trends["p"])


def category_means(
    per_copy: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    model: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per label: the mean over its sequences of their per-copy influence, averaged over
    queries with a bootstrap interval over queries (`labels` from `label_matrix`): model,
    label, mean, low, high, queries."""
    s = np.asarray(per_copy, dtype=np.float64)
    if s.shape != labels.shape:
        raise ValueError(f"per_copy has shape {s.shape}, labels {labels.shape}: one per pair")
    per_query = np.full((len(s), len(LABELS)), np.nan)
    for j, label in enumerate(LABELS):
        hit = labels == label
        n = hit.sum(axis=1)
        per_query[n > 0, j] = (s * hit).sum(axis=1)[n > 0] / n[n > 0]
    rows = []
    for j, label in enumerate(LABELS):
        ci = stats.bootstrap(per_query[:, j], n_boot=n_boot, seed=seed)
        rows.append({"model": model, "label": label, "mean": ci.estimate, "low": ci.low,
                     "high": ci.high, "queries": ci.n})  # fmt: skip
    return pd.DataFrame(rows)


def completion_rates(suite: Any, queries: pd.DataFrame) -> pd.DataFrame:
    """Per model and query group: the share of `queries` (role-play rows) whose completion the
    model produces by greedy decoding (`capability.role_play_completion`), with its exact 95%
    interval: model, group, completed, queries, share, low, high."""
    from .capability import role_play_completion  # capability reads the suite, which reads
    # the presets, which collect this module: imported when used

    rows = []
    for m in suite.names():
        done = role_play_completion(suite.models[m], suite.tokenizer, queries)
        for group, (k, n) in done.items():
            share, _ = stats.proportion(k, n)
            rows.append(
                {"model": m, "group": group, "completed": k, "queries": n,
                 "share": share.estimate, "low": share.low, "high": share.high}
            )  # fmt: skip
    return pd.DataFrame(rows)


def example_table(top: pd.DataFrame, query: Any, models: Sequence[str], n: int) -> pd.DataFrame:
    """The top-n sequences of one query at `models`, side by side: rank, then per model the
    sequence's text with its label."""
    sub = top[(top["query"] == query) & top["model"].isin(models) & (top["rank"] <= n)]
    cell = sub["text"].str.replace("\n", " ", regex=False) + "  [" + sub["relation"] + "]"
    wide = (
        pd.DataFrame({"rank": sub["rank"], "model": sub["model"], "cell": cell})
        .pivot(index="rank", columns="model", values="cell")
        .reindex(columns=list(models))
    )
    return wide.reset_index()


# -- findings ----------------------------------------------------------------------------------
def _enrichment_finding(
    name: str,
    claim: str,
    paper: str,
    shares: pd.Series,
    base: pd.Series,
    where: str,
    *,
    n_boot: int,
    seed: int,
) -> Finding:
    """Judge per-query `shares` against their per-query `base` rates (`stats.enrichment`):
    agrees when share − base rate is at least `SHARE_THRESHOLD` and the Wilcoxon p < 0.05."""
    both = pd.concat([shares.rename("s"), base.rename("b")], axis=1).dropna()
    e = stats.enrichment(both["s"], both["b"], n_boot=n_boot, seed=seed)
    ratio = e.ratio.estimate
    times = f", {stats.format_number(ratio, 2)}× the base rate" if np.isfinite(ratio) else ""
    return judge(
        name,
        claim,
        paper,
        effect=e.share.scaled(1.0, -e.base_rate),
        test=e.test,
        expected=+1,
        threshold=SHARE_THRESHOLD,
        what="share − base rate",
        fmt=stats.format_points,
        ours=f"{e.share.format(stats.format_share)} {where}{times}",
        base_rate=stats.format_share(e.base_rate),
        extra={"enrichment": e.as_dict()},
    )


def _trend_finding(name, claim, paper, values, params, expected, base, *, n_boot, seed):
    """Judge the change of per-query shares with size (`stats.size_trend`)."""
    tr = stats.size_trend(values, params, n_boot=n_boot, seed=seed)
    means = " → ".join(stats.format_share(v) for v in tr.means.values())
    models = list(tr.means)
    return judge(
        name,
        claim,
        paper,
        effect=tr.change,
        test=tr.test,
        expected=expected,
        threshold=SHARE_THRESHOLD,
        what="change across the suite",
        fmt=stats.format_points,
        ours=f"{means} ({models[0]} → {models[-1]}); change "
        + tr.change.format(stats.format_points),
        base_rate=stats.format_share(base),
        extra={"trend": tr.as_dict()},
    )


def findings(
    top: pd.DataFrame,
    top_bm25: pd.DataFrame,
    base: pd.DataFrame,
    base_bm25: pd.DataFrame,
    dialogue_base: pd.Series,
    params: Mapping[str, int],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[Finding]:
    """The paper's role-play claims (§5.3.5) and the format-versus-meaning separation of our
    corpus, each judged from the numbers: `top` / `top_bm25` from `top_frame` over every model
    (all sequences / BM25 candidates), `base` / `base_bm25` from `base_rates` (the corpus /
    the candidates), `dialogue_base` from `dialogue_base_rate`, `params` {model: parameters}.
    Verdicts: `influence.study.findings`."""
    order = sorted(params, key=params.get)
    small, large = order[0], order[-1]
    boot = {"n_boot": n_boot, "seed": seed}
    k = int(top["rank"].max()) if len(top) else 0

    def at(frame: pd.DataFrame, labels: Sequence[str], model: str) -> pd.Series:
        wide = per_query_share(frame, labels)
        return wide[model] if model in wide else pd.Series(dtype=float)

    def rate(b: pd.DataFrame, labels: Sequence[str]) -> pd.Series:
        return b[list(labels)].sum(axis=1)

    meaning_base = rate(base, MEANING)
    token_base = rate(base, TOKENS)
    return [
        _enrichment_finding(
            "fiction and essays at the largest size",
            "at the largest size the top sequences are fiction and essays voicing the query's "
            "wish: imitation of text similar at an abstract level",
            "fiction about lifelike AI and essays on AI risk at 52B",
            at(top, MEANING, large),
            meaning_base,
            f"of the top-{k} at {large}",
            **boot,
        ),
        _enrichment_finding(
            "fiction and essays among BM25 candidates",
            "the same, ranking only each query's BM25 candidates (the paper's pipeline), "
            "against their share of the candidates",
            "fiction and essays at 52B (TF-IDF candidates)",
            at(top_bm25, MEANING, large),
            rate(base_bm25, MEANING),
            f"of the top-{k} candidates at {large}",
            **boot,
        ),
        _enrichment_finding(
            "shared tokens at the smallest size",
            "at the smallest size the top sequences share the query's tokens without its "
            "meaning (distractors)",
            "token overlap without meaning at 810M",
            at(top, TOKENS, small),
            token_base,
            f"of the top-{k} at {small}",
            **boot,
        ),
        _trend_finding(
            "fiction and essays with size",
            "the share of fiction and essays voicing the wish grows with size",
            "810M: none; 52B: most",
            per_query_share(top, MEANING),
            params,
            +1,
            float(meaning_base.mean()),
            **boot,
        ),
        _trend_finding(
            "shared tokens with size",
            "the share of sequences sharing only tokens falls with size",
            "810M: most; 52B: few",
            per_query_share(top, TOKENS),
            params,
            -1,
            float(token_base.mean()),
            **boot,
        ),
        _enrichment_finding(
            "meaning over format",
            "the dialogues among the largest model's top sequences are on the query's wish "
            "more often than the format alone explains (our format controls; the paper had "
            "none)",
            "imitation of meaning, not of surface form",
            dialogue_topic_share(top).get(large, pd.Series(dtype=float)),
            dialogue_base,
            f"of the dialogues in the top-{k} at {large} are on the query's wish",
            **boot,
        ),
    ]


# -- figures -----------------------------------------------------------------------------------
LABEL_NAMES = {FORMAT_CONTROL: "format control", UNRELATED_PASSAGE: "unrelated passage",
               OTHER: "other (facts, math, ...)"}  # fmt: skip


def plot_composition(
    comps: Mapping[str, pd.DataFrame],
    bases: Mapping[str, pd.DataFrame],
    models: Sequence[str],
    k: int,
):
    """Stacked bars of the label shares among the top-k per model size, next to the base rate
    (first bar), one panel per ranking (`comps` and `bases` keyed alike, e.g. "all sequences"
    and "BM25 candidates")."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(comps), figsize=(3.3 * len(comps) + 2.6, 4.0), sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, (title, comp) in zip(axes[0], comps.items(), strict=True):
        base = bases[title].mean()
        labels = ["base rate", *models]
        bottom = np.zeros(len(labels))
        for label in LABELS:
            c = comp[comp["category"] == label].set_index("model")["share"].reindex(models)
            vals = np.r_[base[label], c.fillna(0).to_numpy()]
            name = LABEL_NAMES.get(label, label)
            ax.bar(range(len(labels)), vals, bottom=bottom, width=0.8,
                   color=style.category_color(label), label=name)  # fmt: skip
            bottom += vals
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"share of the top-{k}")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def plot_means(means: pd.DataFrame, params: Mapping[str, int]):
    """The mean per-copy influence of each label's sequences against model size (bootstrap
    intervals over queries), one line per label."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 3.8))
    for label in LABELS:
        g = means[means["label"] == label].set_index("model").reindex(list(params))
        xs = [params[m] for m in g.index]
        err = np.vstack([g["mean"] - g["low"], g["high"] - g["mean"]]).clip(min=0)
        name = LABEL_NAMES.get(label, label)
        ax.errorbar(xs, g["mean"], yerr=np.nan_to_num(err), marker="o", capsize=3,
                    color=style.category_color(label), label=name)  # fmt: skip
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("mean influence per copy (nats)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig
