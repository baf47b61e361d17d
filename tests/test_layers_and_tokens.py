"""influence.study.layers_and_tokens: depths and thirds, layer shares and the restriction
experiment on hand-made scores with known answers, the token HTML and the tokenwise sum."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from brute_force import fitted, lm_data, tiny_llama

import influence as inf
from influence.study import layers_and_tokens as lt

L4 = [f"model.layers.{b}.mlp.{p}" for b in range(4) for p in ("gate_proj", "down_proj")]


def test_layer_depths_and_thirds():
    d = lt.layer_depths(L4)
    assert d["block"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert d["rel_depth"].tolist() == [0.125, 0.125, 0.375, 0.375, 0.625, 0.625, 0.875, 0.875]
    th = lt.depth_thirds(L4)
    assert th["lower"] == L4[:2] and th["middle"] == L4[2:6] and th["upper"] == L4[6:]
    # One block: all middle; two blocks: no middle third.
    assert lt.depth_thirds(["model.layers.0.mlp.up_proj"])["middle"] == [
        "model.layers.0.mlp.up_proj"
    ]
    two = lt.depth_thirds(["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"])
    assert two["middle"] == [] and len(two["lower"]) == len(two["upper"]) == 1
    with pytest.raises(ValueError, match="block index"):
        lt.block_index("mlp.up_proj")


def test_layer_shares_known_answer():
    # Two layers, 1 query, 4 sequences. Totals 3, 1, 5, -2 -> top-2 = {2, 0}.
    by_layer = {
        "model.layers.0.mlp.up_proj": torch.tensor([[1.0, 0.0, 4.0, -1.0]]),
        "model.layers.1.mlp.up_proj": torch.tensor([[2.0, 1.0, 1.0, -1.0]]),
    }
    s = lt.layer_shares(by_layer, k=2)
    # layer 0: (4 + 1) / 8, layer 1: (1 + 2) / 8.
    assert s.iloc[0].tolist() == pytest.approx([5 / 8, 3 / 8])
    # A query whose top-k total is not positive has no share.
    neg = {n: -v.abs() - 1 for n, v in by_layer.items()}
    assert lt.layer_shares(neg, 2).isna().all().all()


@dataclass
class FakeScores:
    by: dict

    models = ["m"]
    query_sets = ["facts", "math"]
    layers = {"m": L4}

    def by_layer(self, model, qs):
        return self.by[qs]


def fake(seed=0):
    g = torch.Generator().manual_seed(seed)
    by = {qs: {n: torch.randn(3, 20, generator=g) for n in L4} for qs in FakeScores.query_sets}
    return FakeScores(by)


def test_share_table_centroid_evenness_and_restriction():
    st = fake()
    # Make the upper block carry everything for math: centroid must be its depth.
    for n in L4[:6]:
        st.by["math"][n] = torch.zeros(3, 20)
    st.by["math"][L4[6]] = torch.arange(20.0).repeat(3, 1)
    st.by["math"][L4[7]] = torch.zeros(3, 20)
    tab = lt.layer_share_table(st, k=5)
    sums = tab.groupby(["model", "query_set", "query"])["share"].sum()
    assert np.allclose(sums[np.isfinite(sums)], 1.0)
    cen = lt.depth_centroid(tab).set_index(["query_set", "query"])["centroid"]
    assert np.allclose(cen.loc["math"], 0.875)
    th = lt.third_share_table(tab)
    assert np.allclose(th[th.query_set == "math"]["upper"], 1.0)
    ev = lt.evenness(tab)
    assert ev.loc["m", "layers"] == 8 and ev.loc["m", "uniform"] == 1 / 8

    # Restriction: ranking by the upper third only picks 19..15 for math.
    def classify(model, qs, idx):
        return np.where(idx.numpy() >= 15, "related", "other")

    def overlap(qs, idx):
        return idx.numpy() / 20

    rt = lt.restriction_table(st, 5, classify, overlap)
    up = rt[(rt.query_set == "math") & (rt.ranking == "upper")]
    assert sorted(up[up["query"] == 0]["train_index"]) == [15, 16, 17, 18, 19]
    comp = lt.composition(rt[rt.query_set == "math"])
    assert comp.loc[("m", "upper"), "related"] == 1.0
    assert set(rt.ranking) == {"all layers", "lower", "middle", "upper"}
    share = lt.per_query_share(rt, "related")
    assert share.loc[("m", "upper", "math", 0)] == 1.0


def test_token_html_colours_and_escapes():
    h = lt.token_html(["<a>", " b"], [1.0, -1.0], scale=1.0)
    assert "&lt;a&gt;" in h and h.count("<span") == 2
    # RdBu: +scale is the blue end, −scale the red end.
    pos, neg = h.split("</span>")[:2]
    r, g, b = (int(x) for x in pos.split("rgb(")[1].split(")")[0].split(","))
    assert b > r
    r, g, b = (int(x) for x in neg.split("rgb(")[1].split(")")[0].split(","))
    assert r > b
    with pytest.raises(ValueError, match="pieces"):
        lt.token_html(["a"], [1.0, 2.0], 1.0)


def test_tokenwise_scores_sum_to_totals_and_check_reports_it():
    model, task = tiny_llama(), inf.LanguageModelingTask()
    train, queries = lm_data(10, min_len=3), lm_data(2, seed=7, prompt=2)
    est = fitted(inf.EKFAC, model, task, train)
    tok = inf.pairwise_scores(model, task, est, queries, train, by_token=True, progress=False)
    tot = inf.pairwise_scores(model, task, est, queries, train, progress=False)
    chk = lt.token_check(tok, tot)
    assert chk["max_rel_diff"] < 1e-10  # float64: rounding only
    assert lt.token_check(tok, tot * 1.01)["max_rel_diff"] > 1e-3  # the check can fail
