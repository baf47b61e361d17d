"""Sparsity and heavy tails of influence (paper §5.2.1, Figs. 8–9, Table 1): the research
question of notebooks/02_sparsity_and_tails, with its preset block (`PRESETS`, `RANGES`), its
findings (`findings`) and its figures (`plot_*`).

Per query, over its per-copy influences on all N training sequences:
- `top_share`: share of the total positive influence held by the top `frac` of the N
  sequences; `n_for_half`: how many sequences hold half of it.
- `fit_tail`: Clauset–Shalizi–Newman (2009): x_min chosen by the Kolmogorov–Smirnov distance
  among the largest `tail_share`·N positive values, keeping at least `min_tail` points in the
  tail (`scan_xmin`: powerlaw's scan in closed form), then the `powerlaw` package above that
  x_min: maximum-likelihood exponent α (α > 1, unbounded above), log-likelihood ratios against
  the lognormal and the exponential (Vuong's test), and, optionally, the bootstrap
  goodness-of-fit p-value (`ks_pvalue`): the share of synthetic data sets, drawn from the fitted
  model (power law above x_min, the data below it), whose refitted KS distance is at least the
  observed one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import stats, style
from .findings import Finding, judge, not_comparable
from .ranges import count, share

SECTION = "02_sparsity_and_tails"
# tail_share: the top share of each query's positive per-copy scores among which powerlaw's KS
# search picks x_min; min_tail: points always kept in the tail; bootstrap: synthetic data sets
# per goodness-of-fit p-value (Clauset et al. 2009), for bootstrap_queries representative
# queries; top_k: top sequences per query of the memorisation contrast's examples and of the
# hub check; ccdf_queries: queries drawn in the CCDF figure; n_boot: bootstrap resamples of
# the intervals over queries.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "tail_share": 0.2,
        "min_tail": 10,
        "bootstrap": 5,
        "bootstrap_queries": 8,
        "top_k": 5,
        "ccdf_queries": 2,
        "n_boot": 200,
    },
    "default": {
        "tail_share": 0.1,
        "min_tail": 20,
        "bootstrap": 50,
        "bootstrap_queries": 8,
        "top_k": 10,
        "ccdf_queries": 3,
        "n_boot": 1000,
    },
    "large": {
        "tail_share": 0.1,
        "min_tail": 20,
        "bootstrap": 100,
        "bootstrap_queries": 16,
        "top_k": 10,
        "ccdf_queries": 3,
        "n_boot": 1000,
    },
}
RANGES = {
    "tail_share": share("the top share of the corpus searched for x_min"),
    "min_tail": count(1, "points always kept in the fitted tail"),
    "bootstrap": count(1, "synthetic data sets per goodness-of-fit p-value"),
    "bootstrap_queries": count(0, "queries given a goodness-of-fit p-value"),
    "top_k": count(1, "top sequences per query"),
    "ccdf_queries": count(1, "queries drawn in the CCDF figure"),
    "n_boot": count(1, "bootstrap resamples"),
}
# The query sets whose tails are studied, in the order of the figures.
SETS = ("facts", "paraphrase", "math", "code", "quotes", "role_play")
# Thresholds of the findings (stated with them on the page).
MOST = 0.5  # "most queries": a share tested against one half
MOST_MARGIN = 0.10  # ... and at least 10 points above it
ALPHA_RANGE = (2.0, 4.3)  # the paper's exponents
TOP1_RANGE = (0.12, 0.52)  # the paper's share of the top 1%
SPREAD_MIN = 10  # "many sequences": at least this many hold half of a query's influence
QUOTE_MARGIN = 0.8  # "every top sequence contains the quote": share − base rate ≥ 0.8
PAPER_N = 5_000_000  # the paper's pretraining sequences searched per query (about)

TAIL_RESULT_KEYS = (
    "n",
    "n_positive",
    "n_tail",
    "tail_frac",
    "xmin",
    "alpha",
    "ks_D",
    "R_lognormal",
    "p_lognormal",
    "R_exponential",
    "p_exponential",
    "powerlaw_preferred",
    "powerlaw_preferred_significant",
    "powerlaw_not_worse",
)


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError("no values: the influence vector is empty")
    return a


def top_share(x, frac: float = 0.01) -> float:
    """Share of the total positive influence held by the top ⌈frac·N⌉ of the N values
    (negative values count as 0: only helpful sequences are studied, as in the paper).
    NaN if no value is positive."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    a = np.clip(_as_array(x), 0, None)
    total = a.sum()
    if total <= 0:
        return float("nan")
    k = max(1, math.ceil(frac * a.size))
    return float(np.sort(a)[::-1][:k].sum() / total)


