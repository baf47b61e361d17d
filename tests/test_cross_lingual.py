"""Notebook 04's analysis (influence.study.cross_lingual) on small synthetic inputs with known
answers, and the translation protocol against the scores stage on a tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_abstraction import FakeScores, _fact, _row

from influence.study import cross_lingual as X
from influence.study import stats


def test_own_sequence_stats_known_ranks():
    s = np.array([5.0, 1.0, 4.0, 4.0, -2.0, 0.0])
    st = X.own_sequence_stats(s, np.array([2, 4]), k=3)
    # own best is 4.0, tied with row 3: ranked pessimistically (5, 4, 4 are >= 4) -> 3
    assert st["best_rank"] == 3
    # stable top-3 = rows 0, 2, 3 -> one own
    assert st["top_share"] == pytest.approx(1 / 3)
    assert st["base_rate"] == pytest.approx(2 / 6)
    assert st["own_mean"] == pytest.approx(1.0)
    assert st["others_mean"] == pytest.approx((5 + 1 + 4 + 0) / 4)
    assert X.own_sequence_stats(s, np.array([0]), k=1)["best_rank"] == 1
    with pytest.raises(ValueError, match="own must hold"):
        X.own_sequence_stats(s, np.array([], dtype=int))


def _named(names, *args, **kw):
    return _fact(*args, **kw) | {"names": names}


@pytest.fixture
def fake():
    train = pd.DataFrame(
        [
            _named("localized", 0, "capital", "Ast", "Zor", lang="en"),  # 0 fact 0: en only
            _named("localized", 0, "capital", "Ast", "Zor", t=1, lang="en"),  # 1
            _named("localized", 1, "leader", "Bel", "Kim", lang="en"),  # 2 fact 1: everywhere
            _named("localized", 1, "leader", "Bel", "Kim", lang="fr"),  # 3
            _named("localized", 1, "leader", "Bel", "Kim", lang="de"),  # 4
            _named("shared", 2, "capital", "Cor", "Dun", lang="fr"),  # 5 fact 2: fr only
            _row(kind="math", group="add") | {"names": ""},  # 6
        ]
    )
    train.insert(0, "id", range(len(train)))
    queries = {
        "cross_lingual": pd.DataFrame(
            [
                _named("localized", 0, "capital", "Ast", "Zor", lang="fr"),
                _named("localized", 0, "capital", "Ast", "Zor", lang="de"),
                _named("shared", 2, "capital", "Cor", "Dun", lang="en"),
            ]
        ),
    }
    scores = {
        "xs": {
            # fr query: own rows (0, 1) rank 4th and 6th; de query: own row 1 first;
            # shared en query: its own row 5 first
            "cross_lingual": torch.tensor(
                [
                    [1.0, 0.5, 3.0, 2.0, 1.5, 0.0, 0.7],
                    [0.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                    [0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0],
                ]
            ),
        }
    }
    return FakeScores(train, queries, scores, {"xs": 1000})


def test_fact_languages_and_own_rows(fake):
    train = fake.train_frame()
    assert X.fact_languages(train) == {0: ("en",), 1: ("de", "en", "fr"), 2: ("fr",)}
    assert X.own_rows(train, 1).tolist() == [2, 3, 4]


def test_own_sequence_table_and_share_table(fake):
    t = X.own_sequence_table(fake, "xs", k=2)
    assert t[["names", "X", "Y"]].values.tolist() == [
        ["localized", "fr", "en"],
        ["localized", "de", "en"],
        ["shared", "en", "fr"],
    ]
    assert t["best_rank"].tolist() == [4, 1, 1]
    assert t["top_share"].tolist() == [0.0, 0.5, 0.5]
    assert t["base_rate"].tolist() == pytest.approx([2 / 7, 2 / 7, 1 / 7])
    assert t["own_mean"].iloc[0] == pytest.approx(0.75 / 7)  # per copy: score / N
    s = X.own_share_table(t, ["xs"], n_boot=50).set_index("names")
    assert list(s.index) == [X.NAME_LABELS["localized"], X.NAME_LABELS["shared"]]
    loc = s.loc[X.NAME_LABELS["localized"]]
    assert loc["queries"] == 2 and loc["base_rate"] == pytest.approx(2 / 7)
    assert loc["enrichment"] == pytest.approx(0.25 / (2 / 7))
    assert loc["top_share"].startswith("25%")


def test_a_query_about_a_fact_stated_everywhere_is_refused(fake):
    fake._queries["cross_lingual"] = pd.DataFrame(
        [_named("localized", 1, "leader", "Bel", "Kim", lang="fr")]
    )
    fake._scores["xs"]["cross_lingual"] = torch.zeros(1, 7)
    with pytest.raises(ValueError, match="stated in one language"):
        X.own_sequence_table(fake, "xs")


def test_top_in_language():
    s = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    mask = np.array([False, True, True, False, True])
    assert X.top_in_language(s, mask, 2).tolist() == [1, 2]
    assert X.top_in_language(s, mask, 10).tolist() == [1, 2, 4]


PARAMS = {"xs": 1_000, "s": 10_000, "l": 100_000}


def _protocol(ratios: dict[str, np.ndarray], names: str = "localized") -> pd.DataFrame:
    """Protocol rows: ratios[model][q, t] is query q's log10 ratio for its t-th translation
    (en sources, translations fr and de), plus each query's own (source) row."""
    rows = []
    for m, r in ratios.items():
        for q in range(r.shape[0]):
            rows.append({"model": m, "query": q, "fact_id": q, "names": names, "source": "en",
                         "language": "en", "influence": 1.0, "original": 1.0,
                         "log_ratio": 0.0})  # fmt: skip
            for t, lang in enumerate(("fr", "de")):
                rows.append({"model": m, "query": q, "fact_id": q, "names": names,
                             "source": "en", "language": lang, "influence": 10 ** r[q, t],
                             "original": 1.0, "log_ratio": r[q, t]})  # fmt: skip
    return pd.DataFrame(rows)


