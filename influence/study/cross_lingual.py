"""Notebook 04: does influence cross languages, and more so in larger models?

frame = own_sequence_table(st, model, k=10)     # per query asked in X about a fact stated
                                                # only in Y: rank/share of Y's sequences
grid = heatmap_grid(frame, "top_share")         # X × Y
tr = translation_protocol(st, model)            # paper Figs. 15–16: top-10 English
                                                # sequences scored against translations
acc = cross_lingual_accuracy(suite)             # completion accuracy per X × Y and size
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import relations as R
from .relations import relation_labels
from .suite import completion_scores, query_dataset, train_dataset

LANGS = ("en", "fr", "de")


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
    (share of the top k that are own), own_mean and others_mean (mean score)."""
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
        "own_mean": float(s[own].mean()),
        "others_mean": float(s[rest].mean()) if rest.any() else float("nan"),
    }


def own_sequence_table(st: Any, model: str, k: int = 10) -> pd.DataFrame:
    """One row per query about a fact stated in one language Y only: the cross-lingual queries
    (asked in X ≠ Y) and, as the diagonal, the `facts` queries of such facts (X = Y). Columns:
    set, query, fact_id, X, Y, best_rank, top_share, own_mean and others_mean (per copy), n_own."""
    train = st.train_frame()
    langs = fact_languages(train)
    recs = []
    for qs in ("cross_lingual", "facts"):
        if qs not in st.query_sets:
            continue
        q = st.queries(qs)
        pc = st.per_copy(model, qs).double().numpy()
        for i, (fid, x) in enumerate(zip(q["fact_id"], q["language"], strict=True)):
            stated = langs.get(int(fid), ())
            if len(stated) != 1:
                continue
            own = own_rows(train, int(fid))
            recs.append(
                {"model": model, "set": qs, "query": i, "fact_id": int(fid), "X": x,
                 "Y": stated[0], "n_own": len(own), **own_sequence_stats(pc[i], own, k)}
            )  # fmt: skip
    return pd.DataFrame(recs)


def heatmap_grid(frame: pd.DataFrame, value: str, agg: str = "mean") -> pd.DataFrame:
    """X (query language) × Y (stated language) table of `value` aggregated over queries."""
    g = frame.pivot_table(index="X", columns="Y", values=value, aggfunc=agg)
    return g.reindex(index=list(LANGS), columns=list(LANGS))


