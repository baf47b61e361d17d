"""How much the study's results depend on the CPU thread count.

For every model of the suite, the scores stage (EK-FAC fit and scores, `study_scores`) is
built twice from the same models, once with 1 intra-op thread and once with `--threads`,
each into its own temporary cache; then it prints the largest relative difference of every
factor tensor and of the scores, and notebook 02's headline numbers and findings computed from
each (the tail fits and the memorisation contrast at the preset's settings).

    python bench/threads_determinism.py --preset smoke --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file


def build(suite, preset: str, threads: int, root: Path):
    from influence.study.influence_scores import study_scores

    os.environ["INFLUENCE_ARTIFACTS"] = str(root)
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    st = study_scores(suite, preset, progress=False)
    print(f"threads {threads}: stage built in {time.perf_counter() - t0:.0f} s wall, "
          f"{time.process_time() - c0:.0f} CPU-s")  # fmt: skip
    return st


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = a.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else float((a != b).any())


def headline_02(st, preset: str, seed: int = 0) -> tuple[pd.Series, list]:
    """Notebook 02's summary at the largest model and its findings, as the notebook computes
    them."""
    from influence.study import tails
    from influence.study.presets import resolve

    cfg = resolve(tails.SECTION, preset)
    order, largest, n = st.models, st.models[-1], st.n_train
    sets = [qs for qs in tails.SETS if qs in st.query_sets]
    per_copy = {(m, qs): st.per_copy(m, qs).double().numpy() for m in order for qs in sets}
    reps = tails.representative_queries(st.selected, cfg["bootstrap_queries"])
    boot = {(m, qs, q): cfg["bootstrap"] for m in order for qs, q in reps}
    table = tails.query_table(per_copy, cfg["tail_share"], cfg["min_tail"], boot, seed=seed)
    summary = tails.summarise(table, order).loc[largest]
    k = int(min(len(r) for r in st.queries("quotes").related_ids))
    frames = {qs: pd.concat([st.top_k(m, qs, k=k) for m in order]) for qs in ("quotes", "facts")}
    related = {qs: [len(r) for r in st.queries(qs).related_ids] for qs in frames}
    memo = tails.memorisation_shares(frames, k, related, n)
    return summary, tails.findings(table, memo, n, largest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from influence.study.suite import load_suite

    torch.set_num_threads(1)
    suite = load_suite(args.preset, args.seed, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        one = build(suite, args.preset, 1, Path(tmp) / "t1")
        many = build(suite, args.preset, args.threads, Path(tmp) / f"t{args.threads}")
        print(f"\nlargest relative difference, 1 vs {args.threads} threads (|a - b|max / |a|max)")
        rows = []
        for m in one.models:
            fa = load_file(one.paths[m] / "ekfac.safetensors")
            fb = load_file(many.paths[m] / "ekfac.safetensors")
            factors = max(max_rel(fa[key], fb[key]) for key in fa)
            scores = max(max_rel(one.scores(m, qs), many.scores(m, qs)) for qs in one.query_sets)
            rows.append({"model": m, "factors": factors, "scores": scores})
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.2g}"))
        torch.set_num_threads(1)
        s1, f1 = headline_02(one, args.preset, args.seed)
        s2, f2 = headline_02(many, args.preset, args.seed)
    print(f"\nnotebook 02 at {one.models[-1]}, 1 vs {args.threads} threads")
    both = pd.DataFrame({"1 thread": s1, f"{args.threads} threads": s2})
    a, b = both.iloc[:, 0].astype(float), both.iloc[:, 1].astype(float)
    both["relative change"] = ((a - b).abs() / a.abs()).where(a != b, 0.0)
    print(both.to_string(float_format=lambda x: f"{x:.6g}"))
    print("\nfindings (estimate, p, verdict)")
    for a, b in zip(f1, f2, strict=True):
        same = (a.estimate, a.p, a.verdict) == (b.estimate, b.p, b.verdict) or (
            a.verdict == b.verdict == "not comparable"
        )
        print(f"  {a.name}: {a.estimate:.6g} p {a.p} {a.verdict} | {b.estimate:.6g} p {b.p} "
              f"{b.verdict} | {'same' if same else 'MOVED'}")  # fmt: skip


if __name__ == "__main__":
    main()
