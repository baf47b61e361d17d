"""Notebook 08: query batching (low-rank preconditioned queries) and TF-IDF filtering.

Paper (Grosse et al. 2023, §3.2): each layer's preconditioned query gradient is stored as a
rank-32 truncated SVD so that many queries share one pass over the training data; rank-32
scores correlate with full-rank ones at Pearson 0.995 (52B model, one query). Before scoring,
the training data is filtered per query to the top 10,000 sequences by a BM25 variant (k1 =
1.5, binary term frequency), which the authors warn biases results toward token overlap.

    res = rank_sweep(model, task, est, queries, train, ranks=[1, 2, 4, None])
    res.scores[None], res.scores[4]        # [Q, N] full-rank and rank-4 scores
    res.query_side                         # per rank: seconds, peak and stored bytes
    agreement(res.scores[4], res.scores[None], top=10)   # per query Pearson, Spearman, overlap

`rank_sweep` preconditions the queries once per rank (`influence.preconditioned_queries`, the
library's query side: query gradients, preconditioning in the eigenbasis, rank truncation
there) and then scores every rank in ONE pass over the training data, against the dense
[Q, out, in'] matrix of each rank's factors: the same numbers as `pairwise_scores(rank=r)`
(tested) at one training pass instead of one per rank.

Peak memory of the query side: on CUDA `torch.cuda.max_memory_allocated` above the memory
already held; on CPU the torch profiler's memory events (`profile_memory=True`: every tensor
allocation and free of the call, in time order), whose running sum's maximum is the peak of
tensor memory the call held. Python objects and the allocator's caches are not counted.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

import influence as inf
from influence.gradients import example_gradients, iter_layer_terms, resolve_device, restore_order
from influence.lowrank import LowRank

# -- query side --------------------------------------------------------------------------------


def stored_bytes(pre: dict[str, Any]) -> int:
    """Bytes of the preconditioned queries as stored: U, σ, V for low rank, else dense."""
    total = 0
    for p in pre.values():
        parts = (p.u, p.s, p.v) if isinstance(p, LowRank) else (p,)
        total += sum(t.numel() * t.element_size() for t in parts)
    return total


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """(fn(), peak bytes of tensor memory allocated during the call) — see the module
    docstring for how it is measured on CPU and CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():
        prof.start()
    try:
        out = fn()
    finally:
        with _stderr_silenced():
            prof.stop()
    # Allocations appear as the self memory of the op that made them, frees as "[memory]"
    # events with negative sizes; the running sum in time order is the memory held.
    events = sorted(
        ((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()),
        key=lambda x: x[0],
    )
    held = peak = 0
    for _, delta in events:
        held += delta
        peak = max(peak, held)
    return out, int(peak)


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ layer prints a "USDT ... profiler_start"
    line there at every start and stop, which no setting turns off. Only the start and stop are
    wrapped, so errors of the measured call still show."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class RankSweep:
    """Scores per rank (None = full rank) and the query side's cost per rank."""

    scores: dict[int | None, torch.Tensor]
    query_side: pd.DataFrame
    train_pass_s: float


def _rank_label(r: int | None) -> str:
    return "full" if r is None else str(r)


def rank_sweep(
    model: torch.nn.Module,
    task: inf.Task,
    estimator: inf.Estimator,
    queries: Any,
    train: Any,
    ranks: Sequence[int | None],
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    measure_memory: bool = True,
    repeats: int = 3,
    progress: bool = False,
) -> RankSweep:
    """Scores of every query against every training example at each rank (None = full).

    The query side's time is the fastest of `repeats` runs (the least disturbed by other
    work on the machine)."""
    if not ranks:
        raise ValueError("ranks is empty; give e.g. [1, 2, 4, None]")
    bad = [r for r in ranks if r is not None and (isinstance(r, bool) or int(r) != r or r < 1)]
    if bad:
        raise ValueError(f"ranks must be positive integers or None (full rank), got {bad}")
    dev = resolve_device(model, device)
    layers = task.tracked_modules(model)
    dense: dict[int | None, dict[str, torch.Tensor]] = {}
    rows = []
    # One untimed call first, so that the first rank's time does not include one-off costs
    # (allocator growth, lazy initialisation of the linear-algebra kernels).
    inf.preconditioned_queries(
        model, task, estimator, queries, rank=ranks[0], batch_size=batch_size, device=dev
    )
    for r in ranks:

        def query_side(r=r):
            return inf.preconditioned_queries(
                model, task, estimator, queries, rank=r, batch_size=batch_size, device=dev
            )

        seconds = float("inf")
        for _ in range(max(1, repeats)):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            pre = query_side()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = min(seconds, time.perf_counter() - t0)
        peak = peak_memory(query_side, dev)[1] if measure_memory else None
        rows.append(
            {
                "rank": _rank_label(r),
                "seconds": seconds,
                "peak_bytes": peak,
                "stored_bytes": stored_bytes(pre),
            }
        )
        dense[r] = {
            n: (p.dense() if isinstance(p, LowRank) else p).reshape(len(p), -1)
            for n, p in pre.items()
        }
    num_q = next(iter(dense[ranks[0]].values())).shape[0]
    # All ranks stacked along the query axis: one product per layer and training batch.
    stacked = {n: torch.cat([dense[r][n] for r in ranks]) for n in layers}
    blocks, indices = [], []
    t0 = time.perf_counter()
    for idx, _, terms, _, _ in iter_layer_terms(
        model, task, train, layers=layers, batch_size=batch_size, device=dev, progress=progress
    ):
        grads = example_gradients(terms)
        block = sum(stacked[n] @ grads[n].reshape(grads[n].shape[0], -1).T for n in layers)
        blocks.append(block.detach().cpu())
        indices.append(idx)
    train_s = time.perf_counter() - t0
    # The library passes over the examples in length order: columns back in dataset order.
    allq = torch.cat(blocks, dim=1)[:, restore_order(indices)]
    scores = {r: allq[i * num_q : (i + 1) * num_q] for i, r in enumerate(ranks)}
    return RankSweep(scores, pd.DataFrame(rows).set_index("rank"), train_s)


# -- agreement ---------------------------------------------------------------------------------
def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> np.ndarray:
    """Per row, |top-k of a ∩ top-k of b| / k."""
    ta = torch.topk(a.double(), k, dim=1).indices
    tb = torch.topk(b.double(), k, dim=1).indices
    pairs = zip(ta.tolist(), tb.tolist(), strict=True)
    return np.array([len(set(x) & set(y)) / k for x, y in pairs])


def agreement(approx: torch.Tensor, exact: torch.Tensor, top: int = 10) -> pd.DataFrame:
    """Per query: Pearson and Spearman of `approx` with `exact` over all training examples and
    the overlap of their top-`top` sets."""
    if approx.shape != exact.shape:
        raise ValueError(f"shapes differ: {tuple(approx.shape)} vs {tuple(exact.shape)}")
    a, e = approx.double().numpy(), exact.double().numpy()
    return pd.DataFrame(
        {
            "pearson": [stats.pearsonr(x, y)[0] for x, y in zip(a, e, strict=True)],
            "spearman": [stats.spearmanr(x, y)[0] for x, y in zip(a, e, strict=True)],
            "top_overlap": top_overlap(approx, exact, top),
        }
    ).rename_axis("query")


def sample_queries(counts: dict[str, int], n: int, seed: int) -> list[tuple[str, int]]:
    """`n` (query set, row) pairs drawn without replacement from all sets, fixed seed, in set
    order (all of them when fewer)."""
    pool = [(qs, i) for qs, c in counts.items() for i in range(c)]
    if n >= len(pool):
        return pool
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(pool), size=n, replace=False).tolist())
    return [pool[i] for i in pick]


