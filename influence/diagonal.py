"""Diagonal: the diagonal of G, fitted as the mean squared per-example pseudo-gradient."""

from __future__ import annotations

import torch

from . import distributed
from .estimator import Estimator, Grads
from .gradients import iter_layer_terms, token_outer_sum


class Diagonal(Estimator):
    """(G + λI)⁻¹ ≈ (diag(G) + λ)⁻¹ with diag(G) = E_n[(∇L_n(ŷ))²], ŷ sampled from the model."""

    name = "diagonal"

    @classmethod
    def state_shapes(cls, info):
        return {"diagonal": info.shape}

    def _fit(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for _, batch, terms, _, _ in iter_layer_terms(
            model,
            task,
            data,
            sample=True,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc="diagonal",
            shard=True,
        ):
            count += task.batch_size(batch)
            # One layer's per-example gradients at a time: a batch of all of them would not
            # fit for a large model.
            for n, (a, g) in terms.items():
                sq = token_outer_sum(g, a).square_().sum(0).double()  # in place: a temporary
                sums[n] = sums[n] + sq if n in sums else sq
        if distributed.is_distributed():  # every rank ends with the sums over all ranks
            for n, info in self.layers_.items():
                sums.setdefault(n, torch.zeros(info.out_features, info.in_dim).double())
            sums = distributed.all_reduce_sum(sums)
            count = int(distributed.all_reduce_number(count))
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
