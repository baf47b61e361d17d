"""The language-model validation (issue 24): exact float64 Gauss–Newton products on a Llama, CG
against the explicit damped inverse, batched against single right-hand sides, convergence
accounting of CG and the PBRF, retraining with copies, bad input."""

from __future__ import annotations

import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev
from transformers import LlamaConfig, LlamaForCausalLM

import influence as inf
from influence.cg import CG
from influence.gnvp import GaussNewton, current_layout, exact_float64, layout_to_params
from influence.gradients import flatten, per_example_gradients, unflatten
from influence.study import cache
from influence.study import ihvp_accuracy as IA
from influence.study import lm_validation as LV
from influence.study import retrain_check as RC
from influence.study.suite import load_suite

TINY = [{"name": "t", "hidden": 16, "layers": 1, "intermediate": 32, "heads": 1}]
TRAIN = {
    "epochs": 2,
    "batch_size": 32,
    "lr": 3e-3,
    "warmup_frac": 0.1,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.0,
    "log_every": 2,
    "threads": 1,
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- a tiny float64 Llama from a config -----------------------------------------------------
def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).double().eval()


def _sequences(n, width=9, seed=0, prompt=0):
    """Right-padded sequences of different lengths; labels −100 on padding (and a prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (i * 3) % (width - 4)
        ids = torch.zeros(width, dtype=torch.long)
        ids[:length] = torch.randint(1, 40, (length,), generator=g)
        mask = (torch.arange(width) < length).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:prompt] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _explicit_g(model, task, data):
    """(1/n) Σ J_iᵀ H_i J_i with J the Jacobian of the logits (jacrev) and H_i by the task."""
    infos = inf.layers.layer_infos(task.tracked_modules(model))
    theta = flatten({k: v[None] for k, v in current_layout(model, infos).items()}, infos)[0]
    g = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for ex in data:
        batch = {k: v[None] for k, v in ex.items()}

        def logits(flat, batch=batch):
            params = layout_to_params(unflatten(flat[None], infos), infos)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            out = functional_call(model, {k: v[0] for k, v in params.items()}, (), inputs)
            return out.logits

        out = logits(theta).detach()
        jac = jacrev(logits)(theta).reshape(-1, theta.numel())
        eye = torch.eye(jac.shape[0], dtype=torch.float64)
        h = torch.stack(
            [task.output_hvp(out, batch, e.reshape(out.shape)).reshape(-1) for e in eye]
        )
        g += jac.T @ h @ jac
    return g / len(data)


def _asymmetry(op, seed=0):
    v = torch.randn(2, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    gv = op.gnvp(v)
    a, b = float(v[1] @ gv[0]), float(v[0] @ gv[1])
    return abs(a - b) / abs(a)


def test_exact_float64_keeps_float64_and_nothing_else():
    x = torch.randn(3, dtype=torch.float64)
    f32 = torch.randn(3)
    with exact_float64():
        assert x.to(torch.float32).dtype == torch.float64
        assert x.to("cpu", torch.float32).dtype == torch.float64
        assert x.to(dtype=torch.float16).dtype == torch.float64
        assert x.to(f32).dtype == torch.float64
        assert x.float().dtype == torch.float64 and x.half().dtype == torch.float64
        assert torch.softmax(x, 0, dtype=torch.float32).dtype == torch.float64
        assert torch.nn.functional.softmax(x, dim=0, dtype=torch.float32).dtype == torch.float64
        assert f32.to(torch.float16).dtype == torch.float16  # other dtypes untouched
        assert torch.arange(3).float().dtype == torch.float32
    assert x.to(torch.float32).dtype == torch.float32  # only inside


def test_llama_gnvp_is_exact_and_symmetric_in_float64():
    model = _llama()
    task = inf.LanguageModelingTask(modules="mlp")
    data = _sequences(5)
    op = GaussNewton(model, task, data, batch_size=2)
    with exact_float64():
        g = _explicit_g(model, task, data)
    dense = op.dense()
    assert torch.allclose(dense, g, rtol=1e-10, atol=1e-12)
    assert _asymmetry(op) < 1e-12
    # The same model as Hugging Face runs it (RMSNorm and softmax in float32): symmetric only
    # to float32 round-off. This is what stalled CG on the study's models.
    as_is = GaussNewton(model, task, data, batch_size=2, exact_float64=False)
    assert _asymmetry(as_is) > 1e-10


def test_explicit_gauss_newton_of_the_validation_matches():
    # The validation's brute force (per-token Jacobians of the hidden states) against the
    # Jacobian of the logits.
    model = _llama(1)
    task = inf.LanguageModelingTask(modules="mlp")
    data = _sequences(4, seed=1)
    with exact_float64():
        expected = _explicit_g(model, task, data)
        g = LV.explicit_gauss_newton(model, task, data)
    assert torch.allclose(g, expected, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def llama_problem():
    model = _llama(2)
    task = inf.LanguageModelingTask(modules="mlp")
    data = _sequences(6, seed=2)
    queries = _sequences(4, seed=3, prompt=3)
    with exact_float64():
        ek = inf.EKFAC().fit(model, task, data, progress=False)
        g = _explicit_g(model, task, data)
        infos = inf.layers.layer_infos(task.tracked_modules(model))
        gq = flatten(per_example_gradients(model, task, queries, measurement=True), infos)
        gt = flatten(per_example_gradients(model, task, data), infos)
    lam = ek.damping_
    a = g + torch.diag(inf.gnvp.damping_vector(lam, infos))
    return model, task, data, queries, ek, lam, a, gq, gt


def test_cg_equals_the_dense_damped_inverse_on_a_llama(llama_problem):
    model, task, data, queries, ek, lam, a, gq, gt = llama_problem
    cg = CG(damping=lam, tol=1e-10, max_iter=2000, preconditioner=ek).fit(
        model, task, data, progress=False
    )
    with exact_float64():
        scores = inf.pairwise_scores(model, task, cg, queries, data, progress=False)
    expected = gq @ torch.linalg.solve(a, gt.T)
    assert float((scores - expected).norm() / expected.norm()) < 1e-7
    solve = cg.meta_["solves"][-1]
    assert all(solve["converged"]) and max(solve["relative_residuals"]) <= 1e-10


def test_batched_cg_equals_single_right_hand_sides(llama_problem):
    model, task, data, _, ek, lam, a, gq, _ = llama_problem
    cg = CG(damping=lam, tol=1e-11, max_iter=2000, preconditioner=ek).fit(
        model, task, data, progress=False
    )
    together = cg.solve(gq)
    alone = torch.cat([cg.solve(gq[i : i + 1]) for i in range(len(gq))])
    exact = torch.linalg.solve(a, gq.T).T
    assert float((together - alone).norm() / alone.norm()) < 1e-8
    assert float((together - exact).norm() / exact.norm()) < 1e-8


def test_multi_shift_cg_equals_dense_solves_at_every_scale(llama_problem):
    model, task, data, _, ek, lam, a, gq, _ = llama_problem
    infos = inf.layers.layer_infos(task.tracked_modules(model))
    g = a - torch.diag(inf.gnvp.damping_vector(lam, infos))
    cg = CG(damping=lam, tol=1e-10, max_iter=3000).fit(model, task, data, progress=False)
    xs = cg.solve_scaled(gq, [10.0, 0.1, 1.0])
    assert sorted(xs) == [0.1, 1.0, 10.0]
    for s, x in xs.items():
        lam_s = {n: s * v for n, v in lam.items()}
        exact = torch.linalg.solve(g + torch.diag(inf.gnvp.damping_vector(lam_s, infos)), gq.T).T
        assert float((x - exact).norm() / exact.norm()) < 1e-8, s
    records = {r["scale"]: r for r in cg.meta_["solves"]}
    assert set(records) == {0.1, 1.0, 10.0}
    assert all(
        all(r["converged"]) and max(r["relative_residuals"]) <= 1e-10 for r in records.values()
    )
    # one Krylov sequence for all scales: the smallest damping's iterations, once
    assert len({r["iterations"] for r in records.values()}) == 1
    with pytest.raises(ValueError, match="preconditions by the damping"):
        CG(damping=lam, preconditioner=ek).fit(model, task, data, progress=False).solve_scaled(
            gq, [1.0]
        )


def test_killed_multi_shift_cg_resumes_from_its_checkpoint_bit_for_bit(llama_problem, tmp_path):
    model, task, data, _, _, lam, _, gq, _ = llama_problem
    scales = [0.1, 1.0, 10.0]

    def fitted():
        return CG(damping=lam, tol=1e-10, max_iter=3000).fit(model, task, data, progress=False)

    whole = fitted().solve_scaled(gq, scales)
    ckpt = tmp_path / "cg.pt"
    cg = fitted()
    gnvp, calls = cg.operator_.gnvp, []

    def killed_after_20(v, *args, **kw):
        calls.append(1)
        if len(calls) > 21:  # the checkpoint's probe, then 20 iterations
            raise KeyboardInterrupt
        return gnvp(v, *args, **kw)

    cg.operator_.gnvp = killed_after_20
    with pytest.raises(KeyboardInterrupt):
        cg.solve_scaled(gq, scales, checkpoint=ckpt, checkpoint_seconds=0)
    assert ckpt.exists()
    resumed_cg = fitted()
    resumed = resumed_cg.solve_scaled(gq, scales, checkpoint=ckpt, checkpoint_seconds=0)
    for s in scales:
        assert torch.equal(resumed[s], whole[s]), s
    assert {r["resumed_at"] for r in resumed_cg.meta_["solves"]} == {20}
    before = resumed_cg.meta_["solves"][0]["seconds_before_resume"]
    assert before["wall_s"] > 0 and before["cpu_s"] > 0  # the killed run's time is counted
    assert not ckpt.exists()  # removed once the solve returned
    # a checkpoint of another problem is refused, naming what differs
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        cg.solve_scaled(gq, scales, checkpoint=ckpt, checkpoint_seconds=0)
    assert ckpt.exists()
    with pytest.raises(ValueError, match="belongs to another problem .its b differs"):
        fitted().solve_scaled(2 * gq, scales, checkpoint=ckpt)
    with pytest.raises(ValueError, match="its scales differs"):
        fitted().solve_scaled(gq, [0.2, 1.0, 10.0], checkpoint=ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the CG checkpoint"):
        fitted().solve_scaled(gq, scales, checkpoint=ckpt)


def test_unconverged_cg_is_recorded_per_right_hand_side(llama_problem):
    model, task, data, _, ek, lam, _, gq, _ = llama_problem
    cg = CG(damping=lam, tol=1e-12, max_iter=2, strict=False).fit(model, task, data, progress=False)
    cg.solve(gq)
    solve = cg.meta_["solves"][-1]
    assert solve["converged"] == [False] * len(gq)
    assert min(solve["relative_residuals"]) > 1e-12 and "warning" in solve
    with pytest.raises(RuntimeError, match=f"for {len(gq)} of {len(gq)} right-hand sides"):
        CG(damping=lam, tol=1e-12, max_iter=2).fit(model, task, data, progress=False).solve(gq)


def test_lissa_residual_is_the_true_residual_of_its_solution(llama_problem):
    # LiSSA's recorded residual, recomputed from the dense damped matrix: deep recursions get
    # close to the solve, a two-step one does not.
    model, task, data, _, _, lam, a, gq, _ = llama_problem
    # 100 × EK-FAC's 'auto' damping: LiSSA's rate 1 − λ_min/s is then fast enough for a test.
    infos = inf.layers.layer_infos(task.tracked_modules(model))
    a = a + torch.diag(inf.gnvp.damping_vector({n: 99 * v for n, v in lam.items()}, infos))
    lam = {n: 100 * v for n, v in lam.items()}
    residuals = {}
    for depth in (2, 1000):
        est = inf.LiSSA(damping=lam, depth=depth, batch_size=len(data)).fit(
            model, task, data, progress=False
        )
        with exact_float64():
            x = est.solve(gq)
            op = (est.operator_.matvec(x) - gq).norm(dim=1) / gq.norm(dim=1)
        dense = (x @ a - gq).norm(dim=1) / gq.norm(dim=1)  # a is symmetric
        assert torch.allclose(op, dense, rtol=1e-8)
        residuals[depth] = float(op.max())
    assert residuals[1000] < 1e-6 < 1e-2 < residuals[2]


def test_per_query_comparison_uses_only_converged_queries():
    truth = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pred = truth.clone()
    pred[1] = -truth[1]  # an unconverged query's row: would give Pearson -1
    df = LV.per_query(pred, truth, [True, False, True])
    assert list(df["query"]) == [0, 2] and np.allclose(df.pearson, 1.0)


def test_pbrf_row_excludes_and_counts_unconverged_examples():
    g = torch.Generator().manual_seed(0)
    ref = {k: torch.randn(2, 12, dtype=torch.float64, generator=g) for k in ("ekfac@1", "cg@1")}
    idx = list(range(0, 12, 2))  # 6 examples
    pbrf = ref["cg@1"][:, idx].clone()
    pbrf[:, 1] = 1e6  # an unconverged solve's garbage
    conv = [True, False, True, True, True, True]
    record = {"indices": idx, "converged": conv, "epsilon": 0.1 / 12}
    problem = LV.Problem(
        "t", None, None, None, list(range(12)), None, [0, 1], {"l": 1.0}, 100, 10, {}
    )
    row = LV._pbrf_row({"size": "t"}, problem, pbrf, record, ref, [True, True], {"n_boot": 50}, 0)
    assert row["n_train"] == 6 and row["n_converged"] == 5
    assert row["converged_share"] == pytest.approx(5 / 6)
    assert row["pearson_cg_vs_pbrf"] == pytest.approx(1.0)  # the garbage column is not used


# -- on a tiny suite ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("INFLUENCE_ARTIFACTS", str(tmp_path_factory.mktemp("artifacts")))
    suite = load_suite("smoke", sizes=TINY, train=TRAIN, progress=False)
    yield suite
    mp.undo()


def test_retraining_with_zero_copies_reproduces_the_weights(tiny_suite):
    again = RC.retrain(tiny_suite, "t", 3, 0, seed=0)
    assert RC.same_weights(again, tiny_suite.models["t"])
    moved = RC.retrain(tiny_suite, "t", 3, 0, seed=0, relocate=True)
    assert not RC.same_weights(moved, tiny_suite.models["t"])
    copies = RC.retrain(tiny_suite, "t", 3, 1, seed=0)
    assert not RC.same_weights(copies, tiny_suite.models["t"])


def test_copies_go_to_distinct_batches_and_nest_with_k():
    plan = [[0, 1], [2, 3], [4, 5], [6]]
    one = RC.insert_copies(plan, 7, 2, 1, epoch=0, insert_seed=0, relocate=False)
    three = RC.insert_copies(plan, 7, 2, 3, epoch=0, insert_seed=0, relocate=False)
    assert sorted(i for b in three for i in b) == list(range(10))
    assert all(len(b) - len(p) <= 1 for b, p in zip(three, plan, strict=True))
    first = next(i for i, b in enumerate(one) if 7 in b)
    assert 7 in three[first]  # k = 3 adds copies to k = 1's places
    moved = RC.insert_copies(plan, 7, 2, 0, epoch=0, insert_seed=0, relocate=True)
    assert sorted(i for b in moved for i in b) == list(range(7)) and 2 not in moved[1]
    assert RC.insert_copies(plan, 7, 2, 0, epoch=0, insert_seed=0, relocate=False) == plan


def test_bad_input_fails_at_once_naming_the_value(tiny_suite):
    c = LV.settings("smoke")
    with pytest.raises(ValueError, match="'xl' has no trained model"):
        LV.check_settings(tiny_suite, {**c, "sizes": ["xl"]})
    with pytest.raises(ValueError, match="'m' has no trained model"):
        LV.check_settings(tiny_suite, {**c, "retrain_sizes": ["m"]})
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=f"damping scale {bad!r}"):
            LV.check_settings(tiny_suite, {**c, "scales": [bad, 1.0]})
    n = len(tiny_suite.corpus.train)
    with pytest.raises(ValueError, match=f"n_train={n + 1} .* corpus size \\({n} training"):
        LV.check_settings(tiny_suite, {**c, "n_train": n + 1})
    with pytest.raises(ValueError, match="must contain 1.0"):
        LV.check_settings(tiny_suite, {**c, "scales": [0.1, 10.0]})
    with pytest.raises(ValueError, match="damping must be positive"):
        inf.CG(damping={"a": 0.0})


def test_a_diverging_lissa_is_run_again_with_twice_the_scale(tiny_suite):
    c = LV.settings("smoke", n_train=12)
    p = LV.make_problem(tiny_suite, tiny_suite.names()[0], c, "smoke", 0, "cpu", False)
    _, auto = LV.lissa(p, c, False)  # 2 × λ_max of the damped G: converges
    assert [a["diverged"] for a in auto["attempts"]] == [None]
    low = auto["scale"] / 16  # below a minibatch's curvature: diverges
    c["lissa"] = {**c["lissa"], "scale": low}
    scores, record = LV.lissa(p, c, False)
    attempts = record["attempts"]
    assert "LiSSA diverged" in attempts[0]["diverged"] and 2 <= len(attempts) <= 5
    assert attempts[-1]["diverged"] is None and record["scale"] == attempts[-1]["scale"]
    assert [a["scale"] for a in attempts] == [low * 2**i for i in range(len(attempts))]
    assert torch.isfinite(scores["lissa"]).all()
    c["lissa"]["scale"] = 1e-30  # no retry reaches the curvature: a clear error
    with pytest.raises(FloatingPointError, match="diverged at every scale tried"):
        LV.lissa(p, c, False)


def test_validation_tables_on_a_tiny_suite(tiny_suite):
    kw = {"n_train": 12, "n_pbrf": 4, "cg_max_iter": 3000, "pbrf_steps": 40, "pbrf_tol": 1e-4}
    v = LV.validate_suite(tiny_suite, "smoke", progress=False, **kw)
    val = v.lm_validation
    assert set(val.estimator) == {"identity", "diagonal", "kfac", "ekfac", "lissa"}
    assert (val.n_queries == 2).all() and (val.n_train == 12).all()
    assert (val.cg_converged_share == 1.0).all() and (val.cg_residual <= 1e-6).all()
    assert set(v.lm_damping_sweep.scale) == {0.1, 1.0, 10.0}
    assert (v.lm_damping_sweep.query("estimator == 'cg'").pearson_vs_cg > 0.999).all()
    assert v.dense_check.cg_max_relative_error.max() < 1e-4
    assert set(v.dense_check.scale) == {0.1, 1.0, 10.0}
    lissa = val[val.estimator == "lissa"].iloc[0]
    assert 0 < lissa.lissa_median_residual <= lissa.lissa_worst_residual < np.inf
    assert val[val.estimator != "lissa"].lissa_worst_residual.isna().all()
    assert v.dense_check.asymmetry_exact_float64.max() < 1e-12
    assert v.lm_pbrf.n_train.tolist() == [4]
    rt = v.retrain_check.iloc[0]
    assert rt.identical_to_suite and rt.n_pairs >= 2 and rt.k_values == [1, 2]
    assert rt.model == val.model.iloc[0]  # so that notebooks 02–07 can cite it per model
    fig, ax = plt.subplots()
    IA.plot_retrain(v.retrain_pairs, v.retrain_check, ax, rt["size"])
    drawn = sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))
    assert drawn == v.retrain_pairs.group.isin(["top", "other", "random"]).sum()
    plt.close(fig)
    tables = v.tables()
    assert {"lm_validation", "lm_damping_sweep", "lm_pbrf", "retrain_check"} <= set(tables)
    # a rerun reads every stage from the cache
    again = LV.validate_suite(tiny_suite, "smoke", progress=False, **kw)
    assert again.costs.cached.all()
    assert again.lm_validation.equals(v.lm_validation)


def test_pbrf_is_cached_per_example_and_an_interrupted_run_resumes(tiny_suite, monkeypatch):
    c = LV.settings("smoke", n_train=12, n_pbrf=3, pbrf_steps=20, pbrf_tol=1e-4)
    p = LV.make_problem(tiny_suite, tiny_suite.names()[0], c, "smoke", 0, "cpu", False)
    first, rec = LV.pbrf(p, c, False)
    idx = rec["indices"]
    assert first["pbrf"].shape == (2, 3) and len(idx) == 3
    assert len(rec["converged"]) == len(rec["steps"]) == len(rec["relative_gradient"]) == 3
    solved = []
    real = LV.pbrf_scores
    monkeypatch.setattr(LV, "pbrf_scores", lambda *a, **k: solved.append(a[4]) or real(*a, **k))
    again, rec2 = LV.pbrf(p, c, False)
    assert solved == [] and rec2["cached"] and torch.equal(again["pbrf"], first["pbrf"])
    # as if the run had been killed before its last example was written
    shutil.rmtree(cache.entry_dir("lm_validation", {**LV.pbrf_key(p, c), "example": idx[-1]}))
    resumed, rec3 = LV.pbrf(p, c, False)
    assert solved == [[idx[-1]]] and not rec3["cached"]
    assert torch.allclose(resumed["pbrf"], first["pbrf"], rtol=0, atol=1e-12)
    assert rec3["converged"] == rec["converged"]
