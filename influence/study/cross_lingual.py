"""Cross-lingual generalisation (paper §5.3.1, Figs. 15–16): the research question of
notebooks/04_cross_lingual, with its preset block (`PRESETS`, `RANGES`), its analysis, its
findings (`findings`) and its figures (`plot_*`).

    tr = translation_protocol(st, model, n_top=10)   # the paper's protocol, per query × target
    pairs = pair_table(tr)                           # median log-ratio per language pair
    own = own_sequence_table(st, model, k=10)        # one-language facts asked in another
    found = findings(tr_all_models, own_all_models, params)

Names: every fact's names are either spelled per language ("localized") or the same in every
language ("shared", the control set; corpus column `names`). Every measure is split by it, so
the share of cross-lingual influence that rides identical name tokens is visible; the paper's
claims are tested on the localized facts, the shared ones are the control.

The paper's protocol: for a query about a fact stated in every language, its top-`n_top`
training sequences in the query's own language are scored against the query's translations
(the corpus's queries of the same fact in the other languages, with their own names). The
ratio translated / original of the summed per-copy influence on those sequences is read on a
log scale (`stats.log_ratio`: log10, clipped at ±3, a translation with no positive influence
at −3); the headline is its median over queries with a bootstrap interval over queries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import stats, style
from .findings import Finding, judge
from .ranges import count

SECTION = "04_cross_lingual"
# k: top-k of a one-language fact asked in another language, whose share of the fact's own
# statements is counted; n_top: the original query's top sequences in its own language scored
# against its translations (the paper: 10); max_per_language: queries per source language and
# name set rescored by the protocol (taken in corpus order among the scored facts queries);
# n_boot: bootstrap resamples over queries.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {"k": 10, "n_top": 10, "max_per_language": 4, "n_boot": 500},
    "default": {"k": 10, "n_top": 10, "max_per_language": 12, "n_boot": 1000},
    "large": {"k": 10, "n_top": 10, "max_per_language": 32, "n_boot": 1000},
}
RANGES = {
    "k": count(1, "top sequences per cross-lingual query"),
    "n_top": count(1, "top sequences of the original query scored against its translations"),
    "max_per_language": count(1, "queries rescored per source language and name set"),
    "n_boot": count(1, "bootstrap resamples"),
}
LANGS = ("en", "fr", "de")
NAME_SETS = ("localized", "shared")  # the tested set, then the control
NAME_LABELS = {"localized": "names per language", "shared": "same names (control)"}
# Thresholds of the findings, fixed from the paper's claims before any result was seen.
NEAR_ZERO = 0.1  # "near zero": a translation keeps at most 10% of the original's influence
LINE_MARGIN = 0.1  # log10: the median must clear a stated line by a factor of 1.26
TREND_THRESHOLD = 0.3  # log10: the ratio at least doubles across the suite
SHARE_THRESHOLD = 0.05  # 5 points of a top-k share across the suite


def fact_languages(train_frame: pd.DataFrame) -> dict[int, tuple[str, ...]]:
    """{fact_id: the languages its training statements are in (sorted)}."""
    f = train_frame[train_frame["kind"] == "fact"]
    return {int(k): tuple(sorted(set(v))) for k, v in f.groupby("fact_id")["language"]}


def own_rows(train_frame: pd.DataFrame, fact_id: int) -> np.ndarray:
    """Row positions of the fact's own statements (kind "fact")."""
    m = (train_frame["kind"] == "fact").to_numpy() & (train_frame["fact_id"] == fact_id).to_numpy()
    return np.flatnonzero(m)


