"""K-FAC: each layer's block of G as T̄ · (A ⊗ S), from token covariances of inputs and
output gradients (sampled labels); inverted through the eigendecompositions of A and S."""

from __future__ import annotations

import torch

from .estimator import Estimator, Grads
from .gradients import iter_layer_terms


def _masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, d] -> [K, d], keeping the K real-token positions."""
    if mask is None or bool(mask.all()):
        return x.reshape(-1, x.shape[-1])
    return x[mask.reshape(x.shape[:2])]


def fit_covariances(model, task, data, *, seed, batch_size, device, progress):
    """One pass with sampled labels: A = E_tokens[ā āᵀ], S = E_tokens[g gᵀ] (float64),
    the number of examples, and T̄, the mean number of real tokens per example."""
    a_sum: dict[str, torch.Tensor] = {}
    s_sum: dict[str, torch.Tensor] = {}
    tokens = examples = 0
    for _, batch, terms, mask in iter_layer_terms(
        model,
        task,
        data,
        sample=True,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="covariances",
    ):
        examples += task.batch_size(batch)
        k = 0
        input_products: dict[int, torch.Tensor] = {}  # layers sharing an input share ā āᵀ
        for n, (a, g) in terms.items():
            if id(a) not in input_products:
                rows = _masked_rows(a, mask)
                input_products[id(a)] = (rows.T @ rows).double()
            g = _masked_rows(g, mask)
            k = g.shape[0]
            aa, gg = input_products[id(a)], (g.T @ g).double()
            a_sum[n] = a_sum[n] + aa if n in a_sum else aa
            s_sum[n] = s_sum[n] + gg if n in s_sum else gg
        tokens += k
    if examples == 0:
        raise ValueError("cannot fit on empty data")
    return (
        {n: v / tokens for n, v in a_sum.items()},
        {n: v / tokens for n, v in s_sum.items()},
        examples,
        tokens / examples,
    )


def _eigh(m: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.isfinite(m).all():
        raise FloatingPointError(
            f"NaN or Inf in covariance {what}: check the model's outputs and loss on the fitting "
            "data (half precision or a diverged model are the usual causes)"
        )
    vals, vecs = torch.linalg.eigh(m.double())
    return vals.clamp_(min=0.0), vecs


class KFAC(Estimator):
    """Kronecker-factored curvature: block ≈ T̄ · (A ⊗ S); 'auto' damping is 0.1 × the mean
    eigenvalue T̄ · mean(λ_A) · mean(λ_S) of that block."""

    name = "kfac"

    def _fit(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        a_cov, s_cov, examples, mean_tokens = fit_covariances(
            model, task, data, seed=seed, batch_size=batch_size, device=device, progress=progress
        )
        self.state_ = {}
        for n in a_cov:
            la, qa = _eigh(a_cov[n], f"A of layer {n!r}")
            ls, qs = _eigh(s_cov[n], f"S of layer {n!r}")
            self.state_.update(
                {
                    f"{n}::eigvals_A": la,
                    f"{n}::eigvecs_A": qa,
                    f"{n}::eigvals_S": ls,
                    f"{n}::eigvecs_S": qs,
                }
            )
        self.meta_ = {"num_examples": examples, "mean_tokens": mean_tokens}
        self._fit_eigenvalues(
            model, task, data, batch_size=batch_size, device=device, progress=progress, seed=seed
        )

    def _fit_eigenvalues(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        t = self.meta_["mean_tokens"]
        self.damping_ = {}
        for n in self.layers_:
            la, ls = self.state_[f"{n}::eigvals_A"], self.state_[f"{n}::eigvals_S"]
            self.damping_[n] = self.resolve_damping(n, t * la.mean() * ls.mean())

    def eigenvalues(self, layer: str) -> torch.Tensor:
        """The [out, in'] eigenvalues of the layer's block in the Kronecker eigenbasis."""
        la, ls = self.state_[f"{layer}::eigvals_A"], self.state_[f"{layer}::eigvals_S"]
        return self.meta_["mean_tokens"] * torch.outer(ls, la)

    def precondition(self, grads: Grads) -> Grads:
        out = {}
        for n, v in grads.items():
            qa = self.state_[f"{n}::eigvecs_A"].to(v.device)
            qs = self.state_[f"{n}::eigvecs_S"].to(v.device)
            lam = self.eigenvalues(n).to(v.device)
            rotated = qs.T @ v.double() @ qa
            out[n] = (qs @ (rotated / (lam + self.damping_[n])) @ qa.T).to(v.dtype)
        return out

    def implied_matrix(self, layer: str) -> torch.Tensor:
        """The undamped block this estimator stands for, [out·in', out·in'] (row-major vec of
        the out × in' gradient): for tests and small models only."""
        qa = self.state_[f"{layer}::eigvecs_A"]
        qs = self.state_[f"{layer}::eigvecs_S"]
        basis = torch.kron(qs, qa)
        return basis @ torch.diag(self.eigenvalues(layer).reshape(-1)) @ basis.T
