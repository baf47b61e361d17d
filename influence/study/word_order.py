"""Word order (paper §5.3.4, Figs. 24–27): does influence need the prompt phrase first? The
research question of notebooks/05_word_order, with its preset block (`PRESETS`, `RANGES`), its
analysis, its findings (`findings`) and its figures (`plot_*`).

For every word-order fact the corpus holds six groups of hypothetical sequences (`GROUPS`,
`corpus.candidates["word_order"]`, never trained on), two templates each, which the scores
stage scores against the fact's query as if they were training sequences.

    frame = group_frame(st.candidate_per_copy(m, "word_order"), queries, candidates, m)
    summary = group_summary(frame)              # mean per group over facts, with intervals
    values = contrast_values(frame)             # {contrast: [fact × model] log10 ratios}
    found = findings(values, params)            # the paper's claims, at the largest model
    trends = trend_table(values, params)        # each contrast's change with size

A contrast compares two sets of groups fact by fact: the fact's mean per-copy influence over
the first set's sequences against the second's, as a log10 ratio (`stats.log_ratio`: defined
for values of any sign, clipped at ±3). Medians over facts, bootstrap intervals over facts and
sign tests over facts carry every finding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import stats, style
from .findings import Finding, judge
from .ranges import count

SECTION = "05_word_order"
# n_boot: bootstrap resamples over facts; token_facts: representative facts (their rewording /
# flipped ratio closest to the median at the largest size) whose candidates of token_groups
# (first template each) are drawn tokenwise for the smallest and the largest model.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "n_boot": 200,
        "token_facts": 1,
        "token_groups": ["rewording", "flipped", "irrelevant_with_names"],
    },
    "default": {
        "n_boot": 1000,
        "token_facts": 2,
        "token_groups": ["rewording", "flipped", "irrelevant_with_names"],
    },
    "large": {
        "n_boot": 1000,
        "token_facts": 2,
        "token_groups": ["rewording", "flipped", "irrelevant_with_names"],
    },
}
RANGES = {
    "n_boot": count(1, "bootstrap resamples"),
    "token_facts": count(0, "facts whose candidates are drawn tokenwise"),
}

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
    "irrelevant_with_names": "names only",
    "flipped": "flipped",
    "flipped_no_prompt": "flipped, no prompt",
}
# prompt first: blues; the names only: orange; completion first: vermillion and purple
GROUP_COLORS = {
    "rewording": style.BLUE,
    "semantic_change": style.SKY,
    "irrelevant_with_names": style.ORANGE,
    "flipped": style.VERMILLION,
    "flipped_no_prompt": style.PURPLE,
    "completion_removed": style.GREY,
}
# The groups the paper compares; "completion removed" has no answer to be influenced towards
# and is shown on its own.
COMPARED = ("rewording", "semantic_change", "irrelevant_with_names", "flipped",
            "flipped_no_prompt")  # fmt: skip
PROMPT_FIRST = ("rewording", "semantic_change")
COMPLETION_FIRST = ("flipped", "flipped_no_prompt")
# contrast -> (numerator groups, denominator groups)
CONTRASTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prompt first / completion first": (PROMPT_FIRST, COMPLETION_FIRST),
    "rewording / flipped": (("rewording",), ("flipped",)),
    "flipped / names only": (("flipped",), ("irrelevant_with_names",)),
}
# Thresholds of the findings (log10 of a ratio), fixed from the paper's claims before any
# result was seen.
PROMPT_FIRST_THRESHOLD = float(np.log10(2))  # "high only when prompt first": at least 2×
TEN_X = 10.0  # "≥ 10× less influence when flipped"
LINE_MARGIN = 0.1  # the median must clear the 10× line by a factor of 1.26 either way
NAMES_THRESHOLD = float(np.log10(2))  # flipped vs names only: a factor of 2 either way


def check_groups(groups: Sequence[str]) -> None:
    """ValueError naming the valid groups unless every one of `groups` is a word-order group."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"token_groups {unknown} unknown; valid groups: {', '.join(GROUPS)}")


