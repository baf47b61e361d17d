"""Runs under torch.distributed: split the passes over training data across ranks.

When a default process group is initialised (a script started with `torchrun`) and has more
than one rank:

- `fit` of every estimator that passes over data (K-FAC, EK-FAC, Diagonal) gives each rank
  the training examples of its share (in length order, every `world_size`-th example) and
  all-reduces the sums (covariances, token and example counts, EK-FAC's eigenvalues, the
  diagonal): every rank ends with the same factors, equal to a one-process fit up to the order
  of summation.
- `pairwise_scores` and `self_scores` split the training examples the same way and gather the
  scores: every rank returns the full [Q, N] (or [N]) result. The queries are preconditioned on
  every rank (they are few), so no rank waits for another before its training pass.
- CG and LiSSA fit and solve on every rank redundantly (each rank makes the same passes over
  all the data and gets the same result); only the scoring pass is split. `pbrf_scores` runs
  whole on every rank.

Every rank must pass the same model, data and queries (the library splits the data itself):
`fit`, `pairwise_scores` and `self_scores` compare the number of examples and a fingerprint of
a few examples of each data set (and `fit` the tracked weights) across ranks, and refuse a
mismatch, such as ranks that each pass their own shard, naming it.

A model wrapped in `DistributedDataParallel` (or FSDP's `FullyShardedDataParallel` with a
full, unsharded `module`) is unwrapped; the library never wraps a model itself. Sampled labels
depend on (seed, example index) only, so the split changes no label.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether passes are split: a process group with more than one rank is initialised."""
    return world()[1] > 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel / DataParallel / FSDP wrapper."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)) or (
        type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module")
    ):
        model = model.module
    return model


def _device_for(t: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over ranks (in place where possible); a no-op without a process group.
    Every rank must pass the same keys with the same shapes."""
    if not is_distributed():
        return tensors
    out = {}
    for k in sorted(tensors):  # the same order on every rank
        t = tensors[k]
        moved = t.to(_device_for(t)).contiguous()
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        out[k] = moved.to(t.device)
    return {k: out[k] for k in tensors}


def all_reduce_number(x: float | int) -> float:
    """Sum a Python number over ranks (float64)."""
    if not is_distributed():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    (t,) = all_reduce_sum({"x": t}).values()
    return t.item()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (the object itself without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def check_same_on_all_ranks(what: str, value: Any, hint: str) -> None:
    """Raise on every rank when `value`, a fingerprint, is not the same on all ranks; `what`
    says what then differs ("the training data differs"). A no-op without a process group."""
    if not is_distributed():
        return
    values = all_gather_objects(value)
    if any(v != values[0] for v in values):
        seen = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise ValueError(f"{what} between ranks ({seen}): {hint}")
