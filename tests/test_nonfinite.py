"""No silent NaN: every NaN/Inf that would reach scores is an error naming the example and layer;
examples without counted tokens and degenerate damping are refused; solvers say when they stop
short. And fit once, damp many: a new damping (or K-FAC from EK-FAC) equals a refit."""

from __future__ import annotations

import warnings

import pytest
import torch
from brute_force import classification_data, fitted, lm_data, tiny_llama, tiny_mlp

import influence as inf
from influence.cg import CG
from influence.lissa import LiSSA

ALL = [inf.Identity, inf.Diagonal, inf.KFAC, inf.EKFAC]


def _mlp_setting(n=10):
    return tiny_mlp(), inf.ClassificationTask(), classification_data(n)


@pytest.mark.parametrize("est_cls", [*ALL, CG])
def test_nan_in_one_query_input_names_the_query(est_cls):
    model, task, data = _mlp_setting()
    est = (
        fitted(est_cls, model, task, data)
        if est_cls is not CG
        else CG(damping=0.1).fit(model, task, data, progress=False)
    )
    x, y = data
    xq = x[:4].clone()
    xq[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer '0' for query 2\b"):
        inf.pairwise_scores(model, task, est, (xq, y[:4]), data, progress=False)


@pytest.mark.parametrize("est_cls", ALL)
def test_inf_in_one_training_input_at_scoring_names_the_example(est_cls):
    model, task, data = _mlp_setting()
    est = fitted(est_cls, model, task, data)
    x, y = data
    xt = x.clone()
    xt[7, 0] = float("inf")
    # batch_size 3: example 7 is row 1 of the third batch; the global index must be named.
    with pytest.raises(FloatingPointError, match=r"for training example 7\b"):
        inf.pairwise_scores(model, task, est, data, (xt, y), batch_size=3, progress=False)
    with pytest.raises(FloatingPointError, match=r"for training example 7\b"):
        inf.self_scores(model, task, est, (xt, y), batch_size=3, progress=False)


@pytest.mark.parametrize("est_cls", [inf.Identity, inf.EKFAC])
def test_nan_weights_after_fitting_raise_at_scoring(est_cls):
    model, task, data = _mlp_setting()
    est = fitted(est_cls, model, task, data)
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf in the bias of layer '0'"):
        inf.pairwise_scores(model, task, est, data, data, progress=False)


def test_cg_and_lissa_refuse_non_finite_right_hand_sides():
    model, task, data = _mlp_setting()
    infos = inf.layers.layer_infos(task.tracked_modules(model))
    dim = sum(i.numel for i in infos.values())
    b = torch.ones(3, dim, dtype=torch.float64)
    b[1, -1] = float("nan")  # the last coordinate belongs to layer '2'
    cg = CG(damping=0.1).fit(model, task, data, progress=False)
    with pytest.raises(FloatingPointError, match=r"CG: the gradient of query 1 .* layer '2'"):
        cg.solve(b)
    lissa = LiSSA(damping=0.1, scale=10.0, depth=5).fit(model, task, data, progress=False)
    with pytest.raises(FloatingPointError, match="LiSSA: the gradient of query 1") as err:
        lissa.solve(b)
    assert "increase `scale`" not in str(err.value)


def test_all_labels_ignored_raise_at_fit_and_at_scoring():
    model, task = tiny_llama(), inf.LanguageModelingTask()
    data = lm_data(6)
    est = fitted(inf.Identity, model, task, data)
    bad = {k: v.clone() for k, v in data.items()}
    bad["labels"][[1, 4]] = -100
    with pytest.raises(ValueError, match=r"training examples \[1, 4\] have no counted tokens"):
        inf.EKFAC().fit(model, task, bad, progress=False)
    with pytest.raises(ValueError, match=r"queries \[1, 4\] have no counted tokens"):
        inf.pairwise_scores(model, task, est, bad, data, progress=False)
    with pytest.raises(ValueError, match=r"training examples \[1, 4\] have no counted tokens"):
        inf.pairwise_scores(model, task, est, data, bad, progress=False)
    # Only position 0 counted: after the shift to next-token targets nothing is left.
    first_only = {k: v.clone() for k, v in data.items()}
    first_only["labels"][:, 1:] = -100
    with pytest.raises(ValueError, match="no counted tokens"):
        inf.Diagonal().fit(model, task, first_only, progress=False)


@pytest.mark.parametrize("damping", [0, 0.0, float("inf"), {"0": 0.1, "2": 0.0}])
def test_zero_or_infinite_damping_refused(damping):
    for cls in (inf.EKFAC, CG, LiSSA):
        with pytest.raises(ValueError, match="positive"):
            cls(damping=damping)
    model, task, data = _mlp_setting()
    with pytest.raises(ValueError, match="positive"):
        inf.pbrf_scores(model, task, data, data, [0], damping=damping, progress=False)


def test_auto_damping_resolving_to_zero_is_refused():
    # All-zero inputs to a layer without bias: its gradients, hence its curvature and its
    # 'auto' damping, are exactly 0.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    task = inf.ClassificationTask()
    x = torch.zeros(8, 4, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    for cls in (inf.KFAC, inf.EKFAC, inf.Diagonal):
        with pytest.raises(ValueError, match=r"resolved damping must be positive.*'0': 0\.0"):
            cls().fit(model, task, (x, y), progress=False)


def test_pbrf_warns_and_strict_raises_when_solves_miss_tolerance():
    model, task, data = _mlp_setting(8)
    kw = dict(damping=0.01, max_steps=1, tol=1e-12, progress=False)
    with pytest.warns(RuntimeWarning, match=r"4 of 4 PBRF solves stopped above the tolerance"):
        _, info = inf.pbrf_scores(model, task, data, data, [0, 3], return_info=True, **kw)
    assert info["unconverged"] == 4
    assert max(max(r) for r in info["relative_gradient"]) > 1e-12
    with pytest.raises(RuntimeError, match="PBRF solves stopped above the tolerance"):
        inf.pbrf_scores(model, task, data, data, [0], strict=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged run is silent
        inf.pbrf_scores(model, task, data, data, [0], damping=0.1, tol=1e-3, progress=False)


# -- fit once, damp many ---------------------------------------------------------------------


@pytest.mark.parametrize("est_cls", ALL)
@pytest.mark.parametrize("damping", [0.03, "auto", {"0": 0.2, "2": 1e-3}])
def test_with_damping_equals_refit(est_cls, damping):
    model, task, data = _mlp_setting(12)
    base = est_cls(damping=0.5).fit(model, task, data, progress=False)
    changed = base.with_damping(damping)
    refit = est_cls(damping=damping).fit(model, task, data, progress=False)
    assert changed.damping_ == refit.damping_  # same floats: same expression, same state
    a = inf.pairwise_scores(model, task, changed, data, data, progress=False)
    b = inf.pairwise_scores(model, task, refit, data, data, progress=False)
    assert torch.equal(a, b)
    if est_cls is not inf.Identity:  # the fitted estimator itself is unchanged
        assert base.damping == 0.5 and base.damping_ != changed.damping_


def test_with_damping_reads_no_data():
    model, task, data = _mlp_setting(12)
    est = inf.EKFAC().fit(model, task, data, progress=False)
    calls = []
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        est.with_damping(0.1)
        inf.KFAC.from_ekfac(est)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("damping", [None, 0.07])
def test_kfac_from_ekfac_equals_kfac_fit(damping):
    model, task = tiny_llama(), inf.LanguageModelingTask()
    data = lm_data(8, min_len=3)
    ek = inf.EKFAC().fit(model, task, data, batch_size=3, progress=False)
    derived = inf.KFAC.from_ekfac(ek, damping=damping)
    direct = inf.KFAC(damping="auto" if damping is None else damping).fit(
        model, task, data, batch_size=3, progress=False
    )
    assert set(derived.state_) == set(direct.state_)
    for k, v in direct.state_.items():
        assert torch.equal(derived.state_[k], v), k
    assert derived.damping_ == direct.damping_
    assert derived.meta_ == direct.meta_
    with pytest.raises(ValueError, match="from_ekfac needs a fitted EKFAC"):
        inf.KFAC.from_ekfac(inf.Diagonal())


def test_cg_with_damping_equals_refit():
    model, task, data = _mlp_setting(12)
    cg = CG(tol=1e-10).fit(model, task, data, progress=False)
    lam = {n: 3 * v for n, v in cg.damping_.items()}
    changed = cg.with_damping(lam)
    refit = CG(damping=lam, tol=1e-10).fit(model, task, data, progress=False)
    a = inf.pairwise_scores(model, task, changed, data, data, progress=False)
    b = inf.pairwise_scores(model, task, refit, data, data, progress=False)
    # Same problem, same CG iterations: equal to round-off.
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert cg.with_damping("auto").damping_ == cg.damping_
    with pytest.raises(ValueError, match="fitted with an explicit damping"):
        refit.with_damping("auto")


def test_study_score_all_and_damping_sweep_fit_once():
    """Notebook 01's K-FAC column and damping sweep reuse one EK-FAC fit: the scores equal
    those of estimators refitted at the same damping, and a 3-scale sweep fits EK-FAC once."""
    from influence.study import ihvp_accuracy as ia

    model, task, data = _mlp_setting(12)
    kw = dict(lissa={}, cg_tol=1e-10, batch_size=5, include_cg=False)
    names = ("identity", "diagonal", "kfac", "ekfac")
    scores, seconds, lam, _ = ia.score_all(model, task, data, data, damping_scale=3.0, **kw)
    auto = inf.EKFAC().fit(model, task, data, batch_size=5, progress=False)
    assert lam == {n: 3.0 * v for n, v in auto.damping_.items()}
    for name, cls in zip(names, ALL, strict=True):
        ref = cls(damping=lam).fit(model, task, data, batch_size=5, progress=False)
        expected = inf.pairwise_scores(model, task, ref, data, data, batch_size=5, progress=False)
        assert torch.equal(scores[name], expected), name
        assert seconds[name] > 0
    fits = []
    original = inf.Estimator.fit

    def counting_fit(self, *a, **k):
        fits.append(type(self).__name__)
        return original(self, *a, **k)

    inf.Estimator.fit = counting_fit
    try:
        sweep = ia.damping_sweep(
            model, task, data, data, [0.3, 1.0, 3.0], cg_tol=1e-10, batch_size=5
        )
    finally:
        inf.Estimator.fit = original
    # One EK-FAC and one diagonal fit; Identity's and CG's fits (no data pass at a given
    # damping) once per scale.
    assert sorted(fits) == ["CG"] * 3 + ["Diagonal", "EKFAC"] + ["Identity"] * 3
    assert len(sweep) == 12 and sweep.pearson.between(-1, 1).all()


def test_score_and_query_checks_name_the_pair_and_layer():
    from influence import checks
    from influence.lowrank import LowRank

    s = torch.zeros(3, 5, dtype=torch.float64)
    s[2, 4] = float("inf")
    with pytest.raises(FloatingPointError, match=r"query 2 and training example 4 is inf \(all"):
        checks.check_finite_scores(s)
    with pytest.raises(FloatingPointError, match=r"query 2 and training example 4 .*layer 'fc'"):
        checks.check_finite_scores({"fc": s})
    checks.check_finite_scores({"fc": torch.ones(2, 2)})  # finite: silent
    u = torch.ones(4, 3, 2)
    v = torch.ones(4, 5, 2)
    sv = torch.ones(4, 2)
    sv[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"query 3 at layer 'fc'"):
        checks.check_finite_queries({"fc": LowRank(u, sv, v)})
    dense = torch.ones(4, 3, 5)
    dense[1, 0, 0] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"query 1 at layer 'fc'"):
        checks.check_finite_queries({"fc": dense})


def test_lissa_with_damping_equals_refit():
    model, task, data = _mlp_setting(12)
    kw = dict(scale=20.0, depth=30, batch_size=4)
    lissa = LiSSA(damping=0.5, **kw).fit(model, task, data, progress=False)
    changed = lissa.with_damping(0.2)
    refit = LiSSA(damping=0.2, **kw).fit(model, task, data, progress=False)
    assert changed.damping_ == refit.damping_ and lissa.damping_["0"] == 0.5
    a = inf.pairwise_scores(model, task, changed, data, data, progress=False)
    b = inf.pairwise_scores(model, task, refit, data, data, progress=False)
    assert torch.equal(a, b)  # same seeded minibatches, same recursion
    auto = LiSSA(damping=0.5, depth=30, batch_size=4).fit(model, task, data, progress=False)
    # scale='auto' is re-estimated for the new damping: 2 λ_max(G + Λ) moves with Λ.
    assert auto.with_damping(5.0).scale_ > auto.scale_ + 2 * 4.0


def test_lissa_names_the_minibatch_whose_product_is_not_finite():
    model, task, (x, y) = _mlp_setting(12)
    lissa = LiSSA(damping=0.1, scale=10.0, depth=20, batch_size=12).fit(
        model, task, (x, y), progress=False
    )
    x[5, 0] = float("nan")  # after fitting: only the solve's GNVPs see it
    rhs = torch.ones(1, sum(i.numel for i in lissa.layers_.values()), dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"training examples \[0, 1, .*\] is NaN/Inf"):
        lissa.solve(rhs)
