"""Exact Gauss–Newton–vector products over the tracked parameters.

G v = (1/N) Σ_i J_iᵀ H_i (J_i v): a Jacobian–vector product, the task's output Hessian, and a
vector–Jacobian product, all through `torch.func` on the model with only the tracked
parameters swapped in. Vectors travel in the internal layout of `influence.layers`
({layer: Tensor[Q, out, in']}, bias as the last column) or flattened to [Q, P].
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from . import checks
from .estimator import check_damping, check_damping_layers, layer_damping
from .gradients import (  # noqa: F401  (take: re-exported for LiSSA and the PBRF)
    _EvalMode,
    flatten,
    num_examples,
    ordered_batches,
    resolve_device,
    take,
    unflatten,
)
from .layers import LayerInfo, layer_infos
from .masks import right_align
from .tasks import Task

Damping = float | Mapping[str, float]
# Largest model output (per right-hand side × right-hand sides) that one vmapped product
# handles; beyond it the right-hand sides are taken in smaller groups.
_VMAP_BYTES = 16 * 2**20


class eager_attention:
    """Temporarily switch a Hugging Face model to eager attention: the fused CPU/GPU attention
    kernels have no double-backward or forward-mode derivative, which GNVPs need. Every config
    in the model is switched (T5 and BART sub-modules hold their own copies)."""

    def __init__(self, model: nn.Module):
        configs = [getattr(model, "config", None)]
        configs += [getattr(m, "config", None) for m in model.modules()]
        seen: dict[int, Any] = {}
        for c in configs:
            if c is not None and getattr(c, "_attn_implementation", None) is not None:
                seen.setdefault(id(c), c)
        self.configs = list(seen.values())

    def __enter__(self):
        self.saved = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            if c._attn_implementation != "eager":
                c._attn_implementation = "eager"
        return self

    def __exit__(self, *exc):
        for c, impl in zip(self.configs, self.saved, strict=True):
            if impl != "eager":
                c._attn_implementation = impl


_LOWER_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
_DOWNCASTS = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16)


class exact_float64(TorchFunctionMode):
    """Inside this context no float64 tensor is cast to a lower floating precision: `.to(
    torch.float32)`, `.float()`, `.half()`, `.bfloat16()` and `dtype=torch.float32` arguments
    (e.g. `softmax(x, dtype=torch.float32)`) on a float64 tensor keep it float64.

    Hugging Face models compute some pieces in float32 whatever the model's dtype (Llama's
    RMSNorm casts its input to float32 and back; eager attention takes its softmax in float32;
    rotary tables are float32), so a model converted with `.double()` is not float64 on the
    path from the parameters to the loss: its Gauss–Newton products carry float32 round-off
    (u'Gv vs v'Gu differed by 1e-7 relative on a tiny Llama, 1e-15 inside this context), and
    conjugate gradients on an ill-conditioned system stall at that level. Tensors of other
    dtypes (float32 models, integer ids) are not touched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and torch.is_tensor(args[0]) and args[0].dtype == torch.float64:
            if func in _DOWNCASTS:
                return args[0]
            if kwargs.get("dtype") in _LOWER_PRECISION:
                kwargs = {**kwargs, "dtype": torch.float64}
            if func is torch.Tensor.to:
                args = _keep_float64_args(args)
        return func(*args, **kwargs)


def _keep_float64_args(args: tuple) -> tuple:
    """Arguments of `x.to(...)` with every lower floating dtype replaced by float64; a target
    tensor of lower precision (`x.to(other)`) becomes its device and float64."""
    out: list = []
    for a in args:
        if isinstance(a, torch.dtype) and a in _LOWER_PRECISION:
            out.append(torch.float64)
        elif torch.is_tensor(a) and a.dtype in _LOWER_PRECISION:
            out += [a.device, torch.float64]
        else:
            out.append(a)
    return tuple(out)


def float64_exact(model: nn.Module):
    """`exact_float64()` for a float64 model, a context that does nothing otherwise."""
    p = next(model.parameters(), None)
    if p is not None and p.dtype == torch.float64:
        return exact_float64()
    return contextlib.nullcontext()


class _TaskOutputs(nn.Module):
    """A module whose forward is `task.outputs(model, batch)`, so `functional_call` applies."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch):
        return self.task.outputs(self.model, batch)


def tracked_parameters(model: nn.Module, task: Task) -> tuple[dict[str, LayerInfo], dict[str, str]]:
    """Tracked layers' infos and `{layer: module path}` (weight at `path.weight`, bias `.bias`)."""
    layers = task.tracked_modules(model)
    return layer_infos(layers), {n: n for n in layers}


