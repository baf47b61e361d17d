"""Pairwise and self influence scores, optionally by layer, by token, or with low-rank queries.

score(q, m) = ∇m_qᵀ (G + λI)⁻¹ ∇L(z_m): positive means training example m helps query q
(adding a copy of it lowers the query's loss). Query gradients are preconditioned once; the
training data is streamed once per chunk of queries, without weight gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import checks, distributed
from .estimator import Estimator, Grads
from .gradients import (
    batch_kind,
    check_same_data_on_all_ranks,
    example_gradients,
    iter_batches,
    iter_layer_terms,
    resolve_device,
    restore_order,
    token_outer_sum,
)
from .heap import release_freed_memory
from .layers import layer_infos
from .lowrank import LowRank, low_rank
from .masks import leading_padding, restore_positions
from .tasks import Task


def _first_batch(data: Any, batch_size: int):
    for _, batch in iter_batches(data, batch_size):
        return batch
    raise ValueError("data is empty")


def _check_inputs(
    model: nn.Module, task: Task, estimator: Estimator, *datasets: Any, batch_size: int
):
    checks.check_task(task)
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be an influence estimator, got {type(estimator).__name__}")
    layers = task.tracked_modules(model)
    estimator.check_fitted(layer_infos(layers))
    kinds, bad_values = [], []
    for data in datasets:
        batch = _first_batch(data, batch_size)
        try:
            task.check_batch(batch)  # a batch of another kind raises a TypeError here
        except ValueError as err:  # its values (labels): reported once the kinds agree
            bad_values.append(err)
        kinds.append(batch_kind(batch))
    if len(set(kinds)) > 1:
        raise TypeError(
            f"query and training data are of different kinds ({kinds[0]} vs {kinds[1]} batches): "
            "both must be what the task expects"
        )
    if bad_values:
        raise bad_values[0]
    return layers


# The token path is a few wide products, which run near the CPU's peak; the dense path's
# per-example gradients (inner dimension T) and its dot products (bound by memory) run at
# about 0.6 of it (bench/bench_large_layers.py, hidden 512: 180 against 80-140 GFLOP/s).
_TOKEN_PATH_SPEEDUP = 1.6


def _use_token_path(lr: LowRank, t: int, rows: int | None = None, kept: bool = True) -> bool:
    """Whether to score a low-rank layer token by token, Σ_t (Uᵀg_t)ᵀ diag σ (Vᵀā_t), cost
    Q·T·r·(out+in') per example, rather than through the dense matrix, T·out·in' + Q·out·in'
    (plus, when the dense queries are not `kept`, rebuilding them for every `rows` examples):
    whichever takes less time."""
    q, o, r = lr.u.shape
    i = lr.v.shape[1]
    dense = t * o * i + q * o * i
    if not kept and rows:
        dense += q * o * i * r / rows
    return q * t * r * (o + i) < _TOKEN_PATH_SPEEDUP * dense


def _token_scores(p: LowRank, a: torch.Tensor, g: torch.Tensor, by_token: bool) -> torch.Tensor:
    """Low-rank scores from the per-token terms, [Q, B] or, by token, [Q, B, T]."""
    b, t, o = g.shape
    us, v = p.stacked()
    q, r = p.s.shape
    gu = g.reshape(b * t, o) @ us.to(g)
    gu.mul_(a.reshape(b * t, -1) @ v.to(a))  # [B·T, Q·r]: every query's r terms per token
    per_token = gu.view(b, t, q, r).sum(-1)
    return per_token.permute(2, 0, 1) if by_token else per_token.sum(1).T


def _layer_scores(p, a, g, by_token: bool) -> torch.Tensor:
    """Scores of one layer for one training batch, [Q, B] or, by token, [Q, B, T], for the
    layers that are not grouped: low-rank ones on the token path, and any layer by token."""
    if isinstance(p, LowRank):
        return _token_scores(p, a, g, by_token)
    if by_token:
        return torch.einsum("qbto,bto->qbt", torch.einsum("qoi,bti->qbto", p, a), g)
    grads = token_outer_sum(g, a)
    return p.reshape(p.shape[0], -1) @ grads.reshape(grads.shape[0], -1).T


@checks.restores_model
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
    """(G + λI)⁻¹ ∇m_q per layer for every query, optionally truncated to `rank`.

    Block-diagonal estimators precondition each batch of queries as it is captured; CG and
    LiSSA solve for all queries at once."""
    checks.check_task(task)
    checks.check_score_args(batch_size=batch_size, device=device, progress=progress, rank=rank)
    model = distributed.unwrap_model(model)
    parts, indices = [], []
    for idx, _, terms, _, _ in iter_layer_terms(
        model,
        task,
        query_data,
        measurement=True,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="queries",
    ):
        indices.append(idx)
        if estimator.block_diagonal:
            parts.append(estimator.precondition_terms(terms, rank))
        else:
            parts.append(example_gradients(terms))
    if not parts:
        raise ValueError("query data is empty")
    merged = _merge_queries(parts, indices)
    release_freed_memory()  # before the training pass: see influence.heap
    if estimator.block_diagonal:
        checks.check_finite_queries(merged, estimator.damping_)
        return merged
    pre = estimator.precondition(merged)
    checks.check_finite_queries(pre, estimator.damping_)
    return pre if rank is None else {n: low_rank(p, rank) for n, p in pre.items()}


def _merge_queries(parts: list[dict], indices: list[torch.Tensor]) -> dict:
    """Per layer, the batches' queries (in pass order: by length) as one tensor in the caller's
    order, with at most one copy. Each layer's batch parts are dropped once placed: dense
    queries of a large model are GBs, and a concatenation followed by a permutation held
    three copies of them."""
    pos = torch.cat(indices)
    in_order = bool(torch.equal(pos, torch.arange(len(pos), device=pos.device)))
    merged = {}
    for n in list(parts[0]):
        chunk = [p.pop(n) for p in parts]
        merged[n] = chunk[0] if len(chunk) == 1 and in_order else _place(chunk, indices, len(pos))
    return merged


def _place(chunk: list, indices: list[torch.Tensor], q: int):
    if isinstance(chunk[0], LowRank):
        fields = ("u", "s", "v")
        return LowRank(*(_place([getattr(c, f) for c in chunk], indices, q) for f in fields))
    out = chunk[0].new_empty((q, *chunk[0].shape[1:]))
    for c, idx in zip(chunk, indices, strict=True):
        out[idx.to(out.device)] = c
    return out


def _pad_tokens(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, t - x.shape[-1])) if x.shape[-1] < t else x


@checks.restores_model
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

    `by_token` splits each score over the positions of the training sequence, at the caller's
    positions (a left-padded row's terms are returned where its tokens are). For a causal
    language model the output at position t predicts token t + 1, so the term at position t
    is the contribution of predicting token t + 1 (the last real position predicts nothing
    and its term is 0; padding's terms are 0); for a seq2seq model, whose tracked layers must
    then all be the decoder's, position t's term is that of target token t. Every tracked
    layer must read the same positions (no pooler or classification head: they read one per
    example). `influence.render_token_html` draws a row of them.
    `rank` stores each layer's preconditioned query gradient as a rank-`rank` truncated SVD (query
    batching). `query_batch_size` bounds how many queries are held at once (each chunk makes
    one pass over the training data). The model is evaluated in eval mode.
    """
    checks.check_score_args(
        batch_size=batch_size,
        device=device,
        progress=progress,
        rank=rank,
        query_batch_size=query_batch_size,
        by_layer=by_layer,
        by_token=by_token,
    )
    model = distributed.unwrap_model(model)
    layers = _check_inputs(model, task, estimator, query_data, train_data, batch_size=batch_size)
    check_same_data_on_all_ranks("the query data", query_data)
    check_same_data_on_all_ranks("the training data", train_data)
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
    num_q = len(next(iter(pre.values())))
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
    checks.check_finite_scores(merged)
    return merged if by_layer else merged["total"]


def _slice_queries(p, start: int, stop: int):
    if isinstance(p, LowRank):
        return LowRank(p.u[start:stop], p.s[start:stop], p.v[start:stop])
    return p[start:stop]


# Training examples are scored in groups of up to this many rows so that each layer's score
# product is one wide matrix product: with the whole layer in the buffer, at 32 columns it was
# bound by reading the [Q, out·in'] query matrix (on a CPU the blocks below remove that: 32
# rows then run as fast as 128). A group keeps its batches' per-token terms (small:
# T·(in' + out) per example and layer, against out·in' for a gradient), and per-example
# gradients are formed one layer at a time, in a buffer of at most _GROUP_BYTES, so that no
# stage holds a whole batch of a large model's gradients.
_GROUP_ROWS = 128
_GROUP_BYTES = 512 * 2**20
# On a CPU the buffer holds a block of each layer's output rows for the whole group, of at
# most _CPU_BLOCK_BYTES, and is multiplied with the queries' matching rows while it is still
# in cache. A buffer of the whole layer (hundreds of MB) made the product with the queries
# bound by memory reads: on bench_large_layers' shapes forming and scoring 128 examples ran
# at 65-70 GFLOP/s unblocked and 96-116 in 32 MiB blocks (16 MiB blocks: 78-105).
_CPU_BLOCK_BYTES = 32 * 2**20


def _block_outputs(rows: int, out_features: int, in_dim: int, itemsize: int, device) -> int:
    """Output rows of a layer whose per-example gradients for `rows` examples are formed at
    once: a cache-sized block on a CPU, the whole layer up to _GROUP_BYTES elsewhere."""
    limit = _CPU_BLOCK_BYTES if torch.device(device).type == "cpu" else _GROUP_BYTES
    return max(1, min(out_features, limit // (rows * in_dim * itemsize)))


def _query_rows(p, keep: bool, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of every query's [out, in'] matrix, [Q, stop - start, in']. Low-rank
    queries are rebuilt block by block from their factors unless `keep` (all of them fit in
    the memory cap): no dense [Q, P] matrix is held, and a block stays in cache (building a
    layer's whole matrix afresh took four times as long, most of it in page faults)."""
    if not isinstance(p, LowRank):
        return p[:, start:stop]
    if keep:
        return p.dense()[:, start:stop]
    us, vt = p.scaled()
    return torch.bmm(us[:, start:stop], vt)


class _TermGroup:
    """Per-token terms of consecutive training batches, scored against the queries layer by
    layer: the group's per-example gradients Σ_t g_t ā_tᵀ of a layer are formed a block of
    output rows at a time (`_block_outputs`) in one reused buffer."""

    def __init__(self, names: list[str], capacity: int, keep_dense: bool):
        self.names, self.capacity, self.keep_dense = names, capacity, keep_dense
        self.batches: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.rows = 0
        self._buffer: torch.Tensor | None = None

    def fits(self, batch_rows: int) -> bool:
        return self.rows + batch_rows <= self.capacity

    def add(self, terms, rows: int) -> None:
        self.batches.append({n: terms[n] for n in self.names})
        self.rows += rows

    def clear(self) -> None:
        self.batches, self.rows = [], 0

    def _flat_buffer(self, need: int, like: torch.Tensor) -> torch.Tensor:
        # One flat buffer shared by all layers (the largest block any layer needs), reused
        # from group to group: a fresh tensor per layer would be page-faulted in every time.
        buf = self._buffer
        same = buf is not None and (buf.dtype, buf.device) == (like.dtype, like.device)
        if not same or buf.numel() < need:
            buf = self._buffer = like.new_empty(need)
        return buf

    def scores(self, name: str, p) -> torch.Tensor:
        """[Q, rows] scores of the group's examples for one layer."""
        a0, g0 = self.batches[0][name]
        o, i = g0.shape[-1], a0.shape[-1]
        block = _block_outputs(self.rows, o, i, a0.element_size(), a0.device)
        flat = self._flat_buffer(self.rows * block * i, a0)
        out = a0.new_zeros(len(p), self.rows)
        for start in range(0, o, block):
            stop = min(o, start + block)
            buf = flat[: self.rows * (stop - start) * i].view(self.rows, stop - start, i)
            filled = 0
            for terms in self.batches:
                a, g = terms[name]
                rows = a.shape[0]
                torch.bmm(g[..., start:stop].transpose(1, 2), a, out=buf[filled : filled + rows])
                filled += rows
            queries = _query_rows(p, self.keep_dense, start, stop)
            out.addmm_(queries.reshape(out.shape[0], -1), buf.reshape(self.rows, -1).T)
        return out


def _group_capacity(batch_rows: int, bytes_per_row: int) -> int:
    """Rows of training terms a group holds: up to `_GROUP_ROWS` within `_GROUP_BYTES`, and
    never less than one batch (the memory plan sizes groups with the same rule)."""
    return max(batch_rows, min(_GROUP_ROWS, _GROUP_BYTES // bytes_per_row))


def _term_bytes(terms, names: list[str]) -> int:
    """Bytes of the distinct term tensors of `names` (layers sharing an input share ā)."""
    seen: dict[int, int] = {}
    for n in names:
        for x in terms[n]:
            seen[id(x)] = x.numel() * x.element_size()
    return sum(seen.values())


def _dense_fits(pre, names: list[str], itemsize: int) -> bool:
    """Whether the dense matrices of the low-rank queries of `names` fit in the memory cap."""
    low = [pre[n] for n in names if isinstance(pre[n], LowRank)]
    return sum(p.u.shape[0] * p.u.shape[1] * p.v.shape[1] for p in low) * itemsize <= _GROUP_BYTES


def _check_one_sequence(terms) -> None:
    """Per-token scores add the layers' terms position by position: every tracked layer must
    read the same positions."""
    positions: dict[int, list[str]] = {}
    for n, (a, _) in terms.items():
        positions.setdefault(a.shape[1], []).append(n)
    if len(positions) > 1:
        seen = "; ".join(f"{t} position(s): {names[:3]}" for t, names in positions.items())
        raise ValueError(
            f"by_token=True needs every tracked layer to read the same token positions; these "
            f"read different ones ({seen}). Track only layers of one sequence with the task's "
            "`modules=` (e.g. the encoder's or the decoder's layers of a seq2seq model, and no "
            "pooler or classification head, which read one position per example)."
        )


def _stream_scores(
    model, task, layers, pre, train_data, by_layer, by_token, batch_size, device, progress
):
    """One pass over the training data: {layer or "total": [Q, N] (or [Q, N, T])}."""
    blocks: list[dict[str, torch.Tensor]] = []  # finished column blocks, on the CPU
    pending: dict[str, list[torch.Tensor]] = {}  # token-path scores of the group's batches
    group: _TermGroup | None = None
    indices: list[torch.Tensor] = []
    first_batch = True
    max_t = 0

    def flush() -> None:
        # Layers in `pre` order, so that the total is summed in a fixed order.
        grouped = group.names if group is not None and group.rows else []
        scores = {
            n: torch.cat(pending[n], dim=1) if n in pending else group.scores(n, pre[n])
            for n in pre
            if n in pending or n in grouped
        }
        if group is not None:
            group.clear()
        pending.clear()
        if scores:
            if not by_layer:
                scores = {"total": sum(scores.values())}
            blocks.append({k: v.detach().cpu() for k, v in scores.items()})

    for idx, batch, terms, _, width in iter_layer_terms(
        model,
        task,
        train_data,
        layers=layers,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="scores",
        shard=True,
    ):
        indices.append(idx)
        # Left-padded rows were right-aligned for the model: tokens go back to their places.
        shifts = leading_padding(task, batch) if by_token else None
        a0 = next(iter(terms.values()))[0]
        rows, t = a0.shape[0], a0.shape[1]
        max_t = max(max_t, t, width)
        if first_batch and by_token:
            _check_one_sequence(terms)
        if first_batch and not by_token:
            # Layers whose scores go through the dense per-example gradient; the choice is a
            # matter of speed only (both paths give the same scores), made on the first batch
            # (the longest, when batches are ordered by length).
            kept = _dense_fits(pre, list(pre), a0.element_size())
            grouped = [
                n
                for n, p in pre.items()
                if not (isinstance(p, LowRank) and _use_token_path(p, t, rows, kept))
            ]
            if grouped:
                per_row = max(1, _term_bytes(terms, grouped) // rows)
                capacity = _group_capacity(rows, per_row)
                keep = _dense_fits(pre, grouped, a0.element_size())
                group = _TermGroup(grouped, capacity, keep_dense=keep)
        first_batch = False
        if group is not None and not group.fits(rows):
            flush()
        if group is not None:
            group.add(terms, rows)
        for n in terms:
            if group is None or n not in group.names:
                layer = _layer_scores(pre[n], *terms[n], by_token)
                pending.setdefault(n, []).append(restore_positions(layer, shifts))
        # A group that cannot take another batch of this size is scored now rather than after
        # the next capture, and the loop lets go of this batch's terms: the next forward then
        # runs with at most a group's terms held, the batch being captured included (the
        # memory plan's assumption; flushing late held one batch of terms more).
        if group is None or not group.fits(rows):
            flush()
        del terms, a0, batch
    flush()
    # Under a process group every rank scored its share: gather them all on every rank.
    shares = distributed.all_gather_objects((indices, blocks, max_t))
    indices = [i for share in shares for i in share[0]]
    blocks = [b for share in shares for b in share[1]]
    max_t = max(share[2] for share in shares)
    if not blocks:
        raise ValueError("training data is empty")
    order = restore_order(indices)
    if by_token:
        return {
            k: torch.cat([_pad_tokens(b[k], max_t) for b in blocks], dim=1)[:, order]
            for k in blocks[0]
        }
    return {k: torch.cat([b[k] for b in blocks], dim=1)[:, order] for k in blocks[0]}


@checks.restores_model
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
    checks.check_score_args(
        batch_size=batch_size, device=device, progress=progress, by_layer=by_layer
    )
    model = distributed.unwrap_model(model)
    layers = _check_inputs(model, task, estimator, train_data, batch_size=batch_size)
    check_same_data_on_all_ranks("the training data", train_data)
    dev = resolve_device(model, device)
    chunks: list[dict[str, torch.Tensor]] = []
    indices: list[torch.Tensor] = []
    for idx, _, terms, _, _ in iter_layer_terms(
        model,
        task,
        train_data,
        layers=layers,
        device=dev,
        batch_size=batch_size,
        progress=progress,
        desc="self-influence",
        shard=True,
    ):
        indices.append(idx)
        if estimator.block_diagonal:
            # One layer at a time (a large model's whole batch of per-example gradients would
            # not fit); CG and LiSSA need every layer at once.
            per_layer = {n: v.detach().cpu() for n, v in estimator.self_products(terms).items()}
        else:
            grads: Grads = example_gradients(terms)
            pre = estimator.precondition(grads)
            per_layer = {n: (grads[n] * pre[n]).flatten(1).sum(1).detach().cpu() for n in grads}
        chunks.append(per_layer)
    shares = distributed.all_gather_objects((indices, chunks))  # every rank's share
    indices = [i for share in shares for i in share[0]]
    chunks = [c for share in shares for c in share[1]]
    if not chunks:
        raise ValueError("training data is empty")
    order = restore_order(indices)
    merged = {n: torch.cat([c[n] for c in chunks])[order] for n in chunks[0]}
    checks.check_finite_scores(merged)
    return merged if by_layer else torch.stack(list(merged.values())).sum(0)