def own_sequence_stats(scores: np.ndarray, own: np.ndarray, k: int = 10) -> dict[str, float]:
    """For one query's scores over all N sequences and its own sequences' positions:
    best_rank (1 = the most influential sequence; ties ranked pessimistically), top_share
    (share of the top k that are own), base_rate (own / N: the top share of a random ranking),
    own_mean and others_mean (mean score)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(own) == 0:
        raise ValueError("own must hold at least one sequence position")
    rest = np.ones(len(s), bool)
    rest[own] = False
    best = s[own].max()
    top = np.argsort(-s, kind="stable")[:k]
    return {
        "best_rank": int((s >= best).sum()),
        "top_share": float(np.isin(top, own).mean()),
        "base_rate": len(own) / len(s),
        "own_mean": float(s[own].mean()),
        "others_mean": float(s[rest].mean()) if rest.any() else float("nan"),
    }


def own_sequence_table(st: Any, model: str, k: int = 10) -> pd.DataFrame:
    """One row per scored cross-lingual query (a fact stated in one language Y only, asked in
    X ≠ Y): set, query, fact_id, names, X, Y, n_own, best_rank, top_share, base_rate,
    own_mean and others_mean (per copy)."""
    train = st.train_frame()
    langs = fact_languages(train)
    q = st.queries("cross_lingual")
    pc = st.per_copy(model, "cross_lingual").double().numpy()
    recs = []
    for i, r in enumerate(q.itertuples()):
        stated = langs.get(int(r.fact_id), ())
        if len(stated) != 1:
            raise ValueError(
                f"cross-lingual query {i} (fact {r.fact_id}) is about a fact stated in "
                f"{list(stated)}; the corpus asks only facts stated in one language"
            )
        own = own_rows(train, int(r.fact_id))
        recs.append(
            {"model": model, "query": i, "fact_id": int(r.fact_id), "names": r.names,
             "X": r.language, "Y": stated[0], "n_own": len(own),
             **own_sequence_stats(pc[i], own, k)}
        )  # fmt: skip
    return pd.DataFrame(recs)


def own_share_table(
    own: pd.DataFrame, order: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per name set and model: the mean top-k share of the fact's own statements with its
    interval, the corpus base rate, the enrichment (share / base rate) and its Wilcoxon p
    (share − base rate over queries), and the median best rank."""
    rows = []
    for names in NAME_SETS:
        for m in order:
            sub = own[(own["names"] == names) & (own["model"] == m)]
            if sub.empty:
                continue
            e = stats.enrichment(sub["top_share"], sub["base_rate"], n_boot=n_boot, seed=seed)
            rows.append(
                {"names": NAME_LABELS[names], "model": m, "queries": len(sub),
                 "top_share": e.share.format(stats.format_share),
                 "base_rate": e.base_rate, "enrichment": e.ratio.estimate, "p": e.test.p,
                 "median_best_rank": float(sub["best_rank"].median())}
            )  # fmt: skip
    return pd.DataFrame(rows)


def cross_lingual_accuracy(suite: Any, models: Sequence[str]) -> pd.DataFrame:
    """Greedy completion accuracy per model and name set of every cross-lingual query (a fact
    stated in one language only, asked in another) and of the same facts asked in the language
    they are stated in (their seen-fact queries). Columns: model, names, asked, accuracy, n."""
    from .suite import completion_scores  # the suite imports the presets, which import this

    train = suite.corpus.train.select_columns(["kind", "fact_id", "language"]).to_pandas()
    langs = fact_languages(train)
    sets = {}
    for name, label in (("cross_lingual", "in another language"), ("facts", "in its language")):
        q = suite.corpus.queries[name]
        keep = [i for i, f in enumerate(q["fact_id"]) if len(langs.get(int(f), ())) == 1]
        sets[label] = q.select(keep)
    recs = []
    for m in models:
        for label, q in sets.items():
            if len(q) == 0:
                continue
            ok = completion_scores(suite.models[m], suite.tokenizer, q)["correct"]
            df = pd.DataFrame({"names": q["names"], "ok": ok})
            for names, sub in df.groupby("names"):
                recs.append({"model": m, "names": names, "asked": label,
                             "accuracy": float(sub.ok.mean()), "n": len(sub)})  # fmt: skip
    return pd.DataFrame(recs)


# -- the paper's protocol (Figs. 15–16) --------------------------------------------------------
def translation_queries(st: Any, max_per_language: int | None = None) -> pd.DataFrame:
    """Scored `facts` queries of facts stated in every language (at most `max_per_language`
    per source language and name set, in corpus order), with the corpus's versions of the same
    query in every language (their names spelled in that language): columns query (row in
    st's tensors), fact_id, names, source (the scored query's language) and, per language,
    prompt_<lang> and completion_<lang>."""
    langs = fact_languages(st.train_frame())
    q = st.queries("facts")
    allq = st.suite.corpus.queries["facts"].to_pandas()
    recs: list[dict] = []
    per: dict[tuple[str, str], int] = {}
    for i, r in enumerate(q.itertuples()):
        if langs.get(int(r.fact_id)) != tuple(sorted(LANGS)):
            continue
        key = (r.language, r.names)
        if max_per_language is not None and per.get(key, 0) >= max_per_language:
            continue
        per[key] = per.get(key, 0) + 1
        rec = {"query": i, "fact_id": int(r.fact_id), "names": r.names, "source": r.language}
        for lang in LANGS:
            row = allq[(allq.fact_id == r.fact_id) & (allq.language == lang)].iloc[0]
            rec[f"prompt_{lang}"] = row.prompt
            rec[f"completion_{lang}"] = row.completion
        recs.append(rec)
    return pd.DataFrame(recs)


