"""Benchmark: time and peak memory of EK-FAC fit and scores against model size, with the
memory plan's prediction next to each measured peak.

Setup (issue 15): GPT-2-shaped models built from `GPT2Config` (Hugging Face `Conv1D` layers,
every one tracked) at about 1M, 6M, 25M and 124M parameters (124M is GPT-2 small, vocab
50257; the smaller ones use smaller vocabularies, see SIZES), random tokens: 256 training
sequences and 32 queries of 128 tokens (queries: the second half is the completion). Per size,
in its own process so that peaks are per size: one plain forward+backward pass over the
training data (the epoch), the EK-FAC fit, and the scores of all queries at rank 32. Each
stage's time is printed as a ratio to the epoch's; its peak RSS (the kernel's high-water mark,
reset per stage) is printed as the increase over the RSS before the model was built, next to
the plan's bytes for that stage (`influence.memory_plan`); the stored factors' row is the RSS
right after the fit, not a peak. The batch size is 32, or the plan's
largest batch size under `--budget-gib` when that is smaller.
glibc's mmap threshold is fixed at 1 MiB (see `main`) so that freed memory leaves the RSS.
Run: `PYTHONPATH=. python bench/bench_scaling.py [--size 1M|6M|25M|124M|all] [--train 256]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

# name: (n_embd, n_layer, n_head, vocab)
SIZES = {
    "1M": (128, 4, 4, 2048),
    "6M": (256, 6, 4, 4096),
    "25M": (512, 6, 8, 12288),
    "124M": (768, 12, 12, 50257),
}
MIB = 2**20


def rss(key: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_size(args) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import influence as inf
    from influence.gradients import iter_batches
    from influence.memory import StagePeaks

    torch.manual_seed(0)
    n_embd, n_layer, n_head, vocab = SIZES[args.size]
    seq, n, q = args.seq, args.train, args.queries
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n + q, seq), generator=g)
    train = {"input_ids": ids[:n], "labels": ids[:n].clone()}
    q_labels = ids[n:].clone()
    q_labels[:, : seq // 2] = -100
    queries = {"input_ids": ids[n:], "labels": q_labels}
    # Thread pools up, and the modules the plan's probe imports loaded, before the baseline.
    inf.memory_plan(
        torch.nn.Linear(4, 2),
        inf.RegressionTask(),
        num_train=1,
        num_queries=1,
        example=(torch.zeros(1, 4), torch.zeros(1, 2)),
    )
    base = rss()
    cfg = GPT2Config(
        n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=vocab, n_positions=seq
    )
    model = GPT2LMHeadModel(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    task = inf.LanguageModelingTask()
    tracked = sum(i.numel for i in inf.layers.layer_infos(task.tracked_modules(model)).values())

    t0 = time.perf_counter()
    plan = inf.memory_plan(
        model,
        task,
        num_train=n,
        num_queries=q,
        seq_len=seq,
        rank=args.rank,
        batch_size=args.batch_size,
        budget=int(args.budget_gib * 2**30),
    )
    t_plan = time.perf_counter() - t0
    bs = min(args.batch_size, plan.max_batch_size)
    if bs != args.batch_size:
        plan = inf.memory_plan(
            model, task, num_train=n, num_queries=q, seq_len=seq, rank=args.rank, batch_size=bs
        )

    def epoch() -> None:
        model.zero_grad(set_to_none=True)
        for _, batch in iter_batches(train, bs):
            task.loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    reset_peak()
    t0 = time.perf_counter()
    epoch()
    t_epoch = time.perf_counter() - t0
    peak_epoch = rss("VmHWM") - base

    with StagePeaks() as peaks:
        t0 = time.perf_counter()
        est = inf.EKFAC().fit(model, task, train, batch_size=bs, progress=False)
        t_fit = time.perf_counter() - t0
        stored = rss() - base  # the factors' own size: RSS once the fit has returned
        t0 = time.perf_counter()
        scores = inf.pairwise_scores(
            model, task, est, queries, train, rank=args.rank, batch_size=bs, progress=False
        )
        t_scores = time.perf_counter() - t0
    assert scores.shape == (q, n) and bool(torch.isfinite(scores).all())

    print(
        f"== {args.size}: GPT-2 n_embd {n_embd}, {n_layer} layers, {n_head} heads, vocab {vocab}: "
        f"{params / 1e6:.1f}M parameters, {tracked / 1e6:.1f}M tracked; {n} train x {seq} "
        f"tokens, {q} queries, rank {args.rank}, batch {bs}, {torch.get_num_threads()} threads"
    )
    print(f"baseline RSS before the model: {base / MIB:.0f} MiB; plan computed in {t_plan:.1f} s")
    print(
        f"{'stage':<26}{'time s':>9}{'x epoch':>9}{'peak MiB':>10}{'plan MiB':>10}{'plan/meas':>10}"
    )
    print(f"{'epoch (fwd+bwd)':<26}{t_epoch:>9.1f}{1:>9.2f}{peak_epoch / MIB:>10.0f}")
    timed = {"fit: eigenvalues": t_fit, "scores": t_scores}
    for stage in plan.stages:
        if stage.name not in peaks.peaks:
            continue
        meas = stored if stage.name == "stored factors" else peaks.peaks[stage.name] - base
        t = timed.get(stage.name)
        ts = f"{t:>9.1f}{t / t_epoch:>9.2f}" if t is not None else " " * 18
        print(
            f"{stage.name:<26}{ts}{meas / MIB:>10.0f}{stage.bytes / MIB:>10.0f}"
            f"{stage.bytes / meas:>10.2f}"
        )
    print(f"(fit total {t_fit:.1f} s on the eigenvalues row, scores total on the scores row)")
    fit_peak = max(v for k, v in peaks.peaks.items() if k.startswith("fit")) - base
    score_peak = max(peaks.peaks.get("queries", 0), peaks.peaks.get("scores", 0)) - base
    print(
        f"SUMMARY {args.size} params={params / 1e6:.1f}M batch={bs} epoch_s={t_epoch:.1f} "
        f"fit_s={t_fit:.1f} fit_x={t_fit / t_epoch:.2f} scores_s={t_scores:.1f} "
        f"scores_x={t_scores / t_epoch:.2f} fit_peak_mib={fit_peak / MIB:.0f} "
        f"scores_peak_mib={score_peak / MIB:.0f} plan_peak_mib={plan.peak / MIB:.0f} "
        f"process_peak_mib={max(peaks.peaks.values()) / MIB:.0f}"
    )
    print(plan.table())
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="all", choices=[*SIZES, "all"])
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--budget-gib", type=float, default=7.0)
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # A fixed threshold: glibc otherwise raises it as large blocks are freed and keeps
        # later ones (up to 32 MiB each) in its heap after they are freed, so the resident
        # memory, and its peak per stage, would include memory the program no longer holds.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    if args.size != "all":
        run_size(args)
        return
    for size in SIZES:  # a fresh process per size: its peak RSS is that size's own
        cmd = [sys.executable, __file__, "--size", size]
        for k in ("train", "queries", "seq", "rank", "batch_size", "budget_gib"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
