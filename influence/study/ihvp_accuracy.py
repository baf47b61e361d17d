"""Notebook 01 (RQ1): how well do cheap estimators of (G + λI)⁻¹ match CG, the PBRF and
retraining? Data, small MLPs with a fixed recipe, the experiment loop, the convergence of
every reference (`reference_table`), the per-query cost of EK-FAC and LiSSA (`query_costs`),
the paper's claims judged on the MLPs (`findings`) and the plots. The language models of the
suite are validated in `influence.study.lm_validation`.

Every estimator of one setting uses the SAME per-layer damping λ_ℓ (EK-FAC's 'auto' value,
0.1 × the mean eigenvalue of the layer's block), so that all of them, CG and the PBRF
approximate the same damped problem. An unconverged reference is not ground truth: a CG query
that misses its tolerance is left out of every comparison with CG, a PBRF training example whose
±ε solves miss theirs is left out of every comparison with the PBRF, and a setting whose PBRF
converged on fewer than `PBRF_MIN_CONVERGED` of its examples is left out of the findings.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.utils.data import TensorDataset

import influence as inf
from influence.cg import CG
from influence.gnvp import GaussNewton
from influence.gradients import flatten
from influence.lds import draw_subsets, lds, retrain_measurements
from influence.lissa import LiSSA
from influence.pbrf import pbrf_scores
from influence.scores import preconditioned_queries
from influence.study import stats, style
from influence.study.cache import artifacts_root
from influence.study.findings import Finding, judge, not_comparable
from influence.study.ranges import count, share

SECTION = "01_ihvp_accuracy"
# Notebook 01's preset block (issue 4). MLP settings: data split, model and training recipe,
# queries, LiSSA/CG/PBRF settings and LDS retrains; language_model: the suite's models on a
# subset of the corpus (MLP layers tracked, the paper's choice; `lm_validation` says what each
# setting does); damping_scales: the MLPs' damping sweep; threads: torch threads (None = all).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "mlp_regression": {
            "test_size": 100,
            "hidden": 16,
            "activation": "tanh",
            "steps": 200,
            "lr": 0.01,
            "weight_decay": 0.1,
            "n_queries": 3,
            "lissa": {"depth": 200, "batch_size": 32},
            "cg_tol": 1e-08,
            "batch_size": 4096,
            "n_pbrf": 8,
            "pbrf_tol": 1e-05,
            "pbrf_steps": 300,
            "lds_subsets": 10,
            "lds_alpha": 0.5,
        },
        "mlp_classification": {
            "test_size": 1297,
            "hidden": 16,
            "activation": "tanh",
            "steps": 200,
            "lr": 0.01,
            "weight_decay": 0.01,
            "n_queries": 3,
            "lissa": {"depth": 200, "batch_size": 32},
            "cg_tol": 1e-08,
            "batch_size": 4096,
            "n_pbrf": 4,
            "pbrf_tol": 1e-05,
            "pbrf_steps": 300,
            "lds_subsets": 10,
            "lds_alpha": 0.5,
        },
        "language_model": {
            "sizes": ["smallest"],
            "query_set": "facts",
            "n_queries": 2,
            "n_train": 24,
            "include_related": True,
            "scales": [0.1, 1.0, 10.0],
            "cg_tol": 1e-06,
            "cg_max_iter": 300,
            "batch_size": 32,
            "n_boot": 200,
            "lissa_sizes": ["smallest", "largest"],
            "lissa": {"depth": 50, "batch_size": 8, "repeats": 1},
            "dense_sizes": ["smallest"],
            "dense_max_params": 6000,
            "dense_n_train": 8,
            "pbrf_sizes": ["smallest"],
            "n_pbrf": 6,
            "pbrf_tol": 1e-05,
            "pbrf_steps": 300,
            "pbrf_preconditioner": "damping",
            "retrain_sizes": ["smallest"],
            "k_values": [1, 2],
            "retrain_top_k": 3,
            "retrain_top_pairs": 2,
            "retrain_max_top": 2,
            "retrain_random": 1,
            "retrain_null": 1,
            "insert_seed": 0,
            "retrain_identity_check": True,
        },
        "damping_scales": [0.1, 1.0, 10.0],
        "threads": 1,
    },
    "default": {
        "mlp_regression": {
            "test_size": 100,
            "hidden": 32,
            "activation": "tanh",
            "steps": 500,
            "lr": 0.01,
            "weight_decay": 0.1,
            "n_queries": 10,
            "lissa": {"depth": 2000, "batch_size": 32},
            "cg_tol": 1e-08,
            "batch_size": 4096,
            "n_pbrf": 300,
            "pbrf_tol": 1e-05,
            "pbrf_steps": 300,
            "lds_subsets": 50,
            "lds_alpha": 0.5,
        },
        "mlp_classification": {
            "test_size": 497,
            "hidden": 32,
            "activation": "tanh",
            "steps": 300,
            "lr": 0.01,
            "weight_decay": 0.01,
            "n_queries": 10,
            "lissa": {"depth": 2000, "batch_size": 32},
            "cg_tol": 1e-08,
            "batch_size": 4096,
            "n_pbrf": 200,
            "pbrf_tol": 1e-05,
            "pbrf_steps": 300,
            "lds_subsets": 50,
            "lds_alpha": 0.5,
        },
        "language_model": {
            "sizes": ["smallest"],
            "query_set": "facts",
            "n_queries": 8,
            "n_train": 256,
            "include_related": True,
            "scales": [1.0],
            "cg_tol": 1e-06,
            "cg_max_iter": 500,
            "batch_size": 32,
            "n_boot": 1000,
            "lissa_sizes": [],
            "lissa": {"depth": 50, "batch_size": 8, "repeats": 1},
            "dense_sizes": [],
            "dense_max_params": 6000,
            "dense_n_train": 8,
            "pbrf_sizes": [],
            "n_pbrf": 6,
            "pbrf_tol": 1e-05,
            "pbrf_steps": 300,
            "pbrf_preconditioner": "damping",
            "retrain_sizes": [],
            "k_values": [1, 2],
            "retrain_top_k": 3,
            "retrain_top_pairs": 2,
            "retrain_max_top": 2,
            "retrain_random": 1,
            "retrain_null": 1,
            "insert_seed": 0,
            "retrain_identity_check": True,
        },
        "damping_scales": [0.1, 1.0, 10.0],
        "threads": 1,
    },
    "large": {
        "mlp_regression": {
            "test_size": 100,
            "hidden": 128,
            "activation": "tanh",
            "steps": 1000,
            "lr": 0.01,
            "weight_decay": 0.1,
            "n_queries": 10,
            "lissa": {"depth": 5000, "batch_size": 32},
            "cg_tol": 1e-08,
            "batch_size": 4096,
            "n_pbrf": 500,
            "pbrf_tol": 1e-05,
            "pbrf_steps": 300,
            "lds_subsets": 100,
            "lds_alpha": 0.5,
        },
        "mlp_classification": {
            "test_size": 497,
            "hidden": 128,
            "activation": "tanh",
            "steps": 500,
            "lr": 0.01,
            "weight_decay": 0.01,
            "n_queries": 10,
            "lissa": {"depth": 5000, "batch_size": 32},
            "cg_tol": 1e-08,
            "batch_size": 4096,
            "n_pbrf": 500,
            "pbrf_tol": 1e-05,
            "pbrf_steps": 300,
            "lds_subsets": 100,
            "lds_alpha": 0.5,
        },
        "language_model": {
            "sizes": None,
            "query_set": "facts",
            "n_queries": 16,
            "n_train": 512,
            "include_related": True,
            "scales": [0.1, 1.0, 10.0],
            "cg_tol": 1e-06,
            "cg_max_iter": 2000,
            "batch_size": 32,
            "n_boot": 1000,
            "lissa_sizes": ["smallest", "largest"],
            "lissa": {"depth": 2000, "batch_size": 8, "repeats": 1},
            "dense_sizes": ["smallest"],
            "dense_max_params": 6000,
            "dense_n_train": 64,
            "pbrf_sizes": ["smallest"],
            "n_pbrf": 32,
            "pbrf_tol": 1e-05,
            "pbrf_steps": 1000,
            "pbrf_preconditioner": "damping",
            "retrain_sizes": ["smallest", "largest"],
            "k_values": [1, 2, 4],
            "retrain_top_k": 10,
            "retrain_top_pairs": 10,
            "retrain_max_top": 10,
            "retrain_random": 2,
            "retrain_null": 2,
            "insert_seed": 0,
            "retrain_identity_check": True,
        },
        "damping_scales": [0.01, 0.1, 1.0, 10.0],
        "threads": None,
    },
}
# The `validation` preset: `default`'s MLP settings, with the language-model validation at full
# size (issue 24): every size of the suite, three dampings, LiSSA at the smallest and largest
# size, the explicit-matrix check where the tracked parameters are few, the PBRF, and
# retraining at the smallest and largest size.
VALIDATION_LANGUAGE_MODEL: dict[str, Any] = {
    "sizes": None,
    "query_set": "facts",
    "n_queries": 8,
    "n_train": 256,
    "include_related": True,
    "scales": [0.1, 1.0, 10.0],
    "cg_tol": 1e-06,
    "cg_max_iter": 2000,
    "batch_size": 32,
    "n_boot": 1000,
    "lissa_sizes": ["smallest", "largest"],
    "lissa": {"depth": 1000, "batch_size": 8, "repeats": 1},
    "dense_sizes": ["smallest"],
    "dense_max_params": 6000,
    "dense_n_train": 64,
    "pbrf_sizes": ["smallest"],
    "n_pbrf": 32,
    "pbrf_tol": 1e-05,
    "pbrf_steps": 500,
    "pbrf_preconditioner": "damping",
    "retrain_sizes": ["smallest", "largest"],
    "k_values": [1, 2, 4],
    "retrain_top_k": 10,
    "retrain_top_pairs": 10,
    "retrain_max_top": 10,
    "retrain_random": 2,
    "retrain_null": 2,
    "insert_seed": 0,
    "retrain_identity_check": True,
}
PRESETS["validation"] = {
    **copy.deepcopy(PRESETS["default"]),
    "language_model": VALIDATION_LANGUAGE_MODEL,
}
_MLP = {
    "test_size": count(1, "held-out examples"),
    "hidden": count(1, "hidden units per layer"),
    "steps": count(1, "training steps"),
    "n_queries": count(1, "test queries"),
    "lissa.depth": count(1, "LiSSA recursion steps"),
    "lissa.batch_size": count(1, "examples per LiSSA minibatch"),
    "batch_size": count(1),
    "n_pbrf": count(1, "training examples given a PBRF"),
    "pbrf_steps": count(1, "L-BFGS steps per PBRF solve"),
    "lds_subsets": count(0, "retrained subsets for the LDS"),
    "lds_alpha": share("the share of the training set in each LDS subset"),
}
RANGES = {
    **{f"{s}.{k}": r for s in ("mlp_regression", "mlp_classification") for k, r in _MLP.items()},
    "language_model.n_queries": count(1, "queries per size"),
    "language_model.n_train": count(1, "corpus sequences in the subset S"),
    "language_model.cg_max_iter": count(1, "CG iterations"),
    "language_model.batch_size": count(1),
    "language_model.n_boot": count(1, "bootstrap resamples"),
    "language_model.n_pbrf": count(1, "sequences given a PBRF"),
    "language_model.pbrf_steps": count(1, "L-BFGS steps per PBRF solve"),
    "language_model.lissa.depth": count(1, "LiSSA recursion steps"),
}

ESTIMATORS = ("identity", "diagonal", "kfac", "ekfac", "lissa")
LABELS = {
    "identity": "dot product",
    "diagonal": "diagonal",
    "kfac": "K-FAC",
    "ekfac": "EK-FAC",
    "lissa": "LiSSA",
    "cg": "CG",
}


# -- data and models ------------------------------------------------------------------------
@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train(self, idx=None) -> TensorDataset:
        if idx is None:
            return TensorDataset(self.x_train, self.y_train)
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return TensorDataset(self.x_train[idx], self.y_train[idx])

    def test(self, idx=None) -> TensorDataset:
        if idx is None:
            return TensorDataset(self.x_test, self.y_test)
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return TensorDataset(self.x_test[idx], self.y_test[idx])


def load_split(kind: str, test_size: int, seed: int = 0) -> Split:
    """scikit-learn's bundled data (no download), standardised with training statistics.

    kind 'regression': diabetes (442 × 10, target standardised); 'classification': digits
    (1797 × 64 pixels, 10 classes).
    """
    from sklearn.datasets import load_diabetes, load_digits

    if kind == "regression":
        x, y = load_diabetes(return_X_y=True)
    elif kind == "classification":
        x, y = load_digits(return_X_y=True)
    else:
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    test, train = perm[:test_size], perm[test_size:]
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
    x = (x - mu) / sd
    xt = torch.tensor(x, dtype=torch.float64)
    if kind == "regression":
        y = (y - y[train].mean()) / y[train].std()
        yt = torch.tensor(y, dtype=torch.float64).unsqueeze(1)
    else:
        yt = torch.tensor(y, dtype=torch.long)
    return Split(xt[train], yt[train], xt[test], yt[test])


def make_mlp(n_in: int, n_out: int, hidden: int, activation: str, seed: int) -> nn.Module:
    """Two hidden layers (the paper's MLPs), float64."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(n_in, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, n_out)
    ).double()


