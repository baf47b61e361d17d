# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 — How accurate is EK-FAC? (RQ1)
#
# **Paper (Grosse et al. 2023, §5.1, Figs. 6–7).** Influence estimates are compared with the
# *proximal Bregman response function* (PBRF), computed by optimisation, over 500 random
# training points and 10 test points, on small MLPs (UCI regression, MNIST), a ResNet and an
# 810M language model. Gradient dot products are far off; EK-FAC and LiSSA both correlate well
# with the PBRF, EK-FAC at roughly an order of magnitude less wall-clock time.
#
# **Here.** The same comparison at small scale on (1) an MLP regressor on scikit-learn's
# diabetes data, (2) an MLP classifier on scikit-learn's digits, (3) the smallest language
# model of our suite. Estimators: dot product (identity), diagonal, K-FAC, EK-FAC, LiSSA.
# Ground truths: **CG** (the exact damped inverse-GNVP, i.e. the linearised answer all
# estimators approximate), the **PBRF** by optimisation, and — on the MLPs — the **LDS** by
# retraining on random halves of the data. Every estimator, CG and the PBRF use the *same*
# per-layer damping λ_ℓ = 0.1 × mean eigenvalue of the layer's curvature block (EK-FAC's
# 'auto' value), so that they all approximate one and the same damped problem.

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
mlp_regression = None
mlp_classification = None
language_model = None
damping_scales = None

# %%
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import influence as inf
from influence.study import ihvp_accuracy as ia
from influence.study.presets import resolve
from influence.study.reporting import Report

warnings.filterwarnings("ignore", category=UserWarning)
cfg = resolve(
    "01_ihvp_accuracy",
    preset,
    mlp_regression=mlp_regression,
    mlp_classification=mlp_classification,
    language_model=language_model,
    damping_scales=damping_scales,
)
if cfg["threads"]:
    # These models are tiny: intra-op threads only add synchronisation cost on 2 cores.
    torch.set_num_threads(cfg["threads"])
torch.manual_seed(seed)
report = Report("01_ihvp_accuracy", preset=preset, device=device, seed=seed, params=cfg)
results = {}

# %% [markdown]
# ## 1. MLP regressor (diabetes)
# Two tanh hidden layers, trained with full-batch Adam on the mean squared error plus weight
# decay. We score every training example for each test query with each estimator, CG, and —
# for a random subset of training examples — the PBRF; then we retrain on random halves of the
# training set (cached under `artifacts/lds_retrains/`) for the LDS.

# %%
with report.stage("mlp_regression"):
    results["mlp_regression"] = ia.run_mlp_setting(
        "mlp_regression", "regression", cfg, seed=seed, progress=False
    )
r = results["mlp_regression"]
print(
    f"train loss {r.meta['train_loss']:.3f}, test loss {r.meta['test_loss']:.3f}, "
    f"CG iterations {r.meta['cg_iterations']}, LiSSA scale {r.meta['lissa_scale']:.3g}"
)
pd.DataFrame(ia.summary(r)).T.round(3)

# %% [markdown]
# ## 2. MLP classifier (digits)
# Two hidden layers of the same width, softmax cross-entropy. (The paper used ReLU on MNIST; we
# use tanh because the PBRF is found by L-BFGS, which stalls at ReLU kinks.)

# %%
with report.stage("mlp_classification"):
    results["mlp_classification"] = ia.run_mlp_setting(
        "mlp_classification", "classification", cfg, seed=seed, progress=False
    )
r = results["mlp_classification"]
print(
    f"train loss {r.meta['train_loss']:.3f}, test loss {r.meta['test_loss']:.3f}, "
    f"CG iterations {r.meta['cg_iterations']}, LiSSA scale {r.meta['lissa_scale']:.3g}"
)
pd.DataFrame(ia.summary(r)).T.round(3)

# %% [markdown]
# ## 3. The smallest language model of the suite
# In float64, MLP layers tracked (the paper's choice). The "training set" of this setting is a
# random subset of the corpus: G, every estimator, CG and the PBRF are defined on that subset,
# so they answer the same question. Queries are fact completions; the measurement is
# −log p(completion | prompt). No LDS here (retraining the language model ≥ 50 times is out
# of budget).

