"""Batches, per-layer terms and per-example gradients: the passes every estimator makes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

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

from . import checks, distributed
from .capture import LayerCapture, LayerTerms
from .heap import release_if_grown
from .layers import LayerInfo, layer_infos
from .masks import LayerMaskFinder, LayerMasks, right_align
from .tasks import IGNORE_INDEX, Task

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
    if examples and isinstance(examples[0], list) and not torch.is_tensor(examples[0]):
        raise TypeError(
            f"the data's examples are lists ({str(examples[0])[:40]}): give token sequences as "
            "dicts {'input_ids': ids, ...} (a list of them, a dict of tensors or a Hugging Face "
            "dataset), and other data as tensors or (x, y) tuples"
        )
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


def _as_tensor_columns(data: Any) -> Any:
    """A dict of numpy arrays (or of tensors and arrays) as a dict of tensors; a Hugging Face
    `DatasetDict` is refused, naming its splits."""
    if isinstance(data, Mapping) and data and all(_is_hf_dataset(v) for v in data.values()):
        raise TypeError(
            f"data is a DatasetDict of splits {list(data)}: pass one split, e.g. "
            f"data[{next(iter(data))!r}]"
        )
    if (
        isinstance(data, Mapping)
        and data
        and all(
            torch.is_tensor(v) or (hasattr(v, "__array__") and hasattr(v, "dtype"))
            for v in data.values()
        )
    ):
        return {k: torch.as_tensor(v) for k, v in data.items()}
    return data


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
    data = _as_tensor_columns(data)
    if isinstance(data, tuple) and all(torch.is_tensor(t) for t in data):
        if any(t.dim() == 0 for t in data):
            raise ValueError(
                f"tuple data (x, y) holds tensors of shapes {[list(t.shape) for t in data]}: "
                "each needs a first dimension of one row per example (one example is "
                "(x[None], y[None]))"
            )
        lengths = [len(t) for t in data]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"the tensors of tuple data (x, y) have different lengths {lengths}: give one "
                "row per example in each"
            )
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
    data = _as_tensor_columns(data)
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


def _hash_values(h, value: Any) -> None:
    if torch.is_tensor(value):
        value = value.detach().cpu().contiguous()
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif isinstance(value, Mapping):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _hash_values(h, value[k])
    elif isinstance(value, list | tuple):
        for v in value:
            _hash_values(h, v)
    else:
        h.update(repr(value).encode())


def data_fingerprint(data: Any) -> str:
    """'<N> examples, sha256 <digest>' of a few of `data`'s examples (its first, middle and
    last ones; the first batch of data that cannot be indexed): cheap, and different for
    the shards of one data set."""
    try:
        n = len(make_loader(data, 1).dataset)
    except TypeError:
        n = None
    h = hashlib.sha256()
    if n is None or isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset):
        for _, batch in iter_batches(data, 1):
            _hash_values(h, batch)
            break
    elif n:
        picks = {0, 1, n // 3, n // 2, (2 * n) // 3, n - 2, n - 1}
        _hash_values(h, take(data, sorted(min(max(i, 0), n - 1) for i in picks)))
    return f"{'?' if n is None else n} examples, sha256 {h.hexdigest()[:12]}"


def check_same_data_on_all_ranks(what: str, data: Any) -> None:
    """Under a process group, refuse `what` ("the training data") unless every rank has the
    same."""
    if distributed.is_distributed():
        distributed.check_same_on_all_ranks(
            f"{what} differs",
            data_fingerprint(data),
            "every rank must pass the whole data, the same on each: the library splits it "
            "across ranks itself (ranks that pass their own shards would mix them)",
        )


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


# Sequence batches are formed from examples ordered by their number of real tokens and trimmed
# to their longest real length, so that a pass costs what the real tokens cost (a corpus of
# short sequences padded to a fixed width otherwise spends most of its work on padding).
# Results are returned in the caller's order and do not depend on it (tested); the switch is
# for those tests.
ORDER_BY_LENGTH = True


class PassBatch(NamedTuple):
    """One batch of a pass: the caller's indices of its examples, the (trimmed) batch as the
    data gives it (the model sees it right-aligned, `masks.right_align`), the tracked layers'
    terms, each layer's mask of real positions (None: all real), and the batch's width
    before trimming."""

    indices: torch.Tensor
    batch: Any
    terms: LayerTerms
    masks: LayerMasks
    width: int


def real_lengths(batch: Any) -> torch.Tensor | None:
    """Per example, 1 + the last position that is a real token (attention_mask 1) or a counted
    label (≠ −100), for dict batches of token sequences whose labels (if any) align with them;
    None for other batches (classification labels, seq2seq decoder targets, tensors, tuples).

    Positions after it are padding that neither a causal model's earlier outputs nor the loss
    can see, so a batch can be cut to its longest real length."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return None
    ids = batch["input_ids"]
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[1] == 0:
        return None
    labels = batch.get("labels")
    if labels is not None and (not torch.is_tensor(labels) or labels.shape != ids.shape):
        return None  # a label per sequence (classification) or decoder targets (seq2seq)
    if any(str(k).startswith("decoder_") for k in batch):
        return None
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if labels is not None:
        real = real | (labels != IGNORE_INDEX)
    pos = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return (real * pos).amax(1).clamp_(min=1).cpu()


def trim_batch(batch: Any, length: int) -> Any:
    """Cut every [B, T] tensor of a dict batch to its first `length` positions."""
    if not isinstance(batch, Mapping):
        return batch
    b, t = batch["input_ids"].shape
    if length >= t:
        return batch
    return {
        k: (v[:, :length] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (b, t) else v)
        for k, v in batch.items()
    }


