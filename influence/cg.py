"""CG: the exact damped inverse Gauss–Newton–vector product, by conjugate gradient.

Solves (G + Λ) x = v with the full (not block-diagonal) Gauss–Newton matrix G of the training
objective, through exact GNVPs over the whole training set (`influence.gnvp`). With the same
damping Λ = diag(λ_ℓ) it is the answer every other estimator approximates.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checks
from .estimator import Estimator, Grads, check_damping
from .gnvp import GaussNewton, damping_vector, mean_fisher_diagonal, resolve_full_damping
from .gradients import flatten, unflatten
from .io import atomic_path


class _FullCurvature(Estimator):
    """Shared fitting of CG and LiSSA: keep a GNVP operator over the training data."""

    block_diagonal = False

    def _fit(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        mean_eig = None
        if isinstance(self.damping, str):
            mean_eig = mean_fisher_diagonal(
                model,
                task,
                data,
                batch_size=batch_size,
                device=device,
                progress=progress,
                seed=seed,
            )
        self.mean_eigenvalues_ = mean_eig  # kept so that `with_damping` needs no data pass
        self.damping_ = resolve_full_damping(self.damping, self.layers_, mean_eig)
        self.operator_ = GaussNewton(
            model,
            task,
            data,
            damping=self.damping_,
            batch_size=batch_size,
            device=device,
            progress=False,
        )
        self.progress_ = progress
        self.seed_ = seed
        self.meta_ = {"num_examples": self.operator_.num_examples, "solves": []}

    def _check_ready(self, grads: Grads) -> None:
        if getattr(self, "operator_", None) is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, task, data)")
        missing = [n for n in self.layers_ if n not in grads]
        if missing:
            raise ValueError(f"gradients miss tracked layers {missing[:5]}")

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """(G + λI)⁻¹ applied to each row of the flat gradients b [Q, P]."""
        raise NotImplementedError

    def with_damping(self, damping) -> _FullCurvature:
        """A copy solving with another damping: the operator is reused (no fitting pass).
        'auto' needs the mean eigenvalues measured when fitting with 'auto'."""
        if getattr(self, "operator_", None) is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, task, data)")
        damping = check_damping(damping)
        if isinstance(damping, str) and self.mean_eigenvalues_ is None:
            raise ValueError(
                f"{type(self).__name__} was fitted with an explicit damping, so damping='auto' "
                "needs a fitting pass: fit it again with damping='auto'"
            )
        new = copy.copy(self)
        new.damping = damping
        new.damping_ = resolve_full_damping(damping, self.layers_, self.mean_eigenvalues_)
        new.operator_ = copy.copy(self.operator_)
        new.operator_.lam = damping_vector(new.damping_, self.layers_)
        new.meta_ = {**copy.deepcopy(self.meta_), "solves": []}
        return new

    def precondition(self, grads: Grads) -> Grads:
        """All layers at once: flatten, solve with the full curvature, unflatten."""
        self._check_ready(grads)
        ref = next(iter(grads.values()))
        flat = flatten({n: grads[n] for n in self.layers_}, self.layers_)
        x = self.solve(flat)
        return {n: v.to(ref.dtype).to(ref.device) for n, v in unflatten(x, self.layers_).items()}

    def save(self, path) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} keeps a reference to the model and training data, not fitted "
            "tensors: it cannot be saved. Fit it again (fitting only resolves the damping)."
        )

    @classmethod
    def load(cls, path, model, task=None):
        raise NotImplementedError(f"{cls.__name__} cannot be saved or loaded; fit it again")


class CG(_FullCurvature):
    """x = (G + Λ)⁻¹ v by (optionally preconditioned) conjugate gradient.

    damping: 'auto' (0.1 × trace(G_ℓℓ)/dim per layer, the mean eigenvalue of the layer's
        diagonal block, estimated with sampled labels as EK-FAC does), a float, or a dict
        {layer: λ} — pass another estimator's `damping_` so that both solve the same problem.
    tol: stop when every query's TRUE residual ‖(G + Λ)x − v‖ ≤ tol · ‖v‖ (recomputed with
        one product when the recursive residual reaches tol; CG restarts from x if it is not).
    max_iter: iterations (each one GNVP pass over the training data for all queries at once).
        Not reaching `tol` raises unless `strict=False` (then it warns in `meta_`). Each
        solve appends to `meta_["solves"]` its iterations, restarts, and per right-hand side
        the true relative residual and whether it converged, so that a caller can exclude
        (and count) the unconverged ones.
    preconditioner: an optional fitted block-diagonal estimator (e.g. EK-FAC) used as the
        CG preconditioner M ≈ (G + Λ)⁻¹; it changes the speed of convergence, not the answer.
    """

    name = "cg"

    def __init__(
        self,
        damping: Any = "auto",
        tol: float = 1e-6,
        max_iter: int = 1000,
        preconditioner: Estimator | None = None,
        strict: bool = True,
        block_diagonal: bool = False,
    ):
        super().__init__(damping)
        # A diagnostic: the exact inverse of the block-diagonal part of G (each layer's block
        # on its own), which K-FAC and EK-FAC approximate further.
        self.block_only = bool(block_diagonal)
        tol = checks.positive_float("tol", tol)
        max_iter = checks.positive_int("max_iter", max_iter)
        checks.boolean("strict", strict)
        if preconditioner is not None and not getattr(preconditioner, "block_diagonal", False):
            raise ValueError("the CG preconditioner must be a fitted block-diagonal estimator")
        self.tol, self.max_iter = float(tol), int(max_iter)
        self.preconditioner, self.strict = preconditioner, strict

    def _config(self):
        return {
            **super()._config(),
            "tol": self.tol,
            "max_iter": self.max_iter,
            "block_diagonal": self.block_only,
        }

    def _apply_m(self, r: torch.Tensor) -> torch.Tensor:
        if self.preconditioner is None:
            return r.clone()
        dtype = next(iter(self.preconditioner.state_.values())).dtype
        z = self.preconditioner.precondition(
            {k: v.to(dtype) for k, v in unflatten(r, self.layers_).items()}
        )
        return flatten(z, self.layers_).double()

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """Solve (G + Λ) X = B for flat right-hand sides B [Q, P] (float64)."""
        checks.check_finite_rhs(b, self.layers_, "CG")
        if self.block_only:
            return self._solve_blocks(b)
        return self._solve(b, self.operator_.matvec)

    def _solve_blocks(self, b: torch.Tensor) -> torch.Tensor:
        """Each layer's block (G_ℓℓ + λ_ℓ) solved on its own: one masked copy of every
        right-hand side per layer, all in the same GNVP passes."""
        op = self.operator_
        q = b.shape[0]
        masks = []
        start = 0
        for info in self.layers_.values():
            m = torch.zeros(op.dim, dtype=torch.float64, device=op.device)
            m[start : start + info.numel] = 1.0
            masks.append(m)
            start += info.numel
        mask = torch.cat([m.expand(q, -1) for m in masks])  # [L*Q, P]
        rhs = b.to(op.device, torch.float64).repeat(len(masks), 1) * mask

        def matvec(x, idx):
            return op.matvec(x) * mask[idx]

        x = self._solve(rhs, matvec, masked=True)
        return x.reshape(len(masks), q, -1).sum(0)

    def _solve(
        self, b: torch.Tensor, matvec, masked: bool = False, x0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Preconditioned CG on every row of b at once (from x0, default 0); a row leaves the
        iteration when its TRUE relative residual ‖b − (G + Λ)x‖/‖b‖ is ≤ tol.

        The recursively updated residual drifts from the true one in finite precision; when
        it says a row is done, the true residual is computed (one product) and a row above
        tol restarts from its current x with that residual, within the same `max_iter`."""
        op = self.operator_
        b = b.to(op.device, torch.float64)
        bnorm = b.norm(dim=1)
        x = torch.zeros_like(b) if x0 is None else x0.to(b).clone()
        r = b.clone()
        res = torch.zeros_like(bnorm)  # true relative residuals (x = 0: 1 where b ≠ 0)
        res[bnorm > 0] = 1.0
        iterations = torch.zeros(b.shape[0], dtype=torch.long)
        history: list[float] = []  # worst recursive residual of the active rows, per iteration
        it, restarts = 0, 0

        def product(v, idx):
            return matvec(v, idx) if masked else matvec(v)

        def true_residual(idx):
            r[idx] = b[idx] - product(x[idx], idx)
            res[idx] = r[idx].norm(dim=1) / bnorm[idx]

        bar = tqdm(total=self.max_iter, desc="CG", disable=not self.progress_, leave=False)
        pending = bnorm > 0
        if x0 is not None and pending.any():
            true_residual(pending.nonzero().squeeze(1))
            pending &= res > self.tol
        while pending.any() and it < self.max_iter:
            active = pending.clone()
            z = self._apply_m(r)
            p = z.clone()
            rz = (r * z).sum(1)
            while active.any() and it < self.max_iter:
                idx = active.nonzero().squeeze(1)
                ap = product(p[idx], idx)
                pap = (p[idx] * ap).sum(1)
                if not (pap > 0).all():
                    raise FloatingPointError(
                        "CG met a non-positive curvature pᵀ(G + Λ)p: the damping must be "
                        "positive (or the model/loss produced NaN)"
                    )
                alpha = rz[idx] / pap
                x[idx] += alpha[:, None] * p[idx]
                r[idx] -= alpha[:, None] * ap
                iterations[idx.cpu()] += 1
                it += 1
                bar.update(1)
                rec = r[idx].norm(dim=1) / bnorm[idx]
                history.append(float(rec.max()))
                done = rec <= self.tol
                keep = idx[~done]
                active[idx[done]] = False
                if keep.numel():
                    zk = self._apply_m(r[keep])
                    rz_new = (r[keep] * zk).sum(1)
                    beta = rz_new / rz[keep]
                    p[keep] = zk + beta[:, None] * p[keep]
                    rz[keep] = rz_new
            rows = pending.nonzero().squeeze(1)
            true_residual(rows)
            pending[rows] = res[rows] > self.tol
            restarts += int(pending.any() and it < self.max_iter)
        bar.close()
        return self._finish(x, res, iterations, it, restarts, history)

    def _finish(self, x, res, iterations, it, restarts, history, **extra) -> torch.Tensor:
        """Check x, append the solve's record to `meta_["solves"]`, raise or warn if any
        right-hand side did not converge."""
        if not torch.isfinite(x).all():
            raise FloatingPointError("CG produced NaN/Inf: check the model, loss and damping")
        converged = res <= self.tol
        info = {
            **extra,
            "iterations": it,
            "max_relative_residual": float(res.max()),
            "relative_residuals": res.tolist(),
            "converged": converged.tolist(),
            "iterations_per_rhs": iterations.tolist(),
            "restarts": restarts,
            "history": history,
        }
        self.meta_.setdefault("solves", []).append(info)
        if not converged.all():
            msg = (
                f"CG did not reach relative residual {self.tol:g} in {self.max_iter} iterations "
                f"for {int((~converged).sum())} of {len(res)} right-hand sides (worst "
                f"{float(res.max()):.3g}); raise max_iter, raise the damping, or pass a "
                "preconditioner (e.g. a fitted EKFAC)"
            )
            if self.strict:
                raise RuntimeError(msg)
            info["warning"] = msg
        return x

    def solve_scaled(
        self,
        b: torch.Tensor,
        scales: Sequence[float],
        checkpoint: str | Path | None = None,
        checkpoint_seconds: float = 120.0,
    ) -> dict[float, torch.Tensor]:
        """(G + sΛ)⁻¹ B for every damping scale s at once; B [Q, P] flat; returns {s: X_s}.

        Multi-shift CG (Jegerlehner 1996, hep-lat/9612014) on Λ^-½ G Λ^-½ + sI, whose Krylov
        spaces do not depend on s: every scale costs the GNVPs of the smallest one alone. In
        the original variables each scale is CG preconditioned by Λ⁻¹ (one number per layer),
        which keeps the iterates in the span of the Jacobian's rows. (A block-diagonal
        preconditioner such as EK-FAC does not: it excites the directions that the MLP's
        rescaling symmetry leaves without curvature, and converged more slowly on the study's
        Llamas.) Each (query, scale) stops on its residual; at the end every TRUE residual is
        computed and one above tol is refined by CG from its x within the iterations left.
        Appends one record per scale (with its "scale") to `meta_["solves"]`.

        checkpoint: a file that keeps the shared iteration's state, written atomically at most
            every `checkpoint_seconds` (0: every iteration) and removed when the solve
            returns. A solve that finds it resumes where the killed one stopped and gives the
            same iterates (bit for bit at the same thread count). It is checked against this
            problem (right-hand sides, scales, damping, tol and one GNVP of a fixed vector): a
            checkpoint of another problem raises, naming what differs."""
        checks.check_finite_rhs(b, self.layers_, "CG")
        if self.block_only or self.preconditioner is not None:
            raise ValueError(
                "solve_scaled preconditions by the damping itself: use a CG without "
                "`preconditioner` and `block_diagonal`"
            )
        scales = [checks.positive_float("scales", v) for v in scales]
        op = self.operator_
        b = b.to(op.device, torch.float64)
        lam = op.lam.to(op.device)
        d = lam.rsqrt()  # Λ^-½: the system in y = Λ^½ x
        s0 = min(scales)
        sig = torch.tensor([v - s0 for v in scales], dtype=torch.float64, device=op.device)[:, None]
        q, n_s = b.shape[0], len(scales)
        bnorm = b.norm(dim=1)
        r = b * d
        p = r.clone()
        ps = r.expand(n_s, -1, -1).clone()  # each scale's search directions
        y = torch.zeros_like(ps)
        zeta = torch.ones(n_s, q, dtype=torch.float64, device=op.device)
        zeta_prev = zeta.clone()
        alpha_prev = torch.ones(q, dtype=torch.float64, device=op.device)
        beta_prev = torch.zeros_like(alpha_prev)
        rr = (r * r).sum(1)
        done = (bnorm == 0).expand(n_s, -1).clone()
        active = ~done.all(0)
        iterations = torch.zeros(q, dtype=torch.long)
        history: list[float] = []
        it = 0
        state_names = ("r", "p", "ps", "y", "zeta", "zeta_prev", "alpha_prev", "beta_prev")
        state_names += ("rr", "done", "active", "iterations")
        store = None
        if checkpoint is not None:
            store = _Checkpoint(checkpoint, checkpoint_seconds, self, b, scales)
            saved = store.load()
            if saved is not None:
                on_device = [saved[k].to(b.device) for k in state_names[:-1]]
                r, p, ps, y, zeta, zeta_prev, alpha_prev, beta_prev, rr, done, active = on_device
                iterations, it, history = saved["iterations"], saved["it"], saved["history"]
        resumed_at = it
        before = store.before if store is not None else {"wall_s": 0.0, "cpu_s": 0.0}
        bar = tqdm(
            total=self.max_iter, initial=it, desc="CG", disable=not self.progress_, leave=False
        )
        while active.any() and it < self.max_iter:
            idx = active.nonzero().squeeze(1)
            ap = d * op.gnvp(d * p[idx]) + s0 * p[idx]
            a = rr[idx] / (p[idx] * ap).sum(1)
            z, zp = zeta[:, idx], zeta_prev[:, idx]
            zn = (
                z
                * zp
                * alpha_prev[idx]
                / (a * beta_prev[idx] * (zp - z) + zp * alpha_prev[idx] * (1 + sig * a))
            )
            live = ~done[:, idx]
            y[:, idx] += torch.where(live, a * zn / z, 0.0)[..., None] * ps[:, idx]
            rn = r[idx] - a[:, None] * ap
            rrn = (rn * rn).sum(1)
            beta = rrn / rr[idx]
            step = zn[..., None] * rn + (beta * (zn / z) ** 2)[..., None] * ps[:, idx]
            ps[:, idx] = torch.where(live[..., None], step, ps[:, idx])
            p[idx] = rn + beta[:, None] * p[idx]
            r[idx], rr[idx] = rn, rrn
            zeta_prev[:, idx], zeta[:, idx] = z, torch.where(live, zn, z)
            alpha_prev[idx], beta_prev[idx] = a, beta
            # each scale's residual in the original variables: Λ^½ ζ_s r
            rec = zeta[:, idx].abs() * (rn / d).norm(dim=1) / bnorm[idx]
            done[:, idx] |= rec <= self.tol
            active[idx] = ~done[:, idx].all(0)
            iterations[idx.cpu()] += 1
            history.append(float(rec.max()))
            it += 1
            bar.update(1)
            if store is not None:
                values = (r, p, ps, y, zeta, zeta_prev, alpha_prev, beta_prev, rr, done, active)
                state = dict(zip(state_names, (*values, iterations), strict=True))
                store.maybe_save(state, it, history)
        bar.close()
        x = y * d
        # TRUE residuals of every (scale, query), one batched product
        gx = op.gnvp(x.reshape(n_s * q, -1)).reshape(n_s, q, -1)
        scale_col = torch.tensor(scales, dtype=torch.float64, device=op.device)[:, None, None]
        res = (b - gx - scale_col * lam * x).norm(dim=2) / bnorm.clamp_min(1e-300)
        res[:, bnorm == 0] = 0.0
        out = {}
        left = self.max_iter
        for j, v in enumerate(scales):
            rows = (res[j] > self.tol).nonzero().squeeze(1)
            its = iterations.clone()
            info_extra = {
                "scale": v,
                "shared_iterations": it,
                "resumed_at": resumed_at,
                "seconds_before_resume": before,
            }
            if rows.numel() and it < left:
                # refine from x: plain CG on this scale's system, within the iterations left
                cap, self.max_iter = self.max_iter, left - it
                strict, self.strict = self.strict, False
                try:
                    x[j, rows] = self._solve(
                        b[rows], lambda u, v=v: op.gnvp(u) + v * lam * u, x0=x[j, rows]
                    )
                finally:
                    self.max_iter, self.strict = cap, strict
                refined = self.meta_["solves"].pop()
                res[j, rows] = torch.tensor(refined["relative_residuals"], dtype=res.dtype)
                its[rows.cpu()] += torch.tensor(refined["iterations_per_rhs"])
                info_extra["refined"] = rows.tolist()
            out[v] = self._finish(x[j], res[j], its, it, int(rows.numel()), history, **info_extra)
        if store is not None:
            store.remove()
        return out


