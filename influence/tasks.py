"""Tasks: how to compute a model's outputs, losses, measurements and curvature terms.

A `Task` is the one object that tells the library what a batch is and which loss it trains.
All losses are SUMS over the examples of a batch (and, for sequences, over counted tokens),
so that the gradient of an example's summand is that example's gradient alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ModuleSelector, find_layers

Batch = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]

IGNORE_INDEX = -100


def example_generator(seed: int, index: int) -> torch.Generator:
    """CPU generator for example `index`: sampled labels depend on (seed, index) only, so they
    do not change with batch size, batch order or device."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63 - 1))


def _uniforms(indices: Sequence[int], seed: int, count: int) -> torch.Tensor:
    return torch.stack(
        [
            torch.rand(count, generator=example_generator(seed, i), dtype=torch.float64)
            for i in indices
        ]
    )


def _sample_categorical(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(logits) with given uniforms (same shape as logits[..., 0])."""
    cdf = torch.softmax(logits.detach().double(), dim=-1).cumsum(-1)
    idx = torch.searchsorted(cdf, u.to(cdf.device).unsqueeze(-1).contiguous())
    return idx.squeeze(-1).clamp_(max=logits.shape[-1] - 1)


class Task:
    """How to compute losses for a model; subclass to customise.

    Subclasses implement `outputs`, `loss_from_outputs`, `sample_targets`, `output_hvp`,
    `bregman` and the batch helpers. `modules` selects the tracked layers (see
    `influence.layers.find_layers`).
    """

    kind = "generic"

    def __init__(self, modules: ModuleSelector = None):
        self.modules = modules

    # -- layers -----------------------------------------------------------------------------
    def tracked_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return find_layers(model, self.modules)

    # -- batches ----------------------------------------------------------------------------
    def batch_size(self, batch: Batch) -> int:
        raise NotImplementedError

    def to_device(self, batch: Batch, device: torch.device | str) -> Batch:
        raise NotImplementedError

    def token_mask(self, batch: Batch) -> torch.Tensor | None:
        """(B, T) bool mask of real token positions, or None for non-sequence data."""
        return None

    def check_batch(self, batch: Batch) -> None:
        """Raise a clear error when `batch` is not of this task's kind."""

    # -- losses -----------------------------------------------------------------------------
    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Network outputs h (logits or predictions) on which the loss is computed."""
        raise NotImplementedError

    def targets(self, batch: Batch) -> torch.Tensor:
        """The true targets of the batch."""
        raise NotImplementedError

    def loss_from_outputs(
        self, outputs: torch.Tensor, batch: Batch, targets: torch.Tensor
    ) -> torch.Tensor:
        """Summed loss of `outputs` against `targets`."""
        raise NotImplementedError

    def sample_targets(
        self, outputs: torch.Tensor, batch: Batch, indices: Sequence[int], seed: int
    ) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution (for the true Fisher)."""
        raise NotImplementedError

    def loss(
        self,
        model: nn.Module,
        batch: Batch,
        *,
        sample: bool = False,
        seed: int = 0,
        indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Summed training loss Σ_n L(z_n); with `sample=True` the labels are drawn from the
        model (example n seeded by `(seed, indices[n])`)."""
        out = self.outputs(model, batch)
        if sample:
            if indices is None:
                indices = range(self.batch_size(batch))
            tgt = self.sample_targets(out, batch, list(indices), seed)
        else:
            tgt = self.targets(batch)
        return self.loss_from_outputs(out, batch, tgt)

    def measurement(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Summed query measurement Σ_q m_q. Default: the loss with the batch's own labels
        (for a language model, −log p(completion | prompt) when prompts are masked with −100)."""
        return self.loss(model, batch)

    # -- curvature and PBRF -----------------------------------------------------------------
    def output_hvp(self, outputs: torch.Tensor, batch: Batch, vector: torch.Tensor) -> torch.Tensor:
        """Hessian of the summed loss w.r.t. the outputs, times `vector` (same shape)."""
        raise NotImplementedError

    def bregman(self, outputs: torch.Tensor, reference: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Summed Bregman divergence D(outputs, reference) of the loss on the outputs."""
        raise NotImplementedError


class _TupleTask(Task):
    """Batches are `(x, y)`; the model maps x to outputs of shape [B, ...]."""

    def batch_size(self, batch):
        return int(batch[0].shape[0])

    def to_device(self, batch, device):
        return tuple(t.to(device) for t in batch)

    def check_batch(self, batch):
        if isinstance(batch, Mapping) or not isinstance(batch, Sequence) or len(batch) != 2:
            raise TypeError(
                f"{type(self).__name__} expects batches (x, y); got {type(batch).__name__}. Use "
                "LanguageModelingTask for dict batches with input_ids."
            )

    def outputs(self, model, batch):
        return model(batch[0])

    def targets(self, batch):
        return batch[1]


class ClassificationTask(_TupleTask):
    """Softmax classification with summed cross-entropy. Batches: (x, y) with integer y."""

    kind = "classification"

    def loss_from_outputs(self, outputs, batch, targets):
        return F.cross_entropy(outputs, targets, reduction="sum")

    def sample_targets(self, outputs, batch, indices, seed):
        u = _uniforms(indices, seed, 1).squeeze(1)
        return _sample_categorical(outputs, u)

    def output_hvp(self, outputs, batch, vector):
        p = torch.softmax(outputs, dim=-1)
        return p * vector - p * (p * vector).sum(-1, keepdim=True)

    def bregman(self, outputs, reference, batch):
        return F.kl_div(
            F.log_softmax(outputs, -1),
            F.log_softmax(reference, -1),
            reduction="sum",
            log_target=True,
        )


class RegressionTask(_TupleTask):
    """Squared error ½‖h − y‖² summed; output Hessian is the identity. Batches: (x, y)."""

    kind = "regression"

    def loss_from_outputs(self, outputs, batch, targets):
        return 0.5 * (outputs - targets.reshape(outputs.shape)).pow(2).sum()

    def sample_targets(self, outputs, batch, indices, seed):
        d = outputs[0].numel()
        noise = torch.stack(
            [
                torch.randn(d, generator=example_generator(seed, i), dtype=torch.float64)
                for i in indices
            ]
        )
        return outputs.detach() + noise.to(outputs).reshape(outputs.shape)

    def output_hvp(self, outputs, batch, vector):
        return vector

    def bregman(self, outputs, reference, batch):
        return 0.5 * (outputs - reference).pow(2).sum()


class LanguageModelingTask(Task):
    """Causal language modelling, Hugging Face conventions.

    Batches are dicts with `input_ids`, optional `attention_mask` and optional `labels`
    (−100 = not counted; default: every real token). Position t's logits predict label t+1.
    The loss is summed over counted tokens; the measurement is the same sum on the query's
    labels, i.e. −log p(completion | prompt) when the prompt is masked.
    """

    kind = "language_modeling"

    def batch_size(self, batch):
        return int(batch["input_ids"].shape[0])

    def to_device(self, batch, device):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def check_batch(self, batch):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                "LanguageModelingTask expects dict batches with 'input_ids' (and optionally "
                f"'attention_mask', 'labels'); got {type(batch).__name__}"
            )

    def token_mask(self, batch):
        mask = batch.get("attention_mask")
        if mask is None:
            return torch.ones_like(batch["input_ids"], dtype=torch.bool)
        return mask.bool()

    def outputs(self, model, batch):
        kwargs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        out = model(**kwargs)
        return out if torch.is_tensor(out) else out.logits

    def targets(self, batch):
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"].masked_fill(~self.token_mask(batch), IGNORE_INDEX)
        return labels

    @staticmethod
    def _shift(outputs, targets):
        return outputs[:, :-1], targets[:, 1:]

    def loss_from_outputs(self, outputs, batch, targets):
        logits, tgt = self._shift(outputs, targets)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            tgt.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def sample_targets(self, outputs, batch, indices, seed):
        true = self.targets(batch)
        u = _uniforms(indices, seed, true.shape[1])
        drawn = torch.full_like(true, IGNORE_INDEX)
        drawn[:, 1:] = _sample_categorical(outputs[:, :-1], u[:, 1:])
        return torch.where(true == IGNORE_INDEX, true, drawn)

    def _counted(self, batch):
        return (self.targets(batch)[:, 1:] != IGNORE_INDEX).unsqueeze(-1)

    def output_hvp(self, outputs, batch, vector):
        logits, v = outputs[:, :-1], vector[:, :-1]
        p = torch.softmax(logits, dim=-1)
        hv = (p * v - p * (p * v).sum(-1, keepdim=True)) * self._counted(batch)
        return torch.cat([hv, torch.zeros_like(vector[:, -1:])], dim=1)

    def bregman(self, outputs, reference, batch):
        logq = F.log_softmax(outputs[:, :-1], -1)
        logp = F.log_softmax(reference[:, :-1], -1)
        kl = (logp.exp() * (logp - logq)).sum(-1, keepdim=True)
        return (kl * self._counted(batch)).sum()