# %%
with report.stage("language_model"):
    results["language_model"] = ia.run_lm_setting(
        cfg, preset=preset, seed=seed, device=device, progress=False
    )
r = results["language_model"]
print({k: r.meta[k] for k in ("model", "params", "tracked", "n_train", "corpus_size")})
pd.DataFrame(ia.summary(r)).T.round(3)

# %% [markdown]
# ## Is the PBRF converged?
# The PBRF is the minimiser of a proximal objective at ±ε (ε = 0.1/N, a tenth of a copy of the
# training example), found with full-batch L-BFGS. The table shows the L-BFGS iterations and
# the worst final gradient relative to the gradient at the start (the stopping rule is
# `pbrf_tol`). At ε = 1/N the −ε problem — removing the example — can be non-convex on these
# models and L-BFGS does not converge; at ε = 0.1/N it converges and the PBRF agrees with CG to
# the precision shown in the last column: at this ε the PBRF is the linearised answer.

# %%
rows = []
for name, r in results.items():
    steps = np.asarray(r.pbrf_info["steps"])
    rel = np.asarray(r.pbrf_info["relative_gradient"])
    cg = r.scores["cg"][:, r.train_indices]
    rows.append(
        {
            "setting": name,
            "training examples": len(r.train_indices),
            "ε·N": r.pbrf_info["epsilon"] * len(r.scores["cg"][0]),
            "mean L-BFGS steps": steps.mean(),
            "worst relative gradient": rel.max(),
            "converged share": float((rel <= r.pbrf_info["tol"] * 1.01).mean()),
            "‖PBRF − CG‖/‖CG‖": float((r.pbrf - cg).norm() / cg.norm()),
            "PBRF seconds": r.pbrf_info["seconds"],
        }
    )
pbrf_table = pd.DataFrame(rows).set_index("setting")
pbrf_table.round(6)

# %% [markdown]
# ## Correlation with the ground truths
# Bars: Pearson (top) and Spearman (bottom) correlation with CG (over every training example)
# and with the PBRF (over the PBRF's training examples), averaged over queries; error bars are
# the standard deviation over queries.

# %%
table = pd.concat([ia.correlation_table(r) for r in results.values()], ignore_index=True)
fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 7), squeeze=False)
for j, name in enumerate(results):
    ia.plot_correlation_bars(table, axes[0, j], name, "pearson")
    ia.plot_correlation_bars(table, axes[1, j], name, "spearman")
axes[0, 0].legend()
fig.tight_layout()
report.savefig(fig, "headline")
plt.show()

# %% [markdown]
# ## Why the block-diagonal estimators stop short of CG
# K-FAC and EK-FAC approximate each layer's block of G on its own and ignore the curvature
# between layers. CG with `block_diagonal=True` solves exactly that block-diagonal problem, so
# it is the best any block-diagonal estimator can do. The table separates the two errors: the
# first column is the cost of dropping the cross-layer blocks, the last two how close the
# Kronecker approximations come to the exact block-diagonal answer.

# %%
ceiling = ia.block_diagonal_ceiling(results)
ceiling.round(3)

# %% [markdown]
# ## Wall-clock time vs correlation (the paper's Fig. 7)
# Time includes fitting the curvature and scoring every training example on every query.