def _own(shares: np.ndarray, names: str = "localized", base: float = 0.01) -> pd.DataFrame:
    """Own-statement rows: shares[q, j] is query q's top-k share at the j-th model."""
    return pd.DataFrame(
        [{"model": m, "query": q, "names": names, "top_share": shares[q, j], "base_rate": base,
          "best_rank": 1} for q in range(shares.shape[0]) for j, m in enumerate(PARAMS)]
    )  # fmt: skip


def _ratios(values: np.ndarray) -> dict[str, np.ndarray]:
    """values[q, j, t] -> {model: [q, t]}."""
    return {m: values[:, j, :] for j, m in enumerate(PARAMS)}


def test_pair_table_and_median_summary_known_values():
    q = 5
    vals = np.zeros((q, 3, 2))
    vals[:, :, 0] = -2.0  # en → fr keeps 1% at every size
    vals[:, :, 1] = np.arange(q)[:, None] * -0.5  # en → de: 0, −0.5, ..., −2 (median −1)
    proto = _protocol(_ratios(vals))
    pairs = X.pair_table(proto, list(PARAMS), n_boot=50).set_index("pair")
    assert list(pairs.index) == ["en → de", "en → fr"]
    assert pairs.loc["en → fr", "median_xs"] == pytest.approx(-2.0)
    assert pairs.loc["en → de", "median_l"] == pytest.approx(-1.0)
    assert pairs.loc["en → fr", "xs"].startswith("1%") and pairs.loc["en → fr", "queries"] == q
    summ = X.median_summary(proto, list(PARAMS), n_boot=50)
    # per query: mean of its two translations, (−2 + (−0.5 q)) / 2; median over q = −1.5
    assert summ["median"].tolist() == pytest.approx([-1.5] * 3)
    assert set(summ["names"]) == {"localized"} and (summ["queries"] == q).all()
    assert X.ratio_text(-1.0) == "10%" and X.ratio_text(-3.0) == "≤ 0.1%"


def _verdicts(proto, own):
    return {f.name: f.verdict for f in X.findings(proto, own, PARAMS, n_boot=200)}


