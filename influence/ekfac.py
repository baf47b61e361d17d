"""EK-FAC: K-FAC's Kronecker eigenbases with the eigenvalues refitted per coordinate,
Λ_ij = (1/N) Σ_n ((Q_Sᵀ DW_n Q_A)_ij)², DW_n example n's pseudo-gradient summed over tokens."""

from __future__ import annotations

import torch

from . import distributed
from .gradients import iter_layer_terms
from .kfac import KFAC, Workspace, eigenbasis_gradients


class EKFAC(KFAC):
    """Eigenvalue-corrected K-FAC (the paper's estimator). Two passes over the fitting data
    with the same sampled labels: covariances, then the eigenvalues in their eigenbases."""

    name = "ekfac"

    @classmethod
    def state_shapes(cls, info):
        return {**super().state_shapes(info), "lambda": info.shape}

    def _fit_eigenvalues(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        sums: dict[str, torch.Tensor] = {}
        bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        count = 0
        workspace = Workspace()
        for _, batch, terms, _, _ in iter_layer_terms(
            model,
            task,
            data,
            sample=True,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc="eigenvalues",
            shard=True,
        ):
            count += task.batch_size(batch)
            workspace.next_batch()
            for n, (a, g) in terms.items():
                if n not in bases:
                    bases[n] = (
                        self.state_[f"{n}::eigvecs_A"].to(a),
                        self.state_[f"{n}::eigvecs_S"].to(g),
                    )
                projected = eigenbasis_gradients(a, g, *bases[n], workspace, n)
                sq = projected.square_().sum(0).double()  # in place: no new temporary
                sums[n] = sums[n] + sq if n in sums else sq
            del terms, projected  # not held beside the next batch's forward
        if distributed.is_distributed():  # every rank ends with the sums over all ranks
            for n, info in self.layers_.items():
                sums.setdefault(n, torch.zeros(info.out_features, info.in_dim).double())
            sums = distributed.all_reduce_sum(sums)
            count = int(distributed.all_reduce_number(count))
        self.damping_ = {}
        for n, s in sums.items():
            lam = s / count
            self.damping_[n] = self.resolve_damping(n, lam.mean())  # from the float64 values
            # Stored in the eigenvectors' dtype (see influence.kfac.state_dtype).
            self.state_[f"{n}::lambda"] = lam.to(self.state_[f"{n}::eigvecs_A"].dtype)

    def eigenvalues(self, layer: str) -> torch.Tensor:
        return self.state_[f"{layer}::lambda"]

    def _mean_eigenvalue(self, layer: str) -> torch.Tensor:
        return self.state_[f"{layer}::lambda"].mean()