def n_for_half(x) -> int:
    """Smallest number of sequences whose positive influences add up to at least half of the
    total positive influence (0 if none is positive)."""
    a = np.sort(np.clip(_as_array(x), 0, None))[::-1]
    total = a.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(a), 0.5 * total) + 1)


def _candidates(pos: np.ndarray, n: int, tail_share: float, min_tail: int):
    """(x_min search range) over the sorted positive values: the largest ⌈tail_share·n⌉ of
    them, always leaving at least `min_tail` points above the largest candidate."""
    hi_count = min(pos.size, max(math.ceil(tail_share * n), min_tail + 2))
    if pos.size < min_tail + 2:
        return None
    return pos[-hi_count], pos[-min_tail]


# powerlaw 2.0 bounds the power law's α to (0, 3) by default: an MLE above 3 is refitted
# numerically inside that box and comes back as 3.0, and the x_min scan then compares
# candidates at the wrong α (a pure α = 3.5 tail was fitted as 3.0). CSN's estimator has no
# upper bound; α > 1 keeps the continuous power law normalisable.
FIT_RANGES = {"alpha": [1.0, None]}
# candidates × distinct values evaluated at once by `scan_xmin`: 32 MB per temporary array
_SCAN_BLOCK = 1 << 22


def scan_xmin(pos: np.ndarray, lo: float, hi: float) -> tuple[float, float, float] | None:
    """CSN's x_min scan in closed form: (x_min, α, KS distance) of the candidate with the
    smallest KS distance, or None with fewer than two candidates.

    The same scan as `powerlaw.Fit(pos, xmin=(lo, hi), parameter_ranges=FIT_RANGES)` (a test
    compares them): candidates are the distinct values in [lo, hi) but the largest; α is the
    continuous maximum-likelihood estimate 1 + m / Σ log(x / x_min) over the m values ≥ x_min,
    which is exact, where powerlaw refits every candidate with α > 3 by Nelder–Mead (over 90% of
    a fit's time on our scores); the KS distance compares the fitted CDF with the empirical
    one of the tail at each distinct value, as powerlaw does. `pos` must be sorted, positive."""
    n = pos.size
    values, first = np.unique(pos, return_index=True)  # `first`: values strictly below
    in_range = (values >= lo) & (values < hi)
    cands, k = values[in_range][:-1], first[in_range][:-1]
    if cands.size < 2:
        return None
    suffix_log = np.cumsum(np.log(pos)[::-1])[::-1]  # Σ log x over pos[i:]
    m = n - k
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1.0 + m / (suffix_log[k] - m * np.log(cands))
    cols = values >= cands[0]
    log_grid, below = np.log(values[cols]), first[cols]
    log_c = np.log(cands)
    dist = np.full(cands.size, np.inf)
    step = max(1, _SCAN_BLOCK // log_grid.size)
    for s in range(0, cands.size, step):
        sl = slice(s, s + step)
        # |fitted − empirical CDF of the tail| = |(x / x_min)^(1−α) − (n − i)/(n − k)| at each
        # distinct x, i the values strictly below x, k those below the candidate
        with np.errstate(over="ignore", invalid="ignore"):
            ccdf_fit = np.exp((1.0 - alpha[sl, None]) * (log_grid - log_c[sl, None]))
            gap = np.abs(ccdf_fit - (n - below) / (n - k[sl, None]))
        # only the distinct values ≥ each candidate count: those below sit left of its column
        gap[np.arange(log_grid.size) < (np.arange(s, s + gap.shape[0]))[:, None]] = -np.inf
        dist[sl] = gap.max(axis=1)
    # outside powerlaw's valid range, or overflowed
    dist[~(alpha > FIT_RANGES["alpha"][0]) | ~np.isfinite(dist)] = np.inf
    if not np.isfinite(dist).any():
        return None
    best = int(np.argmin(dist))
    return float(cands[best]), float(alpha[best]), float(dist[best])


def _powerlaw_fit(pos: np.ndarray, n: int, tail_share: float, min_tail: int):
    """powerlaw's fit above the x_min that `scan_xmin` picks (None if it cannot fit)."""
    import powerlaw

    rng_ = _candidates(pos, n, tail_share, min_tail)
    if rng_ is None:
        return None
    scan = scan_xmin(pos, *rng_)
    if scan is None:
        return None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            fit = powerlaw.Fit(pos, xmin=scan[0], parameter_ranges=FIT_RANGES, verbose=0)
            _ = fit.power_law.alpha  # force the fit inside the silenced block
        except ValueError:  # powerlaw: "No data points in defined range" on degenerate data
            return None
    if not np.isfinite(fit.power_law.alpha):
        return None
    return fit


def sample_powerlaw_tail_model(
    pos: np.ndarray, xmin: float, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """One synthetic data set for the CSN bootstrap: each point comes from the fitted power law
    above x_min with probability n_tail/n, otherwise from the observed values below x_min."""
    below = pos[pos < xmin]
    n = pos.size
    n_tail = int((pos >= xmin).sum())
    k = int(rng.binomial(n, n_tail / n)) if below.size else n
    u = rng.random(k)
    tail = xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))
    body = rng.choice(below, size=n - k, replace=True) if below.size else np.empty(0)
    return np.sort(np.concatenate([body, tail]))


