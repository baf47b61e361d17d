"""Benchmark: notebook 02's x_min scan in closed form (`tails.scan_xmin`) against powerlaw's.

Setup: per-query data shaped like the default preset's per-copy influences (N = 16,039 training
sequences, about half positive: a lognormal body and a power-law tail of exponent α), the
default search range (the largest 10% of N, at least 20 points kept in the tail). For each α it
times `powerlaw.Fit(pos, xmin=(lo, hi))` with powerlaw's default α range (0, 3), the same with
the study's range (`tails.FIT_RANGES`: α > 1, unbounded), and `tails.scan_xmin`; it checks that
the last two pick the same x_min and prints each time and the speed-up. Run:
`python bench/bench_tail_fits.py [--repeats N]`.
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial

import numpy as np
import powerlaw

from influence.study import tails


def data(alpha: float, seed: int, n: int = 16_039) -> np.ndarray:
    """Half of n values: a lognormal body and 1,000 points of a power law above 1e-2."""
    rng = np.random.default_rng(seed)
    body = rng.lognormal(np.log(1e-4), 1.0, n // 2 - 1000)  # rarely above 1e-2 (4.6 sd)
    tail = 1e-2 * (1 - rng.random(1000)) ** (-1 / (alpha - 1))
    return np.sort(np.concatenate([body, tail]))


def powerlaw_scan(pos, lo, hi, ranges):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(pos, xmin=(lo, hi), parameter_ranges=ranges, verbose=0)
        return fit.power_law.xmin, fit.power_law.alpha


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()
    n = 16_039
    print(f"N = {n:,}, search range: the largest 10% of N, best of {args.repeats} runs")
    print(f"{'alpha':>5} {'powerlaw (0,3)':>15} {'powerlaw α>1':>13} {'closed form':>12} "
          f"{'speed-up':>9}  x_min same  fitted α (default range → α>1)")  # fmt: skip
    for alpha in (2.5, 3.5, 4.5):
        pos = data(alpha, seed=int(alpha * 10))
        lo, hi = tails._candidates(pos, n, 0.1, 20)
        t_def, (_, a_def) = timed(partial(powerlaw_scan, pos, lo, hi, None), args.repeats)
        t_pl, (x_pl, a_pl) = timed(
            partial(powerlaw_scan, pos, lo, hi, tails.FIT_RANGES), args.repeats
        )
        t_cf, (x_cf, a_cf, _) = timed(partial(tails.scan_xmin, pos, lo, hi), args.repeats)
        print(
            f"{alpha:>5} {t_def:>14.3f}s {t_pl:>12.3f}s {t_cf:>11.4f}s {t_pl / t_cf:>8.0f}×  "
            f"{str(x_pl == x_cf):>10}  {a_def:.3f} → {a_pl:.3f} (closed form {a_cf:.3f})"
        )


if __name__ == "__main__":
    main()
