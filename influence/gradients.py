"""Batches, per-layer terms and per-example gradients: the passes every estimator makes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .capture import LayerCapture, LayerTerms
from .layers import LayerInfo, layer_infos
from .tasks import Task


def make_loader(data: Any, batch_size: int) -> DataLoader:
    """A sequential DataLoader over `data`.

    Accepts a DataLoader (used as is), a torch Dataset or Hugging Face `datasets.Dataset`
    in torch format, a tuple `(x, y)` of tensors, or a dict of equally long tensors.
    """
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, tuple) and all(torch.is_tensor(t) for t in data):
        data = TensorDataset(*data)
    elif isinstance(data, Mapping) and all(torch.is_tensor(t) for t in data.values()):
        data = _DictDataset(data)
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(
            f"cannot iterate data of type {type(data).__name__}: pass a torch Dataset, a "
            "DataLoader, a Hugging Face datasets.Dataset (with .with_format('torch')), a tuple "
            "(x, y) of tensors or a dict of tensors"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


class _DictDataset(Dataset):
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"dict data has tensors of different lengths {sorted(lengths)}")
        self.tensors = dict(tensors)
        self.n = lengths.pop()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def iter_batches(data: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """Yield `(offset, batch)`: offset is the index of the batch's first example."""
    offset = 0
    for batch in make_loader(data, batch_size):
        yield offset, batch
        n = batch["input_ids"].shape[0] if isinstance(batch, Mapping) else batch[0].shape[0]
        offset += int(n)


def num_examples(data: Any, batch_size: int = 1) -> int:
    loader = make_loader(data, batch_size)
    try:
        return len(loader.dataset)
    except TypeError:
        return sum(1 for _ in iter_batches(data, batch_size))


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to compute on; moves the model there when one is given."""
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    return device


class _EvalMode:
    """Run the model in eval mode (no dropout) and restore its mode afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def iter_layer_terms(
    model: nn.Module,
    task: Task,
    data: Any,
    *,
    layers: dict[str, nn.Module] | None = None,
    measurement: bool = False,
    sample: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "batches",
) -> Iterator[tuple[int, Any, LayerTerms, torch.Tensor | None]]:
    """One pass over `data`: yield `(offset, batch, {layer: (ā, g)}, token_mask)` per batch.

    The loss is the task's training loss (true labels, or sampled ones when `sample`), or its
    measurement when `measurement`. No weight gradients are computed.
    """
    layers = task.tracked_modules(model) if layers is None else layers
    infos = layer_infos(layers)
    dev = resolve_device(model, device)
    loader = make_loader(data, batch_size)
    try:
        total = len(loader)
    except TypeError:
        total = None
    with _EvalMode(model):
        for offset, batch in tqdm(
            iter_batches(loader, batch_size),
            total=total,
            desc=desc,
            disable=not progress,
            leave=False,
        ):
            task.check_batch(batch)
            batch = task.to_device(batch, dev)
            n = task.batch_size(batch)
            with LayerCapture(model, layers, infos, batch_size=n, batch=batch) as cap:
                if measurement:
                    loss = task.measurement(model, batch)
                else:
                    loss = task.loss(
                        model, batch, sample=sample, seed=seed, indices=range(offset, offset + n)
                    )
                terms = cap.backward(loss)
            yield offset, batch, terms, task.token_mask(batch)


def token_outer_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Σ_t g_t ā_tᵀ per example, [B, out, in'], from g [B, T, out] and ā [B, T, in'].

    A batched matrix product: on CPU it runs up to 1.7× faster than the same einsum."""
    return torch.bmm(g.transpose(1, 2), a)


def example_gradients(terms: LayerTerms) -> dict[str, torch.Tensor]:
    """Per-example gradients [B, out, in'] from per-token terms: Σ_t g_t ā_tᵀ."""
    return {n: token_outer_sum(g, a) for n, (a, g) in terms.items()}


def per_example_gradients(
    model: nn.Module,
    task: Task,
    data: Any,
    *,
    measurement: bool = False,
    sample: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Every example's gradient per tracked layer, {layer: Tensor[N, out, in']}.

    With `measurement=True` these are the gradients of the query measurements m_q.
    """
    chunks: dict[str, list[torch.Tensor]] = {}
    for _, _, terms, _ in iter_layer_terms(
        model,
        task,
        data,
        measurement=measurement,
        sample=sample,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="gradients",
    ):
        for n, gr in example_gradients(terms).items():
            chunks.setdefault(n, []).append(gr)
    return {n: torch.cat(c) for n, c in chunks.items()}


def flatten(grads: Mapping[str, torch.Tensor], infos: Mapping[str, LayerInfo]) -> torch.Tensor:
    """{layer: [Q, out, in']} -> [Q, P], layers in `infos` order."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in infos], dim=1)


def unflatten(flat: torch.Tensor, infos: Mapping[str, LayerInfo]) -> dict[str, torch.Tensor]:
    """[Q, P] -> {layer: [Q, out, in']} (inverse of `flatten`)."""
    out, start = {}, 0
    for n, info in infos.items():
        out[n] = flat[:, start : start + info.numel].reshape(flat.shape[0], *info.shape)
        start += info.numel
    return out


def batch_kind(batch: Any) -> str:
    """'dict' or 'tuple': query and training data must be of the same kind."""
    return (
        "dict"
        if isinstance(batch, Mapping)
        else "tuple"
        if isinstance(batch, Sequence)
        else "other"
    )
