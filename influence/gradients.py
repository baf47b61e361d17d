"""Batches, per-layer terms and per-example gradients: the passes every estimator makes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)
from torch.utils.data.dataloader import default_collate
from tqdm.auto import tqdm

from . import checks
from .capture import LayerCapture, LayerTerms
from .layers import LayerInfo, layer_infos
from .tasks import Task

# Padding values of the collator for ragged sequences (Hugging Face conventions): labels are
# not counted (−100), masks are 0, every other key (input_ids, token_type_ids, ...) is 0.
PAD_VALUES = {"labels": -100, "attention_mask": 0, "decoder_attention_mask": 0}


def _is_hf_dataset(data: Any) -> bool:
    return hasattr(data, "select") and hasattr(data, "column_names") and hasattr(data, "format")


def _python_format(data: Any) -> Any:
    """A Hugging Face dataset in torch or python format (numpy, pandas, arrow, ... become python
    objects, same columns), so that `data[i]` is a dict of tensors or lists."""
    fmt = data.format
    if fmt.get("type") in (None, "torch"):
        return data
    return data.with_format(
        None, columns=fmt.get("columns"), output_all_columns=fmt.get("output_all_columns", False)
    )


def _as_tensor(value: Any) -> Any:
    if torch.is_tensor(value):
        return value
    if isinstance(value, str | bytes):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return value


def collate(examples: Sequence[Any]) -> Any:
    """Stack examples into a batch; dict examples with sequences of different lengths are
    right-padded (labels with −100, attention masks with 0, other keys with 0) and get an
    `attention_mask` when they have none. Non-numeric columns (text) stay lists."""
    if not examples or not isinstance(examples[0], Mapping):
        return default_collate(list(examples))
    out: dict[str, Any] = {}
    lengths = None
    for key in examples[0]:
        values = [_as_tensor(e[key]) for e in examples]
        if not all(torch.is_tensor(v) for v in values):
            out[key] = values
            continue
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            out[key] = torch.stack(values)
            continue
        if any(v.dim() != 1 for v in values):
            raise ValueError(
                f"examples' {key!r} have shapes {sorted(shapes)[:4]}: only 1-D sequences can be "
                "padded; pass a DataLoader with your own collate_fn"
            )
        if key == "input_ids":
            lengths = torch.tensor([len(v) for v in values])
        out[key] = torch.nn.utils.rnn.pad_sequence(
            values, batch_first=True, padding_value=PAD_VALUES.get(key, 0)
        )
    if lengths is not None and "attention_mask" not in out:
        width = out["input_ids"].shape[1]
        out["attention_mask"] = (torch.arange(width)[None] < lengths[:, None]).long()
    return out


def _loader_in_dataset_order(loader: DataLoader) -> DataLoader:
    """`loader`, or a copy that visits its dataset in order: scores come back in dataset order
    whatever the loader's shuffling. Samplers that skip or repeat examples are refused."""
    if isinstance(loader.dataset, IterableDataset):
        return loader  # a stream: its order is the data's order
    n = len(loader.dataset)
    sampler = loader.sampler
    if loader.batch_size is None:  # a batch_sampler of the user's: check what it visits
        batches = [list(b) for b in loader.batch_sampler]
        order = [int(i) for b in batches for i in b]
        if order == list(range(n)):
            return loader
        if sorted(order) != list(range(n)):
            raise ValueError(
                "the DataLoader's batch_sampler does not visit each example exactly once: "
                "scores are indexed by position in the dataset, so pass a DataLoader that does "
                "(or just the dataset and batch_size=)"
            )
        width = max(len(b) for b in batches)
        return DataLoader(
            loader.dataset, batch_size=width, shuffle=False, collate_fn=loader.collate_fn
        )
    sequential = isinstance(sampler, SequentialSampler)
    shuffled = isinstance(sampler, RandomSampler) and (
        not sampler.replacement and sampler.num_samples == n
    )
    if not (sequential or shuffled):
        raise ValueError(
            f"the DataLoader's sampler ({type(sampler).__name__}) may not visit each example "
            "exactly once: scores are indexed by position in the dataset, so pass a DataLoader "
            "with shuffle=False (or just the dataset and batch_size=)"
        )
    if sequential and not loader.drop_last:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        shuffle=False,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def make_loader(data: Any, batch_size: int) -> DataLoader:
    """A DataLoader over `data` that visits the examples in dataset order.

    Accepts a DataLoader (with its own `collate_fn`; a shuffled or `drop_last` one is re-made
    in dataset order, so scores are indexed by dataset position), a torch Dataset, a Hugging
    Face `datasets.Dataset` in any format, a tuple `(x, y)` of tensors, or a dict of equally
    long tensors. Examples that are dicts of sequences of different lengths are padded (see
    `collate`).
    """
    if isinstance(data, DataLoader):
        return _loader_in_dataset_order(data)
    if isinstance(data, tuple) and all(torch.is_tensor(t) for t in data):
        data = TensorDataset(*data)
    elif isinstance(data, Mapping) and all(torch.is_tensor(t) for t in data.values()):
        data = _DictDataset(data)
    elif _is_hf_dataset(data):
        data = _python_format(data)
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(
            f"cannot iterate data of type {type(data).__name__}: pass a torch Dataset, a "
            "DataLoader, a Hugging Face datasets.Dataset, a tuple (x, y) of tensors or a dict "
            "of tensors"
        )
    batch_size = checks.positive_int("batch_size", batch_size)
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)


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

    def take(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v[indices] for k, v in self.tensors.items()}


