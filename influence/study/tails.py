"""Sparsity and heavy tails of influence (paper §5.2.1, Figs. 8–9, Table 1): the analysis
behind notebooks/02_sparsity_and_tails.

Per query, over its per-copy influences on all N training sequences:
- `top_share`: share of the total positive influence held by the top `frac` of the N
  sequences; `n_for_half`: how many sequences hold half of it.
- `fit_tail`: Clauset–Shalizi–Newman (2009) with the `powerlaw` package: x_min chosen by the
  Kolmogorov–Smirnov distance among the largest `tail_share`·N positive values (keeping at least
  `min_tail` points in the tail), maximum-likelihood exponent α, log-likelihood ratios against
  the lognormal and the exponential (Vuong's test), and, optionally, the bootstrap
  goodness-of-fit p-value (`ks_pvalue`): the share of synthetic data sets, drawn from the fitted
  model (power law above x_min, the data below it), whose refitted KS distance is at least the
  observed one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd

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


def _powerlaw_fit(pos: np.ndarray, n: int, tail_share: float, min_tail: int):
    import powerlaw

    rng_ = _candidates(pos, n, tail_share, min_tail)
    if rng_ is None:
        return None
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            fit = powerlaw.Fit(pos, xmin=rng_, verbose=0)
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


def query_table(
    per_copy: dict[tuple[str, str], np.ndarray],
    tail_share: float,
    min_tail: int,
    bootstrap: dict[tuple[str, str, int], int] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per (model, query set, query): sparsity statistics and the tail fit.

    `per_copy[(model, query_set)]` is a [Q, N] array of per-copy influences; `bootstrap`
    maps (model, query_set, query) to a number of bootstrap data sets for the KS p-value."""
    from tqdm import tqdm

    bootstrap = bootstrap or {}
    rows = []
    items = [(m, qs, q) for (m, qs), arr in per_copy.items() for q in range(arr.shape[0])]
    for m, qs, q in tqdm(items, desc="tail fits", disable=not progress, mininterval=10):
        x = np.asarray(per_copy[(m, qs)][q], dtype=np.float64)
        b = bootstrap.get((m, qs, q), 0)
        fit = fit_tail(x, tail_share, min_tail, n_bootstrap=b, seed=seed + q)
        rows.append(
            {
                "model": m,
                "query_set": qs,
                "query": q,
                "max_per_copy": float(x.max()),
                "top1_share": top_share(x, 0.01),
                "n_half": n_for_half(x),
                "positive_frac": float((x > 0).mean()),
                **fit,
            }
        )
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


def memorisation_contrast(frames: dict[str, pd.DataFrame], k: int) -> pd.DataFrame:
    """Share of each query's top-k sequences that are `related` (for a quote: contain the
    saying; for a fact: express the same fact), averaged over queries, per model and set.
    `frames[set]` are `StudyScores.top_k` frames (any k' ≥ k)."""
    recs = []
    for qs, df in frames.items():
        top = df[df["rank"] <= k]
        for m, sub in top.groupby("model", sort=False):
            per_q = sub.groupby("query")["related"].mean()
            recs.append(
                {
                    "model": m,
                    "query_set": qs,
                    "k": k,
                    "related_share": float(per_q.mean()),
                    "queries_all_related": float((per_q == 1).mean()),
                }
            )
    return pd.DataFrame(recs)


def _verdict(ok: bool, partly: bool) -> str:
    return "agrees" if ok else ("partly" if partly else "disagrees")