class _Checkpoint:
    """The state of a multi-shift CG solve on disk, tied to its problem (`CG.solve_scaled`)."""

    def __init__(self, path, seconds: float, cg: CG, b: torch.Tensor, scales: Sequence[float]):
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
            raise ValueError(f"checkpoint_seconds must be a number >= 0, got {seconds!r}")
        self.path, self.seconds = Path(path), float(seconds)
        op = cg.operator_
        # One GNVP of a fixed vector identifies the model, data and loss of the operator.
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(1, op.dim, generator=gen, dtype=torch.float64).to(op.device)
        self.problem = {
            "b": b.detach().cpu(),
            "lam": op.lam.detach().cpu().double(),
            "gnvp_probe": op.gnvp(probe).cpu(),
            "scales": torch.tensor(list(scales), dtype=torch.float64),
            "tol": torch.tensor([cg.tol], dtype=torch.float64),
        }
        self.last = time.monotonic()
        # seconds spent on the solve by the processes killed before this one (saved states)
        self.before = {"wall_s": 0.0, "cpu_s": 0.0}
        self.start = (time.perf_counter(), time.process_time())

    def load(self) -> dict | None:
        """The saved state, or None when there is no checkpoint yet."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a file that is not a checkpoint: say so, never guess
            raise ValueError(
                f"cannot read the CG checkpoint {self.path} ({type(err).__name__}: {err}); "
                "delete it to start the solve again"
            ) from None
        for name, want in self.problem.items():
            got = saved["problem"].get(name)
            # relative to the whole tensor: other thread counts move the last bits only
            if (
                got is None
                or got.shape != want.shape
                or float((got - want).norm()) > 1e-9 * float(want.norm())
            ):
                raise ValueError(
                    f"the CG checkpoint {self.path} belongs to another problem (its {name} "
                    "differs: other right-hand sides, scales, damping, tol, model or data); "
                    "delete it or pass another checkpoint path"
                )
        self.before = dict(saved["state"]["spent"])
        return saved["state"]

    def maybe_save(self, state: dict, it: int, history: list[float]) -> None:
        if time.monotonic() - self.last < self.seconds:
            return
        blob = {
            "problem": self.problem,
            "state": {
                **{k: v.detach().cpu() for k, v in state.items()},
                "it": it,
                "history": list(history),
                "spent": {
                    "wall_s": self.before["wall_s"] + time.perf_counter() - self.start[0],
                    "cpu_s": self.before["cpu_s"] + time.process_time() - self.start[1],
                },
            },
        }
        with atomic_path(self.path) as tmp:
            torch.save(blob, tmp)
        self.last = time.monotonic()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
