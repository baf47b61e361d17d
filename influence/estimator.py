"""The estimator interface: something that fits curvature and applies (G + λI)⁻¹.

Gradients travel as dicts `{layer name: Tensor[Q, out, in']}` in the internal layout of
`influence.layers` (bias as the last column). Block-diagonal estimators precondition each
layer on its own; CG and LiSSA precondition the concatenation of all layers at once.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import numbers
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import checks, distributed
from .capture import LayerTerms
from .checks import check_damping_values
from .gradients import check_same_data_on_all_ranks, example_gradients, token_outer_sum
from .heap import release_freed_memory
from .io import (
    atomic_save_safetensors,
    load_safetensors,
    tensors_checksum,
    weights_fingerprint,
)
from .layers import LayerInfo, check_layers_match, layer_infos
from .lowrank import LowRank, low_rank
from .tasks import Task

Damping = str | float | Mapping[str, float]
Grads = dict[str, torch.Tensor]


def _valid_lambda(v: Any) -> bool:
    return (
        not isinstance(v, bool)
        and isinstance(v, numbers.Real)
        and math.isfinite(float(v))
        and float(v) > 0
    )


def check_damping(damping: Damping) -> Damping:
    """Validate a damping setting: 'auto', a positive finite float, or {layer: such a float}.

    λ = 0 leaves directions without curvature undamped (their inverse is infinite: NaN
    scores) and λ = inf makes every score zero, so both are refused."""
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(
                f"unknown damping {damping!r}: use 'auto' (0.1 × mean eigenvalue per layer), a "
                "positive finite float, or a dict {layer name: positive float}"
            )
        return damping
    if isinstance(damping, Mapping):
        bad = {k: v for k, v in damping.items() if not _valid_lambda(v)}
        if bad:
            raise ValueError(
                f"damping must be positive and finite for every layer; got {bad}. Use 'auto', a "
                "positive float, or a dict {layer name: positive float}"
            )
        return {k: float(v) for k, v in damping.items()}
    if not _valid_lambda(damping):
        raise ValueError(
            f"damping must be 'auto', a positive finite float or a dict of them; got {damping!r}"
        )
    return float(damping)


def check_damping_layers(damping: Damping, layers: Mapping[str, Any]) -> None:
    """A damping dict must name tracked layers only (an unknown key is a typo, or another
    model's layer, which would otherwise be ignored)."""
    if isinstance(damping, Mapping):
        unknown = [k for k in damping if k not in layers]
        if unknown:
            raise ValueError(
                f"damping names layers that are not tracked: {unknown[:5]}; the tracked layers "
                f"are {list(layers)[:8]}{' ...' if len(layers) > 8 else ''}"
            )


def layer_damping(damping: Damping, layer: str, mean_eigenvalue: float | None) -> float:
    """λ for `layer`: 0.1 × its mean eigenvalue ('auto'), the float, or the dict's entry.
    Raises when it resolves to zero, a negative number or a non-finite one."""
    if damping == "auto":
        if mean_eigenvalue is None:
            raise ValueError("damping='auto' needs the layer's mean eigenvalue")
        lam = 0.1 * float(mean_eigenvalue)
    elif isinstance(damping, Mapping):
        if layer not in damping:
            raise ValueError(f"damping dict has no entry for layer {layer!r}")
        lam = float(damping[layer])
    else:
        lam = float(damping)
    check_damping_values({layer: lam}, f"damping={damping!r}")
    return lam


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
        self.fingerprint_: str | None = None

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
        the passes are split across ranks and their sums all-reduced (influence.distributed).

        The model is evaluated in eval mode and left as it was (device, `requires_grad`, mode)
        if fitting fails."""
        model = distributed.unwrap_model(model)
        checks.check_model(model)
        checks.check_not_meta(model, f"{type(self).__name__}.fit")
        checks.check_task(task)
        batch_size = checks.positive_int("batch_size", batch_size)
        checks.check_device(device)
        checks.boolean("progress", progress)
        seed = checks.integer("seed", seed)
        with checks.restore_model_on_error(model), self._unfitted_on_error():
            layers = task.tracked_modules(model)
            checks.check_finite_weights(layers)
            self.layers_ = layer_infos(layers)
            check_damping_layers(self.damping, self.layers_)
            fingerprint = weights_fingerprint(layers)
            distributed.check_same_on_all_ranks(
                "the model's tracked weights differ",
                fingerprint[:12],
                "every rank must fit the same model (load the same checkpoint on each)",
            )
            check_same_data_on_all_ranks("the training data", data)
            self._fit(
                model,
                task,
                data,
                batch_size=batch_size,
                device=device,
                progress=progress,
                seed=seed,
            )
            # Contiguous like a loaded copy: eigh's column-major eigenvectors would take other
            # matmul kernels than the saved ones and scores would differ in the last bits.
            self.state_ = {k: v.contiguous() for k, v in self.state_.items()}
            self._check_finite()
            self.fingerprint_ = fingerprint
        release_freed_memory()  # the covariances and the passes' buffers (see influence.heap)
        return self

    @contextlib.contextmanager
    def _unfitted_on_error(self):
        """A fit that fails leaves the estimator unfitted, not half-fitted."""
        try:
            yield
        except BaseException:
            self.layers_, self.state_, self.damping_, self.fingerprint_ = None, {}, {}, None
            raise

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

    # -- changing the damping without refitting -----------------------------------------------
    def _mean_eigenvalue(self, layer: str) -> Any:
        """The layer's mean curvature eigenvalue, from the fitted state ('auto' damping)."""
        raise NotImplementedError(f"{type(self).__name__} cannot change its damping after fitting")

    def with_damping(self, damping: Damping) -> Estimator:
        """A copy of this fitted estimator with another damping, recomputed from the stored
        eigenvalues: no pass over the data. Equal to fitting again with `damping`."""
        if self.layers_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, task, data)")
        new = copy.copy(self)
        new.damping = check_damping(damping)
        check_damping_layers(new.damping, self.layers_)
        new.state_ = dict(self.state_)
        new.meta_ = copy.deepcopy(self.meta_)
        new.damping_ = {n: new.resolve_damping(n, self._mean_eigenvalue(n)) for n in self.layers_}
        return new

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

    def self_products(self, terms: LayerTerms) -> dict[str, torch.Tensor]:
        """gᵀ(G + λI)⁻¹g of every example of one batch, per layer, {layer: [B]}, from per-token
        terms {layer: (ā, g)}. For block-diagonal estimators (see `precondition_terms`)."""
        out = {}
        for n, (a, g) in terms.items():  # one layer at a time, as in precondition_terms
            gr = token_outer_sum(g, a)
            out[n] = (gr * self.precondition({n: gr})[n]).flatten(1).sum(1)
        return out

    # -- persistence ------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        damping = self.damping if not isinstance(self.damping, Mapping) else dict(self.damping)
        return {"damping": damping}

    @classmethod
    def state_shapes(cls, info: LayerInfo) -> dict[str, tuple[int, ...]]:
        """The fitted tensors of one layer, {name: shape} (`state_` keys are "layer::name")."""
        return {}

    def _check_meta(self, path: str | Path) -> None:
        """Raise when a loaded file's `meta_` lacks what this estimator reads."""

    def save(self, path: str | Path) -> None:
        """Write the fitted state atomically as one safetensors file with JSON metadata and a
        sha256 checksum of its tensors and metadata (checked by `load`)."""
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
            "fingerprint": getattr(self, "fingerprint_", None),
        }
        text = json.dumps(meta)
        metadata = {"influence": text, "sha256": tensors_checksum(self.state_, text)}
        atomic_save_safetensors(self.state_, path, metadata)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module,
        task: Task | None = None,
        *,
        strict: bool = False,
    ) -> Estimator:
        """Load fitted state and check it belongs to `model`: its tracked layers and shapes
        (an error), and its weights (a fingerprint saved with the factors: a warning, an
        error with `strict=True`).

        The file is validated whole before anything is returned: every field of its metadata,
        every tensor the estimator needs with its shape, then tensors and metadata against
        the checksum saved with them (flipped bytes); each problem raises a ValueError naming
        it."""
        checks.check_model(model)
        checks.check_not_meta(model, "Estimator.load")
        if task is not None:
            checks.check_task(task)
        checks.boolean("strict", strict)
        tensors, meta, metadata = _read_factor_file(path, cls)
        try:
            est = cls(**meta["config"])
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{path}: its estimator settings {meta['config']} are invalid ({err})"
            ) from None
        est.layers_ = {
            n: LayerInfo(n, int(o), int(i), bool(b), bool(t))
            for n, (o, i, b, t) in meta["layers"].items()
        }
        _check_tensors(path, cls, est.layers_, tensors)
        _check_checksum(path, tensors, metadata)
        damping = meta["damping_"]
        bad = [n for n in est.layers_ if not isinstance(damping.get(n), int | float)]
        if bad:
            raise ValueError(f"{path}: the saved damping of layers {bad[:5]} is missing")
        est.damping_ = {k: float(v) for k, v in damping.items()}
        est.meta_ = meta["meta_"]
        est.state_ = dict(tensors)
        est._check_meta(path)
        est._check_finite()
        task = task or _task_for(est.layers_)
        layers = task.tracked_modules(model)
        check_layers_match(est.layers_, layer_infos(layers))
        saved = meta["fingerprint"]
        est.fingerprint_ = weights_fingerprint(layers)
        if saved is not None and saved != est.fingerprint_:
            msg = (
                f"{path}: the factors were fitted on other weights than this model's tracked "
                f"layers (fingerprint {saved[:12]} saved, {est.fingerprint_[:12]} now): scores "
                "will use curvature of another model. Fit again on this model, or load the "
                "weights the factors were fitted on."
            )
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        return est


