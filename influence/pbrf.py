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
    float64_exact,
    layout_to_params,
    mean_fisher_diagonal,
    params_to_layout,
    resolve_full_damping,
    take,
    tracked_parameters,
)
from .gradients import _EvalMode, num_examples, ordered_batches, resolve_device
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
    preconditioner: Any = None,
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
        every solve's final relative gradient, and `info["converged"]` says per training
        example whether both of its solves met `tol` (a caller excludes and counts the others).
    preconditioner: "damping" (M = Λ⁻¹, one number per layer), or a fitted K-FAC, EK-FAC or
        Diagonal M ≈ (G + Λ)⁻¹ with the same damping: the optimiser then works in z with
        u = M^½ z, where the objective's Hessian is M^½ (G + Λ) M^½. It changes the speed of
        convergence, not the minimiser; the stopping rule stays the one on ∇_u F.

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
    # Reference outputs h(θ_s, x_i) per training batch (grouped by length and cut to the real
    # tokens, as every pass), computed as the objective computes h(θ), and the query batches.
    batches = []
    with _EvalMode(model), float64_exact(model), torch.no_grad():
        for _, b, _ in ordered_batches(train_data, batch_size):
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

    scale = _preconditioner_scaling(preconditioner, infos, lam)

    def solve(train_batch, e: float, init=None):
        # z is the optimiser's variable and u = S z (S = M^½ with a preconditioner, else the
        # identity, when z is u): the objective is evaluated at u as a leaf, so that ∇_u F
        # (the stopping rule's gradient) and ∇_z F = S ∇_u F both come from one backward.
        z = {
            k: (torch.zeros_like(v) if init is None else init[k].clone()).requires_grad_(True)
            for k, v in base.items()
        }
        with torch.no_grad():
            l0 = task.loss(model, train_batch).detach()
        grad_u: dict[str, torch.Tensor] = {}

        def objective():
            with torch.no_grad():
                u = {k: v.detach().clone().requires_grad_(True) for k, v in scale(z, 1).items()}

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
            grad_u.update({k: v.grad for k, v in u.items()})
            with torch.no_grad():
                for k, g in scale(grad_u, 1).items():
                    z[k].grad = g.clone()
            return total + float(f.detach())

        def grad_inf():
            return max(float(g.abs().max()) for g in grad_u.values())

        def zgrad_inf():
            return max(float(v.grad.abs().max()) for v in z.values())

        value = objective()
        if init is None:
            init_grad[:] = [grad_inf(), zgrad_inf()]
        g0, g0_z = init_grad
        target = tol * g0
        steps = 0
        if optimizer == "lbfgs":
            # L-BFGS stops itself on ∇_z F; without a preconditioner that is the rule on ∇_u F.
            # With one, its relative value is a stand-in: met before the rule on ∇_u F, it is
            # tightened tenfold and L-BFGS goes on (it keeps its history between calls).
            ztol = target if preconditioner is None else tol * g0_z
            opt = torch.optim.LBFGS(
                list(z.values()),
                lr=1.0 if lr is None else lr,
                max_iter=int(max_steps),
                tolerance_grad=ztol,
                tolerance_change=0.0,
                history_size=history_size,
                line_search_fn="strong_wolfe",
            )

            def closure():
                opt.zero_grad()
                return objective()

            while grad_inf() > target and steps < max_steps:
                while zgrad_inf() <= ztol:
                    ztol *= 0.1
                opt.param_groups[0].update(tolerance_grad=ztol, max_iter=max_steps - steps)
                opt.step(closure)
                steps = int(opt.state[opt._params[0]].get("n_iter", 0))
                value = objective()  # at the final point (the line search's last may differ)
                if zgrad_inf() > ztol:  # max_steps reached, or the line search made no progress
                    break
        else:
            opt = torch.optim.Adam(list(z.values()), lr=1e-2 if lr is None else lr)
            for steps in range(1, int(max_steps) + 1):  # noqa: B007
                opt.step()
                opt.zero_grad()
                value = objective()
                if grad_inf() <= target:
                    break
        rel = grad_inf() / g0 if g0 > 0 else 0.0
        if not (math.isfinite(value) and math.isfinite(rel)):
            raise FloatingPointError(
                f"the PBRF optimisation for e = {e:g} diverged (objective {value}); the problem "
                "is not convex at this ε and damping: lower epsilon or raise the damping"
            )
        z_final = {k: v.detach() for k, v in z.items()}
        with torch.no_grad():
            u_final = scale(z_final, 1)
        return {k: (base[k] + e * u_final[k]) for k in base}, steps, rel, z_final

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
    with _EvalMode(model), float64_exact(model):
        for j, m in enumerate(tqdm(train_indices, desc="PBRF", disable=not progress, leave=False)):
            zb = right_align(task, task.to_device(take(train_data, [m]), dev))
            init_grad = [0.0, 0.0]  # ‖∇_u F‖∞ and ‖∇_z F‖∞ at u = 0, set by the +ε solve
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
    info["converged"] = [max(pair) <= tol for pair in info["relative_gradient"]]
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


