"""influence.study.role_play on small synthetic inputs with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from influence.study import role_play as rp


def _train():
    """Two topics × (assistant, fiction, essay, distractor), 2 each; 2 unrelated; 4 other."""
    rows = []
    for topic in ("a", "b"):
        for cat in ("assistant", "fiction", "essay", "distractor"):
            rows += [{"kind": "role_play", "category": cat, "topic": topic}] * 2
    rows += [{"kind": "role_play", "category": "unrelated", "topic": ""}] * 2
    rows += [{"kind": "fact", "category": "", "topic": ""}] * 4
    train = pd.DataFrame(rows)
    train.insert(0, "id", range(len(train)))
    train["text"] = [f"seq {i}" for i in train.id]
    return train


def test_corpus_shares_sum_to_one_and_count_other():
    train = _train()
    s = rp.corpus_shares(train)
    assert list(s.index) == list(rp.CATEGORIES)
    assert s.sum() == pytest.approx(1.0)
    assert s["assistant"] == pytest.approx(4 / 22) and s["other"] == pytest.approx(4 / 22)
    bad = train.assign(category=train.category.where(train.id != 0, "poem"))
    with pytest.raises(ValueError, match="poem"):
        rp.corpus_shares(bad)


def test_top_frame_keeps_positive_top_k_in_order():
    train = _train()
    queries = pd.DataFrame({"topic": ["a", "b"]})
    s = -np.ones((2, len(train)))
    # query 0 (topic a): fiction of topic a (ids 2, 3) best, then essay of topic b (id 12),
    # then a fact (id 18); only three positive scores
    s[0, [2, 3, 12, 18]] = [5.0, 5.0, 3.0, 1.0]
    s[0, 18] = 1.0
    s[0, 19] = 0.0  # zero is not a positive influence
    # query 1 (topic b): distractors of topic a (ids 6, 7)
    s[1, [6, 7]] = [2.0, 4.0]
    top = rp.top_frame(s, queries, train, "m", k=5)
    q0 = top[top["query"] == 0]
    assert list(q0.train_id) == [2, 3, 12, 18]  # ties broken by id
    assert list(q0.category) == ["fiction", "fiction", "essay", "other"]
    assert list(q0.topic_match) == ["same topic", "same topic", "other topic", "no topic"]
    q1 = top[top["query"] == 1]
    assert list(q1.train_id) == [7, 6] and list(q1["rank"]) == [1, 2]
    sh = rp.top_shares(top)
    assert sh.loc[("m", 0), "fiction"] == pytest.approx(0.5)
    assert sh.loc[("m", 0), "other"] == pytest.approx(0.25)
    assert sh.loc[("m", 1), "distractor"] == pytest.approx(1.0)
    np.testing.assert_allclose(sh.sum(axis=1), 1.0)
    ts = rp.top_shares(top, "topic_match")
    assert ts.loc[("m", 1), "other topic"] == pytest.approx(1.0)
    summ = rp.share_summary(sh, rp.corpus_shares(train), n_boot=100).set_index("value")
    assert summ.loc["distractor", "share"] == pytest.approx(0.5)
    assert summ.loc["distractor", "enrichment"] == pytest.approx(0.5 / (4 / 22))
    with pytest.raises(ValueError, match="k must be"):
        rp.top_frame(s, queries, train, "m", k=0)
    with pytest.raises(ValueError, match="scores has shape"):
        rp.top_frame(s[:1], queries, train, "m", k=3)


def test_category_means_known_values():
    train = _train()
    queries = pd.DataFrame({"topic": ["a", "a", "b"]})
    # score = 1 on topic a's assistant rows, 3 on topic b's assistant rows, 0 elsewhere
    s = np.zeros((3, len(train)))
    s[:, [0, 1]] = 1.0
    s[:, [8, 9]] = 3.0
    m = rp.category_means(s, queries, train, "m", n_boot=100).set_index(["category", "topic_match"])
    # queries 0, 1 (topic a): same 1, other 3; query 2 (topic b): same 3, other 1
    assert m.loc[("assistant", "same topic"), "mean_per_copy"] == pytest.approx(5 / 3)
    assert m.loc[("assistant", "other topic"), "mean_per_copy"] == pytest.approx(7 / 3)
    assert m.loc[("other", "no topic"), "mean_per_copy"] == pytest.approx(0.0)
    assert (m.queries == 3).all()


def test_paired_share_trend_and_helpers():
    idx = pd.MultiIndex.from_product([["xs", "l"], range(6)], names=["model", "query"])
    shares = pd.DataFrame(0.0, index=idx, columns=list(rp.CATEGORIES))
    shares.loc["xs", "distractor"] = 0.5
    shares.loc["xs", "fiction"] = [0.0, 0.1, 0.1, 0.2, 0.0, 0.1]
    shares.loc["l", "fiction"] = [0.3, 0.4, 0.5, 0.5, 0.2, 0.6]
    t = rp.paired_share_trend(shares, ["fiction", "essay"], "xs", "l")
    assert t["direction"] == "rises" and t["queries"] == 6
    assert t["xs"] == pytest.approx(0.5 / 6) and t["l"] == pytest.approx(2.5 / 6)
    assert t["wilcoxon_p"] == pytest.approx(2 / 2**6)
    d = rp.paired_share_trend(shares, ["distractor"], "xs", "l")
    assert d["direction"] == "falls"
