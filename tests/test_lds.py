"""LDS: exact influence on linear regression predicts retraining; random scores do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence.lds import draw_subsets, lds, retrain_measurements


def _problem(n=200, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    xq = rng.normal(size=(6, d))
    yq = xq @ rng.normal(size=d)  # queries off the training distribution's targets
    return x, y, xq, yq


def _fit(x, y, lam=1e-3):
    # Least squares with J(θ) = (1/|S|) Σ ½(xᵢᵀθ − yᵢ)² + (λ/2)‖θ‖².
    n = len(x)
    return np.linalg.solve(x.T @ x / n + lam * np.eye(x.shape[1]), x.T @ y / n)


def _exact_scores(x, y, xq, yq, lam=1e-3):
    theta = _fit(x, y, lam)
    g = x.T @ x / len(x) + lam * np.eye(x.shape[1])  # Gauss–Newton = Hessian here
    grad_train = (x @ theta - y)[:, None] * x  # ∇L(z_i) [N, d]
    grad_query = (xq @ theta - yq)[:, None] * xq  # ∇m_q, m_q = ½(x_qᵀθ − y_q)²
    return grad_query @ np.linalg.solve(g, grad_train.T)  # [Q, N]


def _retrain(x, y, xq, yq, masks):
    out = []
    for mk in masks:
        theta = _fit(x[mk], y[mk])
        out.append(0.5 * (xq @ theta - yq) ** 2)
    return np.asarray(out)


def test_lds_exact_influence_close_to_one_random_close_to_zero():
    x, y, xq, yq = _problem()
    masks = draw_subsets(len(x), num_subsets=100, alpha=0.5, seed=0)
    assert masks.shape == (100, 200) and (masks.sum(1) == 100).all()
    meas = _retrain(x, y, xq, yq, masks)
    scores = _exact_scores(x, y, xq, yq)
    exact = lds(scores, masks, meas)
    # Halving the data moves θ by O(1/√N): first order captures most of the ranking (measured
    # 0.98 here); 0.85 leaves room for the second-order terms.
    assert exact > 0.85, exact
    rng = np.random.default_rng(1)
    random = [lds(rng.normal(size=scores.shape), masks, meas) for _ in range(5)]
    # Mean of 5 × 6 queries × 100 subsets of Spearman correlations of independent data:
    # standard error ≈ 1/√(100·30) ≈ 0.02.
    assert abs(np.mean(random)) < 0.1, random
    per_q = lds(scores, [np.flatnonzero(m) for m in masks], meas, per_query=True)
    assert per_q.shape == (6,) and np.isclose(per_q.mean(), exact)
    # Sign convention: negated scores (positive = harmful) give the opposite correlation.
    assert lds(-scores, masks, meas) == pytest.approx(-exact)


def test_retrain_measurements_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path))
    x, y, xq, yq = _problem(n=40)
    masks = draw_subsets(40, num_subsets=4, seed=3)
    calls = []

    def train_fn(idx):
        calls.append(len(idx))
        return _fit(x[idx], y[idx])

    def measure_fn(theta):
        return torch.tensor(0.5 * (xq @ theta - yq) ** 2)

    first = retrain_measurements(
        train_fn, measure_fn, masks, cache={"recipe": "ols"}, progress=False
    )
    assert first.shape == (4, 6) and len(calls) == 4
    again = retrain_measurements(
        train_fn, measure_fn, masks, cache={"recipe": "ols"}, progress=False
    )
    assert len(calls) == 4 and np.array_equal(first, again)  # served from artifacts/
    assert list((tmp_path / "lds_retrains").iterdir())


def test_lds_bad_arguments():
    with pytest.raises(ValueError):
        draw_subsets(10, alpha=1.5)
    with pytest.raises(ValueError, match="measurements"):
        lds(np.zeros((2, 10)), draw_subsets(10, 5), np.zeros((5, 3)))


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    from influence.lds import spearman

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, 12).astype(float)  # many ties
        b = a + rng.integers(0, 3, 12)
        assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)


def test_core_imports_neither_the_study_nor_scipy():
    """`import influence` (and influence.lds) loads no module of influence.study, nor scipy,
    which only the study's extra installs."""
    import subprocess
    import sys

    code = (
        "import sys, influence, influence.lds, influence.tables; "
        "bad = [m for m in sys.modules if m.startswith(('influence.study', 'scipy'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
