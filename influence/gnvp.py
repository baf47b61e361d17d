"""Exact Gauss–Newton–vector products over the tracked parameters.

G v = (1/N) Σ_i J_iᵀ H_i (J_i v): a Jacobian–vector product, the task's output Hessian, and a
vector–Jacobian product, all through `torch.func` on the model with only the tracked
parameters swapped in. Vectors travel in the internal layout of `influence.layers`
({layer: Tensor[Q, out, in']}, bias as the last column) or flattened to [Q, P].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from tqdm.auto import tqdm

from . import checks
from .estimator import check_damping, check_damping_layers, layer_damping
from .gradients import (  # noqa: F401  (take: re-exported for LiSSA and the PBRF)
    _EvalMode,
    flatten,
    iter_batches,
    make_loader,
    num_examples,
    resolve_device,
    take,
    unflatten,
)
from .layers import LayerInfo, layer_infos
from .masks import right_align
from .tasks import Task

Damping = float | Mapping[str, float]


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
    ):
        checks.check_not_meta(model, "GaussNewton")
        self.model, self.task, self.data = model, task, data
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

        try:
            res = vmap(one)(tangents)
        except Exception:  # ops without batching rules: fall back to a loop over queries
            rows = [one({k: v[i] for k, v in tangents.items()}) for i in range(flat.shape[0])]
            res = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return flatten(params_to_layout(res, self.infos, "model."), self.infos).detach().double()

    def gnvp(self, flat: torch.Tensor, batch=None) -> torch.Tensor:
        """G V (undamped) on the whole data, or G_B V on one `batch` (mean over its examples)."""
        flat = flat.to(self.device)
        with _EvalMode(self.model), eager_attention(self.model), torch.no_grad():
            if batch is not None:
                n = self.task.batch_size(batch)
                res = self._gnvp_batch(batch, flat) / n
            else:
                res = torch.zeros(flat.shape, dtype=torch.float64, device=self.device)
                loader = make_loader(self.data, self.batch_size)
                for _, b in tqdm(
                    iter_batches(loader, self.batch_size),
                    desc="GNVP",
                    disable=not self.progress,
                    leave=False,
                ):
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
