"""Which positions of a batch are real tokens, for each tracked layer; left padding moved right.

A task names the token sequences of its batches and their real positions (`Task.token_masks`):
one for causal language models and sequence classifiers, the encoder's and the decoder's for
seq2seq models. Each tracked layer reads one of them, or none (a pooler or a classification
head: one position per example); which one is told by its number of positions, and where two
sequences are equally long, by a forward of one example whose sequences differ in length.

Left-padded rows are moved to right padding before the model sees them (`right_align`): the
real tokens then sit at positions 0..L−1, where they are when the example is alone, so models
with absolute positions (GPT-2, BERT, BART) compute the same outputs whatever the padding side,
and no real position attends over padding only. Per-token scores are moved back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .capture import LayerTerms
from .tasks import Task

LayerMasks = dict[str, torch.Tensor | None]


def right_align(task: Task, batch: Any) -> Any:
    """`batch` with every left-padded row rolled so that its first real position comes first
    (`leading_padding` gives each row's shift).

    A row's leading positions with `attention_mask` 0 move to its end, with every tensor of
    `task.sequence_keys` (input ids, labels of a causal LM, token types, position ids, ...).
    A row without any real position is left as it is."""
    lead = leading_padding(task, batch)
    if lead is None:
        return batch
    keys = task.sequence_keys(batch)
    width = batch["attention_mask"].shape[1]
    index = (torch.arange(width, device=lead.device) + lead[:, None]) % width
    out = dict(batch)
    for k in keys:
        v = batch[k]
        idx = index.reshape(*index.shape, *([1] * (v.dim() - 2))).expand_as(v)
        out[k] = v.gather(1, idx.to(v.device))
    return out


def leading_padding(task: Task, batch: Any) -> torch.Tensor | None:
    """Per row, the number of padded positions (`attention_mask` 0) before its first real
    one (0 for a row without any), or None when no row starts with padding."""
    if not task.sequence_keys(batch):
        return None
    mask = batch["attention_mask"] != 0
    lead = (mask.cumsum(1) == 0).sum(1)
    lead = torch.where(lead == mask.shape[1], 0, lead)
    return lead if bool(lead.any()) else None


def restore_positions(scores: torch.Tensor, shifts: torch.Tensor | None) -> torch.Tensor:
    """Per-token scores [Q, B, T] of right-aligned rows back at the caller's positions."""
    if shifts is None:
        return scores
    width = scores.shape[-1]
    index = (torch.arange(width, device=scores.device) + shifts.to(scores.device)[:, None]) % width
    return torch.zeros_like(scores).scatter_(-1, index.expand_as(scores), scores)


def _positions(x: torch.Tensor, batch_size: int) -> int:
    """Positions per example of a layer input: [B, ..., d] or flattened [B·T, d]."""
    if x.dim() >= 2 and x.shape[0] == batch_size:
        return int(x.shape[1:-1].numel())
    return int(x.shape[0]) // batch_size if x.dim() >= 1 else 1


def sequences_read(model: nn.Module, task: Task, layers: dict[str, nn.Module], batch: Any):
    """{layer: name of the token sequence it reads, or None}, from one forward of
    `task.probe_batch(batch)` (no gradients), whose sequences have different lengths."""
    probe = task.probe_batch(batch)
    widths = {name: m.shape[1] for name, m in task.token_masks(probe).items()}
    seen: dict[str, int] = {}

    def hook(name):
        def record(module, args, output):
            seen[name] = _positions(args[0], 1)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            task.outputs(model, probe)
    finally:
        for h in handles:
            h.remove()
    return {n: next((k for k, w in widths.items() if w == seen.get(n)), None) for n in layers}


class LayerMaskFinder:
    """Each tracked layer's mask of real positions, batch by batch, for one pass: a layer
    whose number of positions is that of exactly one sequence reads it; a probe forward
    (made once per pass, when first needed) settles sequences of equal length."""

    def __init__(self, model: nn.Module, task: Task, layers: dict[str, nn.Module]):
        self.model, self.task, self.layers = model, task, layers
        self._read: dict[str, str | None] | None = None

    def __call__(self, batch: Any, terms: LayerTerms) -> LayerMasks:
        masks = self.task.token_masks(batch) if isinstance(batch, Mapping) else {}
        if not masks:
            return dict.fromkeys(terms)
        # A sequence without padding in this batch needs no mask (and no copy of its rows).
        real = {k: (None if bool(m.all()) else m) for k, m in masks.items()}
        out: LayerMasks = {}
        for n, (a, _) in terms.items():
            names = [k for k, m in masks.items() if m.shape[1] == a.shape[1]]
            if len(names) > 1:
                if self._read is None:
                    self._read = sequences_read(self.model, self.task, self.layers, batch)
                names = [self._read[n]] if self._read.get(n) else []
            out[n] = real[names[0]] if names else None
        return out