def _data_lengths(data: Any) -> torch.Tensor | None:
    """Real lengths of every example of indexable sequence data, or None when the data is not
    a dict-of-sequences dataset (then it is batched in the caller's order)."""
    if isinstance(data, DataLoader):
        return None
    if isinstance(data, Mapping) and all(torch.is_tensor(t) for t in data.values()):
        return real_lengths(data)
    if isinstance(data, tuple) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        return None
    parts = []
    for _, batch in iter_batches(data, 1024):
        lengths = real_lengths(batch)
        if lengths is None:
            return None
        parts.append(lengths)
    return torch.cat(parts) if parts else None


def ordered_batches(
    data: Any, batch_size: int, *, shard: bool = False
) -> Iterator[tuple[torch.Tensor, Any, int]]:
    """Yield `(indices, batch, width)`: examples ordered by real length (longest first, ties in
    the caller's order) when the data allows it, each batch trimmed to its longest real length;
    `indices` are the examples' positions in `data` and `width` the batch's untrimmed width.

    With `shard` under a process group, this rank's share only: every world-size-th example of
    that order (or, for data that cannot be indexed, every world-size-th batch)."""
    rank, size = distributed.world() if shard else (0, 1)
    lengths = _data_lengths(data) if ORDER_BY_LENGTH else None
    by_length = lengths is not None
    if lengths is None and size > 1 and not isinstance(data, DataLoader):
        lengths = _data_lengths_any(data)  # split by index, in the caller's order
    if lengths is None:
        for number, (offset, batch) in enumerate(iter_batches(data, batch_size)):
            if number % size != rank:
                continue
            n = batch["input_ids"].shape[0] if isinstance(batch, Mapping) else batch[0].shape[0]
            width = _width(batch)
            real = real_lengths(batch) if ORDER_BY_LENGTH else None
            if real is not None:
                batch = trim_batch(batch, int(real.max()))
            yield torch.arange(offset, offset + int(n)), batch, width
        return
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    order = torch.sort(-lengths, stable=True).indices if by_length else torch.arange(len(lengths))
    order = order[rank::size]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = take(data, idx.tolist())
        width = _width(batch)
        if by_length:
            batch = trim_batch(batch, int(lengths[idx].max()))
        yield idx, batch, width


def _data_lengths_any(data: Any) -> torch.Tensor | None:
    """Number of examples of indexable data as dummy lengths (for splitting it by index)."""
    try:
        n = len(make_loader(data, 1).dataset)
    except TypeError:
        return None
    return torch.ones(n, dtype=torch.long)


def _width(batch: Any) -> int:
    """Sequence width of a dict batch (0 for other batches: their terms say it)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return int(ids.shape[1]) if torch.is_tensor(ids) and ids.dim() >= 2 else 0


def restore_order(indices: list[torch.Tensor]) -> torch.Tensor:
    """The permutation that puts rows gathered in pass order back in the caller's order."""
    return torch.argsort(torch.cat(indices))


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
    shard: bool = False,
) -> Iterator[PassBatch]:
    """One pass over `data`: a `PassBatch` (indices, batch, {layer: (ā, g)}, {layer: mask of
    real positions}, width) per batch, batches formed by `ordered_batches`.

    The loss is the task's training loss (true labels, or sampled ones when `sample`, example
    i seeded by (seed, i) whatever its batch), or its measurement when `measurement`. No weight
    gradients are computed. With `shard`, only this rank's share of the examples (see
    `influence.distributed`)."""
    model = distributed.unwrap_model(model)
    layers = task.tracked_modules(model) if layers is None else layers
    infos = layer_infos(layers)
    checks.check_finite_weights(layers)
    dev = resolve_device(model, device)
    find_masks = LayerMaskFinder(model, task, layers)
    loader = make_loader(data, batch_size)
    try:
        total = len(loader)
    except TypeError:
        total = None
    with _EvalMode(model):
        for idx, batch, width in tqdm(
            ordered_batches(
                loader if isinstance(data, DataLoader) else data, batch_size, shard=shard
            ),
            total=total,
            desc=desc,
            disable=not progress,
            leave=False,
        ):
            task.check_batch(batch)
            checks.check_batch_values(model, batch, idx, measurement)
            checks.check_counted_tokens(task, batch, idx, measurement)
            batch = task.to_device(batch, dev)
            aligned = right_align(task, batch)
            n = task.batch_size(aligned)
            with LayerCapture(model, layers, infos, batch_size=n, batch=aligned) as cap:
                if measurement:
                    loss = task.measurement(model, aligned)
                else:
                    loss = task.loss(model, aligned, sample=sample, seed=seed, indices=idx.tolist())
                terms = cap.backward(loss)
            masks = find_masks(aligned, terms)
            terms = checks.finite_terms(terms, masks, idx, measurement)
            yield PassBatch(idx, batch, terms, masks, width)
            del (
                terms,
                loss,
                aligned,
                masks,
            )  # a consumer that is done with them frees them before the next batch
            if dev.type == "cpu":
                release_if_grown()  # batches change shape: see influence.heap


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
    indices = []
    for idx, _, terms, _, _ in iter_layer_terms(
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
        indices.append(idx)
        for n, gr in example_gradients(terms).items():
            chunks.setdefault(n, []).append(gr)
    if not indices:
        return {}
    order = restore_order(indices)
    return {n: torch.cat(c)[order] for n, c in chunks.items()}


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
