"""Word order (paper §5.3.4, Figs. 24–27): does influence need the prompt phrase first?

For every word-order fact the corpus holds six groups of hypothetical sequences (`GROUPS`,
`corpus.candidates["word_order"]`, never trained on). Given the per-copy scores of the
word-order queries against them (`st.candidate_per_copy`), this module collects
each fact's group sequences (`group_frame`), averages them per group with bootstrap intervals
over facts (`group_summary`), forms the ratio of prompt-first rewordings to flipped sequences
(`flipped_ratio`), compares flipped with "irrelevant with names" (`flipped_vs_names`), and draws
bars per group per size and tokenwise heatmaps (`token_html`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import stats

GROUPS = (
    "rewording",
    "completion_removed",
    "semantic_change",
    "irrelevant_with_names",
    "flipped",
    "flipped_no_prompt",
)
GROUP_LABELS = {
    "rewording": "rewording",
    "completion_removed": "completion removed",
    "semantic_change": "semantic change",
    "irrelevant_with_names": "irrelevant, names",
    "flipped": "flipped",
    "flipped_no_prompt": "flipped, no prompt",
}


def group_frame(
    per_copy: torch.Tensor | np.ndarray, queries: pd.DataFrame, train: pd.DataFrame, model: str
) -> pd.DataFrame:
    """One row per (word-order query, training sequence of its fact's word-order groups):
    model, query, fact_id, group, train_id, template_id, text, per_copy.

    `per_copy` is [Q, N] (rows = `queries` in order, columns = training ids), `queries` has a
    fact_id column, `train` the corpus's id, text, kind, fact_id, group, template_id columns."""
    s = np.asarray(per_copy, dtype=float)
    if s.shape != (len(queries), len(train)):
        raise ValueError(
            f"per_copy has shape {tuple(s.shape)}; expected (queries, training sequences) = "
            f"({len(queries)}, {len(train)})"
        )
    wo = train[train["kind"] == "word_order"]
    out = []
    for qi, fact in enumerate(queries["fact_id"].to_numpy()):
        rows = wo[wo["fact_id"] == fact]
        if rows.empty:
            raise ValueError(f"query {qi} (fact {fact}) has no word-order training sequences")
        ids = rows["id"].to_numpy()
        out.append(
            pd.DataFrame(
                {
                    "model": model,
                    "query": qi,
                    "fact_id": int(fact),
                    "group": rows["group"].to_numpy(),
                    "train_id": ids,
                    "template_id": rows["template_id"].to_numpy(),
                    "text": rows["text"].to_numpy(),
                    "per_copy": s[qi, ids],
                }
            )
        )
    return pd.concat(out, ignore_index=True)


def fact_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean per-copy influence of each group for each (model, fact): index (model, fact_id),
    one column per group in `GROUPS` order."""
    t = frame.pivot_table(index=["model", "fact_id"], columns="group", values="per_copy")
    return t.reindex(columns=[g for g in GROUPS if g in t.columns])


def group_summary(frame: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per model and group: mean over facts of the fact's group mean, with a bootstrap
    interval over facts, the number of facts and of sequences."""
    fm = fact_means(frame)
    rec = []
    for model in frame["model"].unique():
        sub = fm.loc[model]
        for g in sub.columns:
            v = sub[g].dropna().to_numpy()
            ci = stats.bootstrap(v, n_boot=n_boot, seed=seed)
            rec.append(
                {
                    "model": model,
                    "group": g,
                    "mean": ci.estimate,
                    "lo": ci.low,
                    "hi": ci.high,
                    "facts": len(v),
                    "sequences": int(((frame["model"] == model) & (frame["group"] == g)).sum()),
                }
            )
    return pd.DataFrame(rec)


def _ratio_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    den = np.mean(b, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, np.mean(a, axis=axis) / den, np.nan)


def flipped_ratio(
    frame: pd.DataFrame,
    numerator: str = "rewording",
    denominator: str = "flipped",
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per model: mean(numerator group) / mean(denominator group) over facts (a ratio of
    means: a single fact's flipped mean can be near zero or negative), a bootstrap interval
    over facts, the share of facts whose numerator mean exceeds the denominator mean, and the
    two-sided sign-test p-value of that share against 1/2."""
    fm = fact_means(frame)
    rec = []
    for model in frame["model"].unique():
        sub = fm.loc[model][[numerator, denominator]].dropna()
        x = sub.to_numpy()
        wins = int((x[:, 0] > x[:, 1]).sum())
        ci = stats.bootstrap((x[:, 0], x[:, 1]), _ratio_of_means, n_boot=n_boot, seed=seed)
        rec.append(
            {
                "model": model,
                "numerator": float(x[:, 0].mean()),
                "denominator": float(x[:, 1].mean()),
                "ratio": ci.estimate,
                "lo": ci.low,
                "hi": ci.high,
                "facts": len(x),
                "share_numerator_higher": wins / len(x) if len(x) else float("nan"),
                "sign_test_p": stats.sign_test(x[:, 0] - x[:, 1], over="facts").p,
            }
        )
    return pd.DataFrame(rec)


def flipped_vs_names(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model: flipped vs irrelevant-with-names per fact: both means over facts, the mean
    of their difference and the Wilcoxon signed-rank p-value (two-sided; NaN under 2 facts or
    when every difference is 0). The paper: flipped sequences keep only the names' share."""
    return paired_groups(frame, "flipped", "irrelevant_with_names")


def paired_groups(frame: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    fm = fact_means(frame)
    rec = []
    for model in frame["model"].unique():
        sub = fm.loc[model][[a, b]].dropna()
        d = (sub[a] - sub[b]).to_numpy()
        p = stats.wilcoxon(d, over="facts").p
        rec.append(
            {
                "model": model,
                a: float(sub[a].mean()),
                b: float(sub[b].mean()),
                "difference": float(d.mean()) if len(d) else float("nan"),
                "facts": len(d),
                "wilcoxon_p": p,
            }
        )
    return pd.DataFrame(rec)


def normalised_gap(frame: pd.DataFrame, a: str = "rewording", b: str = "flipped") -> pd.DataFrame:
    """Per (model, fact): (a − b) / (|a| + |b|) in [−1, 1]; scale-free, so comparable across
    model sizes whose per-copy scores differ in magnitude. Index fact_id, one column per model."""
    fm = fact_means(frame)
    g = (fm[a] - fm[b]) / (fm[a].abs() + fm[b].abs())
    return g.unstack("model")


def size_trend(gap: pd.DataFrame, small: str, large: str) -> dict:
    """Paired comparison of a per-fact value between the smallest and the largest model:
    mean of each, the direction ("rises"/"falls"/"no change") and the Wilcoxon p-value."""
    sub = gap[[small, large]].dropna()
    d = (sub[large] - sub[small]).to_numpy()
    p = stats.wilcoxon(d, over="facts").p
    mean_d = float(d.mean()) if len(d) else float("nan")
    word = "rises" if mean_d > 0 else "falls" if mean_d < 0 else "no change"
    return {
        "small": small,
        "large": large,
        small: float(sub[small].mean()),
        large: float(sub[large].mean()),
        "direction": word,
        "wilcoxon_p": p,
        "facts": len(d),
    }


def plot_groups(frame: pd.DataFrame, summary: pd.DataFrame, models: Sequence[str]):
    """Bars per group (mean over facts, bootstrap interval) with every sequence as a dot,
    one panel per model size (the paper's Figs. 24–26)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.4), squeeze=False)
    x = np.arange(len(GROUPS))
    rng = np.random.default_rng(0)
    for ax, model in zip(axes[0], models, strict=True):
        s = summary[summary["model"] == model].set_index("group").reindex(list(GROUPS))
        # prompt first: blue; the names only / no completion: orange; flipped: red
        colors = [
            "C3"
            if g.startswith("flipped")
            else "C0"
            if g in ("rewording", "semantic_change")
            else "C1"
            for g in GROUPS
        ]
        err = np.vstack([s["mean"] - s["lo"], s["hi"] - s["mean"]])
        ax.bar(x, s["mean"], color=colors, alpha=0.6, yerr=np.nan_to_num(err), capsize=2)
        pts = frame[frame["model"] == model]
        for i, g in enumerate(GROUPS):
            v = pts.loc[pts["group"] == g, "per_copy"].to_numpy()
            ax.scatter(i + rng.uniform(-0.2, 0.2, len(v)), v, s=4, color="k", alpha=0.4)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(x, [GROUP_LABELS[g] for g in GROUPS], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"model {model}")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[0][0].set_ylabel("influence per copy (nats)")
    fig.tight_layout()
    return fig


def token_contributions(
    by_token: torch.Tensor | np.ndarray, input_ids: Sequence[int], labels: Sequence[int]
) -> list[tuple[int, float]]:
    """(predicted token id, contribution) for one training sequence.

    `by_token[t]` is the contribution of position t (MATH.md, tokenwise attribution), whose
    output predicts token t + 1; positions whose next token is not a target (label −100:
    padding) are dropped. The kept contributions sum to the sequence's total score."""
    v = np.asarray(by_token, dtype=float)
    ids, lab = list(input_ids), list(labels)
    out = []
    for t in range(len(ids) - 1):
        if lab[t + 1] != -100:
            out.append((int(ids[t + 1]), float(v[t])))
    return out


def token_html(
    rows: Sequence[tuple[str, Sequence[tuple[str, float]]]], scale: float | None = None
) -> str:
    """An HTML table, one row per sequence: its caption, then its tokens as text on a
    diverging background (red = helpful/positive, blue = harmful), white at 0, saturated at
    ±`scale` (default: the largest |value| over all rows)."""
    vals = [abs(v) for _, toks in rows for _, v in toks]
    scale = scale or (max(vals) if vals and max(vals) > 0 else 1.0)
    out = ['<table style="border-collapse:collapse;font-family:monospace;font-size:12px">']
    for caption, toks in rows:
        cells = []
        for tok, v in toks:
            a = max(-1.0, min(1.0, v / scale))
            if a >= 0:
                rgb = (255, int(255 * (1 - a)), int(255 * (1 - a)))
            else:
                rgb = (int(255 * (1 + a)), int(255 * (1 + a)), 255)
            text = html.escape(tok).replace(" ", "&nbsp;") or "&nbsp;"
            cells.append(
                f'<span style="background:rgb{rgb};padding:1px 0" title="{v:.3g}">{text}</span>'
            )
        out.append(
            f'<tr><td style="text-align:left;padding:2px 8px;white-space:nowrap">'
            f'{html.escape(caption)}</td><td style="text-align:left">{"".join(cells)}</td></tr>'
        )
    out.append("</table>")
    return "".join(out)


def tokenwise(
    st,
    model: str,
    queries: pd.DataFrame,
    train_ids: Sequence[int],
    progress: bool = False,
    candidates: str | None = None,
) -> tuple[torch.Tensor, Any]:
    """Per-token contributions [Q, N, T] of the training sequences `train_ids` (or, with
    `candidates`, of those rows of that candidate set) to `queries` (rows with prompt and
    completion), with the EK-FAC estimator that the scores stage fitted for `model` (loaded
    from its cache entry, same task, damping and dtype), and the subset (torch dataset with
    input_ids and labels). Summed over T they equal the stage's total scores."""
    import influence as inf

    from .suite import query_dataset, sequence_dataset, train_dataset

    suite = st.suite
    net, task, est = st.model(model), st.task, st.estimator(model)
    if candidates is None:
        train = train_dataset(suite, suite.corpus)
    else:
        texts = suite.corpus.candidates[candidates]["text"]
        train = sequence_dataset(suite.tokenizer, texts, suite.seq_len)
    train = train.select(list(train_ids))
    rows = {"prompt": list(queries["prompt"]), "completion": list(queries["completion"])}
    qd = query_dataset(suite.tokenizer, rows)
    out = inf.pairwise_scores(net, task, est, qd, train, by_token=True, progress=progress)
    return out, train


def span_share(contrib: Sequence[tuple[str, float]], text: str, span: str) -> float:
    """Share of a sequence's total |contribution| that sits on the tokens overlapping the
    first occurrence of `span` in `text`. `contrib` is (decoded token, value) for the
    predicted tokens in order (as from `token_contributions`), whose strings concatenate to
    `text` followed by special tokens. NaN if `span` is absent or every value is 0."""
    start = text.find(span)
    total = sum(abs(v) for _, v in contrib)
    if start < 0 or total == 0:
        return float("nan")
    end, pos, inside = start + len(span), 0, 0.0
    for tok, v in contrib:
        if pos < end and pos + len(tok) > start:
            inside += abs(v)
        pos += len(tok)
    return inside / total
