"""Retraining check of the linear prediction: what does "nats per copy" mean here? (issue 24)

    summary, pairs, costs = retrain_check(suite, "l", settings, "validation", seed=0)

The study reports score / N as the change of log p(completion) when one copy of a training
sequence is added (`influence_scores.StudyScores.per_copy`). Here that is tested directly: add
k copies of sequence m to the corpus, retrain from scratch with the suite's own training
function (`suite.train_model`: same initialisation, seed, recipe and number of steps), and
compare the actual change of log p(completion) of every scored fact query with k × the
study's predicted per-copy influence.

Retraining noise is kept small by changing nothing but the copies: every epoch's batches are
the suite's own (`suite._batches`, seeded by the suite's seed and the epoch); the k copies of an
epoch are appended to k distinct batches drawn by a generator seeded by (`insert_seed`,
epoch), the first k of one permutation, so a larger k adds copies to a smaller k's places.
The number of optimiser steps and the learning-rate schedule do not change. With k = 0 the
training is the suite's, bit for bit (tested; checked again at run time on the smallest size).
The noise floor is measured by "null" retrains: zero added copies, but one existing sequence
moved in every epoch from its batch to one drawn the same way, so the data are the same and
only the insertion differs.

Pairs share retrains: one retrain with copies of m gives a pair (q, m) for every query q.
"Top" sequences are taken greedily from the largest predicted per-copy influences until at
least `retrain_top_pairs` (query, sequence) pairs have m among the query's `retrain_top_k`
top influences; "random" sequences are drawn uniformly from the rest. Every retrain's
measurements are cached (`artifacts/lm_validation/`), so an interrupted check resumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu, pearsonr

from . import suite as suite_module
from .influence_scores import study_scores
from .lm_validation import VERSION, _timed, cached_stage
from .suite import Suite, completion_scores, train_model
from .tokenizer import encode_text


# -- retraining with copies -----------------------------------------------------------------
def insert_copies(
    plan: list[list[int]], n: int, m: int, k: int, epoch: int, insert_seed: int, relocate: bool
) -> list[list[int]]:
    """One epoch's batches with k copies of sequence m (indices n .. n+k−1) appended to k
    distinct batches, or (`relocate`, k = 0) with m moved from its batch to another one."""
    plan = [list(b) for b in plan]
    order = [int(i) for i in np.random.default_rng([insert_seed, epoch]).permutation(len(plan))]
    if relocate:
        home = next(i for i, b in enumerate(plan) if m in b)
        if len(plan[home]) < 2:
            raise ValueError(f"sequence {m} is alone in its batch: it cannot be moved")
        target = next(i for i in order if i != home)
        plan[home].remove(m)
        plan[target].append(m)
        return plan
    if k > len(plan):
        raise ValueError(f"k={k} copies need k distinct batches; an epoch has {len(plan)}")
    for j in range(k):
        plan[order[j]].append(n + j)
    return plan


@contextlib.contextmanager
def copies_in_batches(n: int, m: int, k: int, insert_seed: int, relocate: bool) -> Iterator[None]:
    """While inside, `suite.train_model` trains on the suite's own batches of the first n
    sequences with the copies inserted (`insert_copies`)."""
    original = suite_module._batches

    def planned(lengths, batch_size, epoch, seed):
        plan = original(lengths[:n], batch_size, epoch, seed)
        return insert_copies(plan, n, m, k, epoch, insert_seed, relocate)

    suite_module._batches = planned
    try:
        yield
    finally:
        suite_module._batches = original


def retrain(
    suite: Suite,
    name: str,
    m: int,
    k: int,
    *,
    seed: int,
    insert_seed: int = 0,
    relocate: bool = False,
    device: str = "cpu",
    progress: bool = False,
) -> torch.nn.Module:
    """Model `name` retrained by the suite's recipe with k copies of training sequence m
    (or, with `relocate`, m moved: the noise floor). `seed` is the suite's training seed."""
    sizes = {s["name"]: s for s in suite.params["sizes"]}
    if name not in sizes:
        raise ValueError(f"size {name!r} is not in this suite ({', '.join(sizes)})")
    n = len(suite.corpus.train)
    if not 0 <= m < n:
        raise ValueError(f"training sequence {m} is not in the corpus (0 .. {n - 1})")
    if k < 0 or (relocate and k):
        raise ValueError(f"k must be ≥ 0 (and 0 when relocating), got {k}")
    tok = suite.tokenizer
    seqs = [encode_text(tok, t) for t in suite.corpus.train["text"]]
    with copies_in_batches(n, m, k, insert_seed, relocate):
        model, _ = train_model(
            sizes[name],
            suite.params["train"],
            tok,
            seqs + [seqs[m]] * k,
            suite.params["context"],
            seed,
            device,
            progress,
            tie_embeddings=suite.params["tie_embeddings"],
        )
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bit-for-bit equal parameters."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k].to(pa[k])) for k in pa)


