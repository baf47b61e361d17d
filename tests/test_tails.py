"""Tail statistics of notebook 02 on synthetic data whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from influence.study import tails


def pareto(alpha: float, n: int, seed: int, xmin: float = 1.0) -> np.ndarray:
    """Continuous power law p(x) ∝ x^-alpha on [xmin, ∞), by inversion."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


def test_top_share_and_n_for_half_exact():
    # 200 values: 10 and 5 on top, 100 ones, 98 negatives (ignored: only positive influence).
    x = np.concatenate([[10.0, 5.0], np.ones(100), -np.ones(98)])
    rng = np.random.default_rng(0)
    x = rng.permutation(x)
    total = 115.0
    assert tails.top_share(x, 0.01) == pytest.approx(15 / total, abs=1e-12)  # ⌈2⌉ = 2 values
    assert tails.top_share(x, 0.005) == pytest.approx(10 / total, abs=1e-12)
    assert tails.top_share(x, 1.0) == pytest.approx(1.0, abs=1e-12)
    # half of 115 = 57.5: 10 + 5 + 43 ones = 58 ≥ 57.5, 57 < 57.5
    assert tails.n_for_half(x) == 45
    assert tails.n_for_half(-np.abs(x)) == 0
    assert math.isnan(tails.top_share(-np.abs(x)))


def test_top_share_rejects_bad_fraction():
    with pytest.raises(ValueError, match="frac"):
        tails.top_share(np.ones(3), 0.0)
    with pytest.raises(ValueError, match="empty"):
        tails.top_share(np.array([]))


def test_power_law_exponent_recovered():
    # 20,000 points from α = 2.5 with a lognormal-free bulk; the tail search keeps the top 10%
    # (2,000 points): the MLE's standard error is (α−1)/√n_tail ≈ 1.5/√2000 ≈ 0.034 at the
    # true x_min; the KS search over x_min adds variance, so allow 0.15 (~4 standard errors).
    x = pareto(2.5, 20_000, seed=1)
    fit = tails.fit_tail(x, tail_share=0.1, min_tail=50)
    assert fit["alpha"] == pytest.approx(2.5, abs=0.15)
    assert 50 <= fit["n_tail"] <= 2000
    assert fit["tail_frac"] == pytest.approx(fit["n_tail"] / 20_000)
    assert fit["R_exponential"] > 0  # a power law beats an exponential on power-law data


@pytest.mark.parametrize("alpha", [3.5, 4.2])
def test_exponents_above_three_are_recovered(alpha):
    # powerlaw 2.0's default range for α is (0, 3): without FIT_RANGES both fits return 3.0.
    # 4,000 points above x_min = 1: SE of the MLE (α−1)/√4000 ≤ 0.051; allow 0.25 for the scan.
    fit = tails.fit_tail(pareto(alpha, 4000, seed=11), tail_share=1.0, min_tail=50)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.25)


def _powerlaw_scan(pos, lo, hi):
    import warnings

    import powerlaw

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        pl = powerlaw.Fit(pos, xmin=(lo, hi), parameter_ranges=tails.FIT_RANGES, verbose=0)
        return pl.power_law.xmin, pl.power_law.alpha, pl.power_law.D


@pytest.mark.parametrize(
    "data",
    [
        "pareto 2.5 over a lognormal body",
        "pareto 3.5 over a lognormal body",
        "lognormal",
        "exponential",
        "ties",
    ],
)
def test_closed_form_scan_picks_powerlaws_xmin(data):
    rng = np.random.default_rng(7)
    body = rng.lognormal(0.0, 1.0, 600)
    x = {
        "pareto 2.5 over a lognormal body": np.concatenate([body, pareto(2.5, 200, 8, 3.0)]),
        "pareto 3.5 over a lognormal body": np.concatenate([body, pareto(3.5, 200, 9, 3.0)]),
        "lognormal": body,
        "exponential": rng.exponential(1.0, 800),
        # duplicated sequences have identical influence: the empirical CDF steps by k/n there
        "ties": np.repeat(np.round(pareto(2.2, 300, 10), 2), 3),
    }[data]
    pos = np.sort(x)
    lo, hi = tails._candidates(pos, pos.size, 0.5, 20)
    xmin, alpha, dist = tails.scan_xmin(pos, lo, hi)
    ref_xmin, ref_alpha, ref_dist = _powerlaw_scan(pos, lo, hi)
    assert xmin == ref_xmin
    assert alpha == pytest.approx(ref_alpha, rel=1e-6)
    assert dist == pytest.approx(ref_dist, rel=1e-6)


