"""PBRF by optimisation: exact on a quadratic objective, and → the linearised score as ε → 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import influence as inf
from influence.cg import CG
from influence.pbrf import pbrf_scores


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: intra-op threads only add synchronisation cost on a loaded machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=24, d_out=2, classes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if classes:
        y = torch.randint(0, classes, (n,), generator=g)
    else:
        y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return TensorDataset(x, y)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_pbrf_exact_when_objective_is_quadratic():
    # Only the last layer is tracked: the outputs are linear in the tracked parameters and the
    # loss is squared error, so the PBRF objective is exactly quadratic,
    #   ½ dᵀ(G + λI + e·J_mᵀJ_m)d + e·J_mᵀr_m·d  with d = θ − θ_s,
    # and θ*(±ε) has a closed form. Note the e·J_mᵀJ_m term: the central difference equals
    # the linearised (CG) score only up to O(ε²), checked at small ε below.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    task = inf.RegressionTask(modules=["2"])
    data = _data()
    x, y = data.tensors
    n, lam = len(x), 0.05
    queries = TensorDataset(x[:3], y[:3])
    with torch.no_grad():
        feats = torch.cat([torch.tanh(model[0](x)), torch.ones(n, 1, dtype=x.dtype)], 1)  # ā
        resid = model(x) - y
    eye = torch.eye(2, dtype=x.dtype)
    jac = torch.einsum("oc,nj->nocj", eye, feats).reshape(n, 2, -1)  # J_i, internal layout
    g = torch.einsum("nop,noq->pq", jac, jac) / n
    a = g + lam * torch.eye(g.shape[0], dtype=x.dtype)

    def closed_form(m, eps):
        out = []
        for e in (eps, -eps):
            d = -torch.linalg.solve(a + e * jac[m].T @ jac[m], e * jac[m].T @ resid[m])
            out.append(0.5 * (resid[:3] + (jac[:3] @ d)).pow(2).sum(1))
        return -(out[0] - out[1]) / (2 * eps)

    scores, info = pbrf_scores(
        model,
        task,
        queries,
        data,
        range(4),
        damping=lam,
        epsilon=1 / n,
        tol=1e-10,
        progress=False,
        return_info=True,
    )
    assert info["epsilon"] == pytest.approx(1 / n)  # one copy, the largest ε allowed
    expected = torch.stack([closed_form(m, 1 / n) for m in range(4)], 1)
    # L-BFGS stops at relative gradient 1e-10 on a problem with condition number < 1e3:
    # at most ~1e-7 relative optimisation error in the scores.
    assert _rel(scores, expected) < 1e-6

    # ... and at small ε the PBRF is the linearised score, i.e. CG with the same damping.
    cg = CG(damping=lam, tol=1e-12).fit(model, task, data, progress=False)
    linear = inf.pairwise_scores(model, task, cg, queries, data, progress=False)[:, :4]
    small = pbrf_scores(
        model,
        task,
        queries,
        data,
        range(4),
        damping=lam,
        epsilon=1e-3 / n,
        tol=1e-10,
        progress=False,
    )
    # the O(ε²) gap is 6 % at ε = 1/N, hence ~1e-7 at ε = 1e-3/N
    assert _rel(small, linear) < 1e-6


def test_pbrf_approaches_linearised_score_as_epsilon_shrinks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    task = inf.ClassificationTask()
    data = _data(classes=4)
    queries = TensorDataset(*[t[:3] for t in data.tensors])
    lam = 0.05
    cg = CG(damping=lam, tol=1e-12).fit(model, task, data, progress=False)
    expected = inf.pairwise_scores(model, task, cg, queries, data, progress=False)[:, :4]
    errors = []
    for eps in (1 / 24, 0.1 / 24, 0.01 / 24):
        s = pbrf_scores(
            model,
            task,
            queries,
            data,
            range(4),
            damping=lam,
            epsilon=eps,
            tol=1e-9,
            progress=False,
        )
        errors.append(_rel(s, expected))
    # Central differences: the gap shrinks like ε² (measured ≈ 0.4, 3e-3, 3e-5 on this model).
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.05 * errors[0]
    assert errors[2] < 1e-3


def test_pbrf_adam_agrees_with_lbfgs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    task = inf.RegressionTask()
    data = _data()
    queries = TensorDataset(*[t[:2] for t in data.tensors])
    kw = dict(damping=0.1, progress=False)
    a = pbrf_scores(model, task, queries, data, [0, 1], tol=1e-9, **kw)
    b = pbrf_scores(
        model,
        task,
        queries,
        data,
        [0, 1],
        optimizer="adam",
        lr=0.02,
        max_steps=3000,
        tol=1e-4,
        **kw,
    )
    # Adam stops at relative gradient 1e-4: a few per cent at most on this small problem.
    assert _rel(b, a) < 0.05


def test_pbrf_bad_arguments():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    task, data = inf.RegressionTask(), _data()
    with pytest.raises(ValueError, match="epsilon"):
        pbrf_scores(model, task, data, data, [0], damping=0.1, epsilon=1.0, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        pbrf_scores(model, task, data, data, [0], damping=0.1, optimizer="sgd", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        pbrf_scores(model, task, data, data, [99], damping=0.1, progress=False)


@pytest.mark.parametrize("preconditioner", ["damping", "ekfac", "diagonal"])
def test_preconditioned_pbrf_has_the_same_minimiser(preconditioner):
    # u = M^½ z changes the optimiser's path, not the minimiser nor the stopping rule on ∇_u F.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    task = inf.ClassificationTask()
    data = _data(classes=4)
    queries = TensorDataset(*[t[:3] for t in data.tensors])
    lam = {"0": 0.05, "2": 0.02}
    fitted = {
        "ekfac": lambda: inf.EKFAC(damping=lam).fit(model, task, data, progress=False),
        "diagonal": lambda: inf.Diagonal(damping=lam).fit(model, task, data, progress=False),
    }
    pre = fitted[preconditioner]() if preconditioner in fitted else preconditioner
    # tol 1e-6: the round-off floor of the relative gradient is ~3e-7 here at ε = 0.1/N
    kw = dict(damping=lam, tol=1e-6, progress=False, return_info=True)
    plain, _ = pbrf_scores(model, task, queries, data, range(3), **kw)
    scores, info = pbrf_scores(model, task, queries, data, range(3), preconditioner=pre, **kw)
    assert _rel(scores, plain) < 1e-4
    assert info["converged"] == [True] * 3


def test_pbrf_counts_unconverged_examples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    task, data = inf.ClassificationTask(), _data(classes=4)
    with pytest.warns(RuntimeWarning, match="stopped above the tolerance"):
        _, info = pbrf_scores(
            model,
            task,
            data,
            data,
            [0, 1],
            damping=0.05,
            max_steps=1,
            tol=1e-12,
            progress=False,
            return_info=True,
        )
    assert info["converged"] == [False, False] and info["unconverged"] == 4
    with pytest.raises(ValueError, match="'damping' or a fitted estimator"):
        pbrf_scores(model, task, data, data, [0], damping=0.05, preconditioner="ekfac")
