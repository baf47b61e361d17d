"""EK-FAC: K-FAC's Kronecker eigenbases with the eigenvalues refitted per coordinate,
Λ_ij = (1/N) Σ_n ((Q_Sᵀ DW_n Q_A)_ij)², DW_n example n's pseudo-gradient summed over tokens."""

from __future__ import annotations

import torch

from .gradients import iter_layer_terms
from .kfac import KFAC


def rotate_tokens_first(tokens: int, out_features: int, in_dim: int) -> bool:
    """Whether rotating every token into the eigenbases, T·(out² + in'²) multiply-adds, is
    cheaper than rotating each example's summed gradient, out·in'·(out + in')."""
    o, i = out_features, in_dim
    return tokens * (o * o + i * i) < o * i * (o + i)


def _project(a, g, qa, qs, rotated_inputs: dict) -> torch.Tensor:
    """Q_Sᵀ (Σ_t g_t ā_tᵀ) Q_A per example, [B, out, in'], by the cheaper of two orders:
    rotate every token then sum (short sequences), or sum then rotate each example.

    `rotated_inputs` caches ā Q_A for layers that share both their input and their Q_A (q/k/v
    and gate/up have equal input covariances, hence equal eigenbases)."""
    if not rotate_tokens_first(g.shape[1], g.shape[2], a.shape[-1]):
        return qs.T @ torch.einsum("bto,bti->boi", g, a) @ qa
    cached = rotated_inputs.get(id(a))
    if cached is not None and torch.equal(cached[0], qa):
        a_rot = cached[1]
    else:
        a_rot = a @ qa
        rotated_inputs[id(a)] = (qa, a_rot)
    return torch.einsum("bto,bti->boi", g @ qs, a_rot)


class EKFAC(KFAC):
    """Eigenvalue-corrected K-FAC (the paper's estimator). Two passes over the fitting data
    with the same sampled labels: covariances, then the eigenvalues in their eigenbases."""

    name = "ekfac"

    def _fit_eigenvalues(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        sums: dict[str, torch.Tensor] = {}
        bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
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
            desc="eigenvalues",
        ):
            count += task.batch_size(batch)
            rotated_inputs: dict = {}
            for n, (a, g) in terms.items():
                if n not in bases:
                    bases[n] = (
                        self.state_[f"{n}::eigvecs_A"].to(a),
                        self.state_[f"{n}::eigvecs_S"].to(g),
                    )
                sq = _project(a, g, *bases[n], rotated_inputs).pow(2).sum(0).double()
                sums[n] = sums[n] + sq if n in sums else sq
        self.damping_ = {}
        for n, s in sums.items():
            lam = s / count
            self.state_[f"{n}::lambda"] = lam
            self.damping_[n] = self.resolve_damping(n, lam.mean())

    def eigenvalues(self, layer: str) -> torch.Tensor:
        return self.state_[f"{layer}::lambda"]
