"""Notebook 04's analysis (influence.study.cross_lingual) on small synthetic inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_abstraction import FakeScores, _fact, _row

from influence.study import cross_lingual as X


def test_own_sequence_stats_known_ranks():
    s = np.array([5.0, 1.0, 4.0, 4.0, -2.0, 0.0])
    st = X.own_sequence_stats(s, np.array([2, 4]), k=3)
    # own best is 4.0, tied with row 3: ranked pessimistically (5, 4, 4 are >= 4) -> 3
    assert st["best_rank"] == 3
    # stable top-3 = rows 0, 2, 3 -> one own
    assert st["top_share"] == pytest.approx(1 / 3)
    assert st["own_mean"] == pytest.approx(1.0)
    assert st["others_mean"] == pytest.approx((5 + 1 + 4 + 0) / 4)
    assert X.own_sequence_stats(s, np.array([0]), k=1)["best_rank"] == 1
    with pytest.raises(ValueError, match="own must hold"):
        X.own_sequence_stats(s, np.array([], dtype=int))


@pytest.fixture
def fake():
    train = pd.DataFrame(
        [
            _fact(0, "capital", "Ast", "Zor", lang="en"),  # 0  fact 0: English only
            _fact(0, "capital", "Ast", "Zor", t=1, lang="en"),  # 1
            _fact(1, "leader", "Bel", "Kim", lang="en"),  # 2  fact 1: every language
            _fact(1, "leader", "Bel", "Kim", lang="fr"),  # 3
            _fact(1, "leader", "Bel", "Kim", lang="de"),  # 4
            _row(kind="math", group="add"),  # 5
        ]
    )
    train.insert(0, "id", range(len(train)))
    queries = {
        "cross_lingual": pd.DataFrame(
            [_fact(0, "capital", "Ast", "Zor", lang="fr"), _fact(0, "capital", "Ast", "Zor",
                                                                 lang="de")]
        ),
        "facts": pd.DataFrame(
            [_fact(0, "capital", "Ast", "Zor", lang="en"), _fact(1, "leader", "Bel", "Kim")]
        ),
    }  # fmt: skip
    scores = {
        "xs": {
            # fr query: own rows (0, 1) rank 4th and 5th; de query: own row 1 first
            "cross_lingual": torch.tensor(
                [[1.0, 0.5, 3.0, 2.0, 1.5, 0.0], [0.0, 9.0, 1.0, 1.0, 1.0, 1.0]]
            ),
            "facts": torch.tensor([[4.0, 3.0, 0, 0, 0, 0], [0.0, 0, 1, 1, 1, 0]]),
        }
    }
    return FakeScores(train, queries, scores, {"xs": 1000})


def test_fact_languages_and_own_rows(fake):
    train = fake.train_frame()
    assert X.fact_languages(train) == {0: ("en",), 1: ("de", "en", "fr")}
    assert X.own_rows(train, 1).tolist() == [2, 3, 4]


def test_own_sequence_table_and_grid(fake):
    t = X.own_sequence_table(fake, "xs", k=2)
    # two cross-lingual queries + the diagonal: the one-language fact asked in English
    # (fact 1 is stated in every language, so its facts query is left out)
    assert t[["set", "X", "Y"]].values.tolist() == [
        ["cross_lingual", "fr", "en"],
        ["cross_lingual", "de", "en"],
        ["facts", "en", "en"],
    ]
    assert t["best_rank"].tolist() == [4, 1, 1]
    assert t["top_share"].tolist() == [0.0, 0.5, 1.0]
    assert t["own_mean"].iloc[0] == pytest.approx(0.75 / 6)  # per copy: score / N
    g = X.heatmap_grid(t, "top_share")
    assert list(g.index) == list(X.LANGS) and list(g.columns) == list(X.LANGS)
    assert g.loc["fr", "en"] == 0.0 and g.loc["de", "en"] == 0.5 and g.loc["en", "en"] == 1.0
    assert np.isnan(g.loc["en", "fr"])


def test_top_in_language():
    s = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    mask = np.array([False, True, True, False, True])
    assert X.top_in_language(s, mask, 2).tolist() == [1, 2]
    assert X.top_in_language(s, mask, 10).tolist() == [1, 2, 4]


def test_translation_protocol_matches_the_stage_scores(tmp_path, monkeypatch):
    """A tiny model scored on every facts query: the protocol's recomputed scores of each
    translation on the source query's top sequences equal the stage's own scores of that
    translation (scored as a facts query in its own right), summed over the same sequences."""
    from influence.study.influence_scores import study_scores
    from influence.study.suite import load_suite

    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path))
    tiny = [{"name": "t", "hidden": 16, "layers": 1, "intermediate": 32, "heads": 1}]
    train_cfg = {"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_frac": 0.1,
                 "min_lr_ratio": 0.1, "weight_decay": 0.0, "log_every": 2,
                 "threads": 1}  # fmt: skip
    suite = load_suite("smoke", sizes=tiny, train=train_cfg, progress=False)
    every = {"facts": 1000}  # more than the corpus has: every facts query is scored
    st = study_scores(suite, "smoke", progress=False, query_sets=["facts"], max_queries=every,
                      dtype="float64")  # fmt: skip
    tr, check = X.translation_protocol(st, "t", n_top=5, max_per_language=2)
    assert check < 1e-9  # float64: the recomputation is the same computation
    assert (
        len(tr) == 3 * tr["query"].nunique() and tr.groupby("source")["query"].nunique().max() <= 2
    )
    q = st.queries("facts").reset_index()
    train = st.train_frame()
    full = st.scores("t", "facts").double().numpy()
    for r in tr.itertuples():
        top = X.top_in_language(full[r.query], (train.language == r.source).to_numpy(), 5)
        j = q.index[(q.fact_id == r.fact_id) & (q.language == r.language)][0]
        assert r.influence == pytest.approx(full[j, top].sum() / st.n_train, rel=1e-9, abs=1e-12)
        if r.language == r.source:
            assert j == r.query and r.relative == pytest.approx(1.0)
