"""The linear datamodeling score (LDS): how well summed influence predicts retraining.

Draw K random subsets S_k of αN training examples, retrain from scratch on each with the same
recipe, measure m_q on each retrained model. For each query, the LDS is the Spearman
correlation over k between the measured m_q(θ_{S_k}) and the prediction −Σ_{i∈S_k} score(q, i)
(positive scores are helpful: including them lowers the loss). Reported: the mean over queries.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checks
from .io import atomic_write_json


def draw_subsets(num_examples: int, num_subsets: int = 50, alpha: float = 0.5, seed: int = 0):
    """K random subsets of round(α N) examples as a boolean mask [K, N] (seeded)."""
    num_examples = checks.positive_int("num_examples", num_examples)
    num_subsets = checks.positive_int("num_subsets", num_subsets)
    seed = checks.integer("seed", seed)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    if num_subsets < 2 or num_examples < 2:
        raise ValueError("need at least 2 subsets and 2 training examples")
    size = max(1, int(round(alpha * num_examples)))
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, num_examples), dtype=bool)
    for k in range(num_subsets):
        masks[k, rng.choice(num_examples, size=size, replace=False)] = True
    return masks


def _as_masks(subsets, n: int) -> np.ndarray:
    if isinstance(subsets, np.ndarray) and subsets.dtype == bool:
        if subsets.ndim != 2 or subsets.shape[1] != n:
            raise ValueError(f"subset masks must be [K, {n}], got {subsets.shape}")
        return subsets
    masks = np.zeros((len(subsets), n), dtype=bool)
    for k, idx in enumerate(subsets):
        idx = np.asarray(idx, dtype=int)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(
                f"subsets[{k}] holds indices outside the {n} scored training examples "
                f"[0, {n}): {idx[(idx < 0) | (idx >= n)][:5].tolist()}"
            )
        masks[k, idx] = True
    return masks


def _hash(config: Any, length: int) -> str:
    """Stable short hash of a JSON-able value (the same as the study cache's `config_hash`, so
    existing retrain caches stay valid)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (scipy's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the average rank of the run.
    new = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: the Pearson correlation of average ranks."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb)))


def lds(score_matrix, subsets, measurements, *, per_query: bool = False):
    """Linear datamodeling score.

    score_matrix: [Q, N] influence scores (positive = helpful).
    subsets: boolean masks [K, N] or a list of K index arrays.
    measurements: [K, Q] measured m_q of the model retrained on subset k.
    Returns the mean over queries of the Spearman correlation (or the [Q] array if
    `per_query`). Queries whose measurements or predictions are constant give NaN and are
    left out of the mean.
    """
    s = torch.as_tensor(score_matrix).double().cpu().numpy()
    if s.ndim != 2:
        raise ValueError(f"score_matrix must be [Q, N], got shape {s.shape}")
    masks = _as_masks(subsets, s.shape[1])
    m = np.asarray(torch.as_tensor(measurements).double().cpu().numpy())
    if m.shape != (masks.shape[0], s.shape[0]):
        raise ValueError(
            f"measurements must be [K, Q] = [{masks.shape[0]}, {s.shape[0]}], got {m.shape}"
        )
    predictions = -(masks.astype(np.float64) @ s.T)  # [K, Q]
    rho = np.full(s.shape[0], np.nan)
    for q in range(s.shape[0]):
        if np.ptp(m[:, q]) > 0 and np.ptp(predictions[:, q]) > 0:
            rho[q] = spearman(m[:, q], predictions[:, q])
    if per_query:
        return rho
    if np.isnan(rho).all():
        return float("nan")
    return float(np.nanmean(rho))


def _values_sha256(values: list[float]) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _read_retrain(path, k: int) -> list[float] | None:
    """A cached retrain's measurements, or None (after saying why on stderr, and removing the
    file) when it is unreadable, truncated, of another subset or fails its checksum."""
    try:
        record = json.loads(path.read_text())
        values = record["measurements"]
        if "sha256" not in record and os.environ.get("INFLUENCE_CACHE_ADOPT_LEGACY") == "1":
            # Opt-in migration of records written before checksums (see study/cache.py).
            record["sha256"] = _values_sha256(values)
            atomic_write_json(path, record)
        ok = record["subset"] == k and record.get("sha256") == _values_sha256(values)
        reason = None if ok else "checksum or subset mismatch (modified, or an older format)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = f"unreadable ({type(err).__name__}: {err})"
    if reason is None:
        return values
    print(f"[cache] LDS retrain {path} {reason}: retraining that subset", file=sys.stderr)
    path.unlink(missing_ok=True)
    return None


def retrain_measurements(
    train_fn: Callable[[np.ndarray], Any],
    measure_fn: Callable[[Any], Any],
    subsets,
    *,
    cache: dict | None = None,
    cache_dir: str | Path | None = None,
    num_examples: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Retrain on every subset and measure: returns [K, Q].

    train_fn(indices) -> model trained from scratch on those training indices (same recipe,
        same seed, for every subset); measure_fn(model) -> the Q query measurements m_q.
    cache: a JSON-able description of the recipe (data, model, training, queries); when
        given, each subset's measurements are stored under
        `<cache_dir>/lds_retrains/<hash of cache and subsets>/<k>.json` (atomic writes) and
        reused, so interrupted runs resume and repeated runs are free.
    cache_dir: the artifacts folder (default: $INFLUENCE_ARTIFACTS; one of the two is needed
        with `cache`).
    """
    if isinstance(subsets, np.ndarray) and subsets.dtype == bool:
        index_lists = [np.flatnonzero(mk) for mk in subsets]
    else:
        index_lists = [np.asarray(ix, dtype=int) for ix in subsets]
    folder = None
    if cache is not None:
        root = cache_dir if cache_dir is not None else os.environ.get("INFLUENCE_ARTIFACTS")
        if root is None:
            raise ValueError(
                "retrain_measurements(cache=...) needs a folder: pass cache_dir= (or set "
                "INFLUENCE_ARTIFACTS)"
            )
        key = {
            "recipe": cache,
            "subsets": _hash([ix.tolist() for ix in index_lists], 16),
            "num_examples": num_examples,
        }
        folder = Path(root).resolve() / "lds_retrains" / _hash(key, 12)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(key, indent=2, default=str))
    rows = []
    for k, idx in enumerate(
        tqdm(index_lists, desc="retraining", disable=not progress, leave=False)
    ):
        path = None if folder is None else folder / f"{k:05d}.json"
        if path is not None and path.is_file():
            values = _read_retrain(path, k)
            if values is not None:
                rows.append(values)
                continue
        model = train_fn(idx)
        values = torch.as_tensor(measure_fn(model)).double().reshape(-1).cpu().tolist()
        if path is not None:
            record = {"subset": k, "measurements": values, "sha256": _values_sha256(values)}
            atomic_write_json(path, record)
        rows.append(values)
    return np.asarray(rows, dtype=np.float64)
