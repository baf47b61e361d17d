"""EK-FAC influence scores split across processes with torch.distributed.

Run on one machine with two processes (CPU, gloo; use more processes or GPUs the same way):

    torchrun --nproc-per-node 2 examples/distributed_scores.py scores.pt

or without torchrun, in one process: `python examples/distributed_scores.py scores.pt`. Both
write the same [8, 64] scores (up to the order of floating-point sums).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import influence as inf


def main(out_path: str) -> None:
    launched = "RANK" in os.environ  # set by torchrun
    if launched:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"

    torch.manual_seed(0)  # the same model on every rank
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).to(device).eval()
    if launched:  # a training script's wrapped model is accepted as it is
        model = torch.nn.parallel.DistributedDataParallel(model)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (72, 24), generator=g)
    lengths = torch.randint(6, 25, (72,), generator=g)
    mask = (torch.arange(24) < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    train = {"input_ids": ids[:64], "attention_mask": mask[:64], "labels": labels[:64]}
    queries = {"input_ids": ids[64:], "attention_mask": mask[64:], "labels": labels[64:]}

    task = inf.LanguageModelingTask(modules="mlp")
    # Each rank passes over its share of the training examples; the sums are all-reduced, so
    # every rank holds the same factors.
    est = inf.EKFAC().fit(model, task, train, batch_size=8, progress=False)
    # Each rank scores its share of the training examples; every rank returns all [Q, N] scores.
    scores = inf.pairwise_scores(model, task, est, queries, train, batch_size=8, progress=False)
    if not launched or dist.get_rank() == 0:
        torch.save(scores.cpu(), out_path)
        print(f"scores {tuple(scores.shape)} written to {out_path}")
    if launched:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "scores.pt")
