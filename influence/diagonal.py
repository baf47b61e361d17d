"""Diagonal: the diagonal of G, fitted as the mean squared per-example pseudo-gradient."""

from __future__ import annotations

import torch

from .estimator import Estimator, Grads
from .gradients import example_gradients, iter_layer_terms


class Diagonal(Estimator):
    """(G + λI)⁻¹ ≈ (diag(G) + λ)⁻¹ with diag(G) = E_n[(∇L_n(ŷ))²], ŷ sampled from the model."""

    name = "diagonal"

    def _fit(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for _, batch, terms, _ in iter_layer_terms(
            model,
            task,
            data,
            sample=True,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc="diagonal",
        ):
            count += task.batch_size(batch)
            for n, gr in example_gradients(terms).items():
                sq = gr.square_().sum(0).double()  # in place: gr is a fresh temporary
                sums[n] = sums[n] + sq if n in sums else sq
        if count == 0:
            raise ValueError("cannot fit on empty data")
        self.state_ = {f"{n}::diagonal": s / count for n, s in sums.items()}
        self.damping_ = {n: self.resolve_damping(n, self._mean_eigenvalue(n)) for n in sums}
        self.meta_ = {"num_examples": count}

    def _mean_eigenvalue(self, layer: str) -> torch.Tensor:
        return self.state_[f"{layer}::diagonal"].mean()

    def precondition(self, grads: Grads) -> Grads:
        out = {}
        for n, v in grads.items():
            d = self.state_[f"{n}::diagonal"].to(v.device)
            out[n] = (v.double() / (d + self.damping_[n])).to(v.dtype)
        return out