# -- TF-IDF filtering ------------------------------------------------------------------------
def candidate_sizes(n_train: int, fractions: Sequence[float]) -> list[int]:
    """m = ceil(fraction × N) per fraction (at least 1, at most N), deduplicated, ascending."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"fractions must be in (0, 1], got {bad}")
    return sorted({min(n_train, max(1, int(np.ceil(f * n_train)))) for f in fractions})


def recall_curve(
    bm25: torch.Tensor,
    true_top: torch.Tensor,
    sizes: Sequence[int],
    shares: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Per query and m: recall of `true_top` [Q, k] among the top-m by `bm25` [Q, N]; with the
    bool mask `shares` [Q, k], also recall over the entries that share content tokens with the
    query and over those that do not (NaN where a query has none)."""
    order = torch.sort(-bm25, dim=1, stable=True).indices
    rows = []
    for m in sizes:
        cand = order[:, :m]
        rec = {"all": inf.candidate_recall(true_top, cand)}
        if shares is not None:
            rec["shares tokens"] = inf.candidate_recall(true_top, cand, where=shares)
            rec["no shared token"] = inf.candidate_recall(true_top, cand, where=~shares)
        for q in range(true_top.shape[0]):
            rows.append(
                {
                    "query": q,
                    "m": m,
                    "fraction": m / bm25.shape[1],
                    **{k: float(v[q]) for k, v in rec.items()},
                }
            )
    return pd.DataFrame(rows)
