"""Every documented data format gives the same scores, for every estimator.

Training and query data are given as a padded dict of tensors (the reference), a torch Dataset
of unpadded examples, a Hugging Face `datasets.Dataset` in python, numpy and torch formats
(ragged rows, padded by the library's collator with an attention mask and −100 labels), a
DataLoader with its own padding `collate_fn` (to a different width), and a shuffled DataLoader.
Right padding with a mask changes no real token's computation, so each format's scores equal
the reference's to rounding (float64), in dataset order.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import influence as inf
from influence.gradients import collate, make_loader
from tests.brute_force import VOCAB, tiny_llama

datasets = pytest.importorskip("datasets")

N, Q, SEQ = 6, 2, 6
LENGTHS = [3, 6, 4, 5, 2, 6]
TASK = inf.LanguageModelingTask(modules="mlp")


def ragged(n: int, seed: int, lengths) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(1, VOCAB, (length,), generator=g).tolist()}
        for length in lengths[:n]
    ]


TRAIN = ragged(N, 1, LENGTHS)
QUERY = ragged(Q, 2, [5, 4])


def padded(rows, width=SEQ) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class ListDataset(Dataset):
    """A torch Dataset of unpadded examples (dicts of 1-D tensors)."""

    def __init__(self, rows):
        self.rows = [{k: torch.tensor(v) for k, v in r.items()} for r in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def own_collator(examples):
    """A user's collator: pads to a fixed width of 8 (wider than any sequence)."""
    return padded([{"input_ids": list(map(int, e["input_ids"]))} for e in examples], width=8)


def hf(rows, fmt):
    text = [" ".join(map(str, r["input_ids"])) for r in rows]  # a text column rides along
    ds = datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "text": text})
    return ds.with_format(fmt) if fmt else ds


FORMATS = {
    "dict": lambda rows: padded(rows),
    "torch_dataset": ListDataset,
    "hf_python": lambda rows: hf(rows, None),
    "hf_numpy": lambda rows: hf(rows, "numpy"),
    "hf_torch": lambda rows: hf(rows, "torch"),
    "loader_collate_fn": lambda rows: DataLoader(
        ListDataset(rows), batch_size=4, collate_fn=own_collator
    ),
    "shuffled_loader": lambda rows: DataLoader(
        ListDataset(rows),
        batch_size=4,
        shuffle=True,
        collate_fn=own_collator,
        generator=torch.Generator().manual_seed(0),
    ),
}

ESTIMATORS = {
    "identity": lambda: inf.Identity(),
    "diagonal": lambda: inf.Diagonal(),
    "kfac": lambda: inf.KFAC(),
    "ekfac": lambda: inf.EKFAC(),
    "cg": lambda: inf.CG(damping=0.1, tol=1e-10),
    "lissa": lambda: inf.LiSSA(damping=0.1, depth=30, batch_size=3),
    "pbrf": None,
}


def scores(fmt: str, est: str) -> torch.Tensor:
    model = tiny_llama()
    train, query = FORMATS[fmt](TRAIN), FORMATS[fmt](QUERY)
    if est == "pbrf":
        return inf.pbrf_scores(
            model, TASK, query, train, [0, 3], damping=0.1, max_steps=30, progress=False
        )
    fitted = ESTIMATORS[est]().fit(model, TASK, train, batch_size=4, seed=3)
    return inf.pairwise_scores(model, TASK, fitted, query, train, batch_size=4)


@functools.cache
def reference(est: str) -> torch.Tensor:
    return scores("dict", est)


@pytest.mark.parametrize("est", list(ESTIMATORS))
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "dict"])
def test_format_gives_reference_scores(fmt, est):
    ref = reference(est)
    got = scores(fmt, est)
    assert got.shape == ref.shape == (Q, 2 if est == "pbrf" else N)
    # Rounding only (float64); L-BFGS in the PBRF may take a different last step.
    tol = 1e-6 if est == "pbrf" else 1e-9
    assert (got - ref).abs().max() <= tol * ref.abs().max()


def test_collate_pads_ragged_rows():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}][:1])
    assert batch["input_ids"].tolist() == [[5, 6, 7]]
    batch = collate([{"input_ids": [5, 6, 7], "text": "a"}, {"input_ids": [8], "text": "b"}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["text"] == ["a", "b"]
    batch = collate([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [8], "labels": [8]}])
    assert batch["labels"].tolist() == [[5, 6], [8, -100]]


def test_loaders_that_skip_or_repeat_examples_are_refused():
    ds = ListDataset(TRAIN)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        make_loader(DataLoader(ds, batch_size=2, sampler=sampler), 2)
    # drop_last would lose examples: the loader is re-made to visit all of them.
    loader = make_loader(DataLoader(ds, batch_size=4, drop_last=True, collate_fn=own_collator), 4)
    assert sum(len(b["input_ids"]) for b in loader) == N


def test_batch_samplers_in_order_are_kept_and_permutations_reordered():
    ds = ListDataset(TRAIN)
    growing = DataLoader(ds, batch_sampler=[[0, 1], [2, 3, 4, 5]], collate_fn=own_collator)
    assert make_loader(growing, 1) is growing
    permuted = DataLoader(ds, batch_sampler=[[3, 1], [0, 2, 5, 4]], collate_fn=own_collator)
    ids = torch.cat([b["input_ids"] for b in make_loader(permuted, 1)])
    assert torch.equal(ids, own_collator(ds.rows)["input_ids"])
    with pytest.raises(ValueError, match="exactly once"):
        make_loader(DataLoader(ds, batch_sampler=[[0, 1], [1, 2]]), 1)
