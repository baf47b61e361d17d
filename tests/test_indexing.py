"""influence.study.indexing: notebook 08's gradient-index section. Sizes per layer capped at the
layer, the cached index against pairwise_scores (an eigen index keeping every eigenvector is
exact), the cache entry reused and rebuilt when damaged, the accuracy table and the figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from brute_force import fitted, lm_data, tiny_llama
from datasets import Dataset

import influence as inf
from influence.study import indexing as ix
from influence.study import style


@pytest.fixture(scope="module")
def setting():
    model, task = tiny_llama(), inf.LanguageModelingTask()
    data = lm_data(20, min_len=3)
    est = fitted(inf.EKFAC, model, task, data)
    queries = lm_data(3, seed=7, prompt=2)
    return model, task, est, Dataset.from_dict({k: v.tolist() for k, v in data.items()}), queries


def test_layer_sizes_cap_each_side_at_the_layer(setting):
    _, _, est, _, _ = setting
    k_s, k_a = ix.layer_sizes(est, 10)
    for n, info in est.layers_.items():
        assert k_s[n] == min(10, info.out_features) and k_a[n] == min(10, info.in_dim)
    assert any(k_s[n] < 10 or k_a[n] < 10 for n in k_s)  # the cap is exercised
    assert set(ix.layer_sizes(est, 1)[0].values()) == {1}
    with pytest.raises(ValueError, match="positive integer"):
        ix.layer_sizes(est, 0)
    comps = ix.compressions(est, [2, 4], 3, seed=5)
    assert list(comps) == ["eigen 2", "eigen 4", "random 3"]
    assert isinstance(comps["random 3"], inf.RandomCompression) and comps["random 3"].seed == 5
    assert [ix.compression_kind(n) for n in comps] == ["eigen", "eigen", "random"]


def test_cached_index_is_exact_when_whole_and_reused_from_the_cache(setting, tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path))
    model, task, est, train, queries = setting
    positions = [1, 4, 5, 9, 12, 17]
    exact = inf.pairwise_scores(model, task, est, queries, train, batch_size=5, progress=False)
    exact = exact[:, positions]
    whole = inf.EigenCompression(*ix.layer_sizes(est, 10_000))
    built = ix.cached_index(model, task, est, train, positions, whole, source="t", batch_size=5)
    assert not built.cached and built.build_s > 0 and built.index.num_examples == len(positions)
    ag, query_s, _ = ix.index_accuracy(built.index, model, task, queries, exact, top=3)
    # Every eigenvector kept: the index equals the exact scores up to float32 storage.
    assert (ag["pearson"] > 1 - 1e-6).all() and (ag["top_overlap"] == 1).all() and query_s > 0
    scores = built.index.scores(model, task, queries)
    torch.testing.assert_close(scores.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max())
    # Asked again: the cache entry, with the time its build took.
    again = ix.cached_index(model, task, est, train, positions, whole, source="t", batch_size=5)
    assert again.cached and again.build_s == built.build_s
    # A smaller index is another entry, and not exact (so the check above can fail).
    small = inf.EigenCompression(*ix.layer_sizes(est, 1))
    low = ix.cached_index(model, task, est, train, positions, small, source="t", batch_size=5)
    assert not low.cached
    assert low.index.bytes_per_example < built.index.bytes_per_example
    ag_low, _, _ = ix.index_accuracy(low.index, model, task, queries, exact, top=3)
    assert ag_low["pearson"].mean() < 0.999
    # A damaged entry is moved aside and built again.
    entry = built.index.path.parent
    (entry / "build.json").write_text("{}")
    rebuilt = ix.cached_index(model, task, est, train, positions, whole, source="t", batch_size=5)
    assert not rebuilt.cached and rebuilt.index.num_examples == len(positions)
    assert any((tmp_path / "gradient_index" / ".broken").iterdir())
    with pytest.raises(ValueError, match="positions must be training sequences 0..19"):
        ix.cached_index(model, task, est, train, [3, 20], whole, source="t")


def _rows():
    rng = np.random.default_rng(0)
    out = {}
    cases = (("eigen 4", 64, 0.5), ("eigen 16", 1024, 0.9), ("random 16", 1024, 0.7))
    for name, nbytes, level in cases:
        built = type("B", (), {})()
        built.index = type("I", (), {"bytes_per_example": nbytes})()
        built.build_s, built.build_cpu_s = 2.0, 1.5
        ag = pd.DataFrame({"pearson": level + 0.05 * rng.random(8),
                           "top_overlap": level - 0.1 * rng.random(8)})  # fmt: skip
        out[name] = (built, ag, 0.5, 0.4)
    return out


def test_index_table_and_figure():
    table = ix.index_table(_rows(), exact_s=4.0, n_boot=50)
    assert table["compression"].tolist() == ["eigen 4", "eigen 16", "random 16"]
    assert table["kind"].tolist() == ["eigen", "eigen", "random"]
    assert table["build_vs_exact"].tolist() == [0.5] * 3
    assert table["query_vs_exact"].tolist() == [0.125] * 3
    assert (table["pearson_low"] <= table["pearson"]).all()
    assert (table["pearson"] <= table["pearson_high"]).all()
    assert table.loc[1, "pearson"] == pytest.approx(_rows()["eigen 16"][1]["pearson"].mean())
    assert not style.small_texts(ix.plot_index(table, 4096, 10))