def top_in_language(scores: np.ndarray, mask: np.ndarray, n: int = 10) -> np.ndarray:
    """Positions of the n highest-scoring sequences among those where `mask` is true."""
    idx = np.flatnonzero(mask)
    return idx[np.argsort(-np.asarray(scores)[idx], kind="stable")[:n]]


def translation_protocol(
    st: Any, model: str, n_top: int = 10, max_per_language: int | None = None
) -> tuple[pd.DataFrame, float]:
    """The paper's protocol (Figs. 15–16), from every source language: for each query of
    `translation_queries`, its top-`n_top` training sequences in its own language, scored
    against the query and its translations with the stage's fitted EK-FAC (recomputed here for
    those sequences only). Returns (frame, check). frame: one row per query × target language
    with model, query, fact_id, names, source, language, influence (sum of per-copy scores
    over the n_top sequences), original (the source query's), log_ratio
    (`stats.log_ratio(influence, original)`; NaN when the original is not positive). check:
    the largest relative difference between the recomputed source-language scores and the
    stage's (float rounding when all is well)."""
    import influence as inf

    from .suite import query_dataset, train_dataset

    tq = translation_queries(st, max_per_language)
    if tq.empty:
        return pd.DataFrame(), float("nan")
    train = st.train_frame()
    lang_of = train["language"].to_numpy()
    full = st.scores(model, "facts").double().numpy()
    tops = [
        top_in_language(full[i], lang_of == src, n_top)
        for i, src in zip(tq["query"], tq["source"], strict=True)
    ]
    ids = np.unique(np.concatenate(tops))
    rows: dict[str, list] = {"prompt": [], "completion": []}
    for lang in LANGS:
        rows["prompt"] += tq[f"prompt_{lang}"].tolist()
        rows["completion"] += tq[f"completion_{lang}"].tolist()
    suite, cfg = st.suite, st.config
    net, task, est = st.model(model), st.task, st.estimator(model)
    tr = train_dataset(suite, suite.corpus).select(ids.tolist())
    s = inf.pairwise_scores(
        net, task, est, query_dataset(suite.tokenizer, rows), tr,
        batch_size=cfg["batch_size"], progress=False,
    ).double().numpy()  # fmt: skip
    s = s / st.n_train  # per copy
    pos = {int(t): j for j, t in enumerate(ids)}
    nq = len(tq)
    recs, check = [], 0.0
    for a, (qi, top) in enumerate(zip(tq["query"], tops, strict=True)):
        src = tq["source"].iloc[a]
        cols = [pos[int(t)] for t in top]
        ref = full[qi, top] / st.n_train
        mine = s[LANGS.index(src) * nq + a, cols]
        check = max(check, float(np.abs(mine - ref).max() / max(np.abs(ref).max(), 1e-30)))
        base = float(mine.sum())
        for li, lang in enumerate(LANGS):
            val = float(s[li * nq + a, cols].sum())
            lr = float(stats.log_ratio(val, base)) if base > 0 else float("nan")
            recs.append({"model": model, "query": int(qi), "fact_id": int(tq.fact_id.iloc[a]),
                         "names": tq.names.iloc[a], "source": src, "language": lang,
                         "influence": val, "original": base, "log_ratio": lr})  # fmt: skip
    return pd.DataFrame(recs), check


def translated(protocol: pd.DataFrame) -> pd.DataFrame:
    """The protocol's rows of translations (target language ≠ source) with a log-ratio."""
    if protocol.empty:
        return protocol
    t = protocol[protocol["language"] != protocol["source"]]
    return t.dropna(subset=["log_ratio"]).assign(pair=t["source"] + " → " + t["language"])


def per_query_log_ratio(protocol: pd.DataFrame, names: str) -> pd.DataFrame:
    """[query × model] the mean over a query's translations of their log-ratio, for one name
    set: one value per query, the unit of every interval and test."""
    t = translated(protocol)
    if t.empty:
        return pd.DataFrame()
    t = t[t["names"] == names]
    return t.pivot_table(index="query", columns="model", values="log_ratio", aggfunc="mean")


