"""influence.study.query_batching: the one-pass rank sweep against pairwise_scores(rank=r),
agreement metrics against scipy/hand counts, the CPU peak-memory probe, TF-IDF recall curves."""

from __future__ import annotations

import numpy as np
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
    # BM25 ranks 0..5 in order 5,4,3,2,1,0; true top = {5, 0}; 5 shares tokens, 0 does not.
    bm25 = torch.tensor([[0.0, 1, 2, 3, 4, 5]])
    true_top = torch.tensor([[5, 0]])
    shares = torch.tensor([[True, False]])
    curve = qb.recall_curve(bm25, true_top, [1, 5, 6], shares)
    assert curve["all"].tolist() == [0.5, 0.5, 1.0]
    assert curve["shares tokens"].tolist() == [1.0, 1.0, 1.0]
    assert curve["no shared token"].tolist() == [0.0, 0.0, 1.0]
    assert np.allclose(curve["fraction"], [1 / 6, 5 / 6, 1.0])


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