def batch_length(batch: Any) -> int:
    """Number of examples in a collated batch (dict, tuple or tensor)."""
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        for key in ("input_ids", "labels"):
            if torch.is_tensor(batch.get(key)):
                return int(batch[key].shape[0])
        values = list(batch.values())
    else:
        values = list(batch)
    for v in values:
        if torch.is_tensor(v):
            return int(v.shape[0])
    for v in values:
        if isinstance(v, list):
            return len(v)
    raise TypeError(f"cannot tell the number of examples of a {type(batch).__name__} batch")


def take(data: Any, indices: Sequence[int]) -> Any:
    """The examples `indices` (dataset positions) of `data` as one batch, collated as
    `make_loader` would (a DataLoader's own `collate_fn` included)."""
    indices = [int(i) for i in indices]
    if isinstance(data, tuple) and all(torch.is_tensor(t) for t in data):
        return tuple(t[indices] for t in data)
    if isinstance(data, Mapping) and all(torch.is_tensor(t) for t in data.values()):
        return {k: v[indices] for k, v in data.items()}
    fn = collate
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            raise TypeError(
                "cannot pick examples from a DataLoader over an IterableDataset (LiSSA and the "
                "PBRF need random access): pass a map-style dataset"
            )
        fn, data = data.collate_fn, data.dataset
    elif _is_hf_dataset(data):
        data = _python_format(data)
    if not (isinstance(data, Dataset) or hasattr(data, "__getitem__")):
        raise TypeError(f"cannot index data of type {type(data).__name__}")
    return fn([data[i] for i in indices])


def iter_batches(data: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """Yield `(offset, batch)` in dataset order: offset is the index of the batch's first
    example."""
    offset = 0
    for batch in make_loader(data, batch_size):
        yield offset, batch
        offset += batch_length(batch)


def num_examples(data: Any, batch_size: int = 1) -> int:
    loader = make_loader(data, batch_size)
    try:
        return len(loader.dataset)
    except TypeError:
        return sum(1 for _ in iter_batches(data, batch_size))


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to compute on; moves the model there when one is given."""
    device = checks.check_device(device)  # before the model is touched
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
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
    checks.check_finite_weights(layers)
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
            checks.check_batch_values(model, batch, offset, measurement)
            checks.check_counted_tokens(task, batch, offset, measurement)
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
            checks.check_finite_terms(terms, offset, measurement)
            yield offset, batch, terms, task.token_mask(batch)


def token_outer_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Σ_t g_t ā_tᵀ per example, [B, out, in'], from g [B, T, out] and ā [B, T, in'].

    A batched matrix product: on CPU it runs up to 1.7× faster than the same einsum."""
    return torch.bmm(g.transpose(1, 2), a)


def example_gradients(terms: LayerTerms) -> dict[str, torch.Tensor]:
    """Per-example gradients [B, out, in'] from per-token terms: Σ_t g_t ā_tᵀ."""
    return {n: token_outer_sum(g, a) for n, (a, g) in terms.items()}


@checks.restores_model
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
    checks.check_task(task)
    checks.check_score_args(batch_size=batch_size, device=device, progress=progress)
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