def test_closed_form_scan_needs_two_candidates():
    assert tails.scan_xmin(np.array([1.0, 2.0, 3.0]), 2.5, 3.5) is None


def test_exponential_data_prefers_exponential():
    x = np.random.default_rng(2).exponential(1.0, 5000)
    fit = tails.fit_tail(x, tail_share=0.2, min_tail=50)
    assert fit["R_exponential"] < 0 and fit["p_exponential"] < 0.1
    assert fit["powerlaw_preferred"] is False
    assert fit["powerlaw_not_worse"] is False


def test_bootstrap_pvalue_separates_power_law_from_uniform():
    # With B = 20 the p-value resolves 0.05. Power-law data: the synthetic sets look like the
    # data, so p is not small; uniform data: no synthetic power law is as far off, so p = 0.
    good = tails.fit_tail(pareto(2.5, 2000, seed=3), 0.2, 30, n_bootstrap=20, seed=0)
    bad = tails.fit_tail(np.random.default_rng(4).uniform(1, 2, 2000), 0.2, 30, 20, seed=0)
    assert good["n_bootstrap"] == 20
    assert good["ks_pvalue"] >= 0.1
    assert bad["ks_pvalue"] <= 0.05


def test_short_tail_gives_nan_not_an_error():
    fit = tails.fit_tail(np.array([1.0, 2.0, -1.0]), tail_share=0.5, min_tail=10)
    assert math.isnan(fit["alpha"]) and fit["n_positive"] == 2
    assert fit["powerlaw_preferred"] is None


def test_ccdf_and_fitted_ccdf():
    x, c = tails.ccdf(np.array([3.0, -1.0, 1.0, 2.0, 4.0]))
    assert x.tolist() == [1, 2, 3, 4] and c.tolist() == [1.0, 0.75, 0.5, 0.25]
    fit = {"n_tail": 10, "n_positive": 40, "xmin": 2.0, "alpha": 3.0}
    grid = np.array([2.0, 4.0])
    # (10/40)·(x/2)^(−2): 0.25 at x_min, 0.0625 at 2·x_min
    np.testing.assert_allclose(tails.fitted_ccdf(fit, grid), [0.25, 0.0625], rtol=1e-12)


def test_sampler_draws_power_law_tail_and_data_body():
    rng = np.random.default_rng(5)
    pos = np.sort(np.concatenate([np.linspace(0.1, 0.9, 500), pareto(3.0, 500, seed=6)]))
    syn = tails.sample_powerlaw_tail_model(pos, 1.0, 3.0, rng)
    assert syn.size == pos.size
    body = syn[syn < 1.0]
    assert np.isin(body, pos).all()  # the body is resampled from the data below x_min
    tail = syn[syn >= 1.0]
    # MLE of α on the synthetic tail, α̂ = 1 + n / Σ log(x/x_min), SE ≈ 2/√500 ≈ 0.09
    alpha_hat = 1 + tail.size / np.log(tail).sum()
    assert alpha_hat == pytest.approx(3.0, abs=0.3)


def test_query_table_summary_and_verdicts():
    rng = np.random.default_rng(7)
    # model "a": power-law tails (plus negatives); model "b": exponential tails.
    per_copy = {
        ("a", "facts"): np.stack(
            [np.concatenate([pareto(2.5, 400, seed=s), -rng.exponential(1, 100)]) for s in range(3)]
        ),
        ("a", "quotes"): np.stack([np.concatenate([pareto(2.5, 450, seed=9), [1e4] * 50])]),
        ("b", "facts"): rng.exponential(1.0, (3, 500)),
        ("b", "quotes"): rng.exponential(1.0, (1, 500)),
    }
    table = tails.query_table(per_copy, 0.2, 20, bootstrap={("a", "facts", 0): 5})
    assert len(table) == 8 and set(table.model) == {"a", "b"}
    row = table.iloc[0]
    x = per_copy[("a", "facts")][0]
    assert row.max_per_copy == x.max() and row.top1_share == tails.top_share(x)
    assert row.n_half == tails.n_for_half(x) and row.n_bootstrap == 5
    summary = tails.summarise(table, ["b", "a"])
    assert list(summary.index) == ["b", "a"]
    a = table[table.model == "a"]
    assert summary.loc["a", "median_alpha"] == a.alpha.median()
    assert summary.loc["a", "max_per_copy_no_quotes"] == per_copy[("a", "facts")].max()
    assert summary.loc["a", "ks_pvalue_queries"] == 1
    assert summary.loc["b", "powerlaw_preferred_share"] == 0.0  # exponential data
    # two worker processes give the same table, row for row (each fit has its own seed)
    two = tails.query_table(per_copy, 0.2, 20, bootstrap={("a", "facts", 0): 5}, workers=2)
    pd.testing.assert_frame_equal(two, table)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        tails.query_table(per_copy, 0.2, 20, workers=0)