def paper_vs_here(
    summary: pd.DataFrame, table: pd.DataFrame, memo: pd.DataFrame, n_train: int
) -> pd.DataFrame:
    """The paper's RQ2 findings against ours (largest model unless stated), with a verdict
    decided by a stated rule on the measured numbers (never by eye)."""
    largest = summary.index[-1]
    s = summary.loc[largest]
    t = table[(table.model == largest) & table.alpha.notna()]
    in_range = float(((t.alpha >= 2) & (t.alpha <= 4.3)).mean()) if len(t) else float("nan")
    top1 = table[table.model == largest].top1_share
    q_memo = memo[(memo.model == largest) & (memo.query_set == "quotes")].related_share
    f_memo = memo[(memo.model == largest) & (memo.query_set == "facts")].related_share
    q_memo = float(q_memo.iloc[0]) if len(q_memo) else float("nan")
    f_memo = float(f_memo.iloc[0]) if len(f_memo) else float("nan")
    quotes_max = float(
        table[(table.model == largest) & (table.query_set == "quotes")].max_per_copy.max()
    )
    rows = [
        {
            "finding": "a power law fits the tail best for most queries",
            "paper": "power law preferred for most queries",
            "here": f"preferred over lognormal and exponential for "
            f"{s.powerlaw_preferred_share:.0%} of queries "
            f"({s.powerlaw_preferred_significant_share:.0%} significantly, p < 0.1; no "
            f"alternative significantly better for {s.powerlaw_not_worse_share:.0%}); "
            f"median KS p {s.median_ks_pvalue:.2f} over {int(s.ks_pvalue_queries)} queries",
            "verdict": _verdict(
                s.powerlaw_preferred_share > 0.5,
                s.powerlaw_preferred_share > 0.25 or s.powerlaw_not_worse_share > 0.5,
            ),
            "rule": "agrees if > 50% preferred; partly if > 25%, or if for > 50% no "
            "alternative is significantly better",
        },
        {
            "finding": "exponents about 2 to 4.3",
            "paper": "α ≈ 2–4.3 (2.1, 2.28, 2.57 for three queries)",
            "here": f"median α {s.median_alpha:.2f}; {in_range:.0%} of fitted queries in [2, 4.3]",
            "verdict": _verdict(in_range > 0.5, 2 <= s.median_alpha <= 4.3 or in_range > 0.25),
            "rule": "agrees if > 50% of α in [2, 4.3]; partly if the median is, or > 25%",
        },
        {
            "finding": "the top 1% of sequences hold 12–52% of the positive influence",
            "paper": "12–52%",
            "here": f"median {s.median_top1_share:.0%} (quartiles {top1.quantile(0.25):.0%}–"
            f"{top1.quantile(0.75):.0%}) of the top 1% = {max(1, math.ceil(0.01 * n_train))} "
            f"of {n_train} sequences",
            "verdict": _verdict(
                0.12 <= s.median_top1_share <= 0.52,
                top1.quantile(0.25) <= 0.52 and top1.quantile(0.75) >= 0.12,
            ),
            "rule": "agrees if the median is in [12%, 52%]; partly if the quartiles overlap it",
        },
        {
            "finding": "no single influence above 1 nat per copy, except memorised quotes",
            "paper": "max per-copy influence < 1 nat outside memorised quotes",
            "here": f"largest per-copy influence {s.max_per_copy_no_quotes:.3g} nats without "
            f"quotes, {quotes_max:.3g} for quotes (N = {n_train}; per copy = score / N)",
            "verdict": _verdict(
                s.max_per_copy_no_quotes < 1 <= quotes_max,
                quotes_max > s.max_per_copy_no_quotes,
            ),
            "rule": "agrees if < 1 nat without quotes and ≥ 1 with; partly if quotes are "
            "still the largest",
        },
        {
            "finding": "influence spread over many sequences (not memorised from a few)",
            "paper": "learning is spread over many sequences",
            "here": f"median {s.median_n_half:.0f} sequences hold half of a query's positive "
            f"influence",
            "verdict": _verdict(s.median_n_half >= 10, s.median_n_half >= 3),
            "rule": "agrees if the median number holding half is ≥ 10; partly if ≥ 3",
        },
        {
            "finding": "memorised quotes: every top sequence contains the passage",
            "paper": "for famous quotes all top sequences contain the quote",
            "here": f"share of top-k containing the saying {q_memo:.0%} (facts: share stating "
            f"the same fact {f_memo:.0%})",
            "verdict": _verdict(q_memo >= 0.9, q_memo > f_memo),
            "rule": "agrees if ≥ 90% of the top-k contain it; partly if above facts",
        },
    ]
    return pd.DataFrame(rows)