def fit_tail(
    x,
    tail_share: float = 0.1,
    min_tail: int = 20,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """Power-law fit of the upper tail of one query's influences (see the module docstring).

    Returns the keys of `TAIL_RESULT_KEYS` (NaN/None where the tail is too short to fit), plus
    `ks_pvalue` (NaN unless `n_bootstrap` > 0) and `n_bootstrap` (synthetic sets fitted)."""
    a = _as_array(x)
    pos = np.sort(a[a > 0])
    out: dict = {k: float("nan") for k in TAIL_RESULT_KEYS}
    out.update(n=a.size, n_positive=int(pos.size), ks_pvalue=float("nan"), n_bootstrap=0)
    out["powerlaw_preferred"] = None
    out["powerlaw_preferred_significant"] = None
    out["powerlaw_not_worse"] = None
    fit = _powerlaw_fit(pos, a.size, tail_share, min_tail)
    if fit is None:
        return out
    pl = fit.power_law
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        r_ln, p_ln = fit.distribution_compare("power_law", "lognormal")
        r_ex, p_ex = fit.distribution_compare("power_law", "exponential")
    n_tail = int((pos >= pl.xmin).sum())
    out.update(
        n_tail=n_tail,
        tail_frac=n_tail / a.size,
        xmin=float(pl.xmin),
        alpha=float(pl.alpha),
        ks_D=float(pl.D),
        R_lognormal=float(r_ln),
        p_lognormal=float(p_ln),
        R_exponential=float(r_ex),
        p_exponential=float(p_ex),
        powerlaw_preferred=bool(r_ln > 0 and r_ex > 0),
        powerlaw_preferred_significant=bool(r_ln > 0 and r_ex > 0 and p_ln < 0.1 and p_ex < 0.1),
        # no alternative is significantly better (Vuong p < 0.1 with R < 0)
        powerlaw_not_worse=bool(not (r_ln < 0 and p_ln < 0.1) and not (r_ex < 0 and p_ex < 0.1)),
    )
    if n_bootstrap > 0:
        out["ks_pvalue"], out["n_bootstrap"] = ks_pvalue(
            pos, a.size, out, tail_share, min_tail, n_bootstrap, seed
        )
    return out


def ks_pvalue(
    pos: np.ndarray,
    n: int,
    fitted: dict,
    tail_share: float,
    min_tail: int,
    n_bootstrap: int,
    seed: int = 0,
) -> tuple[float, int]:
    """CSN bootstrap goodness-of-fit p-value: share of synthetic data sets (from the fitted
    model, refitted the same way, x_min search included) whose KS distance ≥ the observed one.
    Returns (p, number of synthetic sets that could be fitted); with B sets p resolves 1/B."""
    rng = np.random.default_rng(seed)
    hits = 0
    done = 0
    for _ in range(n_bootstrap):
        syn = sample_powerlaw_tail_model(pos, fitted["xmin"], fitted["alpha"], rng)
        f = _powerlaw_fit(syn, n - pos.size + syn.size, tail_share, min_tail)
        if f is None:
            continue
        done += 1
        hits += f.power_law.D >= fitted["ks_D"]
    return (hits / done if done else float("nan")), done


def ccdf(x) -> tuple[np.ndarray, np.ndarray]:
    """Empirical complementary CDF of the positive values: (sorted values, P(X ≥ value))."""
    pos = np.sort(_as_array(x))
    pos = pos[pos > 0]
    return pos, 1.0 - np.arange(pos.size) / pos.size


def fitted_ccdf(fit: dict, grid: np.ndarray) -> np.ndarray:
    """The fitted power law's CCDF over all positive values, on `grid` ≥ x_min:
    (n_tail / n_positive)·(x / x_min)^(1−α)."""
    return fit["n_tail"] / fit["n_positive"] * (grid / fit["xmin"]) ** (1.0 - fit["alpha"])


def _query_row(item: tuple) -> dict:
    """One row of `query_table` (a top-level function, so a worker process can run it)."""
    m, qs, q, x, tail_share, min_tail, b, seed = item
    fit = fit_tail(x, tail_share, min_tail, n_bootstrap=b, seed=seed + q)
    return {
        "model": m,
        "query_set": qs,
        "query": q,
        "max_per_copy": float(x.max()),
        "top1_share": top_share(x, 0.01),
        "n_half": n_for_half(x),
        "positive_frac": float((x > 0).mean()),
        **fit,
    }


def query_table(
    per_copy: dict[tuple[str, str], np.ndarray],
    tail_share: float,
    min_tail: int,
    bootstrap: dict[tuple[str, str, int], int] | None = None,
    seed: int = 0,
    progress: bool = False,
    workers: int = 1,
) -> pd.DataFrame:
    """One row per (model, query set, query): sparsity statistics and the tail fit.

    `per_copy[(model, query_set)]` is a [Q, N] array of per-copy influences; `bootstrap`
    maps (model, query_set, query) to a number of bootstrap data sets for the KS p-value.
    `workers` > 1 fits the queries in that many processes: each fit has its own seed
    (`seed` + query), so the table is the same for any number of workers (a test)."""
    from tqdm import tqdm

    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    bootstrap = bootstrap or {}
    items = [
        (m, qs, q, np.asarray(arr[q], dtype=np.float64), tail_share, min_tail,
         bootstrap.get((m, qs, q), 0), seed)
        for (m, qs), arr in per_copy.items()
        for q in range(arr.shape[0])
    ]  # fmt: skip
    bar = tqdm(total=len(items), desc="tail fits", disable=not progress, mininterval=10)
    if workers == 1 or len(items) < 2:
        rows = []
        for item in items:
            rows.append(_query_row(item))
            bar.update(1)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # The bootstrapped fits cost most: hand them out first so no worker is left with
        # one at the end. "spawn": the parent holds torch's thread pools, which fork would copy.
        order = sorted(range(len(items)), key=lambda i: -items[i][6])
        rows = [None] * len(items)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_query_row, items[i]): i for i in order}
            for fut in as_completed(futures):
                rows[futures[fut]] = fut.result()
                bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame, order: Iterable[str]) -> pd.DataFrame:
    """Per model size: median α, share of queries where the power law is preferred (over both
    alternatives; and significantly, p < 0.1), median KS p, median top-1% share, median number
    of sequences holding half, largest per-copy influence (all sets, and without quotes)."""
    recs = []
    for m in order:
        t = table[table.model == m]
        fitted = t[t.alpha.notna()]
        boot = t[t.n_bootstrap > 0]
        recs.append(
            {
                "model": m,
                "queries": len(t),
                "fitted": len(fitted),
                "median_alpha": float(fitted.alpha.median()) if len(fitted) else float("nan"),
                "powerlaw_preferred_share": float(fitted.powerlaw_preferred.astype(float).mean())
                if len(fitted)
                else float("nan"),
                "powerlaw_preferred_significant_share": float(
                    fitted.powerlaw_preferred_significant.astype(float).mean()
                )
                if len(fitted)
                else float("nan"),
                "powerlaw_not_worse_share": float(fitted.powerlaw_not_worse.astype(float).mean())
                if len(fitted)
                else float("nan"),
                "median_ks_pvalue": float(boot.ks_pvalue.median()) if len(boot) else float("nan"),
                "ks_pvalue_queries": len(boot),
                "median_top1_share": float(t.top1_share.median()),
                "median_n_half": float(t.n_half.median()),
                "median_tail_frac": float(fitted.tail_frac.median())
                if len(fitted)
                else float("nan"),
                "max_per_copy": float(t.max_per_copy.max()),
                "max_per_copy_no_quotes": float(t[t.query_set != "quotes"].max_per_copy.max()),
            }
        )
    return pd.DataFrame(recs).set_index("model")


