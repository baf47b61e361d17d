"""Tasks: how to compute a model's outputs, losses, measurements and curvature terms.

A `Task` is the one object that tells the library what a batch is and which loss it trains.
All losses are SUMS over the examples of a batch (and, for sequences, over counted tokens),
so that the gradient of an example's summand is that example's gradient alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ModuleSelector, check_unshared, find_layers

Batch = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]

IGNORE_INDEX = -100
# Keys of a dict batch that hold targets, never forwarded to the model: `labels`, and `label`
# as Hugging Face datasets name a classification column.
LABEL_KEYS = ("labels", "label")


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


def _forward_parameters(model: nn.Module) -> tuple[set[str], bool]:
    """Named parameters of `model.forward`, and whether it takes **kwargs."""
    params = inspect.signature(getattr(model, "forward", model)).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a dict batch that `model.forward` takes by name (all but the labels).

    Every input the batch carries is forwarded (`input_ids`, `attention_mask`,
    `token_type_ids`, `position_ids`, `decoder_input_ids`, ...); `labels` never is, since the
    task computes the loss itself. A forward with `**kwargs` also receives `attention_mask`,
    and one with only `**kwargs` every tensor.
    """
    named, var_kw = _forward_parameters(model)
    if var_kw:
        # forward(input_ids, **kwargs) wrappers still get the attention mask (as they always
        # did); a forward of only **kwargs gets every tensor.
        named = named | {"attention_mask"} if named else None
    return {
        k: v
        for k, v in batch.items()
        if k not in LABEL_KEYS and torch.is_tensor(v) and (named is None or k in named)
    }


def _logits(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, tuple) and out and torch.is_tensor(out[0]):
        logits = out[0]
    if logits is None:
        raise TypeError(
            f"the model returned a {type(out).__name__} without `logits`: the task needs the "
            "model's logits as a tensor (or an output with a `.logits` field)"
        )
    return logits


