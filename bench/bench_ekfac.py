"""Benchmark: EK-FAC fit and pairwise scores as ratios to one plain training epoch.

Setup (issue 3): a Llama-style model of about 1M parameters built from a config (hidden 128,
4 layers, vocab 512), 2,000 training sequences of 64 tokens, 128 queries. In one run it times
one forward+backward pass over the training data with weight gradients (the epoch), the EK-FAC
fit, and the scores of all queries at full rank and rank 32, each `--repeats` times, and
prints the fastest time of each stage as a ratio to the fastest epoch (and the ratio of the
medians), next to its arithmetic floor from a flop count (torch.utils.flop_counter) and the
peak memory. Run: `make bench` or `python bench/bench_ekfac.py [--device cuda] [--quick]`.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

import influence as inf
from influence.capture import LayerCapture
from influence.kfac import rotate_tokens_first
from influence.layers import layer_infos


def build(n_train: int, n_query: int, seq: int, device: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(device).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (n_train + n_query, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    train = {
        "input_ids": ids[:n_train],
        "attention_mask": mask[:n_train],
        "labels": labels[:n_train],
    }
    q_labels = labels[n_train:].clone()
    q_labels[:, : seq // 2] = -100  # prompt: first half; completion: second half
    queries = {"input_ids": ids[n_train:], "attention_mask": mask[n_train:], "labels": q_labels}
    return model, train, queries


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    gc.collect()
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def epoch(model, task, data, batch_size: int, device: str) -> None:
    """One plain training pass: forward, backward with weight gradients, no optimiser step."""
    model.zero_grad(set_to_none=True)
    for _, batch in inf.gradients.iter_batches(data, batch_size):
        batch = task.to_device(batch, device)
        task.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)


def flops_epoch_batch(model, task, batch) -> int:
    with FlopCounterMode(display=False) as fc:
        task.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def flops_influence_pass(model, task, batch) -> int:
    """Forward + backward to the tracked layers' outputs only (no weight gradients)."""
    layers = task.tracked_modules(model)
    with (
        FlopCounterMode(display=False) as fc,
        LayerCapture(model, layers, layer_infos(layers)) as cap,
    ):
        cap.backward(task.loss(model, batch))
    return fc.get_total_flops()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timings per stage (fastest is kept)")
    ap.add_argument(
        "--quick", action="store_true", help="200 sequences, one repeat: checks the script runs"
    )
    args = ap.parse_args()
    if args.quick:
        args.train, args.repeats = 200, 1
    dev, bs = args.device, args.batch_size
    model, train, queries = build(args.train, args.queries, args.seq, dev)
    task = inf.LanguageModelingTask()
    infos = layer_infos(task.tracked_modules(model))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama hidden 128, 4 layers, vocab 512, {n_params / 1e6:.2f}M parameters; "
        f"{len(infos)} tracked linear layers ({sum(i.numel for i in infos.values()) / 1e6:.2f}M "
        f"tracked parameters); N = {args.train} x T = {args.seq}; Q = {args.queries}; "
        f"batch {bs}; device {dev}; torch threads {torch.get_num_threads()}"
    )

    epoch(model, task, {k: v[:bs] for k, v in train.items()}, bs, dev)  # warm-up
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    mem0 = peak_rss_mib()
    times: dict[str, list[float]] = {"epoch": [], "fit": [], "full": [], "rank32": []}

    def stage(name: str, fn):
        out, seconds = timed(fn, dev)
        times[name].append(seconds)
        return out

    # Each repeat times an epoch and every stage; one more epoch closes the run. A shared
    # machine only ever slows a run down (its speed drifts by 10-20% within minutes), so the
    # fastest time of each stage over the repeats estimates its cost, and the ratios divide
    # fastest by fastest (the medians are printed too).
    for _ in range(args.repeats):
        stage("epoch", lambda: epoch(model, task, train, bs, dev))
        est = stage(
            "fit",
            lambda: inf.EKFAC().fit(model, task, train, batch_size=bs, progress=False, device=dev),
        )
        full = stage(
            "full",
            lambda est=est: inf.pairwise_scores(
                model, task, est, queries, train, batch_size=bs, progress=False, device=dev
            ),
        )
        low = stage(
            "rank32",
            lambda est=est: inf.pairwise_scores(
                model, task, est, queries, train, rank=32, batch_size=bs, progress=False, device=dev
            ),
        )
    stage("epoch", lambda: epoch(model, task, train, bs, dev))
    if dev.startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
    else:
        peak = f"{peak_rss_mib():.0f} MiB RSS (was {mem0:.0f} before fitting)"

    # Arithmetic floors, from flop counts of one batch scaled to the data.
    batch = task.to_device({k: v[:bs] for k, v in train.items()}, dev)
    nb = args.train / bs
    f_epoch = flops_epoch_batch(model, task, batch) * nb
    f_pass = flops_influence_pass(model, task, batch) * nb
    tokens = args.train * args.seq
    f_cov = sum(2 * tokens * (i.in_dim**2 + i.out_features**2) for i in infos.values())
    f_proj = sum(
        2 * tokens * (i.in_dim**2 + i.out_features**2 + i.numel)
        if rotate_tokens_first(args.seq, i.out_features, i.in_dim)
        else 2 * args.train * (args.seq * i.numel + i.numel * (i.out_features + i.in_dim))
        for i in infos.values()
    )
    f_grads = sum(2 * tokens * i.numel for i in infos.values())
    f_dots = sum(2 * args.queries * args.train * i.numel for i in infos.values())
    floor_fit = (2 * f_pass + f_cov + f_proj) / f_epoch
    floor_scores = (f_pass + f_grads + f_dots) / f_epoch

    r = torch.corrcoef(torch.stack([full.flatten(), low.flatten()]))[0, 1].item()
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    floors = {"fit": floor_fit, "full": floor_scores, "rank32": floor_scores}
    labels = {
        "fit": "EK-FAC fit (2 passes)",
        "full": f"scores, {args.queries} queries, full rank",
        "rank32": f"scores, {args.queries} queries, rank 32",
    }
    epochs = ", ".join(f"{t:.2f}" for t in times["epoch"])
    print(
        f"\nepoch (forward+backward with weight gradients): fastest {best['epoch']:.2f} s = 1.00x "
        f"(all {len(times['epoch'])}: {epochs} s)"
    )
    print(f"{'stage':<34}{'fastest s':>10}{'ratio':>8}{'median':>8}{'floor':>8}")
    for k, label in labels.items():
        print(
            f"{label:<34}{best[k]:>10.2f}{best[k] / best['epoch']:>7.2f}x"
            f"{median[k] / median['epoch']:>7.2f}x{floors[k]:>7.2f}x"
        )
    print(f"repeats: {args.repeats}; peak memory: {peak}")
    print(f"rank-32 vs full-rank scores: Pearson {r:.4f}")
    print("targets on a 2-core CPU: fit <= 3.0x, scores <= 1.7x an epoch")


if __name__ == "__main__":
    main()
