"""The estimator interface: something that fits curvature and applies (G + λI)⁻¹.

Gradients travel as dicts `{layer name: Tensor[Q, out, in']}` in the internal layout of
`influence.layers` (bias as the last column). Block-diagonal estimators precondition each
layer on its own; CG and LiSSA precondition the concatenation of all layers at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import distributed
from .capture import LayerTerms
from .gradients import example_gradients
from .io import atomic_save_safetensors, load_safetensors
from .layers import LayerInfo, check_layers_match, layer_infos
from .lowrank import LowRank, low_rank
from .tasks import Task

Damping = str | float | Mapping[str, float]
Grads = dict[str, torch.Tensor]


def check_damping(damping: Damping) -> Damping:
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(
                f"unknown damping {damping!r}: use 'auto' (0.1 × mean eigenvalue per layer), a "
                "non-negative float, or a dict {layer name: float}"
            )
        return damping
    if isinstance(damping, Mapping):
        bad = {k: v for k, v in damping.items() if not float(v) >= 0}
        if bad:
            raise ValueError(f"damping must be non-negative; got {bad}")
        return {k: float(v) for k, v in damping.items()}
    if not isinstance(damping, (int, float)) or not float(damping) >= 0:
        raise ValueError(
            f"damping must be 'auto', a non-negative float or a dict of floats; got {damping!r}"
        )
    return float(damping)


def layer_damping(damping: Damping, layer: str, mean_eigenvalue: float | None) -> float:
    """λ for `layer`: 0.1 × its mean eigenvalue ('auto'), the float, or the dict's entry."""
    if damping == "auto":
        if mean_eigenvalue is None:
            raise ValueError("damping='auto' needs the layer's mean eigenvalue")
        return 0.1 * float(mean_eigenvalue)
    if isinstance(damping, Mapping):
        if layer not in damping:
            raise ValueError(f"damping dict has no entry for layer {layer!r}")
        return float(damping[layer])
    return float(damping)


class Estimator:
    """Base class. Subclasses set `name`, implement `_fit` and `precondition`, and keep their
    fitted tensors in `self.state_` ({key: tensor}) so that save/load work unchanged."""

    name: ClassVar[str] = "estimator"
    block_diagonal: ClassVar[bool] = True

    def __init__(self, damping: Damping = "auto"):
        self.damping = check_damping(damping)
        self.layers_: dict[str, LayerInfo] | None = None
        self.damping_: dict[str, float] = {}
        self.state_: dict[str, torch.Tensor] = {}
        self.meta_: dict[str, Any] = {}

    # -- fitting ----------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        task: Task,
        data: Any,
        *,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = True,
        seed: int = 0,
    ) -> Estimator:
        """Fit the curvature on `data` (sampled labels seeded by `seed`). Under a process group
        the passes are split across ranks and their sums all-reduced (influence.distributed)."""
        model = distributed.unwrap_model(model)
        self.layers_ = layer_infos(task.tracked_modules(model))
        self._fit(
            model, task, data, batch_size=batch_size, device=device, progress=progress, seed=seed
        )
        self._check_finite()
        return self

    def _fit(self, model, task, data, *, batch_size, device, progress, seed) -> None:
        raise NotImplementedError

    def resolve_damping(self, layer: str, mean_eigenvalue: float | None) -> float:
        """λ for `layer`: 0.1 × mean eigenvalue ('auto'), the float, or the dict's entry."""
        return layer_damping(self.damping, layer, mean_eigenvalue)

    def _check_finite(self) -> None:
        for key, t in self.state_.items():
            if not torch.isfinite(t).all():
                raise FloatingPointError(
                    f"{self.name}: NaN or Inf in fitted curvature {key!r} (layer "
                    f"{key.split('::')[0]!r}). Check the model's outputs and loss on the fitting "
                    "data, use float32/float64 instead of half precision, or lower the learning "
                    "rate."
                )

    def check_fitted(self, model_layers: dict[str, LayerInfo]) -> None:
        if self.layers_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, task, data)")
        check_layers_match(self.layers_, model_layers)

    # -- applying ---------------------------------------------------------------------------
    def precondition(self, grads: Grads) -> Grads:
        """Return (G + λI)⁻¹ applied to each row of the gradients."""
        raise NotImplementedError

    def precondition_terms(
        self, terms: LayerTerms, rank: int | None = None
    ) -> dict[str, torch.Tensor | LowRank]:
        """(G + λI)⁻¹ applied to the per-example gradients of one batch, given as per-token
        terms {layer: (ā, g)}; with `rank`, each as a rank-`rank` truncated SVD.

        For block-diagonal estimators, whose examples are preconditioned independently; CG and
        LiSSA solve for all examples at once through `precondition`."""
        out: dict[str, torch.Tensor | LowRank] = {}
        for n, (a, g) in terms.items():  # one layer at a time: bounded memory on large models
            p = self.precondition(example_gradients({n: (a, g)}))[n]
            out[n] = p if rank is None else low_rank(p, rank)
        return out

    # -- persistence ------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        damping = self.damping if not isinstance(self.damping, Mapping) else dict(self.damping)
        return {"damping": damping}

    def save(self, path: str | Path) -> None:
        """Write the fitted state atomically as one safetensors file with JSON metadata."""
        if self.layers_ is None:
            raise RuntimeError("nothing to save: the estimator is not fitted")
        meta = {
            "estimator": type(self).__name__,
            "config": self._config(),
            "layers": {
                n: [i.out_features, i.in_features, i.bias, i.transposed]
                for n, i in self.layers_.items()
            },
            "damping_": self.damping_,
            "meta_": self.meta_,
        }
        atomic_save_safetensors(self.state_, path, {"influence": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, task: Task | None = None) -> Estimator:
        """Load fitted state and check it belongs to `model` (its tracked layers and shapes)."""
        tensors, metadata = load_safetensors(path)
        if "influence" not in metadata:
            raise ValueError(f"{path} was not written by influence's Estimator.save")
        meta = json.loads(metadata["influence"])
        if meta["estimator"] != cls.__name__:
            raise ValueError(f"{path} holds a {meta['estimator']}, not a {cls.__name__}")
        est = cls(**meta["config"])
        est.layers_ = {
            n: LayerInfo(n, int(o), int(i), bool(b), bool(t))
            for n, (o, i, b, t) in meta["layers"].items()
        }
        task = task or _task_for(est.layers_)
        check_layers_match(est.layers_, layer_infos(task.tracked_modules(model)))
        est.damping_ = {k: float(v) for k, v in meta["damping_"].items()}
        est.meta_ = meta["meta_"]
        est.state_ = dict(tensors)
        return est


def _task_for(layers: dict[str, LayerInfo]) -> Task:
    """A task that tracks exactly the saved layers (for loading without a task)."""
    return Task(modules=list(layers))
