"""Notebook 08's third way to scale (issue 28): a gradient index (`influence.GradientIndex`) of
the largest model's training sequences, stored compressed once, then asked every query without
another pass over the training data; its accuracy and cost against the stage's exact scores.

    comps = compressions(est, eigen=[4, 16, 64], random=16)   # name -> compression
    built = cached_index(net, task, est, train, positions, comps["eigen 16"], source=...)
    rows = index_accuracy(built.index, net, st.task, queries, exact, top=10)

Compressions (the library's): `EigenCompression(k, k)` keeps each gradient's coefficients on
the top k eigenvectors of each side of a layer's EK-FAC (a layer's whole side where it is
smaller), the random projection baseline `RandomCompression(k, k)` a seeded Gaussian Kronecker
projection (LoGra's) of the same size. The paper has no index: what this measures is evidence,
not a finding.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

import influence as inf

from . import cache, stats, style
from .query_batching import agreement

VERSION = 1


def layer_sizes(estimator: inf.Estimator, k: int) -> tuple[dict[str, int], dict[str, int]]:
    """Per tracked layer of the fitted `estimator`: (k_s, k_a) = (min(k, out), min(k, in')),
    k eigenvectors or projected dimensions per side, a layer's whole side where it is smaller."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer (dimensions per side), got {k!r}")
    layers = estimator.layers_
    if not layers:
        raise ValueError("the estimator is not fitted: it has no tracked layers")
    k_s = {n: min(int(k), i.out_features) for n, i in layers.items()}
    k_a = {n: min(int(k), i.in_dim) for n, i in layers.items()}
    return k_s, k_a


def compressions(
    estimator: inf.Estimator, eigen: Sequence[int], random: int | None, seed: int = 0
) -> dict[str, Any]:
    """{name: compression}: "eigen k" for every k of `eigen`, then "random k" (seeded)."""
    out: dict[str, Any] = {}
    for k in eigen:
        out[f"eigen {k}"] = inf.EigenCompression(*layer_sizes(estimator, k))
    if random is not None:
        out[f"random {random}"] = inf.RandomCompression(*layer_sizes(estimator, random), seed=seed)
    return out


def compression_kind(name: str) -> str:
    """ "eigen" or "random" from a name of `compressions`."""
    return name.split()[0]


@dataclass
class BuiltIndex:
    """An opened index with the time its build took (wall and CPU seconds, as recorded when it
    was built) and whether this call found it in the cache."""

    index: inf.GradientIndex
    build_s: float
    build_cpu_s: float
    cached: bool


def cached_index(
    model: torch.nn.Module,
    task: inf.Task,
    estimator: inf.Estimator,
    train: Any,
    positions: Sequence[int],
    compression: Any,
    *,
    source: str,
    batch_size: int = 32,
    progress: bool = False,
) -> BuiltIndex:
    """The index of the sequences of `train` (a `datasets.Dataset`) at `positions` under
    `model` and its fitted `estimator`, compressed by `compression`, in float32: built once into
    a cache entry (`cache.building`: atomic, checksummed) keyed by `source` (what names the
    model, the estimator and the training data: the scores stage's entry), the compression and
    the positions, then opened and checked against the model and the estimator."""
    positions = [int(i) for i in positions]
    if not positions or min(positions) < 0 or max(positions) >= len(train):
        raise ValueError(
            f"positions must be training sequences 0..{len(train) - 1}, got {len(positions)} "
            f"positions from {min(positions, default=None)} to {max(positions, default=None)}"
        )
    key = {
        "source": source,
        "kind": "gradient_index",
        "compression": compression.config(),
        "positions": cache.config_hash(positions, 16),
        "n": len(positions),
        "dtype": "float32",
        "batch_size": batch_size,
        "version": VERSION,
    }
    entry = cache.entry_dir("gradient_index", key)
    cached = cache.verified(entry)
    if not cached:
        with cache.building(entry) as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            inf.GradientIndex.build(
                model,
                task,
                estimator,
                train.select(positions),
                tmp / "index",
                compression=compression,
                batch_size=batch_size,
                progress=progress,
            )
            took = {"build_s": time.perf_counter() - t0, "build_cpu_s": time.process_time() - c0}
            (tmp / "build.json").write_text(json.dumps(took) + "\n")
    took = json.loads((entry / "build.json").read_text())
    index = inf.GradientIndex.open(entry / "index", model=model, estimator=estimator)
    return BuiltIndex(index, float(took["build_s"]), float(took["build_cpu_s"]), cached)


def index_accuracy(
    index: inf.GradientIndex,
    model: torch.nn.Module,
    task: inf.Task,
    queries: Any,
    exact: torch.Tensor,
    *,
    top: int = 10,
    batch_size: int = 32,
) -> tuple[pd.DataFrame, float, float]:
    """(per query: Pearson, Spearman and top-`top` overlap of the index's scores with `exact`
    [Q, n] (`query_batching.agreement`), wall seconds, CPU seconds) of asking the index every
    query: the queries' own pass and one product per stored row."""
    t0, c0 = time.perf_counter(), time.process_time()
    scores = index.scores(model, task, queries, batch_size=batch_size)
    took = time.perf_counter() - t0, time.process_time() - c0
    return agreement(scores, exact, top=top), *took


def index_table(
    rows: Mapping[str, tuple[BuiltIndex, pd.DataFrame, float, float]],
    exact_s: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per compression (`rows[name]` = (built index, `index_accuracy`'s agreement,
    query seconds, query CPU seconds)): mean Pearson and top-k overlap with the exact scores
    over queries with bootstrap intervals, bytes per indexed sequence, build and query time,
    and both times as a share of `exact_s` (the exact scores' time for the same sequences)."""
    out = []
    for name, (built, ag, query_s, query_cpu_s) in rows.items():
        rec: dict[str, Any] = {"compression": name, "kind": compression_kind(name)}
        for col in ("pearson", "top_overlap"):
            ci = stats.bootstrap(ag[col].to_numpy(dtype=float), n_boot=n_boot, seed=seed)
            rec.update({col: ci.estimate, f"{col}_low": ci.low, f"{col}_high": ci.high})
        rec.update(
            {
                "bytes_per_example": built.index.bytes_per_example,
                "build_s": built.build_s,
                "build_cpu_s": built.build_cpu_s,
                "query_s": query_s,
                "query_cpu_s": query_cpu_s,
                "build_vs_exact": built.build_s / exact_s,
                "query_vs_exact": query_s / exact_s,
            }
        )
        out.append(rec)
    return pd.DataFrame(out)


def plot_index(table: pd.DataFrame, full_bytes: int, top: int):
    """Pearson and top-k overlap with the exact scores against bytes per indexed sequence (log
    scale), eigen-subspace and random indexes apart, with 95% intervals; the dotted line is a
    sequence's full gradient in float32."""
    import matplotlib.pyplot as plt

    colors = {"eigen": style.BLUE, "random": style.ORANGE}
    labels = {"eigen": "eigen-subspace (EK-FAC)", "random": "random projection"}
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for ax, col, ylabel in (
        (axes[0], "pearson", "Pearson with exact scores"),
        (axes[1], "top_overlap", f"top-{top} overlap with exact"),
    ):
        for kind, d in table.groupby("kind", sort=False):
            yerr = np.vstack([d[col] - d[f"{col}_low"], d[f"{col}_high"] - d[col]])
            ax.errorbar(d["bytes_per_example"], d[col], yerr=np.nan_to_num(yerr.clip(min=0)),
                        fmt="o-" if kind == "eigen" else "s", capsize=2, color=colors[kind],
                        label=labels[kind])  # fmt: skip
        ax.axvline(full_bytes, color=style.GREY, ls=":", label="full gradient (float32)")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per indexed sequence")
        ax.set_ylabel(ylabel)
        ax.set_ylim(min(0.0, float(table[f"{col}_low"].min()) - 0.03), 1.03)
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    return fig
