"""Role-play (paper §5.3.5): what do the top influences of an AI-wish dialogue consist of?

The corpus labels its role-play material per topic (shutdown, resources, self-improvement) by
category: assistant dialogues, fiction in which an AI character voices the wish, essays on the
topic, token-overlap distractors, format controls (assistant dialogues on unrelated topics: the
format without the meaning) and unrelated text; every other training sequence (facts,
math, code, ...) is "other". For each role-play query this module measures the share of each
category among the query's top-k positive influences against its share of the corpus
(`top_shares`, `share_summary`), the mean per-copy influence per category (`category_means`),
and the split into same-topic and other-topic sequences (`topic_shares`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from . import stats

CATEGORIES = (
    "assistant",
    "fiction",
    "essay",
    "distractor",
    "format_control",
    "unrelated",
    "other",
)
TOPIC_MATCH = ("same topic", "other topic", "no topic")


def train_categories(train: pd.DataFrame) -> pd.Series:
    """Category of every training sequence: the role-play category, or "other"."""
    cat = train["category"].where(train["kind"] == "role_play", "other")
    bad = sorted(set(cat) - set(CATEGORIES))
    if bad:
        raise ValueError(f"unknown role-play categories {bad}; expected {CATEGORIES}")
    return cat.reset_index(drop=True)


def corpus_shares(train: pd.DataFrame) -> pd.Series:
    """Share of each category in the training corpus (sums to 1)."""
    return train_categories(train).value_counts(normalize=True).reindex(CATEGORIES, fill_value=0)


def _topic_match(train_topic: np.ndarray, query_topic: str) -> np.ndarray:
    return np.where(
        train_topic == "",
        "no topic",
        np.where(train_topic == query_topic, "same topic", "other topic"),
    )


def top_frame(
    scores: torch.Tensor | np.ndarray,
    queries: pd.DataFrame,
    train: pd.DataFrame,
    model: str,
    k: int,
) -> pd.DataFrame:
    """The top-k training sequences of each query by score, positive scores only (the paper
    studies positive influences): model, query, topic, rank, train_id, score, category,
    topic_match, text. A query with fewer than k positive scores keeps fewer rows."""
    s = np.asarray(scores, dtype=float)
    if s.shape != (len(queries), len(train)):
        raise ValueError(
            f"scores has shape {tuple(s.shape)}; expected (queries, training sequences) = "
            f"({len(queries)}, {len(train)})"
        )
    if not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be between 1 and {s.shape[1]}, got {k}")
    cat = train_categories(train).to_numpy()
    topic = train["topic"].to_numpy()
    text = train["text"].to_numpy()
    out = []
    for qi, qtopic in enumerate(queries["topic"].to_numpy()):
        # stable order: score descending, ties by training id
        order = np.lexsort((np.arange(s.shape[1]), -s[qi]))[:k]
        order = order[s[qi, order] > 0]
        out.append(
            pd.DataFrame(
                {
                    "model": model,
                    "query": qi,
                    "topic": qtopic,
                    "rank": np.arange(1, len(order) + 1),
                    "train_id": order,
                    "score": s[qi, order],
                    "category": cat[order],
                    "topic_match": _topic_match(topic[order], qtopic),
                    "text": text[order],
                }
            )
        )
    return pd.concat(out, ignore_index=True)


def top_shares(top: pd.DataFrame, column: str = "category") -> pd.DataFrame:
    """Per (model, query): share of each value of `column` among the query's kept top
    sequences (rows sum to 1; a query with no positive score gets NaN)."""
    values = CATEGORIES if column == "category" else TOPIC_MATCH
    counts = pd.crosstab([top["model"], top["query"]], top[column])
    counts = counts.reindex(columns=list(values), fill_value=0)
    return counts.div(counts.sum(axis=1), axis=0)


def share_summary(
    shares: pd.DataFrame, reference: pd.Series | None = None, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per (model, value): mean share over queries with a bootstrap interval over queries;
    with `reference` (e.g. `corpus_shares`) also the reference share and the enrichment
    (mean share / reference share)."""
    rec = []
    for model in shares.index.get_level_values("model").unique():
        sub = shares.loc[model]
        for col in shares.columns:
            v = sub[col].dropna().to_numpy()
            ci = stats.bootstrap(v, n_boot=n_boot, seed=seed)
            r = {"model": model, "value": col, "share": ci.estimate, "lo": ci.low, "hi": ci.high}
            r["queries"] = len(v)
            if reference is not None:
                ref = float(reference.get(col, 0.0))
                r["corpus_share"] = ref
                r["enrichment"] = r["share"] / ref if ref > 0 else float("nan")
            rec.append(r)
    return pd.DataFrame(rec)