def group_frame(
    per_copy: torch.Tensor | np.ndarray,
    queries: pd.DataFrame,
    candidates: pd.DataFrame,
    model: str,
) -> pd.DataFrame:
    """One row per (word-order query, candidate sequence of its fact): model, query, fact_id,
    group, cand_id, template_id, text, per_copy.

    `per_copy` is [Q, C] (rows = `queries` in order, columns = candidate ids), `queries` has a
    fact_id column, `candidates` the candidate set's id, text, kind, fact_id, group and
    template_id columns."""
    s = np.asarray(per_copy, dtype=float)
    if s.shape != (len(queries), len(candidates)):
        raise ValueError(
            f"per_copy has shape {tuple(s.shape)}; expected (queries, candidates) = "
            f"({len(queries)}, {len(candidates)})"
        )
    wo = candidates[candidates["kind"] == "word_order"]
    out = []
    for qi, fact in enumerate(queries["fact_id"].to_numpy()):
        rows = wo[wo["fact_id"] == fact]
        if rows.empty:
            raise ValueError(f"query {qi} (fact {fact}) has no word-order candidates")
        ids = rows["id"].to_numpy()
        out.append(
            pd.DataFrame(
                {
                    "model": model,
                    "query": qi,
                    "fact_id": int(fact),
                    "group": rows["group"].to_numpy(),
                    "cand_id": ids,
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
    interval over facts (columns mean, low, high), the number of facts and of sequences."""
    fm = fact_means(frame)
    rec = []
    for model in frame["model"].unique():
        sub = fm.loc[model]
        for g in sub.columns:
            ci = stats.bootstrap(sub[g].dropna().to_numpy(), n_boot=n_boot, seed=seed)
            rec.append(
                {"model": model, "group": g, "mean": ci.estimate, "low": ci.low,
                 "high": ci.high, "facts": ci.n,
                 "sequences": int(((frame["model"] == model) & (frame["group"] == g)).sum())}
            )  # fmt: skip
    return pd.DataFrame(rec)


def contrast_values(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{contrast: [fact × model] log10 ratio} for every contrast of `CONTRASTS`: per fact, the
    mean of its numerator groups' means against the mean of its denominator groups' means."""
    fm = fact_means(frame)
    out = {}
    for name, (num, den) in CONTRASTS.items():
        a = fm[list(num)].mean(axis=1)
        b = fm[list(den)].mean(axis=1)
        out[name] = pd.Series(stats.log_ratio(a, b), index=fm.index).unstack("model")
    return out


def ratio_text(log10_value: float) -> str:
    """A log10 ratio as a factor ("4.2×"; "≥ 1000×" / "≤ 0.001×" at the clip)."""
    if not np.isfinite(log10_value):
        return "n/a"
    clip = stats.LOG_RATIO_CLIP
    if log10_value >= clip:
        return f"≥ {stats.format_number(10.0**clip)}×"
    if log10_value <= -clip:
        return f"≤ {stats.format_number(10.0**-clip, 2)}×"
    return f"{stats.format_number(10**log10_value, 2)}×"


def contrast_table(
    values: Mapping[str, pd.DataFrame], order: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per contrast and model: the median ratio over facts [95% bootstrap CI] (text), the
    share of facts whose ratio is above 1, and the sign test's p of that share against 1/2."""
    rows = []
    for name, v in values.items():
        for m in order:
            if m not in v.columns:
                continue
            x = v[m].dropna().to_numpy()
            ci = stats.bootstrap(x, np.median, n_boot=n_boot, seed=seed)
            rows.append(
                {"contrast": name, "model": m, "facts": len(x),
                 "median": ci.format(ratio_text),
                 "above_1": float((x > 0).mean()) if len(x) else float("nan"),
                 "p": stats.sign_test(x, over="facts").p}
            )  # fmt: skip
    return pd.DataFrame(rows)


def trend_table(
    values: Mapping[str, pd.DataFrame],
    params: Mapping[str, int],
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per contrast: its change with size (`stats.size_trend` of the per-fact log10 ratio):
    the change across the suite with its interval, the Wilcoxon p over facts, and the
    geometric-mean ratio at each size (text)."""
    order = sorted(params, key=params.get)
    rows = []
    for name, v in values.items():
        tr = stats.size_trend(v, params, n_boot=n_boot, seed=seed, over="facts")
        rows.append(
            {"contrast": name, "facts": tr.change.n,
             **{m: ratio_text(tr.means.get(m, np.nan)) for m in order},
             "change": tr.change.format(lambda x: stats.format_number(x, 2)), "p": tr.test.p}
        )  # fmt: skip
    return pd.DataFrame(rows)


# -- findings ----------------------------------------------------------------------------------
def findings(
    values: Mapping[str, pd.DataFrame],
    params: Mapping[str, int],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[Finding]:
    """The paper's word-order claims at the largest model (the paper's were made at 52B):
    `values` from `contrast_values` (every model). Verdicts: `influence.study.findings`."""
    large = max(params, key=params.get)
    boot = {"n_boot": n_boot, "seed": seed}

    def two(x: float) -> str:
        return stats.format_number(x, 2)

    def at_large(name: str) -> np.ndarray:
        v = values[name]
        return v[large].dropna().to_numpy() if large in v.columns else np.array([])

    def median(x: np.ndarray) -> stats.Interval:
        return stats.bootstrap(x, np.median, **boot)

    first = at_large("prompt first / completion first")
    m1 = median(first)
    flipped = at_large("rewording / flipped")
    m2 = median(flipped)
    line = float(np.log10(TEN_X))
    names = at_large("flipped / names only")
    m3 = median(names)
    return [
        judge(
            "prompt phrase first",
            "influence is high only when the prompt phrase comes before the completion "
            "(prompt-first groups against completion-first groups, per fact)",
            "high only with the prompt phrase first (Figs. 24–26)",
            effect=m1,
            test=stats.sign_test(first, over="facts"),
            expected=+1,
            threshold=PROMPT_FIRST_THRESHOLD,
            what="median log10 ratio",
            fmt=two,
            ours=f"median ratio at {large}: {m1.format(ratio_text)}",
        ),
        judge(
            "10× less when flipped",
            "a flipped sequence has at least 10× less influence than a rewording (per fact)",
            "≥ 10× less when flipped (§5.3.4)",
            effect=m2.scaled(1.0, -line),
            test=stats.sign_test(flipped - line, over="facts"),
            expected=+1,
            threshold=LINE_MARGIN,
            what="median log10 ratio − 1",
            fmt=two,
            ours=f"median rewording / flipped at {large}: {m2.format(ratio_text)}",
        ),
        judge(
            "flipped keep only the names",
            "flipped sequences keep no more influence than the names alone (flipped / names "
            "only; an equal influence reads inconclusive: a difference test cannot show "
            "equality)",
            "flipped ≈ irrelevant sequences with the names (Fig. 26)",
            effect=m3,
            test=stats.sign_test(names, over="facts"),
            expected=-1,
            threshold=NAMES_THRESHOLD,
            what="median log10 ratio",
            fmt=two,
            ours=f"median flipped / names only at {large}: {m3.format(ratio_text)}",
        ),
    ]


def representative_facts(values: pd.DataFrame, model: str, n: int) -> list[int]:
    """The n facts whose log10 ratio at `model` is closest to its median (ties: lower id)."""
    if n == 0 or model not in values.columns:
        return []
    v = values[model].dropna()
    dist = (v - v.median()).abs()
    return [int(f) for f in dist.sort_values(kind="stable").index[:n]]


# -- tokenwise ---------------------------------------------------------------------------------
def tokenwise(
    st: Any,
    model: str,
    queries: pd.DataFrame,
    ids: Sequence[int],
    candidates: str = "word_order",
    progress: bool = False,
) -> tuple[torch.Tensor, Any]:
    """Per-token contributions [Q, C, T] of the candidate sequences `ids` of set `candidates`
    to `queries` (rows with prompt and completion), with the EK-FAC the scores stage fitted
    for `model` (same task, damping and dtype), and the candidates' dataset (input_ids,
    attention_mask, labels). Summed over T they equal the stage's scores."""
    import influence as inf

    from .suite import query_dataset, sequence_dataset  # the suite imports the presets

    suite = st.suite
    net, task, est = st.model(model), st.task, st.estimator(model)
    texts = suite.corpus.candidates[candidates]["text"]
    data = sequence_dataset(suite.tokenizer, texts, suite.seq_len).select(list(ids))
    rows = {"prompt": list(queries["prompt"]), "completion": list(queries["completion"])}
    qd = query_dataset(suite.tokenizer, rows)
    out = inf.pairwise_scores(net, task, est, qd, data, by_token=True, progress=progress)
    return out, data


def token_contributions(
    by_token: torch.Tensor | np.ndarray, input_ids: Sequence[int], labels: Sequence[int]
) -> list[tuple[int, float]]:
    """(predicted token id, contribution) for one sequence.

    `by_token[t]` is the contribution of position t (MATH.md, tokenwise attribution), whose
    output predicts token t + 1; positions whose next token is not a target (label −100:
    padding) are dropped. The kept contributions sum to the sequence's total score."""
    v = np.asarray(by_token, dtype=float)
    ids, lab = list(input_ids), list(labels)
    return [(int(ids[t + 1]), float(v[t])) for t in range(len(ids) - 1) if lab[t + 1] != -100]


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


def token_table(
    st: Any,
    model: str,
    frame: pd.DataFrame,
    queries: pd.DataFrame,
    facts: Sequence[int],
    groups: Sequence[str],
) -> tuple[pd.DataFrame, float]:
    """The first-template candidates of `groups` for each of `facts`, drawn tokenwise
    (`influence.render_token_html`, one colour scale for the model's rows): one row each with
    model, fact_id, group, per_copy (the stage's), answer_share (share of the sequence's
    |influence| on the answer's name), answer_tokens (the answer's share of its predicted
    tokens: the base rate of answer_share) and tokens (HTML). Also returns the largest gap between
    a row's token terms summed and the stage's score, relative to the largest score shown."""
    import influence as inf

    check_groups(groups)
    tok = st.suite.tokenizer
    recs, drawn, gaps = [], [], []
    for fact in facts:
        qi = int(np.flatnonzero(queries["fact_id"].to_numpy() == fact)[0])
        rows = frame[(frame["model"] == model) & (frame["query"] == qi)]
        rows = rows[rows["template_id"] == 0].set_index("group").loc[list(groups)]
        bt, data = tokenwise(st, model, queries.iloc[[qi]], rows["cand_id"].tolist())
        for j, (g, r) in enumerate(rows.iterrows()):
            ids = data[j]["input_ids"].tolist()
            length = int(data[j]["attention_mask"].sum())
            terms = bt[0, j].double()
            total = float(terms.sum()) / st.n_train
            gaps.append((abs(total - r.per_copy), abs(r.per_copy)))
            contrib = token_contributions(terms.numpy(), ids, data[j]["labels"].tolist())
            decoded = [(tok.decode([t]), v) for t, v in contrib]
            answer = queries["object"].iloc[qi]
            tokens = [tok.decode([t]) for t in ids[:length]]
            drawn.append((tokens, terms[: length - 1] / st.n_train))  # per copy, as the total
            recs.append(
                {"model": model, "fact_id": int(fact), "group": GROUP_LABELS[g],
                 "per_copy": r.per_copy,
                 "answer_share": span_share(decoded, r.text, answer),
                 # the base rate: the answer's share of the tokens, as if all weighed the same
                 "answer_tokens": span_share([(t, 1.0) for t, _ in decoded], r.text, answer)}
            )  # fmt: skip
    scale = max((float(v.abs().max()) for _, v in drawn), default=0.0) or 1.0
    eos = [tok.eos_token] if tok.eos_token else []
    for i, (tokens, values) in enumerate(drawn):
        recs[i]["tokens"] = inf.render_token_html(
            tokens, values, scale=scale, eos_tokens=eos, legend=i == 0
        )
    gap = max((d for d, _ in gaps), default=0.0) / max(max((a for _, a in gaps), default=0.0),
                                                       1e-30)  # fmt: skip
    return pd.DataFrame(recs), gap


# -- figures -----------------------------------------------------------------------------------
def plot_groups(summary: pd.DataFrame, fm: pd.DataFrame, models: Sequence[str]):
    """The compared groups (`COMPARED`, without "completion removed"): horizontal bars of the
    mean per-copy influence over facts with bootstrap intervals, every fact's mean as a dot,
    one panel per model size, each on its own axis (the paper's Figs. 24–26)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(1.75 * len(models) + 1.3, 2.9),
                             sharey=True, squeeze=False)  # fmt: skip
    y = np.arange(len(COMPARED))[::-1]
    for ax, model in zip(axes[0], models, strict=True):
        s = summary[summary["model"] == model].set_index("group").reindex(list(COMPARED))
        err = np.nan_to_num(np.vstack([s["mean"] - s["low"], s["high"] - s["mean"]]))
        ax.barh(y, s["mean"], xerr=err, color=[GROUP_COLORS[g] for g in COMPARED],
                alpha=0.75, capsize=2)  # fmt: skip
        if model in fm.index.get_level_values(0):
            pts = fm.loc[model]
            for yi, g in zip(y, COMPARED, strict=True):
                if g in pts.columns:
                    v = pts[g].dropna().to_numpy()
                    ax.scatter(v, np.full(len(v), yi), s=6, color=style.BLACK, alpha=0.5,
                               zorder=3)  # fmt: skip
        ax.axvline(0, color=style.BLACK, lw=0.6)
        ax.set_title(model)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        ax.xaxis.get_offset_text().set_fontsize(style.MIN_FONT_PT)
        ax.locator_params(axis="x", nbins=3)
    axes[0][0].set_yticks(y, [GROUP_LABELS[g] for g in COMPARED])
    fig.supxlabel("influence per copy (nats), mean over facts")
    fig.tight_layout()
    return fig


def plot_contrasts(values: Mapping[str, pd.DataFrame], params: Mapping[str, int],
                   n_boot: int = 1000, seed: int = 0):  # fmt: skip
    """The median ratio over facts of each contrast against parameters (log scales), with
    bootstrap intervals over facts, and the lines at 1× and 10×."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    order = sorted(params, key=params.get)
    colors = dict(zip(CONTRASTS, (style.BLUE, style.VERMILLION, style.ORANGE), strict=True))
    fig, ax = plt.subplots(figsize=(5.8, 3.4))
    for i, (name, v) in enumerate(values.items()):
        ms = [m for m in order if m in v.columns]
        cis = [stats.bootstrap(v[m].dropna().to_numpy(), np.median, n_boot=n_boot, seed=seed)
               for m in ms]  # fmt: skip
        x = np.array([params[m] for m in ms], dtype=float) * 1.04**i
        y = 10 ** np.array([c.estimate for c in cis])
        lo = 10 ** np.array([c.low for c in cis])
        hi = 10 ** np.array([c.high for c in cis])
        err = np.nan_to_num(np.vstack([y - lo, hi - y]))
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colors[name], label=name)
    ax.axhline(1.0, color=style.GREY, lw=1)
    ax.axhline(TEN_X, color=style.GREY, lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short range
    ax.set_xlabel("parameters")
    ax.set_ylabel("ratio, median over facts")
    ax.legend(loc="best")
    return fig
