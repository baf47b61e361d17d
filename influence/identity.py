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

    def precondition(self, grads: Grads) -> Grads:
        return dict(grads)
