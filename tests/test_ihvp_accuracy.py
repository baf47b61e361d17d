"""Notebook 01's findings on synthetic inputs whose answers are known, and its per-query costs
and reference checks on a tiny MLP."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import influence as inf
from influence.study import ihvp_accuracy as ia

SETTINGS = ("mlp_regression", "mlp_classification")


def correlations(pearson: dict[str, np.ndarray], ground_truth: bool = True) -> pd.DataFrame:
    """The `vs_pbrf` frame: per estimator one Pearson per (setting, query), 10 queries each."""
    rows = []
    for est, values in pearson.items():
        for i, v in enumerate(values):
            setting = SETTINGS[i % 2]
            rows.append(
                {
                    "query": i // 2,
                    "pearson": float(v),
                    "spearman": float(v),
                    "setting": setting,
                    "estimator": est,
                    "ground_truth": ground_truth,
                }
            )
    return pd.DataFrame(rows)


def costs(ratio: np.ndarray) -> pd.DataFrame:
    """The `query_costs` frame (with a setting column): LiSSA costs `ratio` × EK-FAC's."""
    rows = []
    for i, r in enumerate(ratio):
        base = {"setting": SETTINGS[i % 2], "query": i // 2}
        rows.append({**base, "estimator": "ekfac", "cost_s": 0.01})
        rows.append({**base, "estimator": "lissa", "cost_s": 0.01 * float(r)})
    return pd.DataFrame(rows)


def by_name(found):
    return {f.name: f for f in found}


N = 20
RNG = np.random.default_rng(0)
NOISE = RNG.normal(0, 0.01, size=N)


def test_the_papers_picture_agrees():
    # EK-FAC 0.9, LiSSA 0.92, dot product 0.4; LiSSA 30× EK-FAC's cost.
    pearson = {
        "identity": 0.4 + NOISE,
        "ekfac": 0.9 + RNG.normal(0, 0.01, N),
        "lissa": 0.92 + RNG.normal(0, 0.01, N),
        "kfac": 0.88 + NOISE,
        "diagonal": 0.5 + NOISE,
    }
    found = by_name(ia.findings(correlations(pearson), costs(30 * (1 + 0.1 * RNG.random(N)))))
    assert {f.verdict for f in found.values()} == {"agrees"}, found
    assert found["EK-FAC above the dot product"].estimate == pytest.approx(0.5, abs=0.02)
    assert found["EK-FAC competitive"].estimate == pytest.approx(-0.02 + 0.05, abs=0.01)
    assert found["EK-FAC cheaper"].estimate == pytest.approx(np.log10(31.5), abs=0.05)
    assert "×" in found["EK-FAC cheaper"].ours


def test_the_opposite_picture_disagrees():
    # The dot product far above both, EK-FAC 0.3 below LiSSA and 30× more expensive.
    pearson = {
        "identity": 0.9 + NOISE,
        "ekfac": 0.3 + RNG.normal(0, 0.01, N),
        "lissa": 0.6 + RNG.normal(0, 0.01, N),
    }
    found = ia.findings(correlations(pearson), costs(np.full(N, 1 / 30) * (1 + NOISE)))
    assert [f.verdict for f in found] == ["disagrees"] * 4, found


def test_negative_control_no_difference_is_inconclusive():
    # Every estimator the same up to symmetric noise, and equal costs up to noise: no claim
    # holds and none is refuted (EK-FAC − LiSSA + margin is significant but the margin rule
    # alone must not make equal estimators "competitive" when they are coin flips apart).
    rng = np.random.default_rng(3)
    same = 0.7 + rng.normal(0, 0.02, N)
    pearson = {"identity": same + rng.normal(0, 0.3, N), "ekfac": same, "lissa": same}
    pearson["lissa"] = same + rng.normal(0, 0.3, N)
    found = by_name(ia.findings(correlations(pearson), costs(np.exp(rng.normal(0, 0.3, N)))))
    for name in ("EK-FAC above the dot product", "LiSSA above the dot product", "EK-FAC cheaper"):
        assert found[name].verdict == "inconclusive", found[name]
    assert found["EK-FAC competitive"].verdict == "inconclusive", found["EK-FAC competitive"]


def test_too_few_queries_are_inconclusive_and_say_so():
    pearson = {"identity": np.full(4, 0.2), "ekfac": np.full(4, 0.9), "lissa": np.full(4, 0.9)}
    found = by_name(ia.findings(correlations(pearson), costs(np.full(4, 30.0))))
    f = found["EK-FAC above the dot product"]
    assert f.verdict == "inconclusive"
    assert "no test can reach p < 0.05" in f.reason


def test_an_unconverged_pbrf_is_not_ground_truth():
    pearson = {"identity": 0.4 + NOISE, "ekfac": 0.9 + NOISE, "lissa": 0.92 + NOISE}
    found = by_name(ia.findings(correlations(pearson, ground_truth=False), costs(np.full(N, 30))))
    for name in ("EK-FAC above the dot product", "LiSSA above the dot product"):
        assert found[name].verdict == "not comparable"
        assert "ground truth" in found[name].reason
    assert found["EK-FAC competitive"].verdict == "not comparable"
    assert found["EK-FAC cheaper"].verdict == "agrees"  # the cost needs no ground truth


def test_only_ground_truth_settings_count():
    # Regression's PBRF converged, classification's did not: classification, where the dot
    # product would win, is left out.
    pearson = {"identity": 0.4 + NOISE, "ekfac": 0.9 + NOISE, "lissa": 0.92 + NOISE}
    frame = correlations(pearson)
    frame["ground_truth"] = frame.setting == "mlp_regression"
    frame.loc[(frame.setting == "mlp_classification") & (frame.estimator == "identity"),
              "pearson"] = 0.99  # fmt: skip
    found = by_name(ia.findings(frame, costs(np.full(N, 30))))
    f = found["EK-FAC above the dot product"]
    assert f.verdict == "agrees" and "over 10 queries" in f.test


# -- per-query costs and reference checks on a tiny MLP -------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)).tanh()
    task = inf.RegressionTask()
    model = ia.train_mlp(task, x, y, n_out=1, hidden=4, activation="tanh", steps=50, lr=0.05,
                         weight_decay=0.01, seed=0)  # fmt: skip
    train = torch.utils.data.TensorDataset(x, y)
    queries = torch.utils.data.TensorDataset(x[:3] + 0.1, y[:3])
    # 100 × 'auto': LiSSA's rate 1 − λ_min/s is then fast enough to converge in the test.
    lam = {
        k: 100 * v for k, v in inf.EKFAC().fit(model, task, train, progress=False).damping_.items()
    }
    return model, task, train, queries, lam


def test_query_costs_residuals_against_the_exact_damped_solve(tiny):
    model, task, train, queries, lam = tiny
    deep = ia.query_costs(model, task, train, queries, lam,
                          lissa={"depth": 3000, "batch_size": 40}, batch_size=64)  # fmt: skip
    shallow = ia.query_costs(model, task, train, queries, lam,
                             lissa={"depth": 2, "batch_size": 40}, batch_size=64)  # fmt: skip
    assert set(deep.estimator) == {"ekfac", "lissa"} and len(deep) == 6
    assert (deep.cost_s >= deep.solve_s).all() and (deep.cost_s > 0).all()
    lissa = deep[deep.estimator == "lissa"].residual
    # Full-batch LiSSA run long enough converges to (G + Λ)⁻¹ g; two steps do not.
    assert lissa.max() < 1e-6
    assert shallow[shallow.estimator == "lissa"].residual.min() > 1e-2
    # EK-FAC is block-diagonal: on a 2-hidden-layer MLP it cannot solve the full problem.
    assert deep[deep.estimator == "ekfac"].residual.min() > 1e-6


def _result(converged: list[bool]) -> ia.SettingResult:
    q, n = 2, 8
    scores = {e: torch.randn(q, n, dtype=torch.float64) for e in (*ia.ESTIMATORS, "cg")}
    info = {"converged": converged, "relative_gradient": [(1e-6, 1e-6)] * len(converged)}
    cost = pd.DataFrame({"estimator": ["ekfac", "lissa"], "residual": [0.1, 1e-3]})
    return ia.SettingResult(
        "s", scores, {}, np.arange(len(converged)), torch.randn(q, len(converged)), info,
        meta={"cg_iterations": 5, "cg_relative_residuals": [1e-9, 2e-9],
              "cg_converged": [True, False]},
        costs=cost,
    )  # fmt: skip


def test_reference_table_and_ground_truth_rule():
    good = _result([True] * 7 + [False] * 0)
    bad = _result([True] * 5 + [False] * 2)  # 71% < 90%
    table = ia.reference_table({"good": good, "bad": bad}).set_index("setting")
    assert table.loc["good", "pbrf_ground_truth"] and not table.loc["bad", "pbrf_ground_truth"]
    assert table.loc["bad", "pbrf_converged_share"] == pytest.approx(5 / 7)
    assert table.loc["good", "cg_converged_share"] == 0.5
    assert table.loc["good", "lissa_worst_residual"] == pytest.approx(1e-3)
    few = _result([True] * 4)  # every example converged, but fewer than MIN_POINTS
    assert not ia.pbrf_is_ground_truth(few)
    frame = ia.vs_pbrf({"bad": bad})
    assert not frame.ground_truth.any() and frame.pearson.notna().all()  # 5 converged points
