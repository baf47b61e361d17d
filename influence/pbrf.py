"""The proximal Bregman response function (PBRF), by optimisation: the ground truth the paper
validates influence estimates against (Bae et al. 2022; Grosse et al. 2023, §5.1).

For training example m and signed step e = ±ε:
    θ*(e) = argmin_θ (1/N) Σ_i D(h(θ, x_i), h(θ_s, x_i)) + e·L(z_m, θ) + Σ_ℓ (λ_ℓ/2)‖θ_ℓ − θ_sℓ‖²
over the tracked parameters only, and
    PBRF score(q, m) = −(m_q(θ*(ε)) − m_q(θ*(−ε))) / (2ε).
Linearised, this is exactly score(q, m) = ∇m_qᵀ (G + Λ)⁻¹ ∇L(z_m) with the same damping.

The optimisation runs in the rescaled variable u = (θ − θ_s)/e, on
    F(u) = [(1/N) Σ D(h(θ_s + e u), h_s)] / e² + [L(z_m, θ_s + e u) − L(z_m, θ_s)] / e
           + ½ Σ λ_ℓ‖u_ℓ‖²,
which has the same minimiser, is O(1) whatever ε, and has gradient ∇L(z_m) at u = 0; the
stopping rule is ‖∇F(u)‖_∞ ≤ tol · ‖∇L(z_m)‖_∞.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from . import checks
from .gnvp import (
    _TaskOutputs,
    mean_fisher_diagonal,
    resolve_full_damping,
    take,
    tracked_parameters,
)
from .gradients import _EvalMode, iter_batches, make_loader, num_examples, resolve_device
from .masks import right_align
from .tasks import Task


def _param_entries(model: nn.Module, infos) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    out = {}
    for n, info in infos.items():
        out[f"{n}.weight"] = named[f"{n}.weight"].detach().clone()
        if info.bias:
            out[f"{n}.bias"] = named[f"{n}.bias"].detach().clone()
    return out


@checks.restores_model
def pbrf_scores(
    model: nn.Module,
    task: Task,
    query_data: Any,
    train_data: Any,
    train_indices,
    *,
    damping: Any = "auto",
    epsilon: float | None = None,
    optimizer: str = "lbfgs",
    max_steps: int = 500,
    tol: float = 1e-6,
    lr: float | None = None,
    history_size: int = 100,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    seed: int = 0,
    warm_start: bool = True,
    progress: bool = True,
    return_info: bool = False,
    strict: bool = False,
):
    """PBRF scores of the training examples `train_indices` on every query: [Q, M].

    damping: 'auto' (as CG: 0.1 × trace(G_ℓℓ)/dim per layer), a float, or a dict {layer: λ}
        (pass an estimator's `damping_` to compare with it at the same damping).
    epsilon: the step ε ≤ 1/N; default 0.1/N (a tenth of a copy of z_m). At ε = 1/N the −ε
        problem removes z_m entirely and can be non-convex (the loss Hessian's residual term
        −ε·r_m∇²h_m is not covered by the damping): L-BFGS then fails to converge.
    warm_start: start the −ε solve from the +ε minimiser (mirrored in θ).
    optimizer: 'lbfgs' (full-batch L-BFGS with strong-Wolfe line search; default) or 'adam'
        (the paper's choice; `lr` default 1e-2 in the rescaled variable).
    max_steps: optimiser iterations per solve (two solves per training example).
    tol: stop when ‖∇F‖_∞ ≤ tol · ‖∇L(z_m)‖_∞ (relative gradient; see the module docstring).
    batch_size: training examples per forward pass of the Bregman term (full-batch objective).
    return_info: also return a dict with per-solve steps, final relative gradients, seconds.
    strict: raise (instead of warn) when a solve ends above `tol`; either way `info` lists
        every solve's final relative gradient.

    Every query measurement m_q is evaluated at θ*(±ε), so all queries cost one pair of
    optimisations per training example. Use float64 models: the response is O(ε).
    """
    checks.check_task(task)
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
    max_steps = checks.positive_int("max_steps", max_steps)
    tol = checks.positive_float("tol", tol)
    batch_size = checks.positive_int("batch_size", batch_size)
    history_size = checks.positive_int("history_size", history_size)
    seed = checks.integer("seed", seed)
    if lr is not None:
        lr = checks.positive_float("lr", lr)
    for name, flag in (("warm_start", warm_start), ("progress", progress)):
        checks.boolean(name, flag)
    checks.boolean("return_info", return_info)
    checks.boolean("strict", strict)
    checks.check_device(device)
    try:
        train_indices = [checks.integer("train_indices", i) for i in train_indices]
    except TypeError:
        raise ValueError(
            f"train_indices must be a sequence of integers, got {type(train_indices).__name__}"
        ) from None
    infos, _ = tracked_parameters(model, task)
    checks.check_finite_weights(task.tracked_modules(model))
    n_train = num_examples(train_data, batch_size)
    if n_train == 0 or not train_indices:
        raise ValueError("train_data and train_indices must not be empty")
    bad = [i for i in train_indices if not 0 <= i < n_train]
    if bad:
        raise ValueError(f"train_indices out of range [0, {n_train}): {bad[:5]}")
    eps = 0.1 / n_train if epsilon is None else float(epsilon)
    if not 0 < eps <= 1.0 / n_train * (1 + 1e-9):
        raise ValueError(
            f"epsilon must be in (0, 1/N] = (0, {1.0 / n_train:.3g}], got {epsilon}: at −ε the "
            "objective removes ε·N copies of z_m, and beyond one copy it can be unbounded below"
        )
    dev = resolve_device(model, device)  # only after the arguments are checked
    mean_eig = None
    if isinstance(damping, str):
        mean_eig = mean_fisher_diagonal(
            model, task, train_data, batch_size=min(batch_size, 256), device=dev, seed=seed
        )
    lam = resolve_full_damping(damping, infos, mean_eig)
    lam_param = {}
    for n, info in infos.items():
        lam_param[f"{n}.weight"] = lam[n]
        if info.bias:
            lam_param[f"{n}.bias"] = lam[n]

    wrapper = _TaskOutputs(model, task)
    base = _param_entries(model, infos)
    # Reference outputs h(θ_s, x_i) per training batch, and the query batches.
    loader = make_loader(train_data, batch_size)
    batches = []
    with _EvalMode(model), torch.no_grad():
        for _, b in iter_batches(loader, batch_size):
            b = right_align(task, task.to_device(b, dev))
            batches.append((b, task.outputs(model, b).detach()))
        # One query per measurement, whatever batch size a DataLoader of queries has.
        queries = [
            right_align(task, task.to_device(take(query_data, [q]), dev))
            for q in range(num_examples(query_data))
        ]

    def call(params, batch):
        return functional_call(wrapper, {f"model.{k}": v for k, v in params.items()}, (batch,))

    def measurements(params) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(
                [task.measurement(_Bound(wrapper, params), q).double() for q in queries]
            )

    def solve(train_batch, e: float, init=None):
        if init is None:
            u = {k: torch.zeros_like(v, requires_grad=True) for k, v in base.items()}
        else:
            u = {k: init[k].clone().requires_grad_(True) for k in base}
        with torch.no_grad():
            l0 = task.loss(model, train_batch).detach()

        def objective():
            def params():
                return {k: base[k] + e * u[k] for k in base}

            total = 0.0
            for b, ref in batches:  # backward per batch: memory of one batch at a time
                d = task.bregman(call(params(), b), ref, b) / (n_train * e * e)
                d.backward()
                total += float(d.detach())
            out = call(params(), train_batch)
            f = (task.loss_from_outputs(out, train_batch, task.targets(train_batch)) - l0) / e
            f = f + 0.5 * sum(lam_param[k] * u[k].pow(2).sum() for k in u)
            f.backward()
            return total + float(f.detach())

        def grad_inf():
            return max(float(u[k].grad.abs().max()) for k in u)

        for k in u:
            u[k].grad = None
        objective()
        g0 = grad_inf() if init is None else init_grad[0]
        target = tol * g0
        steps = 0
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(
                list(u.values()),
                lr=1.0 if lr is None else lr,
                max_iter=int(max_steps),
                tolerance_grad=target,
                tolerance_change=0.0,
                history_size=history_size,
                line_search_fn="strong_wolfe",
            )

            def closure():
                opt.zero_grad()
                return objective()

            opt.step(closure)
            steps = int(opt.state[opt._params[0]].get("n_iter", 0))
        else:
            opt = torch.optim.Adam(list(u.values()), lr=1e-2 if lr is None else lr)
            for steps in range(1, int(max_steps) + 1):  # noqa: B007
                opt.step()
                opt.zero_grad()
                objective()
                if grad_inf() <= target:
                    break
        for k in u:
            u[k].grad = None
        value = objective()
        rel = grad_inf() / g0 if g0 > 0 else 0.0
        if not (math.isfinite(value) and math.isfinite(rel)):
            raise FloatingPointError(
                f"the PBRF optimisation for e = {e:g} diverged (objective {value}); the problem "
                "is not convex at this ε and damping: lower epsilon or raise the damping"
            )
        if init is None:
            init_grad[0] = g0
        u_final = {k: v.detach() for k, v in u.items()}
        return {k: (base[k] + e * u_final[k]) for k in base}, steps, rel, u_final

    scores = torch.zeros(len(queries), len(train_indices), dtype=torch.float64)
    info: dict[str, Any] = {
        "epsilon": eps,
        "damping": lam,
        "steps": [],
        "relative_gradient": [],
        "seconds": 0.0,
        "optimizer": optimizer,
        "tol": tol,
    }
    start = time.perf_counter()
    with _EvalMode(model):
        for j, m in enumerate(tqdm(train_indices, desc="PBRF", disable=not progress, leave=False)):
            zb = right_align(task, task.to_device(take(train_data, [m]), dev))
            init_grad = [0.0]
            plus, s1, r1, u_plus = solve(zb, eps)
            # θ*(−ε) − θ_s ≈ −(θ*(ε) − θ_s): in the rescaled variable the two minimisers are
            # close, so the −ε solve starts from the +ε one (same stopping rule, relative to
            # ‖∇L(z_m)‖ at u = 0).
            minus, s2, r2, _ = solve(zb, -eps, init=u_plus if warm_start else None)
            scores[:, j] = -(measurements(plus) - measurements(minus)).cpu() / (2 * eps)
            info["steps"].append((s1, s2))
            info["relative_gradient"].append((r1, r2))
    info["seconds"] = time.perf_counter() - start
    if not torch.isfinite(scores).all():
        raise FloatingPointError(
            "PBRF produced NaN/Inf: lower epsilon or check the model in float64"
        )
    rels = [r for pair in info["relative_gradient"] for r in pair]
    missed = sum(r > tol for r in rels)
    info["unconverged"] = missed
    if missed:
        msg = (
            f"{missed} of {len(rels)} PBRF solves stopped above the tolerance: relative gradient "
            f"up to {max(rels):.3g} > tol {tol:g} (max_steps={max_steps}; L-BFGS also stops "
            "when its line search makes no progress). Raise max_steps, lower epsilon, raise the "
            "damping, or loosen tol; info['relative_gradient'] has every solve's value."
        )
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return (scores, info) if return_info else scores


class _Bound:
    """Callable standing in for the model with the given tracked parameters, for
    `task.measurement(model, batch)`."""

    def __init__(self, wrapper: _TaskOutputs, params: dict[str, torch.Tensor]):
        self.wrapper, self.params = wrapper, params
        self.forward = wrapper.model.forward  # its signature says which batch keys to pass

    def __call__(self, *args, **kwargs):
        # task.outputs(model, batch) calls model(x) or model(**kwargs): forward them as is.
        return functional_call(self.wrapper.model, self.params, args, kwargs if kwargs else None)