def test_findings_agree_disagree_and_negative_control():
    q = 12
    rng = np.random.default_rng(0)
    steps = np.array([0.0, 0.75, 1.5])  # log10 ratio gained per size (xs, s, l)
    noise = rng.uniform(-0.2, 0.2, (q, 1, 2))
    rising = -2.0 + steps[None, :, None] + noise  # 1% at xs, rising to about 30%
    share_up = np.tile([0.0, 0.2, 0.4], (q, 1))
    # the control set does the opposite: the findings must ignore it
    control = _protocol(_ratios(np.zeros((q, 3, 2)) + 0.1), names="shared")
    proto = pd.concat([_protocol(_ratios(rising)), control], ignore_index=True)
    own = pd.concat([_own(share_up), _own(share_up[:, ::-1], names="shared")])
    found = X.findings(proto, own, PARAMS, n_boot=200)
    assert [f.verdict for f in found] == ["agrees"] * 3, [f.reason for f in found]
    assert found[2].base_rate == "1%"
    assert found[0].ours.startswith("median translated / original at xs: 0.96% [")

    # the opposite: translations keep all the influence at xs and lose it with size
    falling = -steps[None, :, None] + noise
    opposite = _verdicts(_protocol(_ratios(falling)), _own(share_up[:, ::-1]))
    assert set(opposite.values()) == {"disagrees"}, opposite

    # negative control: every query a coin flip around the near-zero line, no trend
    coin = np.log10(X.NEAR_ZERO) + rng.choice([-0.5, 0.5], size=(q, 3, 2))
    flat = rng.choice([0.0, 0.1], size=(q, 3))
    control_v = _verdicts(_protocol(_ratios(coin)), _own(flat))
    assert set(control_v.values()) == {"inconclusive"}, control_v


def test_findings_without_localized_queries_are_inconclusive():
    q = 4
    proto = _protocol(_ratios(np.zeros((q, 3, 2))), names="shared")
    own = _own(np.zeros((q, 3)), names="shared")
    found = X.findings(proto, own, PARAMS, n_boot=50)
    assert [f.verdict for f in found] == ["inconclusive"] * 3
    assert all("no test is possible" in f.reason for f in found)


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
    assert len(tr) == 3 * tr["query"].nunique()
    assert set(tr["names"]) == {"localized", "shared"}  # both name sets, capped separately
    assert tr.groupby(["source", "names"])["query"].nunique().max() <= 2
    q = st.queries("facts").reset_index()
    train = st.train_frame()
    full = st.scores("t", "facts").double().numpy()
    for r in tr.itertuples():
        top = X.top_in_language(full[r.query], (train.language == r.source).to_numpy(), 5)
        j = q.index[(q.fact_id == r.fact_id) & (q.language == r.language)][0]
        assert r.influence == pytest.approx(full[j, top].sum() / st.n_train, rel=1e-9, abs=1e-12)
        assert r.original == pytest.approx(full[r.query, top].sum() / st.n_train, rel=1e-9)
        if r.original > 0:
            assert r.log_ratio == pytest.approx(float(stats.log_ratio(r.influence, r.original)))
        if r.language == r.source:
            assert j == r.query and r.log_ratio == pytest.approx(0.0)
        # a translation uses its own language's names: the query text differs from the source
        if r.names == "localized" and r.language != r.source:
            assert q.loc[j, "subject"] != q.loc[r.query, "subject"]


def fits_the_page(fig) -> bool:
    """What `Report.figure` requires: no text under 9 pt, at most 10.4 in wide once saved."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    from influence.study import style

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=style.FIGURE_DPI, bbox_inches="tight")
    small = style.small_texts(fig)
    plt.close(fig)
    width = Image.open(buf).size[0] / style.FIGURE_DPI
    return not small and width <= style.MAX_WIDTH_IN


def test_figures_fit_the_page_at_five_sizes_and_both_name_sets():
    from influence.study import style

    style.apply()
    models = ["xs", "s", "m", "l", "xl"]
    params = {m: 10 ** (3 + i) for i, m in enumerate(models)}
    rng = np.random.default_rng(0)
    parts = []
    for names in X.NAME_SETS:
        for src in X.LANGS:
            p = _protocol({m: rng.uniform(-3, 0, (3, 2)) for m in models}, names=names)
            targets = [t for t in X.LANGS if t != src]
            lang = p["language"].map({"en": src, "fr": targets[0], "de": targets[1]})
            parts.append(p.assign(source=src, language=lang, query=p["query"] + 10 * len(parts)))
    proto = pd.concat(parts, ignore_index=True)
    pairs = X.pair_table(proto, models, n_boot=20)
    assert len(pairs) == 2 * 6
    assert fits_the_page(X.plot_pair_heatmaps(pairs, models))
    assert fits_the_page(X.plot_median_ratio(X.median_summary(proto, models, n_boot=20), params))