# The metadata fields of a factor file and their JSON types.
_FIELDS = {
    "estimator": str,
    "config": dict,
    "layers": dict,
    "damping_": dict,
    "meta_": dict,
    "fingerprint": (str, type(None)),
}


_AGAIN = "fit the estimator and save it again"


def _check_checksum(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    saved = metadata.get("sha256")
    if saved is None:
        warnings.warn(
            f"{path} was written before factor files carried a checksum: its tensors cannot "
            "be verified. Save it again to add one.",
            stacklevel=4,
        )
    elif saved != tensors_checksum(tensors, metadata["influence"]):
        raise ValueError(
            f"{path}: its tensors or metadata do not match the checksum saved with them: the "
            f"file was modified or damaged after it was written; {_AGAIN}"
        )


def _read_factor_file(path, cls) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """A factor file's tensors, parsed metadata (every field checked) and raw metadata."""
    tensors, metadata = load_safetensors(path)
    again = _AGAIN  # what to do about any problem below
    if "influence" not in metadata:
        raise ValueError(f"{path} was not written by influence's Estimator.save")
    try:
        meta = json.loads(metadata["influence"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its metadata is not valid JSON ({err}); {again}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its metadata is a {type(meta).__name__}, not an object")
    for field, kind in _FIELDS.items():
        if field not in meta:
            raise ValueError(f"{path}: its metadata has no {field!r} field; {again}")
        if not isinstance(meta[field], kind):
            raise ValueError(
                f"{path}: the metadata field {field!r} is a {type(meta[field]).__name__}; {again}"
            )
    if meta["estimator"] != cls.__name__:
        raise ValueError(
            f"{path} holds a {meta['estimator']}, not a {cls.__name__}: load it with "
            f"inf.{meta['estimator']}.load"
        )
    for n, shape in meta["layers"].items():
        if not (
            isinstance(shape, list) and len(shape) == 4 and all(isinstance(x, int) for x in shape)
        ):
            raise ValueError(f"{path}: layer {n!r} has no valid shape in its metadata; {again}")
    return tensors, meta, metadata


def _check_tensors(path, cls, layers: dict[str, LayerInfo], tensors) -> None:
    """Every tensor `cls` needs for `layers` is there with its shape, and nothing else."""
    expected = {
        f"{n}::{k}": shape
        for n, info in layers.items()
        for k, shape in cls.state_shapes(info).items()
    }
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    wrong = [
        f"{k} {list(tensors[k].shape)} (expected {list(v)})"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != v
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:4]}")
    if extra:
        problems.append(f"tensors a {cls.__name__} does not have {extra[:4]}")
    if wrong:
        problems.append("tensors of the wrong shape: " + "; ".join(wrong[:4]))
    if problems:
        raise ValueError(
            f"{path} is not a complete {cls.__name__} of its layers: {', '.join(problems)}. Fit "
            "the estimator and save it again."
        )


def _task_for(layers: dict[str, LayerInfo]) -> Task:
    """A task that tracks exactly the saved layers (for loading without a task)."""
    return Task(modules=list(layers))