def _preconditioner_scaling(est: Any, infos, lam: dict[str, float]) -> Any:
    """`scale(params, sign)`: M^(sign/2) applied to {"layer.weight": ..., "layer.bias": ...}
    for M = Λ⁻¹ ("damping"), a fitted K-FAC, EK-FAC or Diagonal M ≈ (G + Λ)⁻¹ (its own
    damping), or the identity (the same dict) without one."""
    if est is None:
        return lambda params, sign: params
    if isinstance(est, str):
        if est != "damping":
            raise ValueError(f"preconditioner must be 'damping' or a fitted estimator, got {est!r}")

        def by_layer(params: dict[str, torch.Tensor], sign: int) -> dict[str, torch.Tensor]:
            return {k: v * lam[k.rsplit(".", 1)[0]] ** (-0.5 * sign) for k, v in params.items()}

        return by_layer
    state = getattr(est, "state_", None) or {}
    layers = getattr(est, "layers_", None)
    if layers is None or not (hasattr(est, "eigenvalues") or any("::diagonal" in k for k in state)):
        raise ValueError(
            "the PBRF preconditioner must be a fitted KFAC, EKFAC or Diagonal (same damping as "
            f"the PBRF), got {type(est).__name__}" + ("" if layers is not None else " (not fitted)")
        )
    missing = sorted(set(infos) - set(layers))
    if missing:
        raise ValueError(f"the PBRF preconditioner was fitted without tracked layers {missing[:5]}")

    def layer(n: str, v: torch.Tensor, sign: int) -> torch.Tensor:
        lam = est.damping_[n]
        if hasattr(est, "eigenvalues"):
            qa = state[f"{n}::eigvecs_A"].to(v)
            qs = state[f"{n}::eigvecs_S"].to(v)
            d = (est.eigenvalues(n).to(v) + lam).pow(-0.5 * sign)
            return qs @ ((qs.T @ v @ qa) * d) @ qa.T
        return v * (state[f"{n}::diagonal"].to(v) + lam).pow(-0.5 * sign)

    def scale(params: dict[str, torch.Tensor], sign: int) -> dict[str, torch.Tensor]:
        lay = params_to_layout(params, infos)
        return layout_to_params({n: layer(n, v, sign) for n, v in lay.items()}, infos)

    return scale


class _Bound:
    """Callable standing in for the model with the given tracked parameters, for
    `task.measurement(model, batch)`."""

    def __init__(self, wrapper: _TaskOutputs, params: dict[str, torch.Tensor]):
        self.wrapper, self.params = wrapper, params
        self.forward = wrapper.model.forward  # its signature says which batch keys to pass

    def __call__(self, *args, **kwargs):
        # task.outputs(model, batch) calls model(x) or model(**kwargs): forward them as is.
        return functional_call(self.wrapper.model, self.params, args, kwargs if kwargs else None)
