"""Benchmark: what length ordering and trimming save on short sequences padded to a fixed width.

Setup (issue 10): the study's default `m` model shape (Llama, hidden 128, 3 layers, intermediate
352, vocab 1024; MLP layers tracked), 2,400 training sequences whose real lengths average about
19 tokens, every row right-padded to 72 like `train_dataset`, and 64 queries padded the same way.
It times the EK-FAC fit and the pairwise scores with batches ordered by real length and trimmed
to it (the library's default) and with batches in the data's order at full width
(`influence.gradients.ORDER_BY_LENGTH = False`), checks that both give the same scores, and
prints the speed-up. Run: `python bench/bench_padding.py [--quick]`.
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

import influence as inf
import influence.gradients as gradients


def build(n_train: int, n_query: int, width: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=96,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    n = n_train + n_query
    # Log-normal real lengths with a mean near 19 tokens and a tail to the full width.
    lengths = (torch.randn(n, generator=g) * 0.4 + 2.85).exp().round().clamp(6, width).long()
    ids = torch.randint(2, 1024, (n, width), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    q_labels = labels[n_train:].clone()
    q_labels[:, :4] = -100  # a short prompt
    train = Dataset.from_dict(
        {
            "input_ids": ids[:n_train].numpy(),
            "attention_mask": mask[:n_train].numpy(),
            "labels": labels[:n_train].numpy(),
        }
    ).with_format("torch")
    queries = {"input_ids": ids[n_train:], "attention_mask": mask[n_train:], "labels": q_labels}
    return model, train, queries, lengths[:n_train].double().mean().item()


def run(model, task, train, queries, batch_size: int):
    start = time.perf_counter()
    est = inf.EKFAC().fit(model, task, train, batch_size=batch_size, progress=False)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    s = inf.pairwise_scores(model, task, est, queries, train, batch_size=batch_size, progress=False)
    return fit, time.perf_counter() - start, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2400)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--width", type=int, default=72)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="400 sequences, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.train, args.repeats = 400, 1
    model, train, queries, mean_len = build(args.train, args.queries, args.width)
    task = inf.LanguageModelingTask(modules="mlp")
    print(
        f"N = {args.train} sequences, mean real length {mean_len:.1f} tokens, padded to "
        f"{args.width}; Q = {args.queries}; batch {args.batch_size}; "
        f"torch threads {torch.get_num_threads()}"
    )
    times = {True: [], False: []}
    results = {}
    for _ in range(args.repeats):
        for ordered in (True, False):  # alternate, so that drift on a shared machine is shared
            gradients.ORDER_BY_LENGTH = ordered
            fit, score, s = run(model, task, train, queries, args.batch_size)
            times[ordered].append((fit, score))
            results[ordered] = s
    gradients.ORDER_BY_LENGTH = True
    rel = ((results[True] - results[False]).norm() / results[False].norm()).item()
    best = {k: (min(t[0] for t in v), min(t[1] for t in v)) for k, v in times.items()}
    print(f"{'':<28}{'fit s':>8}{'scores s':>10}{'total s':>9}")
    for k, label in ((False, "data order, full width"), (True, "length order, trimmed")):
        f, s = best[k]
        print(f"{label:<28}{f:>8.2f}{s:>10.2f}{f + s:>9.2f}")
    speedup = sum(best[False]) / sum(best[True])
    print(
        f"speed-up: {speedup:.2f}x (fit {best[False][0] / best[True][0]:.2f}x, scores "
        f"{best[False][1] / best[True][1]:.2f}x); padding share of the rows "
        f"{1 - mean_len / args.width:.0%}; scores agree to {rel:.1e} relative (float32)"
    )
    print("fastest of the repeats; the machine is shared, so times are under contention")


if __name__ == "__main__":
    main()