# -- choosing the pairs ---------------------------------------------------------------------
def choose_sequences(per_copy: np.ndarray, c: dict, seed: int) -> dict[str, list[int]]:
    """Training sequences to retrain with: "top" (greedy from the largest predicted per-copy
    influences until `retrain_top_pairs` pairs have m in the query's top `retrain_top_k`, at
    most `retrain_max_top`), "random" and "null" (uniform over the rest, seeded)."""
    q, n = per_copy.shape
    top_k = np.argsort(-per_copy, axis=1)[:, : c["retrain_top_k"]]
    order = np.argsort(-per_copy, axis=None)
    top: list[int] = []
    pairs = 0
    for flat in order:
        m = int(flat % n)
        if m in top:
            continue
        top.append(m)
        pairs += int((top_k == m).any(axis=1).sum())
        if pairs >= c["retrain_top_pairs"] or len(top) >= c["retrain_max_top"]:
            break
    rng = np.random.default_rng([seed, 31])
    rest = np.setdiff1d(np.arange(n), top)
    random = sorted(int(i) for i in rng.choice(rest, c["retrain_random"], replace=False))
    rest = np.setdiff1d(rest, random)
    null = sorted(int(i) for i in rng.choice(rest, c["retrain_null"], replace=False))
    return {"top": top, "random": random, "null": null}


