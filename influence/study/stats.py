"""The study's statistics, in one place: every analysis module and notebook uses these.

    ci = bootstrap(per_query_values, n_boot=1000, seed=0)        # Interval: mean [low, high]
    t = wilcoxon(large - small)                                  # Test: paired over queries
    tr = size_trend(values_by_model, params)                     # Trend over model sizes
    e = enrichment(top_k_shares, corpus_share)                   # share vs base rate
    format_p(3e-6) == "< 1e-4"; format_number(52.963333) == "53"

Definitions (the report pages and findings quote them):

- **Bootstrap**: the percentile bootstrap of `scipy.stats.bootstrap` (`method="percentile"`),
  seeded, resampling the rows (queries) with replacement; rows of paired samples are resampled
  together. The percentile method (not BCa) because BCa is undefined on the degenerate samples
  the study meets (every query's share 0 or 1), where the percentile interval is the honest
  [0, 0]. Fewer than two rows: the interval is (NaN, NaN).
- **Paired tests over queries**: the Wilcoxon signed-rank test of per-query differences
  (`scipy.stats.wilcoxon`, two-sided, zero differences dropped: `zero_method="wilcox"`) and the
  sign test (`scipy.stats.binomtest` of the number of positive differences among the nonzero
  ones against 1/2, two-sided). With n nonzero differences the smallest two-sided p of either
  is 2 / 2**n, so fewer than 6 queries that change can never reach p < 0.05.
- **Trend over model sizes** (`size_trend`): for each query, the least-squares slope of its
  value against log10(parameters) over the sizes where it has a value (at least two); the
  slopes are tested against 0 with the Wilcoxon signed-rank test over queries, and the effect
  is the mean slope times log10(largest / smallest parameter count): the fitted change across
  the suite, in the value's units, with a bootstrap interval over queries. `steps` says whether
  the mean over queries moves the same way from each size to the next.
- **Base rate and enrichment** (`enrichment`): a share among a query's top-k against the share
  of the corpus in the same category (the base rate, per query or one number): the mean share
  over queries with its bootstrap interval, the ratio mean share / mean base rate with the
  interval scaled the same way, and the Wilcoxon test of share − base rate over queries.
- **p-values** print as "< 1e-4" below 1e-4, else with two significant figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _scipy

LEVEL = 0.95
P_FLOOR = 1e-4


# -- formatting --------------------------------------------------------------------------------
def format_p(p: float | None) -> str:
    """ "< 1e-4" below 1e-4, two significant figures otherwise, "n/a" when there is no test."""
    if p is None or not np.isfinite(p):
        return "n/a"
    if p < P_FLOOR:
        return "< 1e-4"
    return f"{float(p):.2g}"


def p_clause(p: float | None) -> str:
    """ "p = 0.042" or "p < 1e-4" (for prose), "no test" when there is none."""
    text = format_p(p)
    if text == "n/a":
        return "no test"
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def format_number(x: Any, digits: int = 3) -> str:
    """A number for a reader: integers as integers (thousands separated), other values with
    `digits` significant figures (no "-0"), NaN/None as "n/a", anything else as str."""
    if x is None:
        return "n/a"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return f"{int(x):,}"
    if isinstance(x, float | np.floating):
        x = float(x)
        if not math.isfinite(x):
            return "n/a" if math.isnan(x) else ("∞" if x > 0 else "−∞")
        if x == 0:
            return "0"
        text = f"{x:.{digits}g}"
        # 99.95 at 2 digits rounds to "1e+02": a value that reaches 10**digits once rounded is
        # shown in units, as one that starts there.
        big = x.is_integer() or abs(x) >= 10**digits or abs(float(text)) >= 10**digits
        if big and abs(x) < 1e15:
            return f"{round(x):,}"  # no exponent for what a reader counts in units
        if "e" in text:
            mantissa, exp = text.split("e")
            text = f"{mantissa}e{int(exp)}"
        return text
    return str(x)


def format_share(x: float | None, digits: int = 2) -> str:
    """A share as a percentage with `digits` significant figures ("37%", "0.26%")."""
    if x is None or not np.isfinite(x):
        return "n/a"
    pct = 100 * float(x)
    if pct == 0:
        return "0%"
    if abs(pct) >= 10**digits:
        return f"{pct:.0f}%"
    return f"{format_number(pct, digits)}%"


def format_points(x: float | None, digits: int = 2) -> str:
    """A difference of shares in percentage points ("+12 points", "−4.2 points")."""
    if x is None or not np.isfinite(x):
        return "n/a"
    pts = 100 * float(x)
    sign = "+" if pts > 0 else "−" if pts < 0 else ""
    return f"{sign}{format_number(abs(pts), digits)} points"


# -- intervals ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """An estimate with its percentile bootstrap interval (NaN bounds: fewer than two rows)."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL
    n: int = 0

    def scaled(self, factor: float, shift: float = 0.0) -> Interval:
        """factor · x + shift applied to the estimate and both bounds (reordered if factor < 0)."""
        lo, hi = sorted((factor * self.low + shift, factor * self.high + shift))
        return Interval(factor * self.estimate + shift, lo, hi, self.level, self.n)

    def format(self, fmt: Callable[[float], str] = format_number) -> str:
        """ "0.12 [0.08, 0.17]" (the interval omitted when it is undefined; one per element,
        joined by "; ", for an interval of several columns)."""
        if np.ndim(self.estimate) > 0:
            parts = zip(self.estimate, self.low, self.high, strict=True)
            return "; ".join(Interval(e, lo, hi).format(fmt) for e, lo, hi in parts)
        if not np.isfinite(self.low):
            return fmt(self.estimate)
        return f"{fmt(self.estimate)} [{fmt(self.low)}, {fmt(self.high)}]"

    def __str__(self) -> str:
        return self.format()

    def __iter__(self):
        """(estimate, low, high), so that `mean, low, high = bootstrap(x)` reads naturally."""
        return iter((self.estimate, self.low, self.high))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _finite_rows(samples: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    keep = np.ones(len(samples[0]), dtype=bool)
    for s in samples:
        finite = np.isfinite(s)
        keep &= finite if s.ndim == 1 else finite.all(axis=tuple(range(1, s.ndim)))
    return tuple(s[keep] for s in samples)


def bootstrap(
    samples: Any,
    statistic: Callable[..., Any] = np.mean,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """The statistic of `samples` and its percentile bootstrap interval over rows.

    `samples` is one array of rows ([n] or [n, c]: each column gets its own interval, the rows
    resampled together) or a tuple of arrays of equal length, resampled together (paired),
    e.g. `bootstrap((a, b), lambda a, b, axis: a.mean(axis) / b.mean(axis))`. `statistic`
    reduces along `axis` (numpy style: `np.mean`, `np.median`, or a function of the samples
    and `axis`). Rows with a NaN anywhere are dropped. The estimate is the statistic of the
    data; with fewer than two rows the bounds are NaN. Returns an `Interval` (whose fields are
    arrays for [n, c] input)."""
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    paired = isinstance(samples, tuple)
    data = tuple(np.asarray(s, dtype=np.float64) for s in (samples if paired else (samples,)))
    if any(s.ndim == 0 for s in data) or len({len(s) for s in data}) != 1:
        raise ValueError("samples must be arrays of rows of one length")
    data = _finite_rows(data)
    n = len(data[0])
    if n == 0:
        nan = np.full(data[0].shape[1:], np.nan) if data[0].ndim > 1 else float("nan")
        return Interval(nan, nan, nan, level, 0)
    estimate = statistic(*data, axis=0)
    if n < 2:
        nan = np.full_like(np.asarray(estimate, dtype=float), np.nan)
        return Interval(_scalar(estimate), _scalar(nan), _scalar(nan), level, n)
    res = _scipy.bootstrap(
        data,
        statistic,
        n_resamples=n_boot,
        paired=paired and len(data) > 1,
        axis=0,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return Interval(_scalar(estimate), _scalar(ci.low), _scalar(ci.high), level, n)


def _scalar(x: Any) -> Any:
    a = np.asarray(x, dtype=float)
    return float(a) if a.ndim == 0 else a


# -- tests -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Test:
    """A test's name, what it is over, its sample size and its two-sided p-value."""

    __test__ = False  # not a pytest test class

    name: str
    p: float
    n: int
    over: str = "queries"

    def describe(self) -> str:
        """ "Wilcoxon signed-rank over 64 queries, p < 1e-4"."""
        return f"{self.name} over {self.n} {self.over}, {p_clause(self.p)}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _differences(d: Any) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    return d[np.isfinite(d)]


def wilcoxon(differences: Any, over: str = "queries") -> Test:
    """Two-sided Wilcoxon signed-rank test of paired differences (zeros dropped). n counts the
    nonzero differences; p is NaN when none is left."""
    d = _differences(differences)
    d = d[d != 0]
    if len(d) == 0:
        return Test("Wilcoxon signed-rank", float("nan"), 0, over)
    return Test("Wilcoxon signed-rank", float(_scipy.wilcoxon(d).pvalue), len(d), over)


def sign_test(differences: Any, over: str = "queries") -> Test:
    """Two-sided sign test: positive among the nonzero differences against 1/2."""
    d = _differences(differences)
    d = d[d != 0]
    if len(d) == 0:
        return Test("sign test", float("nan"), 0, over)
    return Test(
        "sign test", float(_scipy.binomtest(int((d > 0).sum()), len(d)).pvalue), len(d), over
    )


def proportion(successes: int, n: int, null: float = 0.5, over: str = "queries"):
    """(Interval of the share with its exact Clopper–Pearson 95% interval, two-sided binomial
    test of the share against `null`). n = 0 gives NaN everywhere."""
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, LEVEL, 0), Test("binomial test", nan, 0, over)
    res = _scipy.binomtest(int(successes), int(n), null)
    ci = res.proportion_ci(confidence_level=LEVEL, method="exact")
    share = Interval(successes / n, float(ci.low), float(ci.high), LEVEL, n)
    return share, Test(f"binomial test against {format_share(null)}", float(res.pvalue), n, over)


# -- trends over model sizes -------------------------------------------------------------------
def direction(values: Sequence[float], tol: float = 0.0) -> str:
    """How a sequence ordered by model size moves: "rises with every size", "falls with every
    size", "rises overall, not at every step", "falls overall, not at every step", "does not
    change", or "has fewer than two sizes". Steps within ±tol count as flat."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    if len(v) < 2:
        return "has fewer than two sizes"
    steps = np.diff(v)
    total = v[-1] - v[0]
    if abs(total) <= tol:
        return "does not change"
    word = "rises" if total > 0 else "falls"
    same = np.all(steps * np.sign(total) > tol)
    return f"{word} with every size" if same else f"{word} overall, not at every step"


@dataclass(frozen=True)
class Trend:
    """A value's trend over model sizes (see the module docstring)."""

    change: Interval  # fitted change across the suite (mean slope × decades spanned)
    test: Test
    means: dict[str, float]  # mean over queries at each size
    steps: str  # `direction` of the means
    rises: int  # queries whose slope is positive
    falls: int
    ties: int
    decades: float  # log10(largest / smallest parameters)

    def describe(self, fmt: Callable[[float], str] = format_number) -> str:
        """ "rises by 0.12 [0.05, 0.19] across the suite (xs → l); 40 of 64 queries rise"."""
        c = self.change.estimate
        if not np.isfinite(c):
            return "no query has values at two sizes"
        word = "rises" if c > 0 else "falls" if c < 0 else "does not change"
        ch = self.change.scaled(-1.0) if c < 0 else self.change  # "falls by" a positive amount
        return (
            f"{word} by {ch.format(fmt)} across the suite; {self.rises} queries rise, "
            f"{self.falls} fall, {self.ties} unchanged"
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["change"] = self.change.as_dict()
        d["test"] = self.test.as_dict()
        return d


def size_trend(
    values: pd.DataFrame,
    params: Mapping[str, float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    over: str = "queries",
) -> Trend:
    """Trend of a per-query value over model sizes. `values`: one row per query, one column per
    model (any order; `params` gives each model's parameter count and the order). A query
    needs values at two or more sizes to have a slope."""
    models = sorted((m for m in values.columns if m in params), key=lambda m: params[m])
    if len(models) < 2:
        raise ValueError(
            f"a trend needs at least two model sizes; got columns {list(values.columns)} with "
            f"parameter counts for {list(params)}"
        )
    x = np.log10(np.array([params[m] for m in models], dtype=np.float64))
    y = values[models].to_numpy(dtype=np.float64)
    ok = np.isfinite(y)
    slopes = np.full(len(y), np.nan)
    for i in range(len(y)):
        if ok[i].sum() >= 2:
            xi, yi = x[ok[i]], y[i, ok[i]]
            xc = xi - xi.mean()
            slopes[i] = float((xc * (yi - yi.mean())).sum() / (xc * xc).sum())
    slopes = slopes[np.isfinite(slopes)]
    decades = float(x[-1] - x[0])
    change = bootstrap(slopes, n_boot=n_boot, seed=seed).scaled(decades)
    complete = y[ok.all(axis=1)]
    means = {m: float(complete[:, j].mean()) if len(complete) else float("nan")
             for j, m in enumerate(models)}  # fmt: skip
    return Trend(
        change=change,
        test=wilcoxon(slopes, over=over),
        means=means,
        steps=direction(list(means.values())),
        rises=int((slopes > 0).sum()),
        falls=int((slopes < 0).sum()),
        ties=int((slopes == 0).sum()),
        decades=decades,
    )


# -- base rates and enrichment -----------------------------------------------------------------
def base_rates(labels: pd.Series, order: Sequence[str] | None = None) -> pd.Series:
    """Share of each label among all rows (e.g. a category's share of the corpus)."""
    shares = labels.value_counts(normalize=True)
    return shares.reindex(list(order), fill_value=0.0) if order is not None else shares


@dataclass(frozen=True)
class Enrichment:
    """A share among the top-k against its base rate (see the module docstring)."""

    share: Interval  # mean share over queries
    base_rate: float  # mean base rate over queries
    ratio: Interval  # share / base rate
    test: Test  # Wilcoxon of share − base rate over queries

    def describe(self, fmt: Callable[[float], str] = format_share) -> str:
        """ "38% [30%, 45%] of the top-k against 0.2% of the corpus (190×)"."""
        r = self.ratio.estimate
        ratio = f"{format_number(r, 2)}×" if np.isfinite(r) else "no base rate"
        return (
            f"{self.share.format(fmt)} of the top-k against {fmt(self.base_rate)} of the corpus "
            f"({ratio})"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "share": self.share.as_dict(),
            "base_rate": self.base_rate,
            "ratio": self.ratio.as_dict(),
            "test": self.test.as_dict(),
        }


def enrichment(
    shares: Any, base_rate: Any, *, n_boot: int = 1000, seed: int = 0, over: str = "queries"
) -> Enrichment:
    """Enrichment of per-query shares over their base rate (one number, or one per query)."""
    s = np.asarray(shares, dtype=np.float64).reshape(-1)
    b = np.broadcast_to(np.asarray(base_rate, dtype=np.float64), s.shape).copy()
    keep = np.isfinite(s) & np.isfinite(b)
    s, b = s[keep], b[keep]
    share = bootstrap(s, n_boot=n_boot, seed=seed)
    base = float(b.mean()) if len(b) else float("nan")
    ratio = share.scaled(1.0 / base) if base > 0 else Interval(*(float("nan"),) * 3, LEVEL, len(s))
    return Enrichment(share, base, ratio, wilcoxon(s - b, over=over))


# -- ratios ------------------------------------------------------------------------------------
LOG_RATIO_CLIP = 3.0  # log10: ratios beyond 1000× either way are shown as 1000×


def log_ratio(a: Any, b: Any, clip: float = LOG_RATIO_CLIP) -> np.ndarray:
    """log10(a / b) elementwise, defined for values of any sign and clipped to ±`clip`.

    Through the symmetric gap g = (a − b) / (|a| + |b|) in [−1, 1]: log10((1 + g) / (1 − g)),
    which is log10(a / b) when a and b are both positive. It is monotone (positive when
    a > b), −clip when a ≤ 0 < b (nothing left of b), +clip when b ≤ 0 < a, and NaN when
    a = b = 0 or either is NaN. Medians of it are medians of the ratio, read on a log scale."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = (a - b) / (np.abs(a) + np.abs(b))
        r = np.log10((1 + g) / (1 - g))
    return np.clip(r, -clip, clip)