# %%
fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
for j, (name, r) in enumerate(results.items()):
    s = ia.summary(r)
    ax = axes[0, j]
    for est, v in s.items():
        y = v["pearson_vs_pbrf"]
        ax.scatter(v["seconds"], y, s=40)
        ax.annotate(
            ia.LABELS[est], (v["seconds"], y), fontsize=8, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("seconds (fit + scores)")
    ax.set_ylabel("Pearson vs PBRF")
    ax.set_title(name)
fig.tight_layout()
report.savefig(fig, "time_vs_correlation")
plt.show()

# %% [markdown]
# ## Damping sweep
# Pearson correlation with CG *at the same damping* as λ is scaled from the 'auto' value.
# Larger damping pulls every preconditioner towards a multiple of the identity, so all of
# them agree more with CG (and with each other); small damping exposes the directions of low
# curvature, where block-diagonal and diagonal approximations differ most from the full G.

# %%
sweeps = []
for name, kind in (("mlp_regression", "regression"), ("mlp_classification", "classification")):
    c = cfg[name]
    split = ia.load_split(kind, c["test_size"], seed)
    task = inf.RegressionTask() if kind == "regression" else inf.ClassificationTask()
    model = ia.train_mlp(
        task,
        split.x_train,
        split.y_train,
        n_out=1 if kind == "regression" else 10,
        hidden=c["hidden"],
        activation=c["activation"],
        steps=c["steps"],
        lr=c["lr"],
        weight_decay=c["weight_decay"],
        seed=seed,
    )
    rng = np.random.default_rng(seed + 1)
    queries = split.test(rng.choice(len(split.x_test), size=c["n_queries"], replace=False))
    with report.stage("damping_sweep"):
        df = ia.damping_sweep(
            model,
            task,
            split.train(),
            queries,
            cfg["damping_scales"],
            cg_tol=c["cg_tol"],
            batch_size=c["batch_size"],
        )
    df["setting"] = name
    sweeps.append(df)
sweep = pd.concat(sweeps, ignore_index=True)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
for ax, (name, df) in zip(axes, sweep.groupby("setting"), strict=True):
    for est, d in df.groupby("estimator"):
        ax.plot(d.scale, d.pearson, marker="o", label=ia.LABELS[est])
    ax.set_xscale("log")
    ax.set_xlabel("damping / 'auto' damping")
    ax.set_ylabel("Pearson vs CG")
    ax.set_title(name)
axes[0].legend()
fig.tight_layout()
report.savefig(fig, "damping_sweep")
plt.show()
sweep.pivot_table(index=["setting", "scale"], columns="estimator", values="pearson").round(3)

# %% [markdown]
# ## Headline numbers
# Mean Pearson correlation with the PBRF, with CG, and LDS (MLPs), per estimator and setting.

# %%
# NBVAL_CHECK_OUTPUT
settings = {}
for name, r in results.items():
    s = ia.summary(r)
    settings[name] = {e: s[e] for e in ia.ESTIMATORS}
    for e in ia.ESTIMATORS:
        v = s[e]
        lds_txt = "   -" if v["lds"] is None else f"{v['lds']:5.2f}"
        print(
            f"{name:19s} {e:9s} pbrf {v['pearson_vs_pbrf']:5.2f}  cg {v['pearson_vs_cg']:5.2f}"
            f"  lds {lds_txt}"
        )

# %% [markdown]
# ## Expectations, checked (not forced)
# At the default preset we expected EK-FAC's Pearson correlation with the PBRF to be ≥ 0.85 on
# the MLPs and within 0.05 of LiSSA's, at ≥ 10× less wall-clock time, and the dot product far
# below both. The cell prints what came out.

# %%
checks = []
for name in ("mlp_regression", "mlp_classification"):
    s = settings[name]
    ek, li, dot = s["ekfac"], s["lissa"], s["identity"]
    checks.append(
        {
            "setting": name,
            "EK-FAC vs PBRF": ek["pearson_vs_pbrf"],
            "LiSSA vs PBRF": li["pearson_vs_pbrf"],
            "dot vs PBRF": dot["pearson_vs_pbrf"],
            "EK-FAC ≥ 0.85": ek["pearson_vs_pbrf"] >= 0.85,
            "within 0.05 of LiSSA": ek["pearson_vs_pbrf"] >= li["pearson_vs_pbrf"] - 0.05,
            "time ratio LiSSA/EK-FAC": li["seconds"] / ek["seconds"],
            "dot far below": dot["pearson_vs_pbrf"]
            < min(ek["pearson_vs_pbrf"], li["pearson_vs_pbrf"]) - 0.2,
        }
    )
checks = pd.DataFrame(checks).set_index("setting")
checks.round(3)

# %% [markdown]
# ## Paper vs here
#
# | | paper (§5.1, Figs. 6–7) | here |
# |---|---|---|
# | ground truth | PBRF by Adam | PBRF by L-BFGS at ε = 0.1/N (converged, see table), CG, LDS |
# | models | MLPs (UCI, MNIST), ResNet-20, 810M LM | MLPs (diabetes, digits), smallest suite LM |
# | dot product | far below EK-FAC and LiSSA | far below LiSSA, below EK-FAC, in every setting |
# | EK-FAC vs LiSSA | competitive | below LiSSA by 0.1–0.2 in every setting |
# | time | EK-FAC ~10× faster | EK-FAC about two orders of magnitude faster |
#
# **Reading the results.** Where the PBRF is converged, it agrees with CG to the precision
# in the PBRF table: at ε = 0.1/N the PBRF is the linearised answer, so any gap between an
# estimator and the PBRF is that estimator's approximation of (G + λI)⁻¹, not a difference
# between the linearised and the non-linear response. LiSSA, which uses the full G, comes
# close to CG. The block-diagonal estimators meet two limits, which the ceiling table
# separates. The first is the block-diagonal structure itself: the exact block-diagonal
# inverse correlates with the full one at only about 0.85–0.88 on these three-layer MLPs,
# because their cross-layer curvature is large. The second is the Kronecker basis. On the
# diabetes regressor, EK-FAC reproduces the exact block-diagonal answer almost perfectly, so
# its whole gap to CG and the PBRF is the dropped cross-layer curvature, and it still reaches
# the paper's level against the PBRF. On digits the Kronecker basis costs as much again, and
# EK-FAC falls well short of the paper's MNIST numbers. The damping sweep shows both gaps
# closing as λ grows; the paper's λ (0.1 × mean eigenvalue) is small for these models.
# Against retraining (LDS) the order changes: EK-FAC scores about as well as CG on diabetes,
# and better than both CG and LiSSA on digits, since retraining without the proximity term is
# a different target from the PBRF. We report the shortfall against the PBRF as a finding of
# this scale and architecture, not a bug. The estimator tests check K-FAC, EK-FAC and CG
# against explicit Gauss–Newton matrices, and the PBRF against CG and a closed form.
#
# The cell below writes the comparison in words from the numbers of this run.


# %%
def verdict(name):
    row = checks.loc[name]
    parts = [
        f"{name}: EK-FAC {row['EK-FAC vs PBRF']:.2f} vs PBRF "
        f"({'meets' if row['EK-FAC ≥ 0.85'] else 'misses'} the paper-like ≥ 0.85), "
        f"LiSSA {row['LiSSA vs PBRF']:.2f}, dot product {row['dot vs PBRF']:.2f}",
        f"EK-FAC {'is' if row['within 0.05 of LiSSA'] else 'is not'} within 0.05 of LiSSA",
        f"LiSSA takes {row['time ratio LiSSA/EK-FAC']:.0f}× EK-FAC's time",
        "the dot product is " + ("far below both" if row["dot far below"] else "NOT far below"),
    ]
    return "; ".join(parts) + "."


lm = settings["language_model"]
paper_vs_here = (
    "paper: EK-FAC ≈ LiSSA ≫ dot product against the PBRF, EK-FAC ~10× faster. here: "
    + " ".join(verdict(n) for n in checks.index)
    + f" language model: EK-FAC {lm['ekfac']['pearson_vs_pbrf']:.2f}, LiSSA "
    f"{lm['lissa']['pearson_vs_pbrf']:.2f}, dot {lm['identity']['pearson_vs_pbrf']:.2f} vs PBRF."
    " The PBRF at ε = 0.1/N agrees with CG to the precision in the PBRF table, so the gaps are"
    " the estimators' approximation of (G + λI)⁻¹ (block-diagonal, Kronecker, diagonal), largest"
    " at small damping (see the sweep)."
)
print(paper_vs_here)

# %%
report.metrics["settings"] = settings
report.metrics["cg"] = {n: ia.summary(r)["cg"] for n, r in results.items()}
report.metrics["pbrf"] = pbrf_table.reset_index().to_dict(orient="records")
report.metrics["damping_sweep"] = sweep.to_dict(orient="records")
report.metrics["damping"] = {n: r.damping for n, r in results.items()}
report.paper_vs_here = paper_vs_here
report.save()