def train_mlp(
    task: inf.Task,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_out: int,
    hidden: int,
    activation: str,
    steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> nn.Module:
    """Fixed recipe: full-batch Adam on the mean loss plus (wd/2)‖θ‖², from `seed`'s init."""
    model = make_mlp(x.shape[1], n_out, hidden, activation, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(x)
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss(model, (x, y)) / n
        loss = loss + 0.5 * weight_decay * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model.eval()


# -- the experiment -------------------------------------------------------------------------
@dataclass
class SettingResult:
    name: str
    scores: dict[str, torch.Tensor]  # estimator -> [Q, N] (all training examples)
    seconds: dict[str, float]
    train_indices: np.ndarray  # the examples compared with the PBRF
    pbrf: torch.Tensor | None  # [Q, M]
    pbrf_info: dict = field(default_factory=dict)
    damping: dict = field(default_factory=dict)
    lds: dict[str, float] = field(default_factory=dict)
    lds_per_query: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    costs: pd.DataFrame = field(default_factory=pd.DataFrame)  # `query_costs`


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def score_all(
    model,
    task,
    train,
    queries,
    *,
    lissa: dict,
    cg_tol: float,
    batch_size: int,
    damping_scale: float = 1.0,
    estimators=ESTIMATORS,
    include_cg: bool = True,
    include_block_cg: bool = False,
    fitted: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float], dict]:
    """Fit every estimator and score all training examples on all queries.

    EK-FAC is fitted first; its per-layer 'auto' damping (× `damping_scale`) is then given to
    every other estimator and to CG. EK-FAC at that damping and K-FAC are derived from this one
    fit (`with_damping`, `KFAC.from_ekfac`: the same factors a refit gives, without its passes);
    K-FAC's seconds therefore count no fitting pass of its own. `fitted` may hold an EK-FAC
    ("ekfac") and a Diagonal ("diagonal") fitted before, reused at each damping (the sweep).
    With `include_block_cg`, also the exact inverse of the block-diagonal part of G
    ("cg_block"): the best any block-diagonal estimator can do.
    Returns scores [Q, N], seconds (fit + scores), damping, and solver diagnostics.
    """
    kw = dict(batch_size=batch_size, progress=False)
    scores, seconds, diag = {}, {}, {}
    fitted = fitted or {}

    def run(est, fit=True):
        if fit:
            est.fit(model, task, train, **kw)
        return inf.pairwise_scores(model, task, est, queries, train, **kw)

    if "ekfac" in fitted:
        ek_auto, ek_seconds = fitted["ekfac"], 0.0
    else:
        ek_auto, ek_seconds = _timed(lambda: inf.EKFAC().fit(model, task, train, **kw))
    lam = {n: v * damping_scale for n, v in ek_auto.damping_.items()}
    makers = {
        "identity": lambda: inf.Identity(),
        "diagonal": lambda: inf.Diagonal(damping=lam),
        "lissa": lambda: LiSSA(damping=lam, **lissa),
    }
    derived = {
        "kfac": lambda: inf.KFAC.from_ekfac(ek_auto, damping=lam),
        "ekfac": lambda: ek_auto.with_damping(lam),
    }
    if "diagonal" in fitted:
        derived["diagonal"] = lambda: fitted["diagonal"].with_damping(lam)
    for name in estimators:
        if name in derived:
            est, t_derive = _timed(derived[name])
            scores[name], t = _timed(lambda est=est: run(est, fit=False))
            seconds[name] = t_derive + t + (ek_seconds if name == "ekfac" else 0.0)
            continue
        est = makers[name]()
        scores[name], seconds[name] = _timed(lambda est=est: run(est))
        if name == "lissa":
            diag["lissa_scale"] = est.scale_
    if include_cg:
        # Not strict: a query whose solve misses `cg_tol` is recorded (and excluded by the
        # comparisons with CG) rather than stopping the notebook.
        cg = CG(damping=lam, tol=cg_tol, max_iter=5000, strict=False)
        scores["cg"], seconds["cg"] = _timed(lambda: run(cg))
        solve = cg.meta_["solves"][-1]
        diag["cg_iterations"] = solve["iterations"]
        diag["cg_relative_residuals"] = list(solve["relative_residuals"])
        diag["cg_converged"] = list(solve["converged"])
    if include_block_cg:
        block = CG(damping=lam, tol=cg_tol, max_iter=5000, block_diagonal=True, strict=False)
        scores["cg_block"], seconds["cg_block"] = _timed(lambda: run(block))
        # one right-hand side per (layer, query): a query converged if all its layers did
        per_rhs = np.asarray(block.meta_["solves"][-1]["converged"], dtype=bool)
        diag["cg_block_converged"] = per_rhs.reshape(-1, len(queries)).all(0).tolist()
    return scores, seconds, lam, diag


def query_costs(
    model, task, train, queries, lam: dict, *, lissa: dict, batch_size: int
) -> pd.DataFrame:
    """Per query, EK-FAC's and LiSSA's cost of its inverse-GNVP (G + Λ)⁻¹ ∇m_q and how far it
    is from solving the full damped problem.

    cost_s: CPU seconds (`time.process_time`, this process) of the query's own solve plus the
    estimator's fit shared over the Q queries (EK-FAC: its covariance and eigenvalue passes;
    LiSSA: the power iteration for its scale). The scoring against the training gradients is the
    same for both and not counted. residual: ‖(G + Λ)x − ∇m_q‖ / ‖∇m_q‖ with the full G, the
    convergence of LiSSA's recursion (and, for EK-FAC, what its block-diagonal Kronecker
    approximation leaves). Rows: setting-free (query, estimator, fit_s, solve_s, cost_s,
    residual)."""
    kw = dict(batch_size=batch_size, progress=False)
    makers = {"ekfac": lambda: inf.EKFAC(damping=lam), "lissa": lambda: LiSSA(damping=lam, **lissa)}
    op = GaussNewton(model, task, train, damping=lam, batch_size=batch_size)
    n_q = len(queries)
    rows = []
    for name, make in makers.items():
        start = time.process_time()
        est = make().fit(model, task, train, **kw)
        fit_s = time.process_time() - start
        for q in range(n_q):
            one = torch.utils.data.Subset(queries, [q])
            start = time.process_time()
            x = preconditioned_queries(model, task, est, one, batch_size=batch_size)
            solve_s = time.process_time() - start
            g = preconditioned_queries(model, task, inf.Identity().fit(model, task, one), one)
            x_flat = flatten(x, est.layers_).double()
            g_flat = flatten(g, est.layers_).double()
            r = op.matvec(x_flat) - g_flat
            rows.append(
                {
                    "query": q,
                    "estimator": name,
                    "fit_s": fit_s / n_q,
                    "solve_s": solve_s,
                    "cost_s": fit_s / n_q + solve_s,
                    "residual": float(r.norm() / g_flat.norm()),
                }
            )
    return pd.DataFrame(rows)


def pbrf_converged(res: SettingResult) -> np.ndarray:
    """Which of the PBRF's training examples met the tolerance in both ±ε solves."""
    return np.asarray(res.pbrf_info["converged"], dtype=bool)


def reference_table(results: dict) -> pd.DataFrame:
    """Per setting, how well each reference solved its problem: CG's iterations, worst relative
    residual and converged share of queries; the PBRF's converged share of training examples
    and whether it counts as ground truth (share ≥ `PBRF_MIN_CONVERGED` and at least
    `MIN_POINTS` converged examples); LiSSA's median and worst residual (`query_costs`)."""
    rows = []
    for name, res in results.items():
        conv = pbrf_converged(res)
        lissa = res.costs[res.costs.estimator == "lissa"].residual
        ekfac = res.costs[res.costs.estimator == "ekfac"].residual
        rows.append(
            {
                "setting": name,
                "cg_iterations": res.meta["cg_iterations"],
                "cg_worst_residual": max(res.meta["cg_relative_residuals"]),
                "cg_converged_share": float(np.mean(res.meta["cg_converged"])),
                "pbrf_examples": len(conv),
                "pbrf_converged_share": float(conv.mean()),
                "pbrf_worst_relative_gradient": float(np.max(res.pbrf_info["relative_gradient"])),
                "pbrf_ground_truth": pbrf_is_ground_truth(res),
                "lissa_median_residual": float(lissa.median()),
                "lissa_worst_residual": float(lissa.max()),
                "ekfac_median_residual": float(ekfac.median()),
            }
        )
    return pd.DataFrame(rows)


def pbrf_is_ground_truth(res: SettingResult) -> bool:
    conv = pbrf_converged(res)
    return bool(conv.mean() >= PBRF_MIN_CONVERGED and conv.sum() >= MIN_POINTS)


def vs_pbrf(results: dict) -> pd.DataFrame:
    """Per setting, query and estimator: Pearson correlation with the PBRF over the training
    examples whose PBRF solves converged, and whether the setting's PBRF is ground truth
    (`pbrf_is_ground_truth`). The input of `findings`."""
    frames = []
    for name, res in results.items():
        conv = pbrf_converged(res)
        cols = res.train_indices[conv]
        truth = res.pbrf[:, conv]
        for est in ESTIMATORS:
            df = per_query_correlations(res.scores[est][:, cols], truth)
            df["setting"], df["estimator"] = name, est
            df["ground_truth"] = pbrf_is_ground_truth(res)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def block_diagonal_ceiling(results: dict) -> pd.DataFrame:
    """Mean Pearson correlation over queries, per setting that has block-diagonal CG: how far
    the exact block-diagonal inverse is from the full one (the ceiling of every block-diagonal
    estimator), and how close K-FAC and EK-FAC come to each."""
    rows = []
    for name, res in results.items():
        if "cg_block" not in res.scores:
            continue
        full, block = res.scores["cg"], res.scores["cg_block"]
        # only queries whose full and block-diagonal CG solves both converged
        both = np.logical_and(res.meta["cg_converged"], res.meta["cg_block_converged"])

        def r(a, b, both=both):
            return float(per_query_correlations(a, b).pearson[both].mean())

        rows.append(
            {
                "setting": name,
                "block-diagonal CG vs CG": r(block, full),
                "EK-FAC vs CG": r(res.scores["ekfac"], full),
                "EK-FAC vs block-diagonal CG": r(res.scores["ekfac"], block),
                "K-FAC vs block-diagonal CG": r(res.scores["kfac"], block),
            }
        )
    return pd.DataFrame(rows).set_index("setting")


# Fewer points than this and a correlation says nothing (over two points it is ±1 by
# construction): such correlations are NaN, and the report prints "n/a".
MIN_POINTS = 5


def fmt(value: float | None, digits: int = 2) -> str:
    """A correlation for the reader: "-" where none was asked for (e.g. no LDS), "n/a" where
    it was not computed (too few points)."""
    if value is None:
        return "-"
    if value != value:
        return f"n/a (< {MIN_POINTS} points)"
    return f"{value:.{digits}f}"


def per_query_correlations(pred: torch.Tensor, truth: torch.Tensor) -> pd.DataFrame:
    """Pearson and Spearman correlation per query (rows) between two [Q, M] score matrices;
    NaN when M < MIN_POINTS."""
    rows = []
    for q in range(truth.shape[0]):
        a, b = pred[q].double().numpy(), truth[q].double().numpy()
        if len(a) < MIN_POINTS:
            rows.append({"query": q, "pearson": float("nan"), "spearman": float("nan")})
            continue
        rows.append(
            {"query": q, "pearson": pearsonr(a, b).statistic, "spearman": spearmanr(a, b).statistic}
        )
    return pd.DataFrame(rows)


def correlation_table(res: SettingResult) -> pd.DataFrame:
    """Tidy table: setting, estimator, ground truth, query, pearson, spearman."""
    frames = []
    idx = res.train_indices
    # CG is compared over every training example, the PBRF over the examples it was run on
    # whose solves converged (an unconverged PBRF is no ground truth).
    truths = {"CG": (res.scores["cg"], slice(None))}
    if res.pbrf is not None:
        conv = pbrf_converged(res)
        truths["PBRF"] = (res.pbrf[:, conv], idx[conv])
    for est in [e for e in ESTIMATORS if e in res.scores] + ["cg"]:
        for gt, (truth, cols) in truths.items():
            if est == "cg" and gt == "CG":
                continue
            df = per_query_correlations(res.scores[est][:, cols], truth)
            if gt == "CG":  # a query whose CG solve missed its tolerance has no reference
                df = df[np.asarray(res.meta["cg_converged"], dtype=bool)]
            df["estimator"], df["truth"], df["setting"] = est, gt, res.name
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def summary(res: SettingResult) -> dict[str, dict[str, float | None]]:
    """Per estimator: mean correlations over queries, LDS and seconds (for the report)."""
    table = correlation_table(res)
    out = {}
    for est in [e for e in ESTIMATORS if e in res.scores] + ["cg"]:
        t = table[table.estimator == est]

        def mean(truth, col, t=t):
            v = t[t.truth == truth][col]
            return None if v.empty else float(v.mean())

        out[est] = {
            "pearson_vs_pbrf": mean("PBRF", "pearson"),
            "pearson_vs_cg": 1.0 if est == "cg" else mean("CG", "pearson"),
            "spearman_vs_pbrf": mean("PBRF", "spearman"),
            "spearman_vs_cg": 1.0 if est == "cg" else mean("CG", "spearman"),
            "lds": res.lds.get(est),
            "seconds": float(res.seconds[est]),
        }
    return out


def _score_against_pbrf(
    name, model, task, train, queries, c, rng, *, pbrf_batch_size, include_block_cg, progress
) -> SettingResult:
    """Every estimator's scores, then the PBRF on `n_pbrf` training examples drawn from `rng`."""
    scores, seconds, lam, diag = score_all(
        model,
        task,
        train,
        queries,
        lissa=c["lissa"],
        cg_tol=c["cg_tol"],
        batch_size=c["batch_size"],
        include_block_cg=include_block_cg,
    )
    n = len(train)
    train_idx = np.sort(rng.choice(n, size=min(c["n_pbrf"], n), replace=False))
    pbrf, info = pbrf_scores(
        model,
        task,
        queries,
        train,
        train_idx,
        damping=lam,
        tol=c["pbrf_tol"],
        max_steps=c["pbrf_steps"],
        batch_size=pbrf_batch_size,
        progress=progress,
        return_info=True,
    )
    costs = query_costs(
        model, task, train, queries, lam, lissa=c["lissa"], batch_size=c["batch_size"]
    )
    return SettingResult(name, scores, seconds, train_idx, pbrf, info, lam, meta=diag, costs=costs)


def run_mlp_setting(
    name: str, kind: str, cfg: dict, *, seed: int = 0, progress: bool = True
) -> SettingResult:
    """The whole RQ1 pipeline on one scikit-learn data set: train, score, PBRF, LDS."""
    c = cfg[name]
    split = load_split(kind, c["test_size"], seed)
    task = inf.RegressionTask() if kind == "regression" else inf.ClassificationTask()
    n_out = 1 if kind == "regression" else 10
    recipe = dict(
        n_out=n_out,
        hidden=c["hidden"],
        activation=c["activation"],
        steps=c["steps"],
        lr=c["lr"],
        weight_decay=c["weight_decay"],
    )
    model = train_mlp(task, split.x_train, split.y_train, seed=seed, **recipe)
    train = split.train()
    n = len(train)
    rng = np.random.default_rng(seed + 1)
    query_idx = rng.choice(len(split.x_test), size=c["n_queries"], replace=False)
    queries = split.test(query_idx)
    res = _score_against_pbrf(
        name,
        model,
        task,
        train,
        queries,
        c,
        rng,
        pbrf_batch_size=n,
        include_block_cg=True,
        progress=progress,
    )
    with torch.no_grad():
        res.meta["train_loss"] = float(task.loss(model, (split.x_train, split.y_train)) / n)
        res.meta["test_loss"] = float(
            task.loss(model, (split.x_test, split.y_test)) / len(split.x_test)
        )
    if c["lds_subsets"]:
        masks = draw_subsets(n, c["lds_subsets"], alpha=c["lds_alpha"], seed=seed + 2)

        def train_fn(idx):
            return train_mlp(task, split.x_train[idx], split.y_train[idx], seed=seed, **recipe)

        def measure_fn(m):
            with torch.no_grad():
                return torch.stack(
                    [
                        task.measurement(m, (xq[None], yq[None]))
                        for xq, yq in zip(*queries.tensors, strict=True)
                    ]
                )

        key = {
            "setting": name,
            "kind": kind,
            "recipe": recipe,
            "seed": seed,
            "test_size": c["test_size"],
            "queries": query_idx.tolist(),
            "version": 1,
        }
        meas = retrain_measurements(
            train_fn,
            measure_fn,
            masks,
            cache=key,
            cache_dir=artifacts_root(),
            num_examples=n,
            progress=progress,
        )
        for est, s in res.scores.items():
            res.lds_per_query[est] = lds(s, masks, meas, per_query=True)
            res.lds[est] = float(np.nanmean(res.lds_per_query[est]))
        res.meta["lds_subsets"] = int(c["lds_subsets"])
    return res


def damping_sweep(
    model,
    task,
    train,
    queries,
    scales,
    *,
    cg_tol: float,
    batch_size: int,
    estimators=("identity", "diagonal", "kfac", "ekfac"),
) -> pd.DataFrame:
    """Pearson correlation with CG at each damping (× EK-FAC's 'auto' λ), mean over the queries
    whose CG solve converged (share and worst residual in the row); estimator and CG always
    share the damping. EK-FAC and the diagonal are fitted once and
    only re-damped at each scale (K-FAC derived from the EK-FAC fit)."""
    kw = dict(batch_size=batch_size, progress=False)
    fitted = {"ekfac": inf.EKFAC().fit(model, task, train, **kw)}
    if "diagonal" in estimators:
        # Any positive damping: it is replaced at each scale by `with_damping`.
        fitted["diagonal"] = inf.Diagonal(damping=1.0).fit(model, task, train, **kw)
    rows = []
    for s in scales:
        scores, _, _, diag = score_all(
            model,
            task,
            train,
            queries,
            lissa={},
            cg_tol=cg_tol,
            batch_size=batch_size,
            damping_scale=s,
            estimators=estimators,
            fitted=fitted,
        )
        converged = np.asarray(diag["cg_converged"], dtype=bool)
        for est in estimators:
            df = per_query_correlations(scores[est], scores["cg"])[converged]
            rows.append(
                {
                    "scale": s,
                    "estimator": est,
                    "pearson": df.pearson.mean(),
                    "spearman": df.spearman.mean(),
                    "cg_converged_share": float(converged.mean()),
                    "cg_worst_residual": max(diag["cg_relative_residuals"]),
                }
            )
    return pd.DataFrame(rows)


# -- findings (PAPER.md RQ1, §5.1, Figs. 6-7) -------------------------------------------------
# Thresholds of the findings, stated with them on the page.
FAR_BELOW = 0.2  # "far below": an estimator's Pearson with the PBRF at least 0.2 above the dot's
COMPETITIVE_MARGIN = 0.05  # "competitive": EK-FAC's Pearson at most 0.05 below LiSSA's
COST_RATIO = 10.0  # "an order of magnitude cheaper": LiSSA's cost per query ≥ 10× EK-FAC's
# The PBRF is ground truth for a setting only where at least this share of its training
# examples converged (both ±ε solves within `pbrf_tol`, the issue's ≥ 90%).
PBRF_MIN_CONVERGED = 0.9
# Findings that rest on timings: their numbers differ from run to run (not checked by nbval).
TIMED_FINDINGS = ("EK-FAC cheaper",)


def _ratio(x: float) -> str:
    """A log10 cost ratio for the reader: "42×"."""
    return f"{stats.format_number(10**x)}×" if np.isfinite(x) else "n/a"


def _paired(wide: pd.DataFrame, a: str, b: str) -> pd.Series:
    """a − b per (setting, query) where both have a value (empty if either is missing)."""
    if not {a, b} <= set(wide.columns):
        return pd.Series(dtype=float)
    return (wide[a] - wide[b]).dropna()


def findings(
    correlations: pd.DataFrame, costs: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0
) -> list[Finding]:
    """The paper's RQ1 claims on the MLPs. `correlations` (from `vs_pbrf`): setting, query,
    estimator, pearson, ground_truth; only settings whose PBRF is ground truth count, paired
    per (setting, query). `costs` (from `query_costs`, with a setting column): per query the
    CPU cost of EK-FAC's and LiSSA's inverse-GNVP. Paired differences are tested with the
    Wilcoxon signed-rank test over queries, intervals by the percentile bootstrap."""
    truth = correlations[correlations.ground_truth.astype(bool)]
    wide = truth.pivot_table(index=["setting", "query"], columns="estimator", values="pearson")
    boot = {"n_boot": n_boot, "seed": seed}
    out: list[Finding] = []
    pairs = (
        ("EK-FAC above the dot product", "ekfac", "identity"),
        ("LiSSA above the dot product", "lissa", "identity"),
    )
    no_truth = (
        f"no query of {', '.join(sorted(set(correlations.setting)))} has a correlation with a "
        f"PBRF that is ground truth (≥ {PBRF_MIN_CONVERGED:.0%} of its training examples "
        f"converged, and at least {MIN_POINTS} of them)"
    )
    for name, est, base in pairs:
        claim = f"{LABELS[est]} correlates with the PBRF far better than the gradient dot product"
        d = (
            (wide[est] - wide[base]).dropna()
            if {est, base} <= set(wide)
            else pd.Series(dtype=float)
        )
        if d.empty:
            out.append(not_comparable(name, claim, "far above", ours="-", reason=no_truth))
            continue
        out.append(
            judge(
                name,
                claim,
                "far above (Figs. 6-7)",
                effect=stats.bootstrap(d.to_numpy(), **boot),
                test=stats.wilcoxon(d.to_numpy()),
                expected=+1,
                threshold=FAR_BELOW,
                what=f"Pearson of {LABELS[est]} − dot product",
            )
        )
    claim = "EK-FAC is competitive with LiSSA against the PBRF"
    d = _paired(wide, "ekfac", "lissa")
    if d.empty:
        out.append(
            not_comparable("EK-FAC competitive", claim, "competitive", ours="-", reason=no_truth)
        )
    else:
        # Non-inferiority: agrees when EK-FAC − LiSSA is significantly above −margin.
        shifted = d.to_numpy() + COMPETITIVE_MARGIN
        out.append(
            judge(
                "EK-FAC competitive",
                claim,
                "competitive (Figs. 6-7)",
                effect=stats.bootstrap(shifted, **boot),
                test=stats.wilcoxon(shifted),
                expected=+1,
                threshold=0.0,
                what=f"EK-FAC − LiSSA + {COMPETITIVE_MARGIN:g} (margin)",
                ours=stats.bootstrap(d.to_numpy(), **boot).format() + " (EK-FAC − LiSSA)",
            )
        )
    wide_cost = costs.pivot_table(index=["setting", "query"], columns="estimator", values="cost_s")
    r = np.log10(wide_cost["lissa"] / wide_cost["ekfac"]).dropna().to_numpy()
    out.append(
        judge(
            "EK-FAC cheaper",
            "EK-FAC costs about an order of magnitude less than LiSSA",
            "~10× less wall-clock time (Fig. 7)",
            effect=stats.bootstrap(r, **boot),
            test=stats.wilcoxon(r),
            expected=+1,
            threshold=float(np.log10(COST_RATIO)),
            what="LiSSA's cost / EK-FAC's per query",
            fmt=_ratio,
        )
    )
    return out


# -- plots ----------------------------------------------------------------------------------
def plot_correlation_bars(table: pd.DataFrame, ax, setting: str, metric: str = "pearson"):
    """Bars: mean correlation per estimator and ground truth; error bars: spread over queries
    (standard deviation)."""
    t = table[table.setting == setting]
    order = [e for e in [*ESTIMATORS, "cg"] if e in set(t.estimator)]
    truths = [g for g in ("CG", "PBRF") if g in set(t.truth)]
    width = 0.8 / len(truths)
    for j, gt in enumerate(truths):
        means = [t[(t.estimator == e) & (t.truth == gt)][metric].mean() for e in order]
        sds = [t[(t.estimator == e) & (t.truth == gt)][metric].std() for e in order]
        xs = np.arange(len(order)) + (j - (len(truths) - 1) / 2) * width
        # A NaN mean (too few points for a correlation) draws no bar rather than a zero.
        ax.bar(xs, means, width, yerr=np.nan_to_num(sds), capsize=2, label=f"vs {gt}")
    ax.set_xticks(np.arange(len(order)), [LABELS[e] for e in order], rotation=30)
    ax.set_ylim(min(0, np.nanmin(t[metric]) - 0.05), 1.05)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title(setting)
    ax.set_ylabel(f"{metric.capitalize()} correlation")


RETRAIN_GROUPS = {  # group of a retraining pair: (label, colour)
    "top": ("in the query's top influences", style.VERMILLION),
    "other": ("a top sequence, another query", style.SKY),
    "random": ("random sequence", style.GREY),
}
K_MARKERS = ("o", "s", "^", "D", "v")


def plot_retrain(pairs: pd.DataFrame, summary: pd.DataFrame, ax, size: str) -> None:
    """One size's retraining check: actual change of log p(completion) after retraining with
    k added copies against k × the predicted per-copy change, per pair (colour: how the pair
    was chosen; marker: k), with the identity line and the noise floor (±2 standard deviations
    of the change when a sequence is only moved between batches)."""
    d = pairs[(pairs["size"] == size) & pairs.group.isin(list(RETRAIN_GROUPS))]
    ks = sorted(d.k.unique())
    for group, (label, colour) in RETRAIN_GROUPS.items():
        for j, k in enumerate(ks):
            g = d[(d.group == group) & (d.k == k)]
            if len(g):
                ax.scatter(g.predicted, g.actual, s=16, color=colour, alpha=0.8,
                           marker=K_MARKERS[j % len(K_MARKERS)],
                           label=f"{label}, k={k}")  # fmt: skip
    floor = float(summary.set_index("size").loc[size, "noise_floor"])
    if np.isfinite(floor):
        # under the points (zorder 0), so that pairs inside the band keep their colour
        ax.axhspan(-2 * floor, 2 * floor, color=style.LIGHT_GREY, alpha=0.6, lw=0, zorder=0,
                   label="noise floor (±2 sd)")  # fmt: skip
    lim = float(np.nanmax(np.abs(d[["predicted", "actual"]].to_numpy()))) * 1.05 if len(d) else 1
    ax.plot([-lim, lim], [-lim, lim], color=style.BLACK, lw=0.8, ls="--",
            label="actual = predicted")  # fmt: skip
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("predicted: k × score / N (nats)")
    ax.set_ylabel("actual change of log p (nats)")
    ax.set_title(size)