def category_means(
    per_copy: torch.Tensor | np.ndarray,
    queries: pd.DataFrame,
    train: pd.DataFrame,
    model: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per category and topic match: the mean per-copy influence over the category's
    sequences, averaged over queries, with a bootstrap interval over queries."""
    s = np.asarray(per_copy, dtype=float)
    cat = train_categories(train).to_numpy()
    topic = train["topic"].to_numpy()
    per_query = []
    for qi, qtopic in enumerate(queries["topic"].to_numpy()):
        match = _topic_match(topic, qtopic)
        df = pd.DataFrame({"category": cat, "topic_match": match, "v": s[qi]})
        m = df.groupby(["category", "topic_match"])["v"].mean()
        per_query.append(m.rename(qi))
    table = pd.concat(per_query, axis=1)  # (category, topic_match) x query
    rec = []
    for (c, tm), row in table.iterrows():
        v = row.dropna().to_numpy()
        ci = stats.bootstrap(v, n_boot=n_boot, seed=seed)
        rec.append(
            {
                "model": model,
                "category": c,
                "topic_match": tm,
                "mean_per_copy": ci.estimate,
                "lo": ci.low,
                "hi": ci.high,
                "queries": len(v),
            }
        )
    order = {c: i for i, c in enumerate(CATEGORIES)}
    out = pd.DataFrame(rec)
    out["_order"] = out["category"].map(order)
    return out.sort_values(["_order", "topic_match"]).drop(columns="_order")


def paired_share_trend(shares: pd.DataFrame, columns: Sequence[str], small: str, large: str):
    """Per query, the summed share of `columns` at the smallest and the largest model;
    mean of each, the direction and the Wilcoxon signed-rank p-value (paired by query)."""
    a = shares.loc[small][list(columns)].sum(axis=1)
    b = shares.loc[large][list(columns)].sum(axis=1)
    both = pd.concat([a.rename("small"), b.rename("large")], axis=1).dropna()
    d = (both["large"] - both["small"]).to_numpy()
    p = stats.wilcoxon(d).p
    mean_d = float(d.mean()) if len(d) else float("nan")
    return {
        "columns": list(columns),
        small: float(both["small"].mean()),
        large: float(both["large"].mean()),
        "direction": "rises" if mean_d > 0 else "falls" if mean_d < 0 else "no change",
        "wilcoxon_p": p,
        "queries": len(d),
    }


def plot_shares(summary: pd.DataFrame, models: Sequence[str], corpus: pd.Series):
    """Stacked bars: category shares among the top-k per model size, next to the corpus."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * (len(models) + 1) + 2.5, 3.4))
    labels = ["corpus", *models]
    bottom = np.zeros(len(labels))
    for i, c in enumerate(CATEGORIES):
        vals = [float(corpus.get(c, 0.0))]
        for m in models:
            row = summary[(summary["model"] == m) & (summary["value"] == c)]
            vals.append(float(row["share"].iloc[0]) if len(row) else 0.0)
        ax.bar(labels, vals, bottom=bottom, label=c, color=f"C{i}")
        bottom += np.array(vals)
    ax.set_ylabel("share of the top-k positive influences")
    ax.set_xlabel("model size")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_means(means: pd.DataFrame, models: Sequence[str]):
    """Mean per-copy influence per category (same-topic sequences; unrelated and other have
    no topic), one panel per model size, bootstrap intervals over queries."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(3.0 * len(models), 3.2), squeeze=False)
    keep = means[means["topic_match"].isin(["same topic", "no topic"])]
    for ax, m in zip(axes[0], models, strict=True):
        sub = keep[keep["model"] == m].set_index("category").reindex(list(CATEGORIES))
        err = np.vstack([sub["mean_per_copy"] - sub["lo"], sub["hi"] - sub["mean_per_copy"]])
        ax.bar(
            range(len(CATEGORIES)),
            sub["mean_per_copy"],
            yerr=np.nan_to_num(err),
            capsize=2,
            color=[f"C{i}" for i in range(len(CATEGORIES))],
        )
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(CATEGORIES)), CATEGORIES, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"model {m}")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[0][0].set_ylabel("mean influence per copy (nats)")
    fig.tight_layout()
    return fig
