"""Identity: (G + λI)⁻¹ ≈ I, the gradient dot product (the paper's "dot product" baseline)."""

from __future__ import annotations

from .estimator import Estimator, Grads


class Identity(Estimator):
    """No curvature: scores are plain gradient dot products. Fitting reads no data."""

    name = "identity"

    def __init__(self, damping="auto"):
        super().__init__(damping)

    def _fit(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        self.damping_ = {n: 0.0 for n in self.layers_}

    def with_damping(self, damping) -> Identity:
        """An equal estimator (the dot product has no damping; the setting is only recorded)."""
        new = super().with_damping(damping)
        new.damping_ = dict(self.damping_)
        return new

    def _mean_eigenvalue(self, layer: str) -> float:
        return 1.0  # a placeholder so that 'auto' resolves; Identity ignores its damping

    def precondition(self, grads: Grads) -> Grads:
        return dict(grads)
