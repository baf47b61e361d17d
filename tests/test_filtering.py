"""influence.filtering: BM25 (the paper's TF-IDF filter) against the formula written out here,
binary term frequency, top-m order and ties, the recall helper and input errors."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from influence import bm25_candidates, bm25_scores, candidate_recall, shares_content_tokens

# A small hand-made corpus: repeated tokens, a token in every document (0), a document with
# no counted token after ignoring 0 (index 5), different lengths.
DOCS = [
    [0, 1, 2, 3],
    [0, 2, 2, 2, 4],
    [0, 5, 6],
    [0, 1, 1, 3, 3, 7, 8, 9],
    [0, 4, 5],
    [0],
    [0, 2, 6, 9, 9, 1],
]
QUERIES = [[1, 2], [3, 3, 4, 9], [6, 0], [2, 2, 2], [11, 5]]  # 11 is in no document


def brute_bm25(query, docs, k1, b, binary_tf, ignore=()):
    """Lucene BM25 written out: idf(t) = ln(1 + (N - df + 0.5)/(df + 0.5)) and, per query term
    occurrence (distinct terms if binary), idf * tf / (tf + k1 (1 - b + b |d| / avgdl))."""
    docs = [[t for t in d if t not in ignore] for d in docs]
    query = [t for t in query if t not in ignore]
    if binary_tf:
        docs, query = [sorted(set(d)) for d in docs], sorted(set(query))
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    out = []
    for d in docs:
        tf, score = Counter(d), 0.0
        for t in query:
            df = sum(t in e for e in docs)
            if tf[t] == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            score += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(d) / avgdl))
        out.append(score)
    return out


@pytest.mark.parametrize("binary_tf", [True, False])
@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (1.2, 0.0), (0.7, 1.0)])
def test_scores_match_the_formula(binary_tf, k1, b):
    got = bm25_scores(QUERIES, DOCS, k1=k1, b=b, binary_tf=binary_tf, ignore_ids=[0])
    want = torch.tensor(
        [brute_bm25(q, DOCS, k1, b, binary_tf, ignore={0}) for q in QUERIES], dtype=torch.float64
    )
    assert got.dtype == torch.float64 and got.shape == (len(QUERIES), len(DOCS))
    # Both sides are float64 sums of a handful of O(1) terms: agreement to rounding.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert (want > 0).sum() >= 10  # the corpus exercises many nonzero matches


def test_common_token_counts_unless_ignored():
    # Token 0 is in every document: its idf is small but positive, so it shifts scores unless
    # it is ignored; the brute force with 0 kept agrees too.
    got = bm25_scores([[0, 1]], DOCS)
    want = torch.tensor([brute_bm25([0, 1], DOCS, 1.5, 0.75, True)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert got[0, 5] > 0  # document [0] matches only through token 0


def test_binary_tf_ignores_repetition_in_documents_and_queries():
    repeated = [d + d[-1:] * 3 + d for d in DOCS]  # every document with its tokens repeated
    base = bm25_scores(QUERIES, DOCS, ignore_ids=[0])
    torch.testing.assert_close(bm25_scores(QUERIES, repeated, ignore_ids=[0]), base, rtol=0, atol=0)
    q_repeated = [q * 3 for q in QUERIES]
    torch.testing.assert_close(bm25_scores(q_repeated, DOCS, ignore_ids=[0]), base, rtol=0, atol=0)
    # The same repetitions do change counted-tf scores, so the checks above can fail.
    counted = bm25_scores(QUERIES, DOCS, ignore_ids=[0], binary_tf=False)
    assert not torch.allclose(
        bm25_scores(QUERIES, repeated, binary_tf=False, ignore_ids=[0]), counted
    )
    assert not torch.allclose(
        bm25_scores(q_repeated, DOCS, binary_tf=False, ignore_ids=[0]), counted
    )


def test_input_forms_agree():
    # Padded tensor with -100, and a batch mapping whose attention_mask hides padding id 0.
    t = max(len(d) for d in DOCS)
    padded = torch.full((len(DOCS), t), -100, dtype=torch.long)
    ids = torch.zeros((len(DOCS), t), dtype=torch.long)
    att = torch.zeros((len(DOCS), t), dtype=torch.long)
    for i, d in enumerate(DOCS):
        padded[i, : len(d)] = torch.tensor(d)
        ids[i, : len(d)] = torch.tensor(d)
        att[i, : len(d)] = 1
    base = bm25_scores(QUERIES, DOCS)
    as_rows = [torch.tensor(q) for q in QUERIES]
    torch.testing.assert_close(bm25_scores(as_rows, padded), base, rtol=0, atol=0)
    batch = {"input_ids": ids, "attention_mask": att}
    torch.testing.assert_close(bm25_scores(QUERIES, batch), base, rtol=0, atol=0)
    # Without the mask the padding zeros count as extra token-0 occurrences; with binary tf
    # they add nothing new except to document lengths, which do not change (0 already there).
    torch.testing.assert_close(bm25_scores(QUERIES, {"input_ids": ids}), base, rtol=0, atol=0)
    # ... but with counted tf they lengthen documents and change the scores.
    assert not torch.allclose(
        bm25_scores(QUERIES, {"input_ids": ids}, binary_tf=False),
        bm25_scores(QUERIES, batch, binary_tf=False),
    )


def test_candidates_order_and_ties():
    scores = bm25_scores(QUERIES, DOCS, ignore_ids=[0])
    cand = bm25_candidates(QUERIES, DOCS, m=len(DOCS), ignore_ids=[0])
    assert cand.dtype == torch.long and cand.shape == (len(QUERIES), len(DOCS))
    for q in range(len(QUERIES)):
        # Brute force: sort by (-score, index).
        want = sorted(range(len(DOCS)), key=lambda j, q=q: (-scores[q, j].item(), j))
        assert cand[q].tolist() == want
    # Query [11, 5]: only documents 2 and 4 contain 5, both with 2 distinct counted tokens
    # (2: {5, 6}, 4: {4, 5}) -> equal scores, lower index first; the zeros follow in index order.
    assert scores[4, 2] == scores[4, 4] > 0
    assert cand[4].tolist() == [2, 4, 0, 1, 3, 5, 6]
    # Prefixes: top-m is the first m of the full order.
    for m in (1, 3, 6):
        top = bm25_candidates(QUERIES, DOCS, m=m, ignore_ids=[0])
        assert torch.equal(top, cand[:, :m])


def test_identical_documents_tie_exactly():
    docs = [[5, 6, 7], [1, 2], [7, 6, 5], [2, 1, 1]]
    cand = bm25_candidates([[1, 6]], docs, m=4)
    s = bm25_scores([[1, 6]], docs)
    assert s[0, 0] == s[0, 2] and s[0, 1] == s[0, 3]
    assert cand[0].tolist() == ([0, 2, 1, 3] if s[0, 0] > s[0, 1] else [1, 3, 0, 2])


def test_candidate_recall_exact():
    true_top = torch.tensor([[3, 1, 4], [0, 2, 5], [6, 7, 8]])
    cand = torch.tensor([[1, 9, 3, 0], [5, 5, 5, 5], [0, 1, 2, 3]])
    torch.testing.assert_close(
        candidate_recall(true_top, cand),
        torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64),
        rtol=0,
        atol=0,
    )
    where = torch.tensor([[True, False, True], [False, False, True], [False, False, False]])
    got = candidate_recall(true_top, cand, where=where)
    assert got[0].item() == 0.5 and got[1].item() == 1.0 and math.isnan(got[2].item())
    # the split recalls recombine into the total, weighted by counts
    total = candidate_recall(true_top, cand)
    outside = candidate_recall(true_top, cand, where=~where)
    n_in = where.sum(1).double()
    recombined = (got.nan_to_num() * n_in + outside.nan_to_num() * (3 - n_in)) / 3
    torch.testing.assert_close(recombined, total, rtol=0, atol=1e-15)


def test_shares_content_tokens():
    assert shares_content_tokens([1, 2, 3], [9, 3])
    assert not shares_content_tokens([1, 2, 3], [9, 3], stopwords=[3])
    assert not shares_content_tokens([1, 2], [4, 5])
    assert not shares_content_tokens([-100, 1], [-100, 4])  # negative ids never count
    assert shares_content_tokens(torch.tensor([0, 7]), torch.tensor([7, 7]), stopwords={0})


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: bm25_candidates(QUERIES, DOCS, m=0), r"m must be an integer in \[1, 7\]"),
        (lambda: bm25_candidates(QUERIES, DOCS, m=8), r"m must be an integer in \[1, 7\]"),
        (lambda: bm25_candidates(QUERIES, DOCS, m=2.0), "m must be an integer"),
        (lambda: bm25_scores([], DOCS), "query_tokens is empty"),
        (lambda: bm25_scores(QUERIES, []), "train_tokens is empty"),
        (lambda: bm25_scores([[1], [0, -100]], DOCS, ignore_ids=[0]), r"query_tokens\[1\]"),
        (lambda: bm25_scores(QUERIES, [[0], [0, 0]], ignore_ids=[0]), "no counted token"),
        (lambda: bm25_scores(QUERIES, torch.ones(3, 4)), "2-D integer"),
        (lambda: bm25_scores(QUERIES, {"ids": torch.ones(2, 2)}), "without 'input_ids'"),
        (lambda: bm25_scores([[1.5]], DOCS), "must be integers"),
        (lambda: bm25_scores(QUERIES, DOCS, k1=-1), "k1 must be"),
        (lambda: bm25_scores(QUERIES, DOCS, b=1.5), "b must be"),
        (lambda: candidate_recall(torch.tensor([[1, 1]]), torch.tensor([[1]])), "repeats"),
        (lambda: candidate_recall(torch.tensor([[1]]), torch.tensor([[1], [2]])), "queries"),
        (lambda: candidate_recall(torch.tensor([1]), torch.tensor([[1]])), "true_top must be"),
    ],
)
def test_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