def representative_queries(selected: dict[str, Sequence[int]], n: int) -> list[tuple[str, int]]:
    """The queries given a bootstrap p-value: the first query of each set in `SETS` order,
    then the second of each, ... until `n` are chosen (the same ones at every size)."""
    reps: list[tuple[str, int]] = []
    depth = max((len(v) for v in selected.values()), default=0)
    for i in range(depth):
        for qs in SETS:
            if qs in selected and i < len(selected[qs]) and len(reps) < n:
                reps.append((qs, i))
    return reps


def memorisation_shares(
    frames: dict[str, pd.DataFrame], k: int, related_counts: dict[str, Sequence[int]], n_train: int
) -> pd.DataFrame:
    """Per model, query set and query: the share of the query's top-k sequences that are
    `related` (for a quote: contain the saying; for a fact: state the same fact) and its base
    rate, the share of the corpus that is related to it (`related_counts[set][query]` / N).
    `frames[set]` are `StudyScores.top_k` frames (any k' ≥ k)."""
    recs = []
    for qs, df in frames.items():
        top = df[df["rank"] <= k]
        per_q = top.groupby(["model", "query"], sort=False)["related"].mean()
        for (m, q), v in per_q.items():
            recs.append(
                {
                    "model": m,
                    "query_set": qs,
                    "query": int(q),
                    "share": float(v),
                    "base_rate": related_counts[qs][int(q)] / n_train,
                }
            )
    return pd.DataFrame(recs)


