"""Runs under torch.distributed (two gloo CPU processes) equal one process.

Each worker calls the public API on a DistributedDataParallel-wrapped float64 model; fits are
split by example index and all-reduced, the scoring passes split and gathered. Agreement to
1e-10 relative is rounding (sums in another order); a rank that missed part of the data or
used other labels would be off by orders of magnitude more.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from brute_force import lm_data, tiny_llama

import influence as inf

TIGHT = 1e-10
ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 13  # odd, and not a multiple of the batch size: the ranks' shares differ in size


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(model) -> dict[str, torch.Tensor]:
    """Factors and scores of every estimator that passes over data, and CG's scores."""
    task = inf.LanguageModelingTask()
    data, queries = lm_data(N_TRAIN, min_len=3), lm_data(3, seed=7, prompt=2)
    out: dict[str, torch.Tensor] = {}
    kw = {"batch_size": 2, "progress": False}
    for cls in (inf.Diagonal, inf.KFAC, inf.EKFAC):
        est = cls().fit(model, task, data, batch_size=2, progress=False, seed=3)
        out.update({f"{cls.name} {k}": v for k, v in est.state_.items()})
        out[f"{cls.name} scores"] = inf.pairwise_scores(model, task, est, queries, data, **kw)
        out[f"{cls.name} self"] = inf.self_scores(model, task, est, data, **kw)
    out["rank 1"] = inf.pairwise_scores(model, task, est, queries, data, rank=1, **kw)
    out["by token"] = inf.pairwise_scores(model, task, est, queries, data, by_token=True, **kw)
    # CG solves on every rank (the same solve); only its scoring pass is split.
    cg = inf.CG(damping=est.damping_, tol=1e-10, preconditioner=est)
    cg.fit(model, task, data, batch_size=4, progress=False)
    out["cg scores"] = inf.pairwise_scores(model, task, cg, queries, data, **kw)
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    address = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(tiny_llama())
        torch.save(_results(model), f"{path}.{rank}")
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    path = str(tmp_path / "results")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    single = _results(tiny_llama())
    for rank in (0, 1):
        got = torch.load(f"{path}.{rank}")
        assert set(got) == set(single)
        for k, v in single.items():
            assert got[k].shape == v.shape, k
            # CG stops at a relative residual of 1e-10, and its preconditioner (EK-FAC, equal
            # to rounding) steers the iterates: its solutions agree to that tolerance times
            # the conditioning (measured 6e-9), the rest to rounding.
            assert rel(got[k], v) < (1e-7 if k.startswith("cg") else TIGHT), (rank, k)


def _misuse_worker(rank: int, world: int, port: int, path: str) -> None:
    """Each way a torchrun script can give ranks different inputs; records each error."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, task = tiny_llama(), inf.LanguageModelingTask(modules="mlp")
        data, queries = lm_data(N_TRAIN, min_len=3), lm_data(3, seed=7, prompt=2)
        share = {k: v[rank::2] for k, v in data.items()}  # 7 and 6 examples
        other = lm_data(N_TRAIN, min_len=3, seed=10 + rank)  # same size, other content
        kw = {"progress": False}
        cases = {
            "own shard": lambda: inf.Diagonal().fit(model, task, share, **kw),
            "other content": lambda: inf.Diagonal().fit(model, task, other, **kw),
            "other weights": lambda: inf.Diagonal().fit(tiny_llama(seed=rank), task, data, **kw),
        }
        est = inf.Diagonal().fit(model, task, data, **kw)
        q = lm_data(3, seed=7 + rank, prompt=2)
        cases["other queries"] = lambda: inf.pairwise_scores(model, task, est, q, data, **kw)
        cases["own shard scored"] = lambda: inf.self_scores(model, task, est, share, **kw)
        errors = {}
        for name, call in cases.items():
            try:
                call()
                errors[name] = None
            except ValueError as err:
                errors[name] = str(err)
        # The same inputs on both ranks still work after all those refusals.
        errors["same"] = inf.pairwise_scores(model, task, est, queries, data, **kw).shape
        torch.save(errors, f"{path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_data_queries_or_weights_are_refused(tmp_path):
    """Ranks that each pass their own shard (unequal sizes), other data of the same size,
    other queries, or another model's weights used to mix them silently (both ranks printed
    one matrix); now every rank raises, naming what differs."""
    path = str(tmp_path / "errors")
    mp.spawn(_misuse_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    for rank in (0, 1):
        errors = torch.load(f"{path}.{rank}")
        assert "rank 0: 7 examples" in errors["own shard"]
        assert "rank 1: 6 examples" in errors["own shard"]
        assert errors["own shard"].startswith("the training data differs between ranks")
        assert "every rank must pass the whole data" in errors["own shard"]
        assert errors["other content"].startswith("the training data differs between ranks")
        assert errors["other weights"].startswith("the model's tracked weights differ")
        assert errors["other queries"].startswith("the query data differs between ranks")
        assert errors["own shard scored"].startswith("the training data differs")
        assert errors["same"] == (3, N_TRAIN)


def test_ddp_wrapper_is_unwrapped_and_nothing_is_split_without_a_process_group():
    from influence.distributed import is_distributed, unwrap_model

    assert not is_distributed()
    model = tiny_llama()
    assert unwrap_model(torch.nn.DataParallel(model)) is model
    assert unwrap_model(model) is model


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on POSIX")
def test_readme_torchrun_example_runs_with_two_processes(tmp_path):
    """examples/distributed_scores.py, as the README shows it, under `torchrun
    --nproc-per-node 2`, writes the scores of a one-process run of the same script."""
    script = ROOT / "examples" / "distributed_scores.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one.pt"
    two = tmp_path / "two.pt"
    # A hung collective must fail the test, not stall the whole run: generous time limits.
    run = {"check": True, "env": env, "cwd": ROOT, "timeout": 600}
    subprocess.run([sys.executable, str(script), str(one)], **run)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    port = ["--master-port", str(_free_port())]
    subprocess.run([*torchrun, *port, str(script), str(two)], **run)
    a, b = torch.load(one), torch.load(two)
    assert a.shape == b.shape == (8, 64)
    assert rel(b, a) < 1e-5  # float32 model: sums in another order
