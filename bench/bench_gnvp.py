"""Benchmark: exact Gauss–Newton–vector products on a float64 Llama, per right-hand side.

Setup (issue 24): the study's default `l` model shape (Llama, hidden 192, 4 layers,
intermediate 512, vocab 1024; MLP layers tracked), in float64 under `exact_float64`, one batch
of 32 sequences of 40 tokens, 8 right-hand sides. It times one GNVP of the 8 right-hand sides
with all of them in one vmap and with one at a time (the library's choice for outputs as large
as a language model's logits, `influence.gnvp._VMAP_BYTES`), checks that both give the same
products, and prints each time as a multiple of one plain forward + backward pass of the batch
measured in the same run (process CPU seconds: the machine is shared).
Run: `python bench/bench_gnvp.py [--hidden 192 --layers 4 --intermediate 512]`.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import influence as inf
import influence.gnvp as gnvp
from influence.gnvp import GaussNewton, exact_float64


def cpu_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    start = time.process_time()
    for _ in range(repeats):
        out = fn()
    return (time.process_time() - start) / repeats, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--rhs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32),
        num_key_value_heads=max(1, args.hidden // 32),
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(2, 1024, (32, 40), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    task = inf.LanguageModelingTask(modules="mlp")
    op = GaussNewton(
        model,
        task,
        [dict(zip(batch, v, strict=True)) for v in zip(*batch.values(), strict=True)],
        batch_size=32,
    )
    v = torch.randn(
        args.rhs, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )

    def forward_backward():
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()

    with exact_float64():
        base, _ = cpu_time(forward_backward, args.repeats)
    saved = gnvp._VMAP_BYTES
    try:
        gnvp._VMAP_BYTES = 2**62  # every right-hand side in one vmap
        together, a = cpu_time(lambda: op.gnvp(v), args.repeats)
        gnvp._VMAP_BYTES = 1  # one right-hand side at a time
        alone, b = cpu_time(lambda: op.gnvp(v), args.repeats)
    finally:
        gnvp._VMAP_BYTES = saved
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    print(f"tracked parameters {op.dim:,}; {args.rhs} right-hand sides; 32 × 40 tokens")
    print(f"forward + backward: {base:.3f} CPU s")
    print(f"GNVP, all in one vmap: {together:.3f} CPU s = {together / base:.1f}x")
    print(f"GNVP, one at a time:  {alone:.3f} CPU s = {alone / base:.1f}x")
    print(f"per right-hand side: {alone / args.rhs / base:.2f}x a forward + backward pass")


if __name__ == "__main__":
    main()