def memorisation_summary(
    memo: pd.DataFrame, order: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per query set and model: the mean related share with its bootstrap interval, the base
    rate and the enrichment (share / base rate) with the Wilcoxon p of share − base rate."""
    recs = []
    for qs, g in memo.groupby("query_set", sort=False):
        for m in order:
            sub = g[g.model == m]
            e = stats.enrichment(sub["share"], sub["base_rate"], n_boot=n_boot, seed=seed)
            recs.append(
                {
                    "query_set": qs,
                    "model": m,
                    "queries": len(sub),
                    "share": e.share.estimate,
                    "share_low": e.share.low,
                    "share_high": e.share.high,
                    "base_rate": e.base_rate,
                    "enrichment": e.ratio.estimate,
                    "p": e.test.p,
                }
            )
    return pd.DataFrame(recs)


# -- findings ----------------------------------------------------------------------------------
def _most(name, claim, paper, hits: pd.Series, what: str, extra: str = "") -> Finding:
    """A "most queries" claim: the share of queries for which `hits` holds, against 1/2."""
    hits = hits.dropna().astype(bool)
    share_, test = stats.proportion(int(hits.sum()), len(hits), MOST)
    return judge(
        name,
        claim,
        paper,
        effect=share_.scaled(1.0, -MOST),
        test=test,
        expected=+1,
        threshold=MOST_MARGIN,
        what="share − 50%",
        fmt=stats.format_points,
        ours=f"{share_.format(stats.format_share)} of {len(hits)} queries {what}{extra}",
    )


def findings(table: pd.DataFrame, memo: pd.DataFrame, n_train: int, model: str) -> list[Finding]:
    """The paper's RQ2 claims against the model `model` (the largest): `table` from
    `query_table`, `memo` from `memorisation_shares`. Verdicts: `influence.study.findings`."""
    t = table[table.model == model]
    if t.empty:
        raise ValueError(f"no tail fits of model {model!r}; models: {sorted(set(table.model))}")
    fitted = t[t.alpha.notna()]
    lo_a, hi_a = ALPHA_RANGE
    lo_t, hi_t = TOP1_RANGE
    top1 = t.top1_share.dropna()
    out = [
        _most(
            "power law",
            "a power law fits the tail better than the lognormal and the exponential for most "
            "queries",
            "most queries",
            fitted.powerlaw_preferred,
            "where it is preferred",
        ),
        _most(
            "exponents",
            f"exponents α between {lo_a:g} and {hi_a:g}",
            f"α ≈ {lo_a:g}–{hi_a:g} (2.1, 2.28, 2.57 for three queries)",
            fitted.alpha.between(lo_a, hi_a),
            f"with α in [{lo_a:g}, {hi_a:g}]",
            f" (median α {stats.format_number(fitted.alpha.median(), 3)})",
        ),
        _most(
            "top 1%",
            f"the top 1% of sequences hold {lo_t:.0%}–{hi_t:.0%} of the positive influence",
            f"{lo_t:.0%}–{hi_t:.0%}",
            top1.between(lo_t, hi_t),
            f"in [{lo_t:.0%}, {hi_t:.0%}]",
            f" (median {stats.format_share(top1.median())}, quartiles "
            f"{stats.format_share(top1.quantile(0.25))}–{stats.format_share(top1.quantile(0.75))})",
        ),
    ]
    no_quotes = t[t.query_set != "quotes"]
    quotes = t[t.query_set == "quotes"]
    biggest = no_quotes.max_per_copy.max()
    biggest_q = quotes.max_per_copy.max() if len(quotes) else float("nan")
    out.append(
        not_comparable(
            "1 nat per copy",
            "no single sequence moves a completion's log-probability by more than 1 nat per "
            "copy, except memorised quotes",
            "< 1 nat outside memorised quotes",
            ours=f"largest {stats.format_number(biggest)} nats without quotes, "
            f"{stats.format_number(biggest_q)} with",
            reason=f"per-copy influence is score / N, and one copy is 1/{n_train:,} of our "
            f"corpus against about 1/{PAPER_N:,} of the paper's: the same gradient alignment "
            f"gives a per-copy value about {PAPER_N / n_train:,.0f}× larger here",
        )
    )
    out.append(
        _most(
            "spread",
            "learning is spread over many sequences, not memorised from a few",
            "spread over many sequences",
            no_quotes.n_half >= SPREAD_MIN,
            f"whose positive influence needs ≥ {SPREAD_MIN} sequences to reach half",
            f" (median {stats.format_number(no_quotes.n_half.median())} sequences, "
            "quotes left out)",
        )
    )
    q = memo[(memo.model == model) & (memo.query_set == "quotes")]
    e = stats.enrichment(q["share"], q["base_rate"])
    out.append(
        judge(
            "quotes memorised",
            "for memorised quotes, every top sequence contains the quote",
            "all top sequences contain it",
            effect=e.share.scaled(1.0, -e.base_rate),
            test=e.test,
            expected=+1,
            threshold=QUOTE_MARGIN,
            what="share − base rate",
            fmt=stats.format_points,
            ours=e.share.format(stats.format_share),
            base_rate=stats.format_share(e.base_rate),
        )
    )
    return out


# -- figures -----------------------------------------------------------------------------------
def plot_distributions(per_copy: dict[str, np.ndarray], titles: dict[str, str]):
    """One histogram per query set: the per-copy influence of every training sequence on one
    query, on a signed log scale (sign · log10(1 + |x| / median |x|))."""
    import matplotlib.pyplot as plt

    sets = list(per_copy)
    ncols = 3
    nrows = math.ceil(len(sets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(10, 3.0 * nrows), sharey=True, squeeze=False)
    for ax, qs in zip(axes.ravel(), sets, strict=False):
        x = per_copy[qs]
        lin = np.quantile(np.abs(x), 0.5)
        ax.hist(np.sign(x) * np.log10(1 + np.abs(x) / lin), bins=50,
                color=style.query_set_color(qs))  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(titles[qs])
        ax.set_xlabel(f"signed log (unit {lin:.1e} nats)")
    for ax in axes.ravel()[len(sets) :]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("training sequences")
    fig.tight_layout()
    return fig


def plot_ccdf(
    per_copy: dict[tuple[str, str], np.ndarray],
    table: pd.DataFrame,
    queries: Sequence[tuple[str, int]],
    order: Sequence[str],
):
    """The paper's Fig. 8 at our scale: per model size (panels), the CCDF of a few queries'
    positive per-copy influences (dots) and the fitted power law above x_min (dashed)."""
    import matplotlib.pyplot as plt

    ncols = min(len(order), 4)
    nrows = math.ceil(len(order) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.5 * ncols, 2.9 * nrows), sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, m in zip(axes.ravel(), order, strict=False):
        for qs, q in queries:
            x, c = ccdf(per_copy[(m, qs)][q])
            colour = style.query_set_color(qs)
            ax.loglog(x, c, ".", ms=3, color=colour, label=f"{qs} #{q}")
            row = table[(table.model == m) & (table.query_set == qs) & (table["query"] == q)]
            if len(row) and np.isfinite(row.iloc[0].alpha):
                r = row.iloc[0]
                grid = np.geomspace(r.xmin, x.max(), 50)
                ax.loglog(grid, fitted_ccdf(r.to_dict(), grid), "--", color=colour)
        ax.set_title(f"model {m}")
        ax.set_xlabel("per-copy influence (nats)")
    for ax in axes.ravel()[len(order) :]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("P(influence ≥ x)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4),
               bbox_to_anchor=(0.5, -0.02))  # fmt: skip
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_by_size(table: pd.DataFrame, order: Sequence[str]):
    """Per model size: the fitted exponents and the top-1% shares of every query (boxes, the
    paper's ranges shaded), and the largest per-copy influence of each query set (lines)."""
    import matplotlib.pyplot as plt

    fitted = table[table.alpha.notna()]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    axes[0].boxplot([fitted[fitted.model == m].alpha.to_numpy() for m in order],
                    tick_labels=list(order))  # fmt: skip
    axes[0].axhspan(*ALPHA_RANGE, color=style.GREEN, alpha=0.15, label="paper")
    # log scale: a few short, steep tails fit α > 10 and would flatten the boxes on a linear one
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_locator(plt.FixedLocator([1.5, 2, 3, 4.3, 6, 10, 20]))
    axes[0].yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0].yaxis.set_minor_locator(plt.NullLocator())
    axes[0].set_ylabel("exponent α (log scale)")
    axes[1].boxplot([table[table.model == m].top1_share.to_numpy() for m in order],
                    tick_labels=list(order))  # fmt: skip
    axes[1].axhspan(*TOP1_RANGE, color=style.GREEN, alpha=0.15, label="paper")
    axes[1].set_ylabel("share held by the top 1%")
    for qs in SETS:
        sub = table[table.query_set == qs]
        if len(sub):
            best = sub.groupby("model").max_per_copy.max().reindex(list(order))
            axes[2].plot(list(order), best.to_numpy(), "o-", color=style.query_set_color(qs),
                         label=qs)  # fmt: skip
    axes[2].axhline(1.0, color=style.BLACK, ls=":", lw=1)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("largest per-copy influence (nats)")
    axes[2].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[0].legend(loc="best")
    for ax in axes:
        ax.set_xlabel("model size")
    fig.tight_layout()
    return fig


def plot_memorisation(summary: pd.DataFrame, order: Sequence[str], k: int):
    """The related share of the top-k per model size, quotes against facts, with intervals
    and each set's corpus base rate (dotted)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for qs, g in summary.groupby("query_set", sort=False):
        g = g.set_index("model").reindex(list(order))
        colour = style.query_set_color(qs)
        yerr = np.vstack([g.share - g.share_low, g.share_high - g.share]).clip(min=0)
        ax.errorbar(list(order), g.share, yerr=np.nan_to_num(yerr), fmt="o-", capsize=3,
                    color=colour, label=f"{qs}: top-{k}")  # fmt: skip
        ax.axhline(g.base_rate.mean(), color=colour, ls=":", lw=1, label=f"{qs}: corpus")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("model size")
    ax.set_ylabel("share related to the query")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig
