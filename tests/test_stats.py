"""The study's statistics (influence.study.stats) against exact values and brute force."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sstats

from influence.study import stats


def test_p_values_and_numbers_are_formatted_for_readers():
    assert stats.format_p(3e-6) == "< 1e-4"
    assert stats.format_p(1e-4) == "0.0001"
    assert stats.format_p(0.04234) == "0.042"
    assert stats.format_p(0.5) == "0.5"
    assert stats.format_p(float("nan")) == "n/a" and stats.format_p(None) == "n/a"
    assert stats.p_clause(3e-6) == "p < 1e-4" and stats.p_clause(0.042) == "p = 0.042"
    assert stats.format_number(52.963333) == "53"
    assert stats.format_number(199.0) == "199" and stats.format_number(2400) == "2,400"
    assert stats.format_number(-0.0) == "0" and stats.format_number(-1e-20) == "-1e-20"
    assert stats.format_number(0.000123456) == "0.000123"
    assert stats.format_number(float("nan")) == "n/a" and stats.format_number(True) == "yes"
    assert stats.format_share(0.375) == "38%" and stats.format_share(0.0026) == "0.26%"
    assert stats.format_share(1.0) == "100%"
    # values that round up to the next power of ten: no exponent ("1e2%")
    assert stats.format_share(0.9995) == "100%" and stats.format_number(99.96, 2) == "100"
    assert stats.format_number(999.7) == "1,000" and stats.format_points(0.9996) == "+100 points"
    assert stats.format_points(-0.42) == "−42 points" and stats.format_points(0.05) == "+5 points"


def test_bootstrap_mean_interval_has_the_normal_width():
    # standard error of the mean of 0..99 is 29.01 / sqrt(100) = 2.9: 95% CI ≈ mean ± 5.7
    ci = stats.bootstrap(np.arange(100, dtype=float), n_boot=2000, seed=0)
    assert ci.estimate == 49.5 and ci.n == 100
    assert 49.5 - 8 < ci.low < 49.5 - 4 and 49.5 + 4 < ci.high < 49.5 + 8
    x = np.random.default_rng(1).normal(5.0, 2.0, size=400)
    lo, hi = stats.bootstrap(x, n_boot=2000, seed=0).low, stats.bootstrap(x, n_boot=2000).high
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(len(x)), rel=0.15)


def test_bootstrap_is_the_percentile_interval_of_the_resampled_statistic():
    """Brute force: resample rows with the generator scipy uses, take the percentiles."""
    x = np.random.default_rng(3).exponential(1.0, size=30)
    ci = stats.bootstrap(x, np.median, n_boot=500, seed=7)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(x), size=(500, len(x)))
    brute = np.median(x[idx], axis=1)
    assert ci.estimate == np.median(x)
    assert ci.low == pytest.approx(np.percentile(brute, 2.5), rel=1e-12)
    assert ci.high == pytest.approx(np.percentile(brute, 97.5), rel=1e-12)


def test_bootstrap_is_seeded_pairs_rows_and_drops_nan():
    x = np.random.default_rng(0).normal(size=50)
    y = 2 * x + 1
    assert stats.bootstrap(x, seed=3) == stats.bootstrap(x, seed=3)
    assert stats.bootstrap(x, seed=3) != stats.bootstrap(x, seed=4)
    both = stats.bootstrap(np.c_[x, y], seed=3)  # columns resampled with the same rows
    assert both.low[0] == pytest.approx(stats.bootstrap(x, seed=3).low, rel=1e-12)
    assert both.high[1] == pytest.approx(2 * both.high[0] + 1, rel=1e-9)
    ratio = stats.bootstrap((y, x + 10), lambda a, b, axis: a.mean(axis) / b.mean(axis))
    assert ratio.estimate == pytest.approx(y.mean() / (x.mean() + 10))
    assert ratio.low < ratio.estimate < ratio.high
    with_nan = stats.bootstrap(np.r_[x, np.nan], seed=3)
    assert with_nan == stats.bootstrap(x, seed=3)
    one = stats.bootstrap(np.array([3.0]))
    assert one.estimate == 3.0 and math.isnan(one.low) and math.isnan(one.high)
    assert math.isnan(stats.bootstrap(np.array([])).estimate)
    lo_hi = stats.bootstrap(np.zeros(5))  # degenerate: the percentile interval is [0, 0]
    assert (lo_hi.low, lo_hi.high) == (0.0, 0.0)
    mean, low, high = stats.bootstrap(x, seed=3)  # unpacks as (estimate, low, high)
    assert low < mean < high
    with pytest.raises(ValueError, match="n_boot"):
        stats.bootstrap(x, n_boot=0)


def test_paired_tests_exact_p_values():
    d = np.linspace(0.1, 1.0, 10)
    w = stats.wilcoxon(d)
    assert w.n == 10 and w.p == pytest.approx(2 / 2**10)  # exact, all positive
    assert stats.wilcoxon(np.r_[d, 0.0, 0.0]).n == 10  # zero differences dropped
    assert stats.wilcoxon(np.r_[d, -d]).p == pytest.approx(1.0)  # symmetric: no effect
    assert math.isnan(stats.wilcoxon(np.zeros(4)).p) and stats.wilcoxon(np.zeros(4)).n == 0
    s = stats.sign_test([1, 2, 3, 4, 5, 6, 0])
    assert s.n == 6 and s.p == pytest.approx(2 / 2**6)
    assert stats.sign_test([1, -1, 2, -2]).p == pytest.approx(1.0)
    assert "over 10 queries" in w.describe() and "p = 0.002" in w.describe()


def test_proportion_is_an_exact_binomial():
    share, test = stats.proportion(8, 10, 0.5)
    assert share.estimate == 0.8 and share.low < 0.8 < share.high
    assert test.p == pytest.approx(sstats.binomtest(8, 10, 0.5).pvalue)
    ci = sstats.binomtest(8, 10).proportion_ci(method="exact")
    assert (share.low, share.high) == pytest.approx((ci.low, ci.high))
    assert math.isnan(stats.proportion(0, 0)[1].p)


def test_size_trend_slope_against_log_parameters():
    params = {"xs": 1e4, "s": 1e5, "m": 1e6, "l": 1e7}  # three decades
    base = np.random.default_rng(0).normal(size=(12, 1))
    rising = pd.DataFrame(base + np.arange(4) * 0.1, columns=list(params))  # +0.1 per decade
    tr = stats.size_trend(rising, params, seed=0)
    assert tr.decades == pytest.approx(3.0)
    assert tr.change.estimate == pytest.approx(0.3)  # slope 0.1 per decade × 3 decades
    assert tr.test.n == 12 and tr.test.p == pytest.approx(2 / 2**12)
    assert (tr.rises, tr.falls, tr.ties) == (12, 0, 0)
    assert tr.steps == "rises with every size"
    # columns in any order, a missing value only drops that size for that query
    shuffled = rising[["l", "xs", "m", "s"]].copy()
    shuffled.iloc[0, 0] = np.nan
    assert stats.size_trend(shuffled, params).change.estimate == pytest.approx(0.3)
    # negative control: half the queries rise, half fall by the same amount
    flat = pd.DataFrame(np.r_[np.arange(4)[None] * 0.1, -np.arange(4)[None] * 0.1].repeat(6, 0),
                        columns=list(params))  # fmt: skip
    tr0 = stats.size_trend(flat, params)
    assert tr0.change.estimate == pytest.approx(0.0, abs=1e-12) and tr0.test.p == pytest.approx(1)
    with pytest.raises(ValueError, match="at least two model sizes"):
        stats.size_trend(rising[["xs"]], params)


def test_direction_words():
    assert stats.direction([1, 2, 3]) == "rises with every size"
    assert stats.direction([3, 2, 2, 1]) == "falls overall, not at every step"
    assert stats.direction([3, 2, 1]) == "falls with every size"
    assert stats.direction([1, 3, 2]) == "rises overall, not at every step"
    assert stats.direction([1, 1.0001], tol=1e-3) == "does not change"
    assert stats.direction([1]) == "has fewer than two sizes"


def test_enrichment_against_base_rate():
    shares = np.array([0.5, 0.6, 0.4, 0.5, 0.7, 0.3, 0.5, 0.6])
    e = stats.enrichment(shares, 0.01, seed=0)
    assert e.share.estimate == pytest.approx(0.5125) and e.base_rate == 0.01
    assert e.ratio.estimate == pytest.approx(51.25)
    assert e.ratio.low == pytest.approx(e.share.low / 0.01)
    assert e.test.p == pytest.approx(2 / 2**8)
    per_query = stats.enrichment([0.2, 0.4], [0.1, 0.2])  # base rate per query
    assert per_query.base_rate == pytest.approx(0.15) and per_query.ratio.estimate == 2.0
    assert "of the top-k against 1% of the corpus" in e.describe()
    labels = pd.Series(["a", "a", "b", "c"])
    assert stats.base_rates(labels, ["a", "b", "d"]).to_dict() == {"a": 0.5, "b": 0.25, "d": 0.0}


def test_log_ratio_of_values_of_any_sign():
    # both positive: log10(a / b); the gap form is the same number
    np.testing.assert_allclose(stats.log_ratio([10.0, 1.0, 0.5], [1.0, 10.0, 0.5]), [1, -1, 0])
    clip = stats.LOG_RATIO_CLIP
    # nothing left of b (a ≤ 0 < b) and nothing to compare with (b ≤ 0 < a): the clip
    assert stats.log_ratio(0.0, 2.0) == -clip and stats.log_ratio(-1.0, 2.0) == -clip
    assert stats.log_ratio(2.0, 0.0) == clip and stats.log_ratio(2.0, -5.0) == clip
    assert stats.log_ratio(1e6, 1.0) == clip and stats.log_ratio(1.0, 1e6) == -clip
    # monotone for negative values too: a = −1 is above b = −3
    assert stats.log_ratio(-1.0, -3.0) == pytest.approx(np.log10(3))
    assert np.isnan(stats.log_ratio(0.0, 0.0)) and np.isnan(stats.log_ratio(np.nan, 1.0))
    # increasing in a for every b
    a = np.linspace(-5, 5, 101)
    for b in (-2.0, 0.5, 3.0):
        assert np.all(np.diff(stats.log_ratio(a, b)) >= 0)