def _batch_size_of(batch: Mapping[str, Any]) -> int:
    for key in (*LABEL_KEYS, "input_ids", "inputs_embeds"):
        if torch.is_tensor(batch.get(key)):
            return int(batch[key].shape[0])
    for v in batch.values():
        if torch.is_tensor(v):
            return int(v.shape[0])
    raise TypeError("the dict batch holds no tensors")


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
        """The tracked layers (see `find_layers`); tied weights among them are refused."""
        layers = find_layers(model, self.modules)
        check_unshared(model, layers)
        return layers

    # -- batches ----------------------------------------------------------------------------
    def batch_size(self, batch: Batch) -> int:
        raise NotImplementedError

    def to_device(self, batch: Batch, device: torch.device | str) -> Batch:
        raise NotImplementedError

    # Whether a dict batch's `labels` follow the positions of its inputs (causal language
    # models: a label per token) rather than one per example or a decoder's own sequence.
    labels_follow_inputs = False

    def token_mask(self, batch: Batch) -> torch.Tensor | None:
        """(B, T) bool mask of the real (not padding) positions of a batch that holds one token
        sequence, or None (non-sequence data, or every position real)."""
        return None

    def token_masks(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The (B, T) bool masks of the real positions of each token sequence of `batch`, by
        name: padded positions are left out of the curvature (input and output-gradient
        covariances, token counts). One sequence by default (`token_mask`); a seq2seq batch
        has the encoder's and the decoder's. {} for non-sequence data."""
        mask = self.token_mask(batch)
        return {} if mask is None else {"tokens": mask}

    def probe_batch(self, batch: Batch) -> Batch:
        """One example of `batch` whose token sequences (`token_masks`) all have different
        lengths: a forward of it tells which sequence each tracked layer reads. Only needed
        by tasks with more than one sequence."""
        raise NotImplementedError(
            f"{type(self).__name__} has several token sequences of equal length: implement "
            "probe_batch to tell which one each layer reads"
        )

    def sequence_keys(self, batch: Batch) -> list[str]:
        """Keys of the [B, T, ...] tensors of a dict batch that follow the positions of its
        `attention_mask` (moved together when a left-padded row is right-aligned)."""
        if not isinstance(batch, Mapping) or not torch.is_tensor(batch.get("attention_mask")):
            return []
        shape = batch["attention_mask"].shape
        return [
            k
            for k, v in batch.items()
            if torch.is_tensor(v)
            and v.dim() >= 2
            and v.shape[:2] == shape
            and not str(k).startswith("decoder_")
            and (k != "labels" or self.labels_follow_inputs)
        ]

    def check_batch(self, batch: Batch) -> None:
        """Raise a clear error when `batch` is not of this task's kind."""

    # What `counted` misses, and what to do about it, for the error naming such examples.
    uncounted = "nothing their loss counts: they have no loss and no gradient. Drop them"

    def counted(self, batch: Batch) -> torch.Tensor | None:
        """(B,) bool: whether each example's loss counts anything (a label not −100); None
        when every example's does. An example that counts nothing has no loss and no
        gradient, so its scores would be meaningless: the passes refuse it by name."""
        return None

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
    """Batches are `(x, y)`, the model mapping x to outputs [B, ...]; or Hugging Face dict
    batches with `labels` and the model's inputs (`input_ids`, `attention_mask`,
    `token_type_ids`, ...), the model returning outputs or an object with `.logits`."""

    def batch_size(self, batch):
        if isinstance(batch, Mapping):
            return _batch_size_of(batch)
        return int(batch[0].shape[0])

    def to_device(self, batch, device):
        if isinstance(batch, Mapping):
            return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        return tuple(t.to(device) for t in batch)

    def token_mask(self, batch):
        # Token inputs (a sequence classifier): the attention mask; (x, y) data has none.
        if isinstance(batch, Mapping):
            mask = batch.get("attention_mask")
            if torch.is_tensor(mask) and mask.dim() == 2:
                return mask.bool()
        return None

    def check_batch(self, batch):
        if isinstance(batch, Mapping):
            if not any(torch.is_tensor(batch.get(k)) for k in LABEL_KEYS):
                raise TypeError(
                    f"{type(self).__name__} got a dict batch without a 'labels' (or 'label') "
                    f"tensor (keys {sorted(batch)[:8]}): add the labels, one per example"
                )
        elif not isinstance(batch, Sequence) or len(batch) != 2:
            raise TypeError(
                f"{type(self).__name__} expects batches (x, y) or dicts with 'labels'; got "
                f"{type(batch).__name__}. Use LanguageModelingTask for causal language models."
            )
        self._check_targets(self.targets(batch), self.batch_size(batch))

    def _check_targets(self, targets: torch.Tensor, batch_size: int) -> None:
        if not torch.is_tensor(targets) or targets.dim() == 0 or targets.shape[0] != batch_size:
            shape = list(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
            raise ValueError(
                f"{type(self).__name__}: the labels ({shape}) do not have one row per example "
                f"of the batch ({batch_size})"
            )

    def outputs(self, model, batch):
        if isinstance(batch, Mapping):
            return _logits(model(**model_inputs(model, batch)))
        return _logits(model(batch[0]))

    def targets(self, batch):
        if isinstance(batch, Mapping):
            return batch["labels"] if torch.is_tensor(batch.get("labels")) else batch["label"]
        return batch[1]


class ClassificationTask(_TupleTask):
    """Softmax classification with summed cross-entropy.

    Batches: `(x, y)` with integer y, or dicts with integer `labels` [B] and the model's inputs
    (Hugging Face `*ForSequenceClassification`: `input_ids`, `attention_mask`,
    `token_type_ids`, ...). The query measurement is −log p(label | input), summed: a positive
    score means the training example raises the log-probability of the query's label.
    """

    kind = "classification"
    uncounted = (
        "label −100, which cross-entropy ignores: they have no loss and no gradient. Drop "
        "them, or give them a class"
    )

    def _check_targets(self, targets, batch_size):
        super()._check_targets(targets, batch_size)
        if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                f"{type(self).__name__} needs integer class labels, one per example (shape "
                f"[{batch_size}]); got {targets.dtype} labels of shape {list(targets.shape)}. "
                "Squeeze a [B, 1] column; for real-valued targets use RegressionTask."
            )

    def counted(self, batch):
        labels = self.targets(batch)
        return None if not bool((labels == IGNORE_INDEX).any()) else labels != IGNORE_INDEX

    def loss_from_outputs(self, outputs, batch, targets):
        classes = outputs.shape[-1]
        if outputs.dim() != 2 or classes < 2:
            raise ValueError(
                f"{type(self).__name__} needs logits [batch, classes] with at least 2 classes; "
                f"the model gives {list(outputs.shape)}"
                + (
                    " (num_labels=1: cross-entropy over one class is always 0, so every "
                    "gradient and score would be 0). For a regression head use RegressionTask "
                    "with float labels; to classify, give the model num_labels >= 2."
                    if classes == 1
                    else ""
                )
            )
        bad = (targets >= classes) | ((targets < 0) & (targets != IGNORE_INDEX))
        if not bad.is_meta and bool(bad.any()):  # a meta tensor (memory_plan) has no values
            raise ValueError(
                f"labels {targets[bad].unique().tolist()[:5]} are outside the model's classes "
                f"[0, {classes}) and are not −100: fix the labels or the model's num_labels"
            )
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
        if targets.numel() != outputs.numel():
            raise ValueError(
                f"RegressionTask: the targets' shape {list(targets.shape)} does not match the "
                f"model's outputs {list(outputs.shape)}: give one target per output"
            )
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


class SequenceClassificationTask(ClassificationTask):
    """`ClassificationTask` for Hugging Face `*ForSequenceClassification` models.

    Dict batches with the model's inputs and integer `labels` [B]; the loss is the summed
    cross-entropy, the query measurement −log p(label | text): a positive score means the
    training example raises the log-probability of the query's label.
    """

    kind = "sequence_classification"


class LanguageModelingTask(Task):
    """Causal language modelling, Hugging Face conventions.

    Batches are dicts with `input_ids`, optional `attention_mask` and optional `labels`
    (−100 = not counted; default: every real token), plus any other input of the model's
    forward (`token_type_ids`, `position_ids`, ...), all forwarded. Position t's logits predict
    label t+1. The loss is summed over counted tokens; the measurement is the same sum on the
    query's labels, i.e. −log p(completion | prompt) when the prompt is masked.
    """

    kind = "language_modeling"
    # Logits at position t predict the label at t + shift (1 for causal LMs, 0 for seq2seq).
    shift = 1
    labels_follow_inputs = True

    def batch_size(self, batch):
        return int(batch["input_ids"].shape[0])

    def to_device(self, batch, device):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    uncounted = (
        "no counted tokens (every label is −100 after the shift to next-token targets): they "
        "have no loss and no gradient. Drop them, or unmask at least one completion token in "
        "each"
    )

    def check_batch(self, batch):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                f"{type(self).__name__} expects dict batches with 'input_ids' (and optionally "
                f"'attention_mask', 'labels'); got {type(batch).__name__}"
            )
        labels, ids = batch.get("labels"), batch["input_ids"]
        if (
            not torch.is_tensor(ids)
            or ids.dim() != 2
            or ids.shape[1] == 0
            or ids.is_floating_point()
        ):
            what = list(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
            raise ValueError(
                f"{type(self).__name__}: input_ids must be integer token ids [examples, "
                f"positions] with at least one position; got {what}"
                + (f" of {ids.dtype}" if torch.is_tensor(ids) else "")
                + " (a dict of tensors holds one row per example: one sequence is ids[None])"
            )
        if self.labels_follow_inputs and labels is not None and labels.shape != ids.shape:
            raise ValueError(
                f"{type(self).__name__}: labels of shape {list(labels.shape)} do not match "
                f"input_ids {list(ids.shape)}: a causal language model's labels are its tokens "
                "(−100 where not counted), one per input position"
            )

    def counted(self, batch):
        per_example = self._counted(batch).reshape(self.batch_size(batch), -1).any(1)
        return None if bool(per_example.all()) else per_example

    def token_mask(self, batch):
        mask = batch.get("attention_mask")
        if mask is None:
            return torch.ones_like(batch["input_ids"], dtype=torch.bool)
        return mask.bool()

    def outputs(self, model, batch):
        return _logits(model(**model_inputs(model, batch)))

    def targets(self, batch):
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"].masked_fill(~self.token_mask(batch), IGNORE_INDEX)
        return labels

    def _shift(self, outputs, targets):
        """(logits, labels) aligned: logits[:, t] scores labels[:, t]."""
        s = self.shift
        return outputs[:, : outputs.shape[1] - s], targets[:, s:]

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
        s = self.shift
        u = _uniforms(indices, seed, true.shape[1])
        drawn = torch.full_like(true, IGNORE_INDEX)
        drawn[:, s:] = _sample_categorical(outputs[:, : outputs.shape[1] - s], u[:, s:])
        return torch.where(true == IGNORE_INDEX, true, drawn)

    def _counted(self, batch):
        return (self.targets(batch)[:, self.shift :] != IGNORE_INDEX).unsqueeze(-1)

    def output_hvp(self, outputs, batch, vector):
        t = outputs.shape[1] - self.shift
        logits, v = outputs[:, :t], vector[:, :t]
        p = torch.softmax(logits, dim=-1)
        hv = (p * v - p * (p * v).sum(-1, keepdim=True)) * self._counted(batch)
        return torch.cat([hv, torch.zeros_like(vector[:, t:])], dim=1)

    def bregman(self, outputs, reference, batch):
        t = outputs.shape[1] - self.shift
        logq = F.log_softmax(outputs[:, :t], -1)
        logp = F.log_softmax(reference[:, :t], -1)
        kl = (logp.exp() * (logp - logq)).sum(-1, keepdim=True)
        return (kl * self._counted(batch)).sum()


class Seq2SeqLMTask(LanguageModelingTask):
    """Sequence-to-sequence language modelling (T5, BART, ...), Hugging Face conventions.

    Batches are dicts with the source `input_ids`, optional `attention_mask`, the target
    `labels` [B, T'] (−100 = not counted) and optionally `decoder_input_ids` /
    `decoder_attention_mask`; without `decoder_input_ids` the model's own
    `prepare_decoder_input_ids_from_labels` shifts the labels right (as in training). Decoder
    position t's logits score label t. The loss and the query measurement are
    −log p(target | source), summed over the counted target tokens.
    """

    kind = "seq2seq_language_modeling"
    shift = 0
    labels_follow_inputs = False
    uncounted = (
        "no counted target tokens (every label is −100): they have no loss and no gradient. "
        "Drop them, or give each a target"
    )

    def check_batch(self, batch):
        if isinstance(batch, Mapping) and not torch.is_tensor(batch.get("labels")):
            raise TypeError(
                "Seq2SeqLMTask needs the target tokens as 'labels' in each batch (−100 for "
                f"positions that do not count); got keys {sorted(batch)[:8]}"
            )
        super().check_batch(batch)

    def token_mask(self, batch):
        # Encoder and decoder layers read different sequences: see token_masks.
        return None

    def token_masks(self, batch):
        """The encoder's real positions (its attention mask) and the decoder's: its
        `decoder_attention_mask`, else every position up to the last counted label (later
        ones are padding, which a causal decoder's earlier positions never read)."""
        ids = batch["input_ids"]
        encoder = batch.get("attention_mask")
        encoder = torch.ones_like(ids, dtype=torch.bool) if encoder is None else encoder.bool()
        decoder = batch.get("decoder_attention_mask")
        if decoder is None:
            counted = batch["labels"] != IGNORE_INDEX
            positions = torch.arange(1, counted.shape[1] + 1, device=counted.device)
            last = (counted * positions).amax(1, keepdim=True)
            decoder = positions < last + 1
        return {"encoder": encoder, "decoder": decoder.bool()}

    def probe_batch(self, batch):
        """The first example, with its encoder input one position shorter (or, with a
        single position, its target one longer) when both sequences are equally long."""
        one = {k: (v[:1] if torch.is_tensor(v) and v.dim() >= 1 else v) for k, v in batch.items()}
        width, target = one["input_ids"].shape[1], one["labels"].shape[1]
        if width != target:
            return one
        if width > 1:
            keys = [k for k in self.sequence_keys(one) if k != "labels"] or ["input_ids"]
            return {k: (v[:, : width - 1] if k in keys else v) for k, v in one.items()}
        pad = torch.nn.functional.pad
        return {
            k: (
                pad(v, (0, 1), value=IGNORE_INDEX if k == "labels" else 0)
                if k == "labels" or (str(k).startswith("decoder_") and torch.is_tensor(v))
                else v
            )
            for k, v in one.items()
        }

    def targets(self, batch):
        return batch["labels"]

    def outputs(self, model, batch):
        inputs = model_inputs(model, batch)
        if "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs:
            # Stand-ins for the model (torch.func wrappers) expose its bound `forward`.
            owner = getattr(getattr(model, "forward", None), "__self__", model)
            prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None) or getattr(
                owner, "prepare_decoder_input_ids_from_labels", None
            )
            if prepare is None:
                raise TypeError(
                    f"{type(model).__name__} has no prepare_decoder_input_ids_from_labels: put "
                    "'decoder_input_ids' (the labels shifted right) in each batch"
                )
            inputs["decoder_input_ids"] = prepare(labels=batch["labels"])
        return _logits(model(**inputs))
