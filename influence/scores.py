"""Pairwise and self influence scores, optionally by layer, by token, or with low-rank queries.

score(q, m) = ∇m_qᵀ (G + λI)⁻¹ ∇L(z_m): positive means training example m helps query q
(adding a copy of it lowers the query's loss). Query gradients are preconditioned once; the
training data is streamed once per chunk of queries, without weight gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .estimator import Estimator, Grads
from .gradients import (
    batch_kind,
    example_gradients,
    iter_batches,
    iter_layer_terms,
    per_example_gradients,
    resolve_device,
)
from .layers import layer_infos
from .tasks import Task


@dataclass
class LowRank:
    """A layer's preconditioned query gradients as U diag(σ) Vᵀ, U [Q, out, r], V [Q, in', r]."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    _dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """The [Q, out, in'] matrices, built once and kept (the dense path reuses them)."""
        if self._dense is None:
            self._dense = torch.einsum("qor,qr,qir->qoi", self.u, self.s, self.v)
        return self._dense


def low_rank(
    p: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 1, seed: int = 0
) -> LowRank | torch.Tensor:
    """Rank-`rank` truncated SVD of each query's [out, in'] matrix.

    A randomized range finder (Halko, Martinsson & Tropp 2011) with `oversample` extra columns
    and `power_iters` power iterations, seeded, so it is deterministic; it is near the exact
    truncation when the spectrum decays (tested) and several times cheaper than a full SVD of
    every layer of every query. When `rank` covers the matrix nothing is truncated and the
    matrices are returned as they are.
    """
    q, o, i = p.shape
    k = min(rank, o, i)
    if k == min(o, i):
        return p
    width = min(k + oversample, o, i)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(i, width, generator=gen, dtype=torch.float64).to(p)
    y = p @ omega
    for _ in range(power_iters):
        y = torch.linalg.qr(y).Q
        y = p @ (p.transpose(-1, -2) @ y)
    basis = torch.linalg.qr(y).Q  # [Q, out, width]
    b = basis.transpose(-1, -2) @ p  # [Q, width, in']: p ≈ basis @ b
    # SVD of the small b through the eigendecomposition of b bᵀ (width × width, float64):
    # much cheaper than a batched SVD of the wide b, and exact for the kept top directions.
    evals, evecs = torch.linalg.eigh((b @ b.transpose(-1, -2)).double())
    top = evecs[..., -k:].flip(-1)
    s = evals[..., -k:].flip(-1).clamp_min(0).sqrt()
    v = (b.transpose(-1, -2).double() @ top) / s.clamp_min(torch.finfo(s.dtype).tiny).unsqueeze(-2)
    return LowRank((basis.double() @ top).to(p.dtype), s.to(p.dtype), v.to(p.dtype))


def _first_batch(data: Any, batch_size: int):
    for _, batch in iter_batches(data, batch_size):
        return batch
    raise ValueError("data is empty")


def _check_inputs(
    model: nn.Module, task: Task, estimator: Estimator, *datasets: Any, batch_size: int
):
    if not isinstance(task, Task):
        raise TypeError(f"task must be an influence.Task, got {type(task).__name__}")
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be an influence estimator, got {type(estimator).__name__}")
    layers = task.tracked_modules(model)
    estimator.check_fitted(layer_infos(layers))
    kinds = []
    for data in datasets:
        batch = _first_batch(data, batch_size)
        task.check_batch(batch)
        kinds.append(batch_kind(batch))
    if len(set(kinds)) > 1:
        raise TypeError(
            f"query and training data are of different kinds ({kinds[0]} vs {kinds[1]} batches): "
            "both must be what the task expects"
        )
    return layers


def _use_token_path(lr: LowRank, t: int) -> bool:
    """Low-rank scores token by token, Σ_t (Uᵀg_t)ᵀ diag σ (Vᵀā_t), cost Q·T·r·(out+in'), or
    through the dense matrix, cost T·out·in' + Q·out·in' — whichever is cheaper."""
    q, o, r = lr.u.shape
    i = lr.v.shape[1]
    return q * t * r * (o + i) < t * o * i + q * o * i


def _layer_scores(p, a, g, by_token: bool) -> torch.Tensor:
    """Scores of one layer for one training batch: [Q, B] or, by token, [Q, B, T]."""
    if isinstance(p, LowRank) and (by_token or _use_token_path(p, a.shape[1])):
        gu = torch.einsum("bto,qor->qbtr", g, p.u)
        av = torch.einsum("bti,qir->qbtr", a, p.v)
        per_token = torch.einsum("qbtr,qr->qbt", gu * av, p.s)
        return per_token if by_token else per_token.sum(-1)
    dense = p.dense() if isinstance(p, LowRank) else p
    if by_token:
        return torch.einsum("qbto,bto->qbt", torch.einsum("qoi,bti->qbto", dense, a), g)
    grads = torch.einsum("bto,bti->boi", g, a)
    return dense.reshape(dense.shape[0], -1) @ grads.reshape(grads.shape[0], -1).T


def preconditioned_queries(
    model: nn.Module,
    task: Task,
    estimator: Estimator,
    query_data: Any,
    *,
    rank: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor | LowRank]:
    """(G + λI)⁻¹ ∇m_q per layer for every query, optionally truncated to `rank`."""
    grads = per_example_gradients(
        model,
        task,
        query_data,
        measurement=True,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    pre = estimator.precondition(grads)
    if rank is None:
        return pre
    if rank < 1:
        raise ValueError(f"rank must be a positive integer or None, got {rank}")
    return {n: low_rank(p, rank) for n, p in pre.items()}


def _pad_tokens(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, t - x.shape[-1])) if x.shape[-1] < t else x


def pairwise_scores(
    model: nn.Module,
    task: Task,
    estimator: Estimator,
    query_data: Any,
    train_data: Any,
    *,
    rank: int | None = None,
    by_layer: bool = False,
    by_token: bool = False,
    batch_size: int = 32,
    query_batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Influence of every training example on every query.

    Returns [Q, N]; with `by_token` [Q, N, T] (T the longest training sequence; the terms sum
    to the total); with `by_layer` a dict {layer: scores} whose values sum to the total.
    `rank` stores each layer's preconditioned query gradient as a rank-`rank` truncated SVD (query
    batching). `query_batch_size` bounds how many queries are held at once (each chunk makes
    one pass over the training data). The model is evaluated in eval mode.
    """
    layers = _check_inputs(model, task, estimator, query_data, train_data, batch_size=batch_size)
    dev = resolve_device(model, device)
    pre = preconditioned_queries(
        model,
        task,
        estimator,
        query_data,
        rank=rank,
        batch_size=batch_size,
        device=dev,
        progress=progress,
    )
    first = next(iter(pre.values()))
    num_q = (first.u if isinstance(first, LowRank) else first).shape[0]
    chunk = query_batch_size or num_q
    results: list[dict[str, torch.Tensor]] = []
    for start in range(0, num_q, chunk):
        part = {n: _slice_queries(p, start, start + chunk) for n, p in pre.items()}
        results.append(
            _stream_scores(
                model, task, layers, part, train_data, by_layer, by_token, batch_size, dev, progress
            )
        )
    merged = {n: torch.cat([r[n] for r in results], dim=0) for n in results[0]}
    return merged if by_layer else merged["total"]


def _slice_queries(p, start: int, stop: int):
    if isinstance(p, LowRank):
        return LowRank(p.u[start:stop], p.s[start:stop], p.v[start:stop])
    return p[start:stop]


def _stream_scores(
    model, task, layers, pre, train_data, by_layer, by_token, batch_size, device, progress
):
    per_batch: list[dict[str, torch.Tensor]] = []
    max_t = 0
    for _, _, terms, _ in iter_layer_terms(
        model,
        task,
        train_data,
        layers=layers,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="scores",
    ):
        layer_scores = {n: _layer_scores(pre[n], a, g, by_token) for n, (a, g) in terms.items()}
        max_t = max(max_t, next(iter(terms.values()))[0].shape[1])
        if not by_layer:
            layer_scores = {"total": sum(layer_scores.values())}
        per_batch.append({k: v.detach().cpu() for k, v in layer_scores.items()})
    if not per_batch:
        raise ValueError("training data is empty")
    keys = per_batch[0]
    if by_token:
        return {k: torch.cat([_pad_tokens(b[k], max_t) for b in per_batch], dim=1) for k in keys}
    return {k: torch.cat([b[k] for b in per_batch], dim=1) for k in keys}


def self_scores(
    model: nn.Module,
    task: Task,
    estimator: Estimator,
    train_data: Any,
    *,
    by_layer: bool = False,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Self-influence ∇L(z_m)ᵀ (G + λI)⁻¹ ∇L(z_m) of every training example, [N] (or by layer).

    For block-diagonal estimators the by-layer terms sum to the total; for CG and LiSSA the
    by-layer split pairs each layer's gradient with its part of the full preconditioned one.
    """
    layers = _check_inputs(model, task, estimator, train_data, batch_size=batch_size)
    dev = resolve_device(model, device)
    chunks: list[dict[str, torch.Tensor]] = []
    for _, _, terms, _ in iter_layer_terms(
        model,
        task,
        train_data,
        layers=layers,
        batch_size=batch_size,
        device=dev,
        progress=progress,
        desc="self-influence",
    ):
        grads: Grads = example_gradients(terms)
        pre = estimator.precondition(grads)
        per_layer = {n: (grads[n] * pre[n]).flatten(1).sum(1).detach().cpu() for n in grads}
        chunks.append(per_layer)
    merged = {n: torch.cat([c[n] for c in chunks]) for n in chunks[0]}
    return merged if by_layer else torch.stack(list(merged.values())).sum(0)
