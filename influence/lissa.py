"""LiSSA: the stochastic Neumann-series estimate of (G + Λ)⁻¹ v with minibatch GNVPs.

x₀ = v;  x_{j+1} = v + x_j − (G_B + Λ) x_j / s;  answer x_depth / s, averaged over `repeats`.
It converges when s > λ_max(G_B + Λ) / 2 for every minibatch, at rate 1 − λ_min(G + Λ)/s per
step, so `depth` must be several times s / min λ_ℓ. Divergence is detected and raised.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checks
from .cg import _FullCurvature
from .gnvp import take


class LiSSA(_FullCurvature):
    """(G + Λ)⁻¹ v ≈ x / s from the recursion x ← v + x − (G_B + Λ) x / s.

    damping: as for `CG` ('auto', a float, or a dict {layer: λ} such as `ekfac.damping_`).
    scale: s; 'auto' = 2 × λ_max(G + Λ) estimated by power iteration on the full data
        (room for minibatch noise). Must exceed λ_max(G_B + Λ)/2 or the recursion diverges.
    depth: recursion steps per repeat; repeats: independent runs averaged.
    batch_size: training examples per minibatch GNVP (drawn without replacement per epoch).
    """

    name = "lissa"

    def __init__(
        self,
        damping: Any = "auto",
        scale: float | str = "auto",
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        power_iters: int = 30,
    ):
        super().__init__(damping)
        if not isinstance(scale, str):
            scale = checks.positive_float("scale", scale)
        elif scale != "auto":
            raise ValueError(f"scale must be 'auto' or a positive number, got {scale!r}")
        depth = checks.positive_int("depth", depth)
        repeats = checks.positive_int("repeats", repeats)
        batch_size = checks.positive_int("batch_size", batch_size)
        seed = checks.integer("seed", seed)
        power_iters = checks.positive_int("power_iters", power_iters)
        self.scale, self.depth, self.repeats = scale, int(depth), int(repeats)
        self.lissa_batch_size, self.lissa_seed, self.power_iters = (
            int(batch_size),
            seed,
            power_iters,
        )

    def _config(self):
        return {
            **super()._config(),
            "scale": self.scale,
            "depth": self.depth,
            "repeats": self.repeats,
        }

    def _fit(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        super()._fit(
            model, task, data, batch_size=batch_size, device=device, progress=progress, seed=seed
        )
        if self.scale == "auto":
            self.scale_ = 2.0 * self.max_eigenvalue(self.power_iters)
        else:
            self.scale_ = float(self.scale)
        self.meta_["scale"] = self.scale_

    def with_damping(self, damping) -> LiSSA:
        """As `CG.with_damping`; with scale='auto' the scale is re-estimated for the new
        damping (power iteration with GNVPs, no fitting pass)."""
        new = super().with_damping(damping)
        if self.scale == "auto":
            new.scale_ = 2.0 * new.max_eigenvalue(self.power_iters)
            new.meta_["scale"] = new.scale_
        return new

    def max_eigenvalue(self, iters: int = 30) -> float:
        """λ_max(G + Λ) by power iteration with full-data GNVPs."""
        op = self.operator_
        gen = torch.Generator().manual_seed(self.lissa_seed)
        v = torch.randn(1, op.dim, generator=gen, dtype=torch.float64).to(op.device)
        v /= v.norm()
        lam = 0.0
        for _ in range(iters):
            w = op.matvec(v)
            lam = float((w * v).sum())
            v = w / w.norm()
        return lam

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """LiSSA estimate of (G + Λ)⁻¹ B for flat right-hand sides B [Q, P] (float64)."""
        # A NaN right-hand side is the caller's, not a divergence: say so before iterating.
        checks.check_finite_rhs(b, self.layers_, "LiSSA")
        op = self.operator_
        b = b.to(op.device, torch.float64)
        s = self.scale_
        lam_min = float(op.lam.min())
        bnorm = b.norm(dim=1).clamp_min(1e-300)
        # ‖x‖ ≤ s ‖v‖ / λ_min(G + Λ) when the recursion converges; far beyond that it diverges.
        bound = 100.0 * s / max(lam_min, 1e-12 * s)
        n = op.num_examples
        rng = np.random.default_rng(self.lissa_seed)
        total = torch.zeros_like(b)
        bar = tqdm(
            total=self.repeats * self.depth, desc="LiSSA", disable=not self.progress_, leave=False
        )
        for rep in range(self.repeats):
            x = b.clone()
            order, pos = rng.permutation(n), 0
            for step in range(self.depth):
                if pos + self.lissa_batch_size > n:
                    order, pos = rng.permutation(n), 0
                idx = order[pos : pos + self.lissa_batch_size]
                pos += self.lissa_batch_size
                batch = take(op.data, idx)
                hx = op.matvec(x, batch=batch)
                if not bool(torch.isfinite(hx.sum())) and bool(torch.isfinite(x.sum())):
                    # Finite iterate, non-finite product: the model or data, not divergence.
                    raise FloatingPointError(
                        f"LiSSA: the Gauss–Newton product on training examples "
                        f"{sorted(int(i) for i in idx)[:8]} is NaN/Inf at repeat {rep}, step "
                        f"{step}: check those examples and the model's outputs on them"
                    )
                x = b + x - hx / s
                ratio = x.norm(dim=1) / bnorm
                if not torch.isfinite(x).all() or (ratio > bound).any():
                    raise FloatingPointError(
                        f"LiSSA diverged at repeat {rep}, step {step} (‖x‖/‖v‖ = "
                        f"{float(ratio.max()):.3g} with scale {s:.4g}): increase `scale` (it must "
                        "exceed half the largest eigenvalue of the damped minibatch Gauss–Newton "
                        "matrix), or increase `batch_size`"
                    )
                bar.update(1)
            total += x / s
        bar.close()
        self.meta_.setdefault("solves", []).append({"depth": self.depth, "repeats": self.repeats})
        return total / self.repeats