def _synthetic_table(n, preferred, alpha, top1, n_half, model="l"):
    """A `query_table`-like frame of n queries with the given per-query values."""
    return pd.DataFrame(
        {
            "model": model,
            "query_set": ["facts"] * (n - 2) + ["quotes"] * 2,
            "query": range(n),
            "alpha": alpha,
            "powerlaw_preferred": preferred,
            "top1_share": top1,
            "n_half": n_half,
            "max_per_copy": 0.5,
        }
    )


def _memo(shares, base):
    return pd.DataFrame(
        {"model": "l", "query_set": "quotes", "query": range(len(shares)), "share": shares,
         "base_rate": base}
    )  # fmt: skip


def test_findings_follow_the_numbers_with_negative_controls():
    n = 40
    paper_like = tails.findings(
        _synthetic_table(n, True, 2.5, 0.3, 50), _memo([1.0] * 8, 0.002), 2400, "l"
    )
    by = {f.name: f for f in paper_like}
    for name in ("power law", "exponents", "top 1%", "spread", "quotes memorised"):
        assert by[name].verdict == "agrees", (name, by[name].reason)
    assert by["1 nat per copy"].verdict == "not comparable"
    assert "2,083× larger here" in by["1 nat per copy"].reason  # 5,000,000 / 2,400
    assert by["quotes memorised"].base_rate == "0.2%"
    # negative control: the opposite of every claim
    opposite = {
        f.name: f
        for f in tails.findings(
            _synthetic_table(n, False, 1.2, 0.9, 1), _memo([0.0] * 8, 0.002), 2400, "l"
        )
    }
    for name in ("power law", "exponents", "top 1%", "spread"):
        assert opposite[name].verdict == "disagrees", (name, opposite[name].reason)
    # quotes whose top-k hold the saying only at its base rate: no difference, no test
    null_quotes = tails.findings(
        _synthetic_table(n, True, 2.5, 0.3, 50), _memo([0.002] * 8, 0.002), 2400, "l"
    )
    assert {f.name: f for f in null_quotes}["quotes memorised"].verdict == "inconclusive"
    # negative control: a coin flip per query is inconclusive, not "partly"
    coin = [i % 2 == 0 for i in range(n)]
    half = {f.name: f for f in tails.findings(
        _synthetic_table(n, coin, 2.5, 0.3, 50), _memo([1.0] * 8, 0.002), 2400, "l")}  # fmt: skip
    assert half["power law"].verdict == "inconclusive"
    assert "of 40 queries where it is preferred" in half["power law"].ours
    with pytest.raises(ValueError, match="no tail fits of model 'xl'"):
        tails.findings(_synthetic_table(n, True, 2.5, 0.3, 50), _memo([1.0], 0.1), 2400, "xl")


def test_memorisation_shares_and_representative_queries():
    frames = {
        "quotes": pd.DataFrame({"model": "l", "query": [0, 0, 1, 1], "rank": [1, 2, 1, 2],
                                "related": [True, True, True, False]}),
    }  # fmt: skip
    memo = tails.memorisation_shares(frames, 2, {"quotes": [2, 4]}, 100)
    assert memo.share.tolist() == [1.0, 0.5] and memo.base_rate.tolist() == [0.02, 0.04]
    summary = tails.memorisation_summary(memo, ["l"], n_boot=50)
    assert summary.loc[0, "share"] == 0.75 and summary.loc[0, "base_rate"] == pytest.approx(0.03)
    reps = tails.representative_queries({"facts": [5, 6], "quotes": [9]}, 3)
    assert reps == [("facts", 0), ("quotes", 0), ("facts", 1)]
