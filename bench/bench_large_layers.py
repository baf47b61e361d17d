"""Benchmark: scores of a model whose batch of per-example gradients exceeds the buffer cap.

Setup (issue 10): a Llama-style model built from a config (hidden 512, 4 layers, intermediate
2048, vocab 512: 17M parameters, 16.8M of them in the 28 tracked linear layers), 256 training
sequences of 64 tokens, 32 queries, batch 32. One batch of per-example gradients is 2.1 GB in
float32, four times the 512 MiB cap of `influence.scores`, so the scores take the per-layer
path. It prints each stage as a ratio to one plain forward+backward epoch and to two flop
floors, counted with torch.utils.flop_counter: the training side alone (the capture pass +
forming per-example gradients + the Q·N·P dot products: the issue's floor, target <= 1.5x),
and that plus the query side the scores cannot skip (the queries' own capture pass and their
preconditioning, (G + λI)⁻¹ in EK-FAC's eigenbasis and, at rank 32, the truncated SVD). At
full rank rotating the preconditioned queries back is 2·Q·Σ out·in'·(out + in') flops, 1.4 epochs:
with N = 256 training sequences it is not amortised (`--train 1024` shows the trend).
It also scores the same model on the path a small model takes, with the memory caps of
`influence.scores` raised so that every layer's per-example gradients for a whole group are
formed at once and the dense rank-32 queries are kept: the large-layer path must be as fast.
Run: `python bench/bench_large_layers.py [--repeats 2] [--train N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics

import torch
from bench_ekfac import epoch, flops_epoch_batch, flops_influence_pass, timed
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

import influence as inf
import influence.scores as scores_module
from influence.layers import layer_infos


def build(n_train: int, n_query: int, seq: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (n_train + n_query, seq), generator=g)
    mask = torch.ones_like(ids)
    train = {"input_ids": ids[:n_train], "attention_mask": mask[:n_train], "labels": ids[:n_train]}
    q_labels = ids[n_train:].clone()
    q_labels[:, : seq // 2] = -100
    queries = {"input_ids": ids[n_train:], "attention_mask": mask[n_train:], "labels": q_labels}
    return model, train, queries


@contextlib.contextmanager
def small_model_path():
    """The scores' memory caps raised past this model's needs: each layer's per-example
    gradients for a whole group in one buffer, dense rank-32 queries kept, as for a model
    whose batch of gradients fits the cap."""
    saved = scores_module._GROUP_BYTES, scores_module._CPU_BLOCK_BYTES
    scores_module._GROUP_BYTES = scores_module._CPU_BLOCK_BYTES = 2**40
    try:
        yield
    finally:
        scores_module._GROUP_BYTES, scores_module._CPU_BLOCK_BYTES = saved


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--rank-only", action="store_true", help="skip full rank: the peak RSS is rank 32's"
    )
    args = ap.parse_args()
    bs = args.batch_size
    model, train, queries = build(args.train, args.queries, args.seq)
    task = inf.LanguageModelingTask()
    infos = layer_infos(task.tracked_modules(model))
    p_tracked = sum(i.numel for i in infos.values())
    p_all = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama hidden 512, 4 layers, {p_all / 1e6:.1f}M parameters"
        f", {p_tracked / 1e6:.1f}M tracked in {len(infos)} layers; N = {args.train} x "
        f"T = {args.seq}; Q = {args.queries}; batch {bs}; one batch of per-example gradients "
        f"{bs * p_tracked * 4 / 2**30:.1f} GiB; torch threads {torch.get_num_threads()}"
    )
    epoch(model, task, {k: v[:bs] for k, v in train.items()}, bs, "cpu")  # warm-up
    est = inf.EKFAC().fit(model, task, train, batch_size=bs, progress=False)
    rss_fit = rss_mib()
    times: dict[str, list[float]] = {"epoch": [], "full": [], "rank32": []}
    buffered: dict[str, list[float]] = {"full": [], "rank32": []}
    # The query side alone (the scores' first step), to split each score time into the two
    # sides and set the training side against its own floor.
    q_times: dict[str, list[float]] = {"full": [], "rank32": []}
    # Peak RSS is a high-water mark: the library's own peaks are read in the first repeat,
    # before the small-model path first runs.
    rss_full = rss_low = float("nan")
    ranks = {"full": None, "rank32": 32}  # stage: rank
    if args.rank_only:
        del ranks["full"]

    def score(rank: int | None) -> torch.Tensor:
        return inf.pairwise_scores(
            model, task, est, queries, train, rank=rank, batch_size=bs, progress=False
        )

    for repeat in range(args.repeats):
        times["epoch"].append(timed(lambda: epoch(model, task, train, bs, "cpu"), "cpu")[1])
        for k, rank in ranks.items():
            q_times[k].append(
                timed(
                    lambda rank=rank: inf.preconditioned_queries(
                        model, task, est, queries, rank=rank, batch_size=bs
                    ),
                    "cpu",
                )[1]
            )
        if not args.rank_only:
            full, t = timed(lambda: score(None), "cpu")
            times["full"].append(t)
        if repeat == 0:
            rss_full = rss_mib()
        low, t = timed(lambda: score(32), "cpu")
        times["rank32"].append(t)
        if repeat == 0:
            rss_low = rss_mib()
        # Timed in the same repeat as the library's path: this machine's speed drifts.
        with small_model_path():
            for k, rank in ranks.items():
                buffered[k].append(timed(lambda rank=rank: score(rank), "cpu")[1])
    times["epoch"].append(timed(lambda: epoch(model, task, train, bs, "cpu"), "cpu")[1])

    batch = {k: v[:bs] for k, v in train.items()}
    nb = args.train / bs
    f_epoch = flops_epoch_batch(model, task, batch) * nb
    f_pass = flops_influence_pass(model, task, batch) * nb
    f_grads = 2 * args.train * args.seq * p_tracked
    f_dots = 2 * args.queries * args.train * p_tracked
    floor = (f_pass + f_grads + f_dots) / f_epoch
    query_side = {"full": float("nan")}
    for k, rank in ranks.items():
        with FlopCounterMode(display=False) as fc:
            inf.preconditioned_queries(model, task, est, queries, rank=rank, batch_size=bs)
        query_side[k] = fc.get_total_flops() / f_epoch
    best = {k: min(v) for k, v in times.items() if v}
    epochs = ", ".join(f"{t:.2f}" for t in times["epoch"])
    print(f"\nepoch: fastest {best['epoch']:.2f} s (all: {epochs})")
    print(
        f"flop floor of the training side: {floor:.2f}x an epoch (Q·N·P dots "
        f"{f_dots / f_epoch:.2f}x); query side: {query_side['full']:.2f}x at full rank, "
        f"{query_side['rank32']:.2f}x at rank 32"
    )
    head = f"{'stage':<22}{'fastest s':>10}{'x epoch':>9}{'x floor':>9}{'x floor+q':>11}"
    print(head + f"{'median x':>10}")
    for k, label in (("full", "scores, full rank"), ("rank32", "scores, rank 32")):
        if k not in ranks:
            continue
        ratio = best[k] / best["epoch"]
        whole = ratio / (floor + query_side[k])
        med = statistics.median(times[k]) / statistics.median(times["epoch"])
        print(
            f"{label:<22}{best[k]:>10.2f}{ratio:>8.2f}x{ratio / floor:>8.2f}x{whole:>10.2f}x"
            f"{med:>9.2f}x"
        )
    print("split of each score time (fastest query side; training side = scores - query side):")
    for k, label in (("full", "full rank"), ("rank32", "rank 32")):
        if k not in ranks:
            continue
        q = min(q_times[k]) / best["epoch"]
        t = best[k] / best["epoch"] - q
        print(
            f"  {label:<9} query side {q:.2f}x epoch ({q / query_side[k]:.2f}x its flops); "
            f"training side {t:.2f}x epoch = {t / floor:.2f}x the training-side floor"
        )
    print("against the small-model path on the same model (whole layers buffered, dense queries):")
    for k, label in (("full", "full rank"), ("rank32", "rank 32")):
        if k not in ranks:
            continue
        b = min(buffered[k])
        med = statistics.median(times[k]) / statistics.median(buffered[k])
        print(
            f"  {label:<9} {b:.2f} s = {b / best['epoch']:.2f}x epoch; this path takes "
            f"{best[k] / b:.2f}x its time (medians: {med:.2f}x)"
        )
    print(
        f"peak RSS: {rss_fit:.0f} MiB after the fit, {rss_full:.0f} MiB after full-rank scores "
        f"(skipped: {args.rank_only}), {rss_low:.0f} MiB after rank-32 scores, "
        f"{rss_mib():.0f} MiB at the end, with the small-model path (the [Q, P] full-rank query "
        f"matrix alone is {args.queries * p_tracked * 4 / 2**20:.0f} MiB)"
    )
    if not args.rank_only:
        r = torch.corrcoef(torch.stack([full.flatten(), low.flatten()]))[0, 1].item()
        print(f"rank-32 vs full-rank scores: Pearson {r:.4f}; target: scores <= 1.5x the floor")
    print("x floor: the training side's floor only; x floor+q: with the query side's flops too")


if __name__ == "__main__":
    main()
