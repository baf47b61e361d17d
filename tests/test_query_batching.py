"""influence.study.query_batching: the one-pass rank sweep against pairwise_scores(rank=r),
agreement metrics against scipy/hand counts, the CPU peak-memory probe, TF-IDF recall curves,
the token-overlap bias of the filter, and the findings with negative controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from brute_force import fitted, lm_data, tiny_llama
from scipy import stats

import influence as inf
from influence.study import query_batching as qb


@pytest.fixture(scope="module")
def setting():
    model, task = tiny_llama(), inf.LanguageModelingTask()
    train, queries = lm_data(18, min_len=3), lm_data(3, seed=7, prompt=2)
    return model, task, fitted(inf.EKFAC, model, task, train), queries, train


def test_rank_sweep_matches_pairwise_scores_per_rank(setting):
    model, task, est, queries, train = setting
    ranks = [1, 2, None]
    res = qb.rank_sweep(model, task, est, queries, train, ranks, batch_size=5, measure_memory=False)
    for r in ranks:
        want = inf.pairwise_scores(
            model, task, est, queries, train, rank=r, batch_size=5, progress=False
        )
        # float64 model, same factors, different summation order: rounding only.
        torch.testing.assert_close(res.scores[r], want, rtol=1e-9, atol=1e-12)
    # The ranks genuinely differ (so the check above can fail on a mixed-up rank).
    assert not torch.allclose(res.scores[1], res.scores[None], rtol=1e-3)
    qs = res.query_side
    assert list(qs.index) == ["1", "2", "full"]
    # Stored size: rank r keeps U [Q, out, r], σ [Q, r], V [Q, in', r] per layer.
    pre = inf.preconditioned_queries(model, task, est, queries, rank=1, batch_size=5)
    assert qs.loc["1", "stored_bytes"] == qb.stored_bytes(pre)
    n_full = sum(
        p.numel() * 8
        for p in inf.preconditioned_queries(model, task, est, queries, batch_size=5).values()
    )
    assert qs.loc["full", "stored_bytes"] == n_full


def test_rank_sweep_rejects_bad_ranks(setting):
    model, task, est, queries, train = setting
    with pytest.raises(ValueError, match="ranks"):
        qb.rank_sweep(model, task, est, queries, train, [0, None])
    with pytest.raises(ValueError, match="ranks is empty"):
        qb.rank_sweep(model, task, est, queries, train, [])


def test_peak_memory_counts_live_tensors_on_cpu():
    def fn():
        a = torch.ones(1_000_000, dtype=torch.float32)  # 4 MB
        b = a * 2  # 8 MB held at this point
        del a
        c = torch.ones(250_000)  # 4 + 1 MB: below the peak
        return float(b.sum() + c.sum())

    out, peak = qb.peak_memory(fn)
    assert out == 2_250_000.0
    # Two 4 MB tensors were alive together, never three; small scalars add a few bytes.
    assert 8_000_000 <= peak < 8_100_000


def test_agreement_against_scipy_and_hand_overlap():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(3, 50, generator=g, dtype=torch.float64)
    approx = exact + 0.3 * torch.randn(3, 50, generator=g, dtype=torch.float64)
    ag = qb.agreement(approx, exact, top=10)
    for q in range(3):
        assert ag.loc[q, "pearson"] == pytest.approx(stats.pearsonr(approx[q], exact[q])[0])
        assert ag.loc[q, "spearman"] == pytest.approx(stats.spearmanr(approx[q], exact[q])[0])
    assert (qb.agreement(exact, exact)["top_overlap"] == 1).all()
    # Hand-made overlap: top-2 of a = {0, 1}, of b = {1, 2}: one shared of two.
    a = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 4.0, 5.0, 1.0]])
    assert qb.top_overlap(a, b, 2).tolist() == [0.5]


def test_sample_queries_is_seeded_and_without_replacement():
    counts = {"facts": 5, "math": 3}
    s1, s2 = qb.sample_queries(counts, 4, seed=1), qb.sample_queries(counts, 4, seed=1)
    assert s1 == s2 and len(set(s1)) == 4
    assert all(0 <= i < counts[q] for q, i in s1)
    assert len(qb.sample_queries(counts, 100, seed=1)) == 8


def test_candidate_sizes_and_recall_curve():
    assert qb.candidate_sizes(200, [0.01, 0.5, 0.004, 1.0]) == [1, 2, 100, 200]
    with pytest.raises(ValueError, match="fractions"):
        qb.candidate_sizes(10, [0.0])
    # BM25 ranks 0..5 in order 5,4,3,2,1,0 (ties to the lower index); true top = {5, 0}.
    bm25 = torch.tensor([[0.0, 1, 2, 3, 4, 5], [1.0, 1, 0, 0, 0, 0]])
    true_top = torch.tensor([[5, 0], [1, 2]])
    curve = qb.recall_curve(bm25, true_top, [1, 5, 6])
    assert curve[curve["query"] == 0]["all"].tolist() == [0.5, 0.5, 1.0]
    # Query 1: top-1 is sequence 0 (tie with 1, lower index first), top-5 holds 0..4.
    assert curve[curve["query"] == 1]["all"].tolist() == [0.0, 1.0, 1.0]
    assert np.allclose(curve[curve["query"] == 0]["fraction"], [1 / 6, 5 / 6, 1.0])
    summary = qb.recall_summary(curve.assign(model="a"), 6, n_boot=50)
    assert summary["recall"].tolist() == pytest.approx([0.25, 0.75, 1.0])
    assert summary["random"].tolist() == pytest.approx([1 / 6, 5 / 6, 1.0])
    assert summary["saved"].tolist() == pytest.approx([5 / 6, 1 / 6, 0.0])


def test_overlap_matrix_against_set_intersections():
    rng = np.random.default_rng(0)
    qsets = [set(rng.choice(40, size=rng.integers(0, 5), replace=False).tolist()) for _ in range(7)]
    tsets = [
        set(rng.choice(40, size=rng.integers(0, 8), replace=False).tolist()) for _ in range(30)
    ]
    want = np.array([[bool(q & t) for t in tsets] for q in qsets])
    got = qb.overlap_matrix(qsets, tsets)
    assert got.dtype == bool and (got == want).all()
    assert want.any() and not want.all()  # the check can fail both ways
    with pytest.raises(ValueError, match="at least one query"):
        qb.overlap_matrix([], tsets)


def test_filter_bias_known_answer():
    # One query, 6 sequences; influence order 0 > 1 > 2 > 3 > 4 > 5. Sequences 0, 3, 4 share a
    # token with the query. BM25 keeps {1, 3, 4, 5}: the true top-2 is {0, 1} (one overlaps),
    # the filtered top-2 is {1, 3} (one overlaps); sequence 0 (overlapping) is lost.
    scores = torch.tensor([[6.0, 5, 4, 3, 2, 1]])
    cand = np.array([[False, True, False, True, True, True]])
    ov = np.array([[True, False, False, True, True, False]])
    b = qb.filter_bias(scores, cand, ov, 2).iloc[0]
    assert b["corpus"] == pytest.approx(0.5)
    assert b["candidates"] == pytest.approx(0.5)
    assert b["true"] == pytest.approx(0.5) and b["filtered"] == pytest.approx(0.5)
    assert b["bias"] == 0
    assert b["recall"] == pytest.approx(0.5)
    assert b["recall_overlap"] == 0 and b["recall_other"] == 1
    assert b["lost_other"] == 0  # the one lost sequence overlaps
    # BM25 keeping only the overlapping ones: the filtered top-2 is {3, 4}, both overlap.
    b = qb.filter_bias(scores, ov, ov, 2).iloc[0]
    assert b["filtered"] == 1 and b["bias"] == pytest.approx(0.5)
    assert np.isnan(qb.filter_bias(scores, np.ones_like(ov), ov, 2).iloc[0]["lost_other"])
    with pytest.raises(ValueError, match="fewer than the top-3"):
        qb.filter_bias(scores, np.array([[True, True, False, False, False, False]]), ov, 3)
    with pytest.raises(ValueError, match="must all be"):
        qb.filter_bias(scores, cand[:, :5], ov, 2)


def _bias_frame(kind: str, seed: int = 0, q: int = 40, n: int = 300, k: int = 10):
    """filter_bias on synthetic queries: overlap a coin flip per (query, sequence) with
    probability 0.4; influence independent of overlap, or ("enriched") larger where it
    overlaps; candidates the 30% kept by a filter that prefers overlap ("bm25"), avoids it
    ("anti") or ignores it ("random")."""
    rng = np.random.default_rng(seed)
    ov = rng.random((q, n)) < 0.4
    scores = rng.standard_normal((q, n)) + (4.0 * ov if kind == "enriched" else 0.0)
    noise = rng.random((q, n))
    pref = {"bm25": ov, "enriched": ov, "anti": ~ov, "random": np.zeros_like(ov)}[kind]
    keep = np.argsort(-(pref + noise), axis=1)[:, : int(0.3 * n)]
    cand = np.zeros((q, n), dtype=bool)
    np.put_along_axis(cand, keep, True, axis=1)
    return qb.filter_bias(torch.tensor(scores), cand, ov, k).assign(model="l")


def test_bias_finding_agrees_disagrees_and_negative_controls():
    f = qb.bias_finding(_bias_frame("bm25"), "l", 0.3, 10, n_boot=200)
    assert f.verdict == "agrees", f.reason
    assert f.base_rate.startswith("4")  # about 40% of the corpus overlaps each query
    assert qb.bias_finding(_bias_frame("anti"), "l", 0.3, 10, n_boot=200).verdict == "disagrees"
    # Negative control: a filter blind to overlap changes no share.
    f = qb.bias_finding(_bias_frame("random"), "l", 0.3, 10, n_boot=200)
    assert f.verdict == "inconclusive", f.reason
    # The test can fail where the paper's warning holds for BM25's candidates: when the true
    # top-k already overlaps the query (influence enriched in overlap), the filter adds no bias.
    enriched = _bias_frame("enriched")
    assert enriched["candidates"].mean() > enriched["corpus"].mean() + 0.3
    f = qb.bias_finding(enriched, "l", 0.3, 10, n_boot=200)
    assert f.verdict == "inconclusive", f.reason
    s = qb.bias_summary(enriched, n_boot=100)
    assert s.loc[0, "true_enrichment"] > 2 and s.loc[0, "true_p"] < 0.05
    with pytest.raises(ValueError, match="no filter bias of model 'xl'"):
        qb.bias_finding(enriched, "xl", 0.3, 10)


def _rank_frame(pearson: np.ndarray, whole: bool = False, model: str = "l") -> pd.DataFrame:
    return pd.DataFrame(
        {"model": model, "rank": qb.PAPER_RANK, "query": np.arange(len(pearson)),
         "pearson": pearson, "spearman": pearson, "top_overlap": 1.0, "whole": whole}
    )  # fmt: skip


def test_rank_finding_agrees_disagrees_negative_control_and_not_comparable():
    rng = np.random.default_rng(0)
    close = 0.9995 - 0.0003 * rng.random(12)
    assert qb.rank_finding(_rank_frame(close), "l", n_boot=200).verdict == "agrees"
    far = 0.9 + 0.05 * rng.random(12)
    f = qb.rank_finding(_rank_frame(far), "l", n_boot=200)
    assert f.verdict == "disagrees" and "−0.0" in f.reason
    # Negative control: Pearson scattered evenly around the paper's 0.995.
    coin = qb.PAPER_PEARSON + np.where(np.arange(12) % 2 == 0, 1, -1) * 0.003 * rng.random(12)
    f = qb.rank_finding(_rank_frame(coin), "l", n_boot=200)
    assert f.verdict == "inconclusive", f.reason
    # Rank 32 keeps every layer whole: nothing to test.
    f = qb.rank_finding(_rank_frame(close, whole=True), "l")
    assert f.verdict == "not comparable" and "whole" in f.reason
    with pytest.raises(ValueError, match="no rank-32 agreement of model 'xl'"):
        qb.rank_finding(_rank_frame(close), "xl")


def test_findings_one_per_claim_and_the_headline():
    from influence.study.findings import headline, overall

    rng = np.random.default_rng(1)
    ranks = _rank_frame(0.9995 - 0.0003 * rng.random(12))
    curve = qb.recall_curve(
        torch.tensor(rng.random((5, 200))),
        torch.tensor(np.argsort(rng.random((5, 200)), axis=1)[:, :10]),
        [1, 20, 100],
    )
    recall = qb.recall_summary(curve.assign(model="l"), 200, n_boot=50)
    found = qb.findings(
        ranks, recall, _bias_frame("bm25"), rank_model="l", model="l", bias_fraction=0.1, k=10,
        n_boot=100,
    )  # fmt: skip
    assert [f.name for f in found] == ["rank 32 vs full rank", "TF-IDF recall",
                                       "token-overlap bias"]  # fmt: skip
    assert [f.verdict for f in found] == ["agrees", "not comparable", "agrees"]
    assert overall(found)[0] == "agrees"
    assert "random sequences" in found[1].ours
    assert headline(found).splitlines()[1] == "TF-IDF recall: -> not comparable"


def test_figures_pass_the_font_rules():
    from influence.study import style

    models = ["xs", "l"]
    table = pd.concat(
        [_rank_frame(np.full(3, 1 - 10.0**-r), whole=r > 3, model=m).assign(rank=2**r)
         for m in models for r in range(1, 7)]
    )  # fmt: skip
    assert not style.small_texts(qb.plot_ranks(qb.rank_summary(table), models, 10))
    rng = np.random.default_rng(2)
    top = np.argsort(rng.random((4, 100)), axis=1)[:, :10]
    curves = pd.concat(
        qb.recall_curve(torch.tensor(rng.random((4, 100))), torch.tensor(top), [1, 10, 50]).assign(
            model=m
        )
        for m in models
    )
    assert not style.small_texts(
        qb.plot_recall(qb.recall_summary(curves, 100, n_boot=20), models, 10)
    )
    bias = pd.concat(_bias_frame("bm25", seed=i).assign(model=m) for i, m in enumerate(models))
    assert not style.small_texts(qb.plot_bias(qb.bias_summary(bias, n_boot=20), models, 10))


def test_the_module_owns_its_preset_block_and_ranges():
    from influence.study import presets

    assert presets.SECTIONS[qb.SECTION] is qb.PRESETS
    assert presets.RANGES[qb.SECTION] is qb.RANGES
    with pytest.raises(ValueError, match=r"bias_fraction must be a number in \(0, 1\]"):
        presets.resolve(qb.SECTION, "smoke", bias_fraction=0)
    with pytest.raises(ValueError, match="unknown parameter"):
        presets.resolve(qb.SECTION, "smoke", index_size=10)


def test_low_rank_of_rank_deficient_float32_queries():
    # A query whose completion has 2 tokens has layer gradients of rank <= 2; asked for rank
    # 16, the range finder of a float32 matrix used to fail its Cholesky (found by notebook 08).
    from influence.lowrank import low_rank

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 64, 2, generator=g) @ torch.randn(3, 2, 48, generator=g)
    lr = low_rank(a.float(), 16)
    assert lr.u.dtype == torch.float32 and lr.u.shape == (3, 64, 16)
    # Rank 2 kept whole: the truncation reproduces the matrix to float32 rounding.
    torch.testing.assert_close(lr.dense(), a.float(), rtol=0, atol=1e-4 * a.abs().max().item())
    assert (lr.s[:, 2:] < 1e-4 * lr.s[:, :1]).all()


def test_sample_sequences_is_seeded_ascending_and_all_when_none():
    a = qb.sample_sequences(100, 10, seed=3)
    assert a == qb.sample_sequences(100, 10, seed=3) == sorted(set(a)) and len(a) == 10
    assert a != qb.sample_sequences(100, 10, seed=4)
    assert (
        qb.sample_sequences(5, None, seed=0) == qb.sample_sequences(5, 9, seed=0) == [0, 1, 2, 3, 4]
    )
    with pytest.raises(ValueError, match="positive number of training sequences"):
        qb.sample_sequences(5, 0, seed=0)
