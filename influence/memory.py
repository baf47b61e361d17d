"""How much memory fitting an estimator and scoring queries will take, before running them.

`memory_plan` adds up, stage by stage, what the library's code allocates: the model, the
float64 covariances, the eigenvectors, the eigenvalue pass's buffers, the stored queries, the
scoring pass's groups of captured terms and gradient buffer, and the score matrix. Sizes of
factors, buffers and queries follow from the tracked layers' shapes. The memory of one
forward+backward (activations, output gradients, the captured terms) is measured by a probe:
one capture pass at batch 1 and one at batch 2, at the planned sequence length, under a
dispatch mode that records the peak of the bytes of the tensors they create (on CUDA, the
allocator's peak), extrapolated linearly in the batch size. On a `meta`-device model the
probe allocates nothing, so large models can be planned without their weights.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import checks
from .capture import LayerCapture
from .gradients import _EvalMode
from .index.compression import Compression, check_compression, stored_shapes, tokens_first
from .index.gradient_index import BLOCK_BYTES, SHARD_BYTES
from .kfac import rotate_tokens_first
from .layers import LayerInfo, layer_infos
from .lowrank import LowRank
from .scores import _block_outputs, _dense_fits, _group_capacity, _use_token_path
from .tasks import LanguageModelingTask, Seq2SeqLMTask, Task

ESTIMATORS = ("ekfac", "kfac")
_MASK_KEYS = ("attention_mask", "decoder_attention_mask")
F64 = 8


def _fmt(n: float) -> str:
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Stage:
    """One stage: its peak `bytes`, and the parts that make it up (they sum to `bytes`)."""

    name: str
    parts: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())


@dataclass
class MemoryPlan:
    """Bytes each stage needs at its peak (one rank), for one batch size.

    `max_batch_size` is the largest batch size whose peak fits `budget` (None without one)."""

    stages: list[Stage]
    batch_size: int
    settings: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None
    max_batch_size: int | None = None

    @property
    def peak(self) -> int:
        return max(s.bytes for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.bytes).name

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def table(self) -> str:
        """The stages as a readable table: peak per stage and its largest parts."""
        head = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        lines = [f"memory plan ({head}, batch_size={self.batch_size})"]
        width = max(len(s.name) for s in self.stages)
        for s in self.stages:
            big = sorted(s.parts.items(), key=lambda kv: -kv[1])[:4]
            detail = ", ".join(f"{k} {_fmt(v)}" for k, v in big if v > 0)
            lines.append(f"  {s.name:<{width}}  {_fmt(s.bytes):>11}   {detail}")
        lines.append(f"  {'peak':<{width}}  {_fmt(self.peak):>11}   ({self.peak_stage})")
        if self.budget is not None:
            lines.append(
                f"  budget {_fmt(self.budget)}: largest batch size that fits: {self.max_batch_size}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# -- the probe --------------------------------------------------------------------------------


class _PeakBytes(TorchDispatchMode):
    """Records the peak of the bytes of storages created while active (not the allocator's
    rounding: on a CPU that is within a few percent for tensors of more than a few pages)."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known, self.live, self.now, self.peak = known, {}, 0, 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key in self.known or key in self.live:
                    continue
                self.live[key] = st.nbytes()
                self.now += st.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(st, self._free, key)
        return out


def _storage_keys(tensors) -> set[int]:
    return {t.untyped_storage()._cdata for t in tensors if isinstance(t, torch.Tensor)}