def ratio_text(log10_value: float) -> str:
    """A log10 ratio as a percentage of the original ("12%"; "≤ 0.1%" at the clip)."""
    if not np.isfinite(log10_value):
        return "n/a"
    if log10_value <= -stats.LOG_RATIO_CLIP:
        return f"≤ {stats.format_share(10**-stats.LOG_RATIO_CLIP)}"
    return stats.format_share(10**log10_value)


def median_ratio(values: Any, n_boot: int = 1000, seed: int = 0) -> stats.Interval:
    """The median of log10 ratios with its bootstrap interval over rows."""
    return stats.bootstrap(np.asarray(values, dtype=float), np.median, n_boot=n_boot, seed=seed)


def median_summary(
    protocol: pd.DataFrame, order: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per name set and model: the median over queries of the per-query log-ratio with its
    bootstrap interval (log10 columns median, low, high) and the number of queries."""
    rows = []
    for names in NAME_SETS:
        v = per_query_log_ratio(protocol, names)
        for m in order:
            if m not in v.columns:
                continue
            ci = median_ratio(v[m].dropna(), n_boot, seed)
            rows.append({"names": names, "model": m, "median": ci.estimate, "low": ci.low,
                         "high": ci.high, "queries": ci.n})  # fmt: skip
    return pd.DataFrame(rows)


def pair_table(
    protocol: pd.DataFrame, order: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per name set, language pair (source → target) and model: the median translated /
    original ratio over queries with its bootstrap interval, as text ("12% [5%, 30%]"), and
    the log10 median (`median`) for the figure."""
    t = translated(protocol)
    rows = []
    for (names, pair, src, tgt), g in t.groupby(["names", "pair", "source", "language"]):
        row: dict[str, Any] = {"names": names, "pair": pair, "source": src, "target": tgt,
                               "queries": g["query"].nunique()}  # fmt: skip
        for m in order:
            v = g.loc[g["model"] == m, "log_ratio"]
            if v.empty:
                continue
            ci = median_ratio(v, n_boot, seed)
            row[m] = ci.format(ratio_text)
            row[f"median_{m}"] = ci.estimate
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["set_rank"] = out["names"].map({n: i for i, n in enumerate(NAME_SETS)})
    out = out.sort_values(["set_rank", "source", "target"], kind="stable")
    return out.drop(columns="set_rank").reset_index(drop=True)


# -- findings ----------------------------------------------------------------------------------
def findings(
    protocol: pd.DataFrame,
    own: pd.DataFrame,
    params: Mapping[str, int],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[Finding]:
    """The paper's cross-lingual claims, tested on the facts whose names are spelled per
    language: `protocol` from `translation_protocol` (every model, concatenated), `own` from
    `own_sequence_table` (every model). Verdicts: `influence.study.findings`."""
    boot = {"n_boot": n_boot, "seed": seed}
    order = sorted(params, key=params.get)
    small = order[0]
    suite = f"{small} → {order[-1]}"
    line = float(np.log10(NEAR_ZERO))

    def two(x: float) -> str:
        return stats.format_number(x, 2)

    v = per_query_log_ratio(protocol, "localized")
    if v.empty:
        v = pd.DataFrame(columns=order, dtype=float)
    first = v[small].dropna() if small in v.columns else pd.Series(dtype=float)
    med = median_ratio(first, **boot)
    out = [
        judge(
            "near zero at the smallest size",
            f"translations of a query keep near-zero influence on its top sequences in the "
            f"smallest model (here: a median ratio below {stats.format_share(NEAR_ZERO)})",
            "near zero at 810M (Figs. 15–16)",
            effect=med.scaled(1.0, -line),
            test=stats.sign_test(first - line),
            expected=-1,
            threshold=LINE_MARGIN,
            what=f"median log10 ratio − log10 {NEAR_ZERO:g}",
            fmt=two,
            ours=f"median translated / original at {small}: {med.format(ratio_text)}",
            extra={"median_log10": med.as_dict()},
        )
    ]
    tr = stats.size_trend(v, params, **boot)
    out.append(
        judge(
            "translations rise with size",
            "the influence translations keep rises with model size (log10 ratio per query)",
            "rises steadily from 810M to 52B (Figs. 15–16)",
            effect=tr.change,
            test=tr.test,
            expected=+1,
            threshold=TREND_THRESHOLD,
            what="change of log10 ratio across the suite",
            fmt=two,
            ours=" → ".join(ratio_text(x) for x in tr.means.values())
            + f" ({suite}); change {tr.change.format(two)}",
            extra={"trend": tr.as_dict()},
        )
    )
    loc = own[own["names"] == "localized"]
    shares = loc.pivot_table(index="query", columns="model", values="top_share")
    if shares.empty:
        shares = pd.DataFrame(columns=order, dtype=float)
    base = float(loc["base_rate"].mean()) if len(loc) else float("nan")
    ts = stats.size_trend(shares, params, **boot)
    out.append(
        judge(
            "other-language statements rise",
            "a fact stated in one language and asked in another finds its statements among "
            "its top sequences more often in larger models",
            "cross-lingual influence rises with size (Figs. 15–16)",
            effect=ts.change,
            test=ts.test,
            expected=+1,
            threshold=SHARE_THRESHOLD,
            what="change of the top-k share across the suite",
            fmt=stats.format_points,
            ours=" → ".join(stats.format_share(x) for x in ts.means.values())
            + f" ({suite}); change {ts.change.format(stats.format_points)}",
            base_rate=stats.format_share(base),
            extra={"trend": ts.as_dict()},
        )
    )
    return out


# -- figures -----------------------------------------------------------------------------------
def plot_pair_heatmaps(pairs: pd.DataFrame, order: Sequence[str]):
    """One row of query language × translation language heatmaps per name set, one panel per
    model: the median translated / original ratio (colour: log10, −3 to 0; text: percent,
    "<0.1" at the clip)."""
    import matplotlib.pyplot as plt

    sets = [n for n in NAME_SETS if n in set(pairs["names"])]
    fig, axes = plt.subplots(
        len(sets), len(order), figsize=(1.7 * len(order) + 1.4, 1.9 * len(sets) + 0.7),
        squeeze=False, layout="constrained",
    )  # fmt: skip
    clip = stats.LOG_RATIO_CLIP
    im = None
    for r, names in enumerate(sets):
        sub = pairs[pairs["names"] == names]
        for c, m in enumerate(order):
            ax = axes[r][c]
            grid = np.full((len(LANGS), len(LANGS)), np.nan)
            for row in sub.itertuples():
                val = getattr(row, f"median_{m}", np.nan)
                grid[LANGS.index(row.source), LANGS.index(row.target)] = val
            im = ax.imshow(grid, vmin=-clip, vmax=0, cmap="viridis")
            for (i, j), val in np.ndenumerate(grid):
                if np.isfinite(val):
                    text = "<0.1" if val <= -clip else stats.format_number(100 * 10**val, 2)
                    ax.text(j, i, text, ha="center", va="center",
                            color="white" if val < -1.5 else "black")  # fmt: skip
            ax.set_xticks(range(len(LANGS)), LANGS)
            ax.set_yticks(range(len(LANGS)), LANGS if c == 0 else [])
            ax.tick_params(length=0)
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r == 0:
                ax.set_title(m)
            if c == 0:
                ax.set_ylabel(f"{NAME_LABELS[names]}\nquery in")
            if r == len(sets) - 1:
                ax.set_xlabel("translation")
    if im is not None:
        bar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9)
        bar.set_ticks([-3, -2, -1, 0], labels=["0.1%", "1%", "10%", "100%"])
        bar.set_label("translated / original")
    return fig


def plot_median_ratio(summary: pd.DataFrame, params: Mapping[str, int]):
    """The median translated / original ratio (log scale) against parameters, per name set,
    with bootstrap intervals over queries and the near-zero line."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    colors = {"localized": style.BLUE, "shared": style.ORANGE}
    for i, names in enumerate(NAME_SETS):
        s = summary[summary["names"] == names]
        if s.empty:
            continue
        x = np.array([params[m] for m in s["model"]], dtype=float) * (1.04 if i else 1.0)
        y = 10 ** s["median"].to_numpy()
        lo, hi = 10 ** s["low"].to_numpy(), 10 ** s["high"].to_numpy()
        err = np.nan_to_num(np.vstack([y - lo, hi - y]))
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colors[names],
                    label=NAME_LABELS[names])  # fmt: skip
    ax.axhline(NEAR_ZERO, color=style.GREY, lw=1, ls="--")
    ax.text(0.01, NEAR_ZERO, f"near zero ({stats.format_share(NEAR_ZERO)})", va="bottom",
            color=style.GREY, transform=ax.get_yaxis_transform())  # fmt: skip
    ax.axhline(1.0, color=style.LIGHT_GREY, lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=max(ax.get_ylim()[1], 1.5))  # the 100% line stays in view
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short range
    ax.set_xlabel("parameters")
    ax.set_ylabel("translated / original (median)")
    ax.legend(loc="best")
    return fig