def cross_lingual_accuracy(suite: Any, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Greedy completion accuracy, per model, of every cross-lingual query (a fact stated only
    in Y asked in X) and, as the diagonal X = Y, of the seen-fact queries of one-language facts.
    Long frame: model, set, X, Y, accuracy, n."""
    train = suite.corpus.train.select_columns(["kind", "fact_id", "language"]).to_pandas()
    langs = fact_languages(train)
    sets = {}
    for name in ("cross_lingual", "facts"):
        q = suite.corpus.queries[name]
        keep = [i for i, f in enumerate(q["fact_id"]) if len(langs.get(int(f), ())) == 1]
        sets[name] = q.select(keep)
    recs = []
    for m in models or list(suite.models):
        for name, q in sets.items():
            if len(q) == 0:
                continue
            ok = completion_scores(suite.models[m], suite.tokenizer, q)["correct"]
            y = [langs[int(f)][0] for f in q["fact_id"]]
            df = pd.DataFrame({"X": q["language"], "Y": y, "ok": ok})
            for (x, yy), sub in df.groupby(["X", "Y"]):
                recs.append({"model": m, "set": name, "X": x, "Y": yy,
                             "accuracy": float(sub.ok.mean()), "n": len(sub)})  # fmt: skip
    return pd.DataFrame(recs)


# -- the paper's protocol (Figs. 15–16) --------------------------------------------------------
def translation_queries(st: Any, max_per_language: int | None = None) -> pd.DataFrame:
    """Scored `facts` queries of facts stated in every language (at most `max_per_language`
    per source language, in corpus order), with the corpus's versions of the same query in
    every language: columns query (row in st's tensors), fact_id, source (the scored query's
    language) and, per language, prompt_<lang> and completion_<lang>."""
    train = st.train_frame()
    langs = fact_languages(train)
    q = st.queries("facts")
    allq = st.suite.corpus.queries["facts"].to_pandas()
    recs, per = [], dict.fromkeys(LANGS, 0)
    for i, r in enumerate(q.itertuples()):
        if langs.get(int(r.fact_id)) != tuple(sorted(LANGS)):
            continue
        if max_per_language is not None and per[r.language] >= max_per_language:
            continue
        per[r.language] += 1
        rec = {"query": i, "fact_id": int(r.fact_id), "source": r.language}
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
    """The paper's protocol (Figs. 15–16), from every source language: for each scored query in
    language X about a fact stated in every language, its top-`n_top` training sequences in
    X, scored against the query and its translations with the stage's fitted EK-FAC
    (recomputed here for those sequences only). Returns (frame, check): frame has one row per
    query × target language: query, fact_id, source, language, influence (sum of per-copy
    scores over the n_top sequences), relative (influence / the source query's own, NaN when
    that is not positive), top_same_fact and top_with_names (share of the n_top sequences that
    state the query's fact, and that carry one of its names, which are spelled the same in
    every language); check is the largest relative difference between the recomputed
    source-language scores and the stage's (float32 rounding when all is well)."""
    import influence as inf

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
    facts = st.queries("facts")
    recs, check = [], 0.0
    for a, (qi, top) in enumerate(zip(tq["query"], tops, strict=True)):
        src = tq["source"].iloc[a]
        cols = [pos[int(t)] for t in top]
        ref = full[qi, top] / st.n_train
        own = s[LANGS.index(src) * nq + a, cols]
        check = max(check, float(np.abs(own - ref).max() / max(np.abs(ref).max(), 1e-30)))
        base = own.sum()
        lab = relation_labels(facts.loc[qi], train)
        same_fact = float(np.isin(lab[top], (R.SAME_WORDS, R.OTHER_WORDS)).mean())
        names = float(np.isin(lab[top], (R.SAME_WORDS, R.OTHER_WORDS, R.SHARES_NAME)).mean())
        for li, lang in enumerate(LANGS):
            val = s[li * nq + a, cols].sum()
            recs.append({"model": model, "query": int(qi), "fact_id": int(tq.fact_id.iloc[a]),
                         "source": src, "language": lang, "influence": float(val),
                         "relative": float(val / base) if base > 0 else float("nan"),
                         "top_same_fact": same_fact, "top_with_names": names})  # fmt: skip
    return pd.DataFrame(recs), check


def plot_heatmaps(rows: Sequence[tuple[str, dict[str, pd.DataFrame], str, float | None]]):
    """Rows of X × Y heatmaps, one per model: each row is (label, {model: grid}, number
    format, vmax or None for the row's largest value)."""
    import matplotlib.pyplot as plt

    ncol = max(len(g) for _, g, _, _ in rows)
    fig, axes = plt.subplots(
        len(rows), ncol, figsize=(2.6 * ncol + 1.2, 2.6 * len(rows)), squeeze=False
    )
    for r, (label, grids, fmt, vmax) in enumerate(rows):
        vals = np.concatenate([g.to_numpy(dtype=float).ravel() for g in grids.values()])
        top = vmax if vmax is not None else float(np.nanmax(np.append(vals, 1e-12)))
        for c, (m, g) in enumerate(grids.items()):
            ax = axes[r][c]
            a = g.to_numpy(dtype=float)
            im = ax.imshow(a, vmin=0, vmax=top, cmap="viridis")
            ax.set_xticks(range(len(g.columns)))
            ax.set_xticklabels(g.columns)
            ax.set_yticks(range(len(g.index)))
            ax.set_yticklabels(g.index)
            ax.set_title(f"{m}: {label}", fontsize=8)
            for (i, j), v in np.ndenumerate(a):
                if not np.isnan(v):
                    ax.text(j, i, fmt.format(v), ha="center", va="center", color="w", fontsize=8)
            if c == 0:
                ax.set_ylabel("asked in (X)")
            if r == len(rows) - 1:
                ax.set_xlabel("stated in (Y)")
        fig.colorbar(im, ax=axes[r].tolist(), shrink=0.8)
    return fig
