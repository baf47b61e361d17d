"""A GradientIndex built under torch.distributed (two gloo CPU processes) writes one shard per
rank and scores as one process does (see tests/test_distributed.py for the setting)."""

from __future__ import annotations

import json
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from brute_force import lm_data, tiny_llama

import influence as inf

N_TRAIN = 13  # odd: the ranks' shards differ in size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    address = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(tiny_llama())
        task = inf.LanguageModelingTask()
        data, queries = lm_data(N_TRAIN, min_len=3), lm_data(3, seed=7, prompt=2)
        est = inf.EKFAC().fit(model, task, data, batch_size=2, progress=False, seed=3)
        out = {}
        for name, comp in (("none", None), ("eigen", inf.EigenCompression(3, 3))):
            index = inf.GradientIndex.build(
                model,
                task,
                est,
                data,
                f"{path}/{name}",
                compression=comp,
                dtype=torch.float64,
                batch_size=2,
                progress=False,
            )
            out[name] = index.scores(model, task, queries)
        torch.save(out, f"{path}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_write_a_shard_each_and_score_as_one(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model, task = tiny_llama(), inf.LanguageModelingTask()
    data, queries = lm_data(N_TRAIN, min_len=3), lm_data(3, seed=7, prompt=2)
    est = inf.EKFAC().fit(model, task, data, batch_size=2, progress=False, seed=3)
    exact = inf.pairwise_scores(model, task, est, queries, data, batch_size=2, progress=False)
    one = inf.GradientIndex.build(
        model,
        task,
        est,
        data,
        tmp_path / "one",
        compression=inf.EigenCompression(3, 3),
        dtype=torch.float64,
        progress=False,
    )
    single = {"none": exact, "eigen": one.scores(model, task, queries)}
    for name in ("none", "eigen"):
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 7), (7, 13)]
        for k in (0, 1):  # each written by its own rank
            assert json.loads((tmp_path / name / f"shard-0000{k}.json").read_text())["rank"] == k
        for rank in (0, 1):
            got = torch.load(tmp_path / f"rank{rank}.pt")[name]
            err = ((got - single[name]).norm() / single[name].norm()).item()
            assert err < 1e-10, (name, rank, err)  # factors all-reduced: sums in another order