def layout_to_params(
    vecs: Mapping[str, torch.Tensor], infos: Mapping[str, LayerInfo], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """{layer: [..., out, in']} -> {"layer.weight": module layout, "layer.bias": [..., out]}."""
    out = {}
    for n, info in infos.items():
        m = vecs[n]
        w = m[..., : info.in_features]
        out[f"{prefix}{n}.weight"] = w.transpose(-1, -2) if info.transposed else w
        if info.bias:
            out[f"{prefix}{n}.bias"] = m[..., info.in_features]
    return out


def params_to_layout(
    params: Mapping[str, torch.Tensor], infos: Mapping[str, LayerInfo], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Inverse of `layout_to_params`."""
    out = {}
    for n, info in infos.items():
        w = params[f"{prefix}{n}.weight"]
        w = w.transpose(-1, -2) if info.transposed else w
        if info.bias:
            w = torch.cat([w, params[f"{prefix}{n}.bias"].unsqueeze(-1)], dim=-1)
        out[n] = w
    return out


def current_layout(model: nn.Module, infos: Mapping[str, LayerInfo]) -> dict[str, torch.Tensor]:
    """The tracked parameters' current values in the internal layout (detached)."""
    named = dict(model.named_parameters())
    return {k: v.detach() for k, v in params_to_layout(named, infos).items()}


def damping_vector(damping: Damping, infos: Mapping[str, LayerInfo]) -> torch.Tensor:
    """Per-coordinate λ as a flat float64 vector [P] (one λ per layer block)."""
    parts = []
    for n, info in infos.items():
        lam = damping[n] if isinstance(damping, Mapping) else damping
        parts.append(torch.full((info.numel,), float(lam), dtype=torch.float64))
    return torch.cat(parts)


def mean_fisher_diagonal(
    model: nn.Module,
    task: Task,
    data: Any,
    *,
    batch_size: int = 32,
    device=None,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Mean eigenvalue of each layer's diagonal block of G: trace(G_ℓℓ)/dim, estimated as the
    mean squared per-example gradient with labels sampled from the model (as EK-FAC does)."""
    from .diagonal import Diagonal

    # Only the fitted diagonal is used: the damping is a placeholder (0 is refused).
    diag = Diagonal(damping=1.0).fit(
        model, task, data, batch_size=batch_size, device=device, progress=progress, seed=seed
    )
    return {k.split("::")[0]: float(v.mean()) for k, v in diag.state_.items()}


def resolve_full_damping(
    damping, infos: Mapping[str, LayerInfo], mean_eig: Mapping[str, float] | None
) -> dict[str, float]:
    """Per-layer λ for CG/LiSSA/PBRF: 'auto' = 0.1 × trace(G_ℓℓ)/dim, a float, or a dict."""
    damping = check_damping(damping)
    check_damping_layers(damping, infos)
    return {n: layer_damping(damping, n, mean_eig[n] if mean_eig else None) for n in infos}


class GaussNewton:
    """The damped Gauss–Newton operator (G + Λ) of `task`'s loss on `data` at the model's
    current parameters, Λ = diag(λ_ℓ) per tracked layer.

    `matvec(V)` takes flat vectors [Q, P] (layers in `infos` order, internal layout) and
    returns (G + Λ) V in float64. `batch` products (`matvec_batch`) give G_B V on a subset.
    A float64 model is computed in float64 throughout (`exact_float64`); `exact_float64=False`
    keeps the float32 pieces of its modules (a diagnostic: the products are then symmetric
    only to float32 round-off).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        data: Any,
        *,
        damping: Damping = 0.0,
        batch_size: int = 32,
        device=None,
        progress: bool = False,
        exact_float64: bool = True,
    ):
        checks.check_not_meta(model, "GaussNewton")
        self.model, self.task, self.data = model, task, data
        self.exact = bool(exact_float64)
        self.infos, _ = tracked_parameters(model, task)
        self.batch_size = batch_size
        resolve_device(model, device)  # a given device is where the model goes, as elsewhere
        self.dtype = next(model.parameters()).dtype
        self.num_examples = num_examples(data, batch_size)
        if self.num_examples == 0:
            raise ValueError("cannot build a Gauss–Newton operator on empty data")
        self.lam = damping_vector(damping, self.infos)
        self.dim = int(self.lam.numel())
        self.progress = progress
        self._wrapper = _TaskOutputs(model, task)
        self._batches: list | None = None
        self.num_products = 0

    @property
    def device(self) -> torch.device:
        """Where the model is now: products follow it (a later call may move it, e.g. scores
        computed on another device than the fit)."""
        return next(self.model.parameters()).device

    def _primals(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        primals = {}
        for n, info in self.infos.items():
            primals[f"model.{n}.weight"] = named[f"{n}.weight"].detach()
            if info.bias:
                primals[f"model.{n}.bias"] = named[f"{n}.bias"].detach()
        return primals

    # -- products ---------------------------------------------------------------------------
    def _gnvp_batch(self, batch, flat: torch.Tensor) -> torch.Tensor:
        """Σ_{i in batch} J_iᵀ H_i J_i v for each row v of `flat` [Q, P]; returns [Q, P]."""
        batch = right_align(self.task, self.task.to_device(batch, self.device))
        primals = self._primals()

        def f(params):
            return functional_call(self._wrapper, params, (batch,))

        out, vjp_fn = vjp(f, primals)
        out = out.detach()
        # Jv by the double-vjp trick: u ↦ Jᵀu is linear, so its vjp with v is J v.
        zero = torch.zeros_like(out)
        _, vjp_vjp = vjp(lambda u: vjp_fn(u)[0], zero)
        tangents = layout_to_params(
            unflatten(flat.to(self.dtype), self.infos), self.infos, "model."
        )

        def one(t):
            jv = vjp_vjp(t)[0]
            hjv = self.task.output_hvp(out, batch, jv)
            return vjp_fn(hjv)[0]

        # vmap over the right-hand sides, in chunks whose outputs stay within _VMAP_BYTES: for
        # a language model's logits a batched product moves Q times more memory per op and
        # ran slower than one right-hand side at a time (bench/bench_gnvp.py: 10.3x vs 8.3x a
        # forward + backward pass for 8 right-hand sides at the study's `l` shape)
        chunk = max(1, _VMAP_BYTES // max(1, out.numel() * out.element_size()))
        parts = []
        for start in range(0, flat.shape[0], chunk):
            part = {k: v[start : start + chunk] for k, v in tangents.items()}
            parts.append(self._products(one, part))
        res = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return flatten(params_to_layout(res, self.infos, "model."), self.infos).detach().double()

    def batches(self) -> list:
        """The training batches, read once and kept: every product reuses them. Sequences are
        grouped by length and cut to their longest real token (`ordered_batches`), so a product
        costs what the real tokens cost; G is a sum over examples, so the order is free."""
        if self._batches is None:
            self._batches = [b for _, b, _ in ordered_batches(self.data, self.batch_size)]
        return self._batches

    @staticmethod
    def _products(one, tangents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`one` applied to each row of the tangents, batched by vmap where it helps."""
        q = next(iter(tangents.values())).shape[0]
        if q > 1:
            try:
                return vmap(one)(tangents)
            except Exception:  # ops without batching rules: fall back to a loop over rows
                pass
        rows = [one({k: v[i] for k, v in tangents.items()}) for i in range(q)]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def gnvp(self, flat: torch.Tensor, batch=None) -> torch.Tensor:
        """G V (undamped) on the whole data, or G_B V on one `batch` (mean over its examples)."""
        flat = flat.to(self.device)
        exact = float64_exact(self.model) if self.exact else contextlib.nullcontext()
        with _EvalMode(self.model), eager_attention(self.model), exact, torch.no_grad():
            if batch is not None:
                n = self.task.batch_size(batch)
                res = self._gnvp_batch(batch, flat) / n
            else:
                res = torch.zeros(flat.shape, dtype=torch.float64, device=self.device)
                for b in tqdm(self.batches(), desc="GNVP", disable=not self.progress, leave=False):
                    res += self._gnvp_batch(b, flat)
                res /= self.num_examples
        self.num_products += flat.shape[0]
        return res

    def matvec(self, flat: torch.Tensor, batch=None) -> torch.Tensor:
        """(G + Λ) V in float64 (G_B on `batch` when given)."""
        flat = flat.to(self.device, torch.float64)
        return self.gnvp(flat, batch) + self.lam.to(flat.device) * flat

    def dense(self) -> torch.Tensor:
        """The explicit damped matrix (G + Λ) [P, P] (small models only; for tests)."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.device)
        return self.matvec(eye)
