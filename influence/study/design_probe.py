"""Train one size of a preset's suite with one recipe value changed, and measure what it learned
(notebook 00's capability measures). The design log's probes (`design_log.py`) are runs of this:

    python -m influence.study.design_probe --size xl --lr 1.8e-3 --train-seed 0

The model is not cached and never replaces a suite model: a probe asks whether a recipe change
is worth a rebuild of the suite, it does not make one.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from . import capability, suite
from .tokenizer import encode_text


def probe(
    size: str,
    *,
    lr: float | None = None,
    epochs: int | None = None,
    preset: str = "default",
    seed: int = 0,
    train_seed: int = 0,
    threads: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """Train size `size` of `preset`'s suite on the corpus of `seed` with training seed
    `train_seed`, its peak learning rate set to `lr` and the epochs to `epochs` (None: the
    preset's), on `threads` CPU threads; `overrides` replace suite parameters as in
    `suite.load_suite`. Returns the recipe values used, the capability
    measures (`capability.summarise`), the mean training loss per epoch, the held-out loss
    curve and the training CPU seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # training and evaluation alike
    try:
        return _probe(size, lr, epochs, preset, seed, train_seed, threads, overrides)
    finally:
        torch.set_num_threads(before)


def _probe(size, lr, epochs, preset, seed, train_seed, threads, overrides) -> dict[str, Any]:
    if epochs is not None and epochs < 1:  # before the corpus is built: bad input fails at once
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    params, corpus, tok = suite.prepare(preset, seed, None, overrides)
    sizes = {s["name"]: s for s in params["sizes"]}
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; the {preset} suite has {list(sizes)}")
    spec = {**sizes[size], **({"lr": lr} if lr is not None else {})}
    train = {**params["train"], "threads": threads}
    if epochs is not None:
        train["epochs"] = epochs
    seqs = [encode_text(tok, t) for t in corpus.train["text"]]
    held = [encode_text(tok, t) for t in corpus.heldout["text"]]
    model, log = suite.train_model(
        spec,
        train,
        tok,
        seqs,
        params["context"],
        train_seed,
        progress=False,
        heldout=held,
        tie_embeddings=params["tie_embeddings"],
    )
    measures = capability.summarise(capability.outcomes(model, tok, corpus))
    loss, epoch = np.asarray(log["loss"]), np.asarray(log["epoch"])
    per_epoch = [float(loss[(epoch > k) & (epoch <= k + 1)].mean()) for k in range(train["epochs"])]
    return {
        "preset": preset,
        "size": size,
        "lr": spec.get("lr", train["lr"]),
        "epochs": train["epochs"],
        "seed": seed,
        "train_seed": train_seed,
        **{k: round(v, 4) for k, v in measures.items()},
        "train_loss_per_epoch": [round(v, 3) for v in per_epoch],
        "heldout_curve": [round(v, 3) for v in log["heldout"]["loss"]],
        "train_cpu_seconds": round(log["train_cpu_seconds"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", required=True, help="a size name of the preset's suite")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    row = probe(
        args.size,
        lr=args.lr,
        epochs=args.epochs,
        preset=args.preset,
        seed=args.seed,
        train_seed=args.train_seed,
        threads=args.threads,
    )
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