# -- the check ------------------------------------------------------------------------------
def _fit_line(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson and least-squares slope of y on x (NaN below 3 points or without spread)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": float("nan"), "slope": float("nan"), "n": int(len(x))}
    slope = float(np.polyfit(x, y, 1)[0])
    return {"pearson": float(pearsonr(x, y).statistic), "slope": slope, "n": int(len(x))}


def retrain_check(
    suite: Suite,
    name: str,
    c: dict,
    preset: str,
    seed: int,
    progress: bool = False,
    device: str = "cpu",
    first: bool = True,
) -> tuple[dict, pd.DataFrame, list[dict]]:
    """(summary row, one row per (query, sequence, k) pair, cost rows) for size `name`; with
    `first` and `retrain_identity_check`, also a retrain with k = 0 that must reproduce the
    suite's weights bit for bit."""
    stage = study_scores(suite, preset, progress=progress, sizes=[name])
    per_copy = stage.per_copy(name, c["query_set"]).double().numpy()
    rows = stage.selected[c["query_set"]]
    queries = suite.corpus.queries[c["query_set"]].select(rows)
    base = completion_scores(suite.models[name], suite.tokenizer, queries)["logprob"]
    chosen = choose_sequences(per_copy, c, seed)
    key0 = {
        "stage": "retrain",
        "model": suite.paths[name].name if name in suite.paths else name,
        "corpus": suite.corpus.sha256,
        "seed": seed,
        "query_set": c["query_set"],
        "queries": list(rows),
        "insert_seed": c["insert_seed"],
        # retrains before this entry were untied whatever the suite: their entries are stale
        "tie_embeddings": suite.params["tie_embeddings"],
        "version": VERSION,
    }

    def measured(m: int, k: int, relocate: bool) -> dict:
        def build():
            model, cost = _timed(
                lambda: retrain(
                    suite,
                    name,
                    m,
                    k,
                    seed=seed,
                    insert_seed=c["insert_seed"],
                    relocate=relocate,
                    device=device,
                    progress=progress,
                )
            )
            lp = completion_scores(model, suite.tokenizer, queries)["logprob"]
            record = {"logprob": lp.tolist(), "costs": {"retrain": cost}}
            if k == 0 and not relocate:
                record["identical_to_suite"] = same_weights(model, suite.models[name])
            return {}, record

        return cached_stage({**key0, "m": m, "k": k, "relocate": relocate}, build)[1]

    records = []
    check = None
    if first and c["retrain_identity_check"]:
        check = measured(chosen["null"][0], 0, False)
    if check is not None:
        records.append(check)
    top_k = np.argsort(-per_copy, axis=1)[:, : c["retrain_top_k"]]
    pairs = []
    for group in ("top", "random", "null"):
        for m in chosen[group]:
            for k in [0] if group == "null" else c["k_values"]:
                rec = measured(m, k, group == "null")
                records.append(rec)
                actual = np.asarray(rec["logprob"]) - base
                for q in range(len(rows)):
                    label = group
                    if group == "top" and m not in top_k[q]:
                        label = "other"
                    pairs.append(
                        {
                            "size": name,
                            "query": q,
                            "query_row": int(rows[q]),
                            "train_id": m,
                            "group": label,
                            "k": k,
                            "per_copy": float(per_copy[q, m]),
                            "predicted": float(k * per_copy[q, m]),
                            "actual": float(actual[q]),
                        }
                    )
    df = pd.DataFrame(pairs)
    summary = {"size": name, "model": key0["model"], **_summary(name, df, c, records, check)}
    costs = [
        {"size": name, "part": "retrain", "step": "retrain", **r["costs"]["retrain"]}
        | {"cached": r["cached"]}
        for r in records
    ]
    return summary, df, costs


def _summary(name: str, df: pd.DataFrame, c: dict, records: list, check: dict | None) -> dict:
    tested = df[df.group.isin(["top", "random"])]
    noise = df[df.group == "null"].actual.to_numpy()
    floor = float(noise.std()) if len(noise) else float("nan")
    top = df[df.group == "top"]
    out: dict[str, Any] = {
        "size": name,
        "n_top_pairs": int(top[["query", "train_id"]].drop_duplicates().shape[0]),
        "n_random_pairs": int(
            df[df.group == "random"][["query", "train_id"]].drop_duplicates().shape[0]
        ),
        "k_values": list(c["k_values"]),
    }
    out["n_pairs"] = out["n_top_pairs"] + out["n_random_pairs"]
    fit = _fit_line(tested.predicted.to_numpy(), tested.actual.to_numpy())
    out["pearson_predicted_vs_actual"], out["slope"] = fit["pearson"], fit["slope"]
    for group in ("top", "random"):
        g = df[df.group == group]
        fit = _fit_line(g.predicted.to_numpy(), g.actual.to_numpy())
        out[f"pearson_{group}"], out[f"slope_{group}"] = fit["pearson"], fit["slope"]
    out["slope_top_by_k"] = {
        str(k): _fit_line(g.predicted.to_numpy(), g.actual.to_numpy())["slope"]
        for k, g in top.groupby("k")
    }
    ratio = top.actual / top.predicted
    out["median_ratio_top"] = float(ratio.median()) if len(ratio) else float("nan")
    # Do the sequences with the largest predicted influence raise their query's log p more
    # than random ones do? One-sided Mann–Whitney over pairs: robust to the retraining noise.
    rand = df[df.group == "random"].actual
    out["median_actual_top"] = float(top.actual.median()) if len(top) else float("nan")
    out["median_actual_random"] = float(rand.median()) if len(rand) else float("nan")
    out["top_above_random_p"] = (
        float(mannwhitneyu(top.actual, rand, alternative="greater").pvalue)
        if len(top) and len(rand)
        else float("nan")
    )
    out["noise_floor"] = floor
    out["top_above_noise"] = float((top.actual.abs() > 2 * floor).mean()) if len(top) else 0.0
    out["max_predicted_top"] = float(top.predicted.max()) if len(top) else float("nan")
    out["n_retrains"] = len(records)
    out["retrain_wall_s"] = float(np.mean([r["costs"]["retrain"]["wall_s"] for r in records]))
    out["retrain_cpu_s"] = float(np.mean([r["costs"]["retrain"]["cpu_s"] for r in records]))
    out["identical_to_suite"] = None if check is None else bool(check["identical_to_suite"])
    return out
