"""influence.study.word_order on small synthetic inputs with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from influence.study import word_order as wo


def _world(n_facts: int = 3, templates: int = 2):
    """A training frame: per fact one plain fact row, then each group's templates; queries
    one per fact. Returns (train, queries)."""
    rows = []
    for f in range(n_facts):
        rows.append({"kind": "fact", "fact_id": f, "group": "", "template_id": 0})
        for g in wo.GROUPS:
            for t in range(templates):
                rows.append({"kind": "word_order", "fact_id": f, "group": g, "template_id": t})
    rows.append({"kind": "math", "fact_id": -1, "group": "add", "template_id": 0})
    train = pd.DataFrame(rows)
    train.insert(0, "id", range(len(train)))
    train["text"] = [f"seq {i}" for i in train.id]
    queries = pd.DataFrame({"fact_id": list(range(n_facts))})
    return train, queries


def _scores(train, queries, value):
    """[Q, N] with value(fact, group, template) on each query's own word-order rows and a
    large decoy (999) everywhere else, so that picking a wrong row shows."""
    s = np.full((len(queries), len(train)), 999.0)
    for qi, f in enumerate(queries.fact_id):
        for r in train.itertuples():
            if r.kind == "word_order" and r.fact_id == f:
                s[qi, r.id] = value(f, r.group, r.template_id)
    return s


def test_group_frame_picks_each_facts_sequences():
    train, queries = _world()
    s = _scores(train, queries, lambda f, g, t: 100 * f + 10 * wo.GROUPS.index(g) + t)
    fr = wo.group_frame(s, queries, train, "m")
    assert len(fr) == 3 * 6 * 2
    assert not (fr.per_copy == 999).any()
    expect = 100 * fr.fact_id + 10 * fr.group.map(wo.GROUPS.index) + fr.template_id
    np.testing.assert_array_equal(fr.per_copy.to_numpy(), expect.to_numpy())
    with pytest.raises(ValueError, match="per_copy has shape"):
        wo.group_frame(s[:, :-1], queries, train, "m")


def test_group_summary_and_ratio_known_values():
    train, queries = _world(n_facts=4)
    # rewording = 10 (+ fact), flipped = 1 (+ fact/10), names = flipped: the paper's picture
    base = {"rewording": 10.0, "flipped": 1.0, "irrelevant_with_names": 1.0}

    def value(f, g, t):
        return base.get(g, 0.5) * (1 + f) + (t - 0.5) * 0.01  # template offsets cancel

    s = _scores(train, queries, value)
    fr = wo.group_frame(s, queries, train, "m")
    summ = wo.group_summary(fr, n_boot=200).set_index("group")
    # mean over facts of (1 + f) = 2.5
    assert summ.loc["rewording", "mean"] == pytest.approx(25.0)
    assert summ.loc["flipped", "mean"] == pytest.approx(2.5)
    assert summ.loc["rewording", "lo"] <= 25.0 <= summ.loc["rewording", "hi"]
    assert (summ.facts == 4).all() and (summ.sequences == 8).all()
    r = wo.flipped_ratio(fr, n_boot=200).iloc[0]
    assert r.ratio == pytest.approx(10.0)
    # every resample keeps the 10:1 ratio of means, so the interval collapses onto it
    assert r.lo == pytest.approx(10.0) and r.hi == pytest.approx(10.0)
    assert r.share_numerator_higher == 1.0 and r.sign_test_p == pytest.approx(2 * 0.5**4)
    n = wo.flipped_vs_names(fr).iloc[0]
    assert n.difference == pytest.approx(0.0) and np.isnan(n.wilcoxon_p)
    gap = wo.normalised_gap(fr)
    np.testing.assert_allclose(gap["m"].to_numpy(), 9 / 11)


def test_size_trend_direction_and_pairing():
    gap = pd.DataFrame({"xs": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "l": [0.5, 0.7, 0.8, 0.9, 1, 1]})
    t = wo.size_trend(gap, "xs", "l")
    assert t["direction"] == "rises" and t["facts"] == 6
    assert t["xs"] == pytest.approx(0.35) and t["l"] == pytest.approx(0.8166666, rel=1e-6)
    assert t["wilcoxon_p"] == pytest.approx(2 / 2**6)  # all six differences positive, exact
    assert wo.size_trend(gap[["l", "xs"]], "l", "xs")["direction"] == "falls"


def test_token_contributions_align_with_predicted_tokens():
    ids = [1, 7, 8, 9, 2, 0, 0]  # <bos> a b c <eos> pad pad
    labels = [1, 7, 8, 9, 2, -100, -100]
    by_token = np.array([0.5, -1.0, 2.0, 0.25, 0.0, 0.0, 0.0])
    out = wo.token_contributions(by_token, ids, labels)
    # position t predicts token t+1: <bos>'s output predicts 7, ..., c's output predicts <eos>
    assert out == [(7, 0.5), (8, -1.0), (9, 2.0), (2, 0.25)]
    assert sum(v for _, v in out) == pytest.approx(by_token.sum())


def test_token_html_colours_and_escapes():
    page = wo.token_html([("row <1>", [("a", 1.0), (" <b>", -1.0), ("c", 0.0)])])
    assert "rgb(255, 0, 0)" in page and "rgb(0, 0, 255)" in page  # saturated ends
    assert "rgb(255, 255, 255)" in page  # zero is white
    assert "&lt;b&gt;" in page and "row &lt;1&gt;" in page and "<b>" not in page


def test_span_share():
    toks = [("The", 1.0), (" cap", 1.0), (" Par", 2.0), ("is", 4.0), (".", 0.0), ("</s>", 2.0)]
    text = "The cap Paris."
    assert wo.span_share(toks, text, "Paris") == pytest.approx(6 / 10)
    assert np.isnan(wo.span_share(toks, text, "Rome"))