def _repeat_rows(batch: Any, rows: int) -> Any:
    """`batch`'s first example repeated `rows` times (every tensor with a batch dimension)."""

    def rep(x):
        if torch.is_tensor(x) and x.dim() >= 1:
            return x[:1].repeat(rows, *([1] * (x.dim() - 1)))
        return x

    if isinstance(batch, Mapping):
        return {k: rep(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(rep(v) for v in batch)
    return rep(batch)


@dataclass(frozen=True)
class _PassCost:
    """One capture pass at batch b: peak(b) = base + per_row·b bytes, and the captured terms,
    per layer: (input key, bytes of ā per example, bytes of g per example)."""

    base: int
    per_row: int
    terms: dict[str, tuple[int, int, int]]

    def peak(self, b: int) -> int:
        return self.base + self.per_row * b

    def term_bytes(self, b: int, names=None) -> int:
        names = self.terms if names is None else names
        inputs = {self.terms[n][0]: self.terms[n][1] for n in names}
        return b * (sum(inputs.values()) + sum(self.terms[n][2] for n in names))


def _probe_once(model, task, layers, infos, batch, rows, device, sample) -> tuple[int, dict]:
    batch = task.to_device(batch, device)
    known = _storage_keys([*model.parameters(), *model.buffers(), *tree_leaves(batch)])
    cuda = device.type == "cuda"
    with _EvalMode(model):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
        # The backward runs on this thread for CPU and meta tensors, so the mode sees it;
        # CUDA's backward runs on a device thread, hence the allocator's count there.
        mode = _PeakBytes(known)
        with (
            mode if not cuda else _null(),
            LayerCapture(model, layers, infos, batch_size=rows, batch=batch) as cap,
        ):
            loss = task.loss(model, batch, sample=sample, seed=0, indices=list(range(rows)))
            terms = cap.backward(loss)
            del loss
        peak = torch.cuda.max_memory_allocated(device) - start if cuda else mode.peak
    shapes = {}
    for n, (a, g) in terms.items():
        shapes[n] = (
            id(a),
            a.numel() * a.element_size() // rows,
            g.numel() * g.element_size() // rows,
        )
    return peak, shapes


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _probe(model, task, layers, infos, example, scale: float, sample: bool) -> _PassCost:
    device = next(model.parameters()).device
    args = (model, task, layers, infos)
    if device.type == "cuda":
        # A device's first pass also allocates what lives on (cuBLAS workspaces, kernels'
        # scratch): counted at batch 1 alone, it would shrink the per-row bytes.
        _probe_once(*args, _repeat_rows(example, 1), 1, device, sample)
    p1, _ = _probe_once(*args, _repeat_rows(example, 1), 1, device, sample)
    p2, terms = _probe_once(*args, _repeat_rows(example, 2), 2, device, sample)
    per_row = max(0, p2 - p1)
    base = max(0, p1 - per_row)
    ids: dict[int, int] = {}
    terms = {
        n: (ids.setdefault(k, len(ids)), int(a * scale), int(g * scale))
        for n, (k, a, g) in terms.items()
    }
    return _PassCost(int(base * scale), int(per_row * scale), terms)


def _vocab_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        size = getattr(emb, "num_embeddings", None)
    if size is None:
        raise ValueError(
            "cannot tell the model's vocabulary size: pass `example=` (one batch of your data)"
        )
    return int(size)


def _example_batch(model, task, example, seq_len):
    if example is not None:
        return example
    if not isinstance(task, LanguageModelingTask) or isinstance(task, Seq2SeqLMTask):
        raise ValueError(
            f"memory_plan needs `example=` (a batch of your data) for a {type(task).__name__}; "
            "only causal language modelling builds its own token batch"
        )
    if seq_len is None:
        raise ValueError("seq_len is needed to plan a language model without `example=`")
    ids = torch.randint(0, min(_vocab_size(model), 1000), (1, seq_len), generator=None)
    # No attention mask: all tokens are real, and a mask makes some models inspect its
    # values, which a meta-device model cannot.
    return {"input_ids": ids, "labels": ids.clone()}


# -- sizes of the library's tensors ------------------------------------------------------------


def _model_bytes(model: nn.Module, itemsize: int | None) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        size = t.element_size() if itemsize is None or not t.is_floating_point() else itemsize
        seen[t.untyped_storage()._cdata] = t.numel() * size
    return sum(seen.values())


def _workspace_bytes(infos, b: int, t: int, isz: int) -> int:
    """Buffers of a `Workspace` (kfac.eigenbasis_gradients): per distinct shape, the rotated
    inputs [b, T, in'], rotated output gradients [b, T, out] and gradients [b, out, in']."""
    shapes = set()
    for info in infos.values():
        o, i = info.out_features, info.in_dim
        if rotate_tokens_first(t, o, i):
            shapes |= {("input", b * t * i), ("output", b * t * o), ("gradient", (b, o, i))}
    return isz * sum(s[1] if s[0] != "gradient" else math.prod(s[1]) for s in shapes)


def _eigen_layer_temp(info: LayerInfo, b: int, t: int, isz: int) -> int:
    """Per-layer temporaries of the eigenvalue pass: the squared [out, in'] sum, its float64
    copy and the new running sum; two [b, out, in'] products when summed before rotating."""
    o, i = info.out_features, info.in_dim
    temp = o * i * (isz + 2 * F64)
    if not rotate_tokens_first(t, o, i):
        temp += 2 * b * o * i * isz
    return temp


def _query_storage(infos, q: int, rank: int | None, isz: int) -> dict[str, int]:
    out = {}
    for n, info in infos.items():
        o, i = info.out_features, info.in_dim
        k = None if rank is None else min(rank, o, i)
        out[n] = q * isz * (o * i if k is None or k == min(o, i) else k * (o + i + 1))
    return out


def _meta_queries(infos, q: int, rank: int | None) -> dict[str, Any]:
    """Shape-only stand-ins of the stored queries, for the library's own path choices."""
    out = {}
    for n, info in infos.items():
        o, i = info.out_features, info.in_dim
        k = None if rank is None else min(rank, o, i)
        if k is None or k == min(o, i):
            out[n] = torch.empty(q, o, i, device="meta")
        else:
            e = torch.empty
            out[n] = LowRank(
                e(q, o, k, device="meta"), e(q, k, device="meta"), e(q, i, k, device="meta")
            )
    return out


# -- the plan ---------------------------------------------------------------------------------


def _stages(
    model_bytes: int,
    infos: dict[str, LayerInfo],
    cost: _PassCost,
    score_cost: _PassCost,
    *,
    estimator: str,
    batch: int,
    n_rank: int,
    num_train: int,
    num_queries: int,
    qchunk: int,
    t: int,
    rank: int | None,
    isz: int,
    device: torch.device,
) -> list[Stage]:
    b = min(batch, n_rank)
    last = n_rank % b
    terms = cost.term_bytes(b)
    cov = sum(F64 * (i.in_dim**2 + i.out_features**2) for i in infos.values())
    # Eigenvectors and EK-FAC's eigenvalues are stored in float32 unless the model is float64
    # (influence.kfac.state_dtype); the Kronecker factors' eigenvalues in float64.
    sdz = F64 if isz == F64 else 4
    eig = sum(sdz * (i.in_dim**2 + i.out_features**2) for i in infos.values())
    eigvals = sum(F64 * (i.in_dim + i.out_features) for i in infos.values())
    lam = sum(sdz * i.numel for i in infos.values()) if estimator == "ekfac" else 0
    factors = eig + eigvals + lam
    stages = []

    # Covariance pass: float64 sums, added to in place; per layer, ā āᵀ and g gᵀ in the
    # terms' dtype.
    cov_temp = max(isz * (i.in_dim**2 + i.out_features**2) for i in infos.values())
    stages.append(
        Stage(
            "fit: covariances",
            {
                "model": model_bytes,
                "covariances (float64)": cov,
                "batch: forward+backward": max(cost.peak(b), terms + cov_temp),
            },
        )
    )
    # torch.linalg.eigh: the eigenvectors and a workspace of about 2·d² doubles, then the
    # row-major copy; the other covariances and the eigenvectors so far are held meanwhile.
    d = max(max(i.in_dim, i.out_features) for i in infos.values())
    stages.append(
        Stage(
            "fit: eigendecompositions",
            {
                "model": model_bytes,
                "covariances/eigenvectors": cov,
                "eigh workspace": 3 * F64 * d * d,
            },
        )
    )
    if estimator == "ekfac":
        ws = _workspace_bytes(infos, b, t, isz) + (
            _workspace_bytes(infos, last, t, isz) if last else 0
        )
        temp = max(_eigen_layer_temp(i, b, t, isz) for i in infos.values())
        stages.append(
            Stage(
                "fit: eigenvalues",
                {
                    "model": model_bytes,
                    "eigenvectors": eig + eigvals,
                    "eigenvectors in model dtype": 0
                    if isz == sdz
                    else sum(isz * (i.in_dim**2 + i.out_features**2) for i in infos.values()),
                    "eigenvalue sums (float64)": sum(F64 * i.numel for i in infos.values()),
                    "workspace buffers": ws,
                    "batch: forward+backward": max(cost.peak(b), terms + temp),
                },
            )
        )
    stages.append(Stage("stored factors", {"model": model_bytes, "factors": factors}))

    # Queries: batches of `batch` queries, each preconditioned and stored; at the end the
    # batches' parts are merged layer by layer (one layer's copy at a time; none for one
    # batch in the caller's order, which the plan does not assume).
    terms = score_cost.term_bytes(b)
    bq = min(batch, num_queries)
    storage = _query_storage(infos, num_queries, rank, isz)
    store = sum(storage.values())
    q_terms = score_cost.term_bytes(bq)

    def q_layer_temp(info: LayerInfo) -> int:
        o, i = info.out_features, info.in_dim
        temp = isz * (o * o + i * i) + o * i * (F64 + isz) + bq * o * i * isz
        if not rotate_tokens_first(t, o, i):
            temp += 2 * bq * o * i * isz
        if rank is not None and rank < min(o, i):
            w = min(rank + 8, o, i)
            temp += bq * w * (o * (isz + 2 * F64) + i * 2 * F64)
        return temp

    q_temp = _workspace_bytes(infos, bq, t, isz) + max(q_layer_temp(i) for i in infos.values())
    # The previous batch's terms are still held (by the loop) during the next forward.
    q_prev = q_terms if num_queries > bq else 0
    q_pass = max(score_cost.peak(bq) + q_prev, q_terms + q_temp)
    stages.append(
        Stage(
            "queries",
            {
                "model": model_bytes,
                "factors": factors,
                "stored queries": store,
                "batch / merge": max(q_pass, max(storage.values())),
            },
        )
    )

    # Scoring: the library's own choices (token path or grouped dense gradients) on
    # shape-only stand-ins of one chunk of queries.
    meta = _meta_queries(infos, qchunk, rank)
    kept = _dense_fits(meta, list(meta), isz)
    token = [
        n for n, p in meta.items() if isinstance(p, LowRank) and _use_token_path(p, t, b, kept)
    ]
    grouped = [n for n in meta if n not in token]
    caches = sum(_query_storage({n: infos[n]}, qchunk, rank, isz)[n] for n in token)
    flush_temp = 0
    held = 0
    buffer = 0
    if grouped:
        per_row = max(1, score_cost.term_bytes(b, grouped) // b)
        capacity = min(_group_capacity(b, per_row), n_rank)
        # A forward runs with the group's earlier batches held: a group is scored as soon as
        # another batch would not fit, and a finished batch's terms are let go. Its scoring
        # holds them all (within `batch` below) with the buffer and the rebuilt query rows.
        held = (capacity // b - 1) * b * per_row
        keep = _dense_fits(meta, grouped, isz)
        for n in grouped:
            o, i = infos[n].out_features, infos[n].in_dim
            block = _block_outputs(capacity, o, i, isz, device)
            buffer = max(buffer, capacity * block * i * isz)
            if isinstance(meta[n], LowRank):
                # Its factors scaled by σ (`LowRank.scaled`), kept for every block of rows.
                caches += _query_storage({n: infos[n]}, qchunk, rank, isz)[n]
                if keep:
                    caches += qchunk * o * i * isz
                else:  # rebuilt a block of rows at a time
                    flush_temp = max(flush_temp, qchunk * block * i * isz)
    token_temp = max(
        (
            2 * b * t * qchunk * min(rank, infos[n].out_features, infos[n].in_dim) * isz
            for n in token
        ),
        default=0,
    )
    score_matrix = num_queries * num_train * isz
    stages.append(
        Stage(
            "scores",
            {
                "model": model_bytes,
                "factors": factors,
                "stored queries": store,
                "query caches": caches,
                "gradient buffer": buffer,
                "held terms": held,
                "batch": max(score_cost.peak(b), terms + flush_temp + token_temp),
                "score matrix": 3 * score_matrix,
            },
        )
    )
    return stages


def _index_stages(
    model_bytes: int,
    infos: dict[str, LayerInfo],
    score_cost: _PassCost,
    *,
    compression: Compression,
    factors: int,
    batch: int,
    n_rank: int,
    num_train: int,
    num_queries: int,
    t: int,
    isz: int,
    store_isz: int,
    memory_cap: int,
) -> list[Stage]:
    """`GradientIndex.build` on one rank, then `scores` in a process that holds only the
    model (and, without eigen compression, the index's estimator)."""
    b = min(batch, n_rank)
    shapes = stored_shapes(compression, infos)
    row = sum(r * c for r, c in shapes.values())
    per_shard = max(1, min(SHARD_BYTES // (row * store_isz), n_rank))
    eigen = compression is not None and compression.kind == "eigen"
    # The training side's projections and, whitened, the query side's (float64 and a copy
    # in the model's dtype).
    sides = 2 if getattr(compression, "whiten", False) else 1
    projections = (
        0
        if compression is None
        else sides
        * sum(
            (i.out_features * shapes[n][0] + i.in_dim * shapes[n][1]) * (F64 + isz)
            for n, i in infos.items()
        )
    )

    def layer_temp(n: str, rows: int) -> int:
        # One layer's projected batch, and what it is formed from.
        o, i = infos[n].out_features, infos[n].in_dim
        r, c = shapes[n]
        out = rows * r * c * (isz + store_isz)
        if compression is None:
            return out
        if tokens_first(t, o, i, r, c, rows, isz):
            return out + rows * t * (r + c) * isz
        return out + rows * o * i * isz + rows * o * c * isz

    temp = max(layer_temp(n, b) for n in infos)
    # Without eigen compression the estimator is saved with the index: safetensors turns every
    # tensor into bytes before writing, a copy of the factors.
    saving = 0 if eigen else factors
    build = Stage(
        "index: build",
        {
            "model": model_bytes,
            "factors": factors,
            "projections": projections,
            "shard rows": per_shard * row * store_isz,
            "batch / saving": max(score_cost.peak(b), score_cost.term_bytes(b) + temp, saving),
        },
    )
    q_vectors = num_queries * row * isz
    bq = min(batch, num_queries)
    query_pass = score_cost.peak(bq) + score_cost.term_bytes(bq) + q_vectors
    if eigen:
        # Tokens projected on the kept eigenvectors; no estimator is loaded.
        query_pass += max(layer_temp(n, bq) for n in infos)
        loaded = projections
    elif compression is None:
        # The batch's preconditioned gradients of every layer (estimator.precondition_terms:
        # per layer its eigenbasis gradients and two [B, out, in'] temporaries).
        dense = sum(bq * i.numel * isz for i in infos.values())
        widest = max(i.numel for i in infos.values())
        query_pass += dense + 2 * bq * widest * isz + _workspace_bytes(infos, bq, t, isz)
        loaded = factors
    else:
        # One layer at a time in the eigenbasis (the workspace's buffers, scaled in place, or
        # a layer's gradients and their rotation) and projected there: no dense
        # preconditioned queries. That work follows the backward, whose graph is freed by
        # then: the pass's peak is the larger of the two (summing them planned 34% over the
        # measured peak once a float32 model's eigenvectors were stored in float32).
        widest = max(i.numel for i in infos.values())
        work = max(_workspace_bytes(infos, bq, t, isz), 2 * bq * widest * isz) + widest * isz
        query_pass = q_vectors + max(score_cost.peak(bq), score_cost.term_bytes(bq) + work)
        loaded = factors + projections
    block = max(1, min(memory_cap // (row * store_isz), n_rank))
    # The vectors, a block read, its copy in the queries' dtype, its [Q, rows] product, and
    # the [Q, N] scores.
    reading = q_vectors + block * row * (store_isz + isz) + num_queries * block * isz
    search = Stage(
        "index: search",
        {
            "model": model_bytes,
            "estimator or projections": loaded,
            "query pass / blocks": max(query_pass, reading + num_queries * num_train * isz),
        },
    )
    return [build, search]


def memory_plan(
    model: nn.Module,
    task: Task,
    *,
    num_train: int,
    num_queries: int,
    seq_len: int | None = None,
    estimator: str = "ekfac",
    batch_size: int = 32,
    query_batch_size: int | None = None,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    world_size: int = 1,
    budget: int | None = None,
    example: Any = None,
    index: bool | Compression = False,
    index_dtype: torch.dtype = torch.float32,
    index_memory_cap: int = BLOCK_BYTES,
) -> MemoryPlan:
    """Bytes each stage of `estimator.fit(...)` followed by `pairwise_scores(...)` will need
    on one rank, as the library runs them with these settings.

    `seq_len`: tokens per sequence (a causal language model's batch is built from it); for
    other tasks pass `example`, one batch of the data (its first example is repeated).
    `dtype`: the dtype the model will run in (default: its own); the probe's bytes are scaled
    to it. `world_size`: ranks that share the training data (factors and queries are
    replicated on each). `budget` (bytes): also find the largest batch size whose peak fits;
    raises ValueError, saying what to change, when batch size 1 does not fit.
    `index`: also plan `GradientIndex.build` of the training data and a search of the
    queries (stages "index: build" and "index: search"): True for an uncompressed index, or
    its compression (`EigenCompression`, `RandomCompression`); `index_dtype` and
    `index_memory_cap` as given to the build and the search.
    """
    checks.check_task(task)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}: memory_plan knows {list(ESTIMATORS)}")
    num_train = checks.positive_int("num_train", num_train)
    num_queries = checks.positive_int("num_queries", num_queries)
    batch_size = checks.positive_int("batch_size", batch_size)
    world_size = checks.positive_int("world_size", world_size)
    seq_len = checks.positive_int("seq_len", seq_len, allow_none=True)
    query_batch_size = checks.positive_int("query_batch_size", query_batch_size, allow_none=True)
    rank = checks.positive_int("rank", rank, allow_none=True)
    budget = checks.positive_int("budget", budget, allow_none=True)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if next(model.parameters(), None) is None:
        raise ValueError("the model has no parameters")
    if not isinstance(index, bool):
        check_compression(index)
    index_memory_cap = checks.positive_int("index_memory_cap", index_memory_cap)

    layers = task.tracked_modules(model)
    infos = layer_infos(layers)
    own = next(iter(layers.values())).weight
    isz = own.element_size() if dtype is None else torch.finfo(dtype).bits // 8
    example = _example_batch(model, task, example, seq_len)
    if own.is_meta and isinstance(example, Mapping):
        # Models inspect their masks' values (e.g. whether any position is padded), which a
        # meta tensor does not have: plan as if every position were real.
        example = {k: v for k, v in example.items() if k not in _MASK_KEYS}
    scale = isz / own.element_size()
    if own.is_meta and dtype is not None and dtype != own.dtype:
        # A meta model costs nothing to copy: probe it in the planned dtype itself, since
        # some of a pass's tensors (sampled labels' float64 softmax) do not scale with it.
        model = copy.deepcopy(model).to(dtype)
        layers = task.tracked_modules(model)
        scale = 1.0
    # Fitting passes draw labels from the model (a float64 softmax over the outputs); the
    # query and scoring passes use the data's labels.
    cost = _probe(model, task, layers, infos, example, scale, sample=True)
    score_cost = _probe(model, task, layers, infos, example, scale, sample=False)
    t = max(1, max(cost.terms[n][2] // (infos[n].out_features * isz) for n in infos))
    model_bytes = _model_bytes(model, None if dtype is None else isz)
    n_rank = math.ceil(num_train / world_size)
    qchunk = min(query_batch_size or num_queries, num_queries)

    def stages(b: int) -> list[Stage]:
        kw = dict(
            estimator=estimator,
            batch=b,
            n_rank=n_rank,
            num_train=num_train,
            num_queries=num_queries,
            qchunk=qchunk,
            t=t,
            rank=rank,
            isz=isz,
            device=own.device,
        )
        planned = _stages(model_bytes, infos, cost, score_cost, **kw)
        if index is False:
            return planned
        stored = next(st for st in planned if st.name == "stored factors")
        return planned + _index_stages(
            model_bytes,
            infos,
            score_cost,
            compression=None if index is True else index,
            factors=stored.parts["factors"],
            batch=b,
            n_rank=n_rank,
            num_train=num_train,
            num_queries=num_queries,
            t=t,
            isz=isz,
            store_isz=torch.finfo(index_dtype).bits // 8,
            memory_cap=index_memory_cap,
        )

    settings = {
        "estimator": estimator,
        "num_train": num_train,
        "num_queries": num_queries,
        "seq_len": t,
        "rank": rank,
        "dtype": str(dtype or own.dtype).replace("torch.", ""),
        "world_size": world_size,
    }
    if query_batch_size:
        settings["query_batch_size"] = query_batch_size
    if index is not False:
        settings["index"] = "uncompressed" if index is True else repr(index)
    plan = MemoryPlan(stages(batch_size), batch_size, settings, budget)
    if budget is None:
        return plan
    peak = lambda b: max(s.bytes for s in stages(b))  # noqa: E731
    if peak(1) > budget:
        low = MemoryPlan(stages(1), 1, settings)
        raise ValueError(
            f"even batch size 1 needs {_fmt(low.peak)} (stage {low.peak_stage!r}), more than the "
            f"budget of {_fmt(budget)}. Lower `rank` or `query_batch_size` (stored queries and "
            "their caches), run in a smaller dtype, track fewer layers (the factors grow with "
            "the square of the layer widths), or split the training data over more ranks.\n"
            + low.table()
        )
    # Peaks grow with the batch size; beyond the data per rank nothing changes.
    lo, hi = 1, n_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    plan.max_batch_size = lo
    return plan


# -- measuring ------------------------------------------------------------------------------

# The passes' progress labels (iter_layer_terms' `desc`) named as the plan's stages; the time
# after a pass, until the next one starts, counts as the stage after it.
_PASS_STAGES = {
    "covariances": "fit: covariances",
    "after covariances": "fit: eigendecompositions",
    "eigenvalues": "fit: eigenvalues",
    "after eigenvalues": "stored factors",
    "queries": "queries",
    "after queries": "scores",
    "scores": "scores",
    "after scores": "scores",
}


def _read_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


class StagePeaks:
    """Measures the peak memory (bytes) of each stage of the library's passes, to check a
    plan against: on CPU the peak resident memory (Linux only: the kernel's high-water mark,
    reset at every stage); with a CUDA `device`, the caching allocator's peak allocation there.

    Usage: `with StagePeaks() as peaks: est.fit(...); pairwise_scores(...)`, then
    `peaks.peaks` is {stage name: peak}; subtract the RSS (or `torch.cuda.memory_allocated`)
    before the model was built to compare with a plan, which counts the model but not the
    interpreter and libraries."""

    _modules = ("kfac", "ekfac", "scores")

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peaks: dict[str, int] = {}
        self.label = "before"
        self._saved: list = []

    def _switch(self, label: str) -> None:
        stage = _PASS_STAGES.get(self.label, self.label)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            peak = _read_status("VmHWM")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        self.peaks[stage] = max(self.peaks.get(stage, 0), peak)
        self.label = label

    def __enter__(self) -> StagePeaks:
        import importlib

        for name in self._modules:
            module = importlib.import_module(f"influence.{name}")
            original = module.iter_layer_terms
            self._saved.append((module, original))

            def wrapped(*args, _original=original, desc: str = "batches", **kwargs):
                self._switch(desc)
                yield from _original(*args, desc=desc, **kwargs)
                self._switch(f"after {desc}")

            module.iter_layer_terms = wrapped
        self._switch("before")
        return self

    def __exit__(self, *exc) -> None:
        self._switch("end")
        for module, original in self._saved:
            module.iter_layer_terms = original
        self._saved = []
        self.peaks.pop("before", None)
