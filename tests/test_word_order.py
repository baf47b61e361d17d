"""Notebook 05's analysis (influence.study.word_order) on small synthetic inputs with known
answers."""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest

from influence.study import word_order as wo


def _world(n_facts: int = 3, templates: int = 2):
    """A candidate frame: each fact's group templates (and a non-word-order decoy row);
    queries one per fact. Returns (candidates, queries)."""
    rows = []
    for f in range(n_facts):
        for g in wo.GROUPS:
            for t in range(templates):
                rows.append({"kind": "word_order", "fact_id": f, "group": g, "template_id": t})
    rows.append({"kind": "fact", "fact_id": 0, "group": "", "template_id": 0})
    cands = pd.DataFrame(rows)
    cands.insert(0, "id", range(len(cands)))
    cands["text"] = [f"seq {i}" for i in cands.id]
    queries = pd.DataFrame({"fact_id": list(range(n_facts))})
    return cands, queries


def _scores(cands, queries, value):
    """[Q, C] with value(fact, group, template) on each query's own candidates and a large
    decoy (999) everywhere else, so that picking a wrong row shows."""
    s = np.full((len(queries), len(cands)), 999.0)
    for qi, f in enumerate(queries.fact_id):
        for r in cands.itertuples():
            if r.kind == "word_order" and r.fact_id == f:
                s[qi, r.id] = value(f, r.group, r.template_id)
    return s


def test_group_frame_picks_each_facts_candidates():
    cands, queries = _world()
    s = _scores(cands, queries, lambda f, g, t: 100 * f + 10 * wo.GROUPS.index(g) + t)
    fr = wo.group_frame(s, queries, cands, "m")
    assert len(fr) == 3 * 6 * 2
    assert not (fr.per_copy == 999).any()
    expect = 100 * fr.fact_id + 10 * fr.group.map(wo.GROUPS.index) + fr.template_id
    np.testing.assert_array_equal(fr.per_copy.to_numpy(), expect.to_numpy())
    with pytest.raises(ValueError, match="per_copy has shape"):
        wo.group_frame(s[:, :-1], queries, cands, "m")
    with pytest.raises(ValueError, match="no word-order candidates"):
        wo.group_frame(s, pd.DataFrame({"fact_id": [0, 1, 7]}), cands, "m")


# rewording 10, flipped 1, names only 1, semantic change 6, flipped without prompt 0.5,
# completion removed −1 (times 1 + fact): the paper's picture
BASE = {"rewording": 10.0, "semantic_change": 6.0, "irrelevant_with_names": 1.0,
        "flipped": 1.0, "flipped_no_prompt": 0.5, "completion_removed": -1.0}  # fmt: skip


def _frame(n_facts=4, models=("m",), value=None):
    cands, queries = _world(n_facts=n_facts)

    def paper(f, g, t):
        return BASE[g] * (1 + f) + (t - 0.5) * 0.01  # template offsets cancel in the mean

    return pd.concat(
        [wo.group_frame(_scores(cands, queries, value or paper), queries, cands, m)
         for m in models], ignore_index=True,
    )  # fmt: skip


def test_group_summary_and_contrasts_known_values():
    fr = _frame()
    summ = wo.group_summary(fr, n_boot=200).set_index("group")
    # mean over facts of (1 + f) = 2.5
    assert summ.loc["rewording", "mean"] == pytest.approx(25.0)
    assert summ.loc["flipped", "mean"] == pytest.approx(2.5)
    assert summ.loc["rewording", "low"] <= 25.0 <= summ.loc["rewording", "high"]
    assert (summ.facts == 4).all() and (summ.sequences == 8).all()
    v = wo.contrast_values(fr)
    assert list(v) == list(wo.CONTRASTS)
    # the (1 + f) factor cancels in every ratio
    np.testing.assert_allclose(v["rewording / flipped"]["m"], 1.0)
    np.testing.assert_allclose(v["flipped / names only"]["m"], 0.0, atol=1e-12)
    np.testing.assert_allclose(v["prompt first / completion first"]["m"], np.log10(8 / 0.75))
    t = wo.contrast_table(v, ["m"], n_boot=50).set_index("contrast")
    assert t.loc["rewording / flipped", "median"].startswith("10× [10×, 10×]")
    assert t.loc["rewording / flipped", "above_1"] == 1.0
    assert t.loc["rewording / flipped", "p"] == pytest.approx(2 * 0.5**4)
    assert np.isnan(t.loc["flipped / names only", "p"])  # every ratio exactly 1: no test


def test_contrasts_of_negative_and_zero_influence():
    # flipped has no positive influence: the drop is complete (+3); rewording negative: −3
    def value(f, g, t):
        return {"rewording": 1.0 if f == 0 else -1.0, "flipped": -0.5 if f == 0 else 2.0}.get(
            g, 1.0
        )

    v = wo.contrast_values(_frame(n_facts=2, value=value))["rewording / flipped"]["m"]
    assert v.tolist() == [3.0, -3.0]
    assert wo.ratio_text(3.0) == "≥ 1,000×" and wo.ratio_text(-3.0) == "≤ 0.001×"
    assert wo.ratio_text(np.log10(4.2)) == "4.2×"


def test_trend_table_reads_each_contrast_over_sizes():
    params = {"xs": 1_000, "s": 10_000, "l": 100_000}
    gain = {"xs": 1.0, "s": 3.0, "l": 9.0}  # rewording grows against flipped with size
    v = {}
    for m, g in gain.items():
        fr = _frame(n_facts=8, value=lambda f, grp, t, g=g: (BASE[grp] * g if grp == "rewording"
                                                             else BASE[grp]) * (1 + f))  # fmt: skip
        for name, val in wo.contrast_values(fr).items():
            v.setdefault(name, []).append(val["m"].rename(m))
    values = {name: pd.concat(cols, axis=1) for name, cols in v.items()}
    t = wo.trend_table(values, params, n_boot=50).set_index("contrast")
    row = t.loc["rewording / flipped"]
    assert [row["xs"], row["s"], row["l"]] == ["10×", "30×", "90×"]
    assert row.change.startswith(f"{np.log10(9):.2g}")
    assert row.p == pytest.approx(2 / 2**8)  # all eight slopes positive
    assert t.loc["flipped / names only", "change"].startswith("0")


PARAMS = {"xs": 1_000, "s": 10_000, "l": 100_000}


def _values(first, flipped, names):
    """Contrast frames [fact × model] with the given per-fact values at every size."""
    return {
        name: pd.DataFrame({m: x for m in PARAMS})
        for name, x in zip(wo.CONTRASTS, (first, flipped, names), strict=True)
    }


def test_findings_agree_disagree_and_negative_control():
    rng = np.random.default_rng(0)
    n = 12
    noise = rng.uniform(-0.1, 0.1, n)
    agree = wo.findings(_values(1.3 + noise, 1.5 + noise, -0.5 + noise), PARAMS, n_boot=200)
    assert [f.verdict for f in agree] == ["agrees"] * 3, [f.reason for f in agree]
    assert agree[1].ours.startswith("median rewording / flipped at l: ")
    # the opposite: flipped carry more than rewordings, less than 10× apart, more than names
    opposite = wo.findings(_values(-0.5 + noise, 0.2 + noise, 0.6 + noise), PARAMS, n_boot=200)
    assert [f.verdict for f in opposite] == ["disagrees"] * 3, [f.reason for f in opposite]
    # negative control: every fact a coin flip around each claim's line
    coin = rng.choice([-0.5, 0.5], size=n)
    control = wo.findings(_values(coin, 1.0 + coin[::-1], coin), PARAMS, n_boot=200)
    assert [f.verdict for f in control] == ["inconclusive"] * 3, [f.reason for f in control]
    # flipped exactly as influential as the names alone: a difference test cannot agree
    equal = wo.findings(_values(1.3 + noise, 1.5 + noise, np.zeros(n)), PARAMS, n_boot=50)
    assert equal[2].verdict == "inconclusive" and "no test is possible" in equal[2].reason
    # three facts can never reach p < 0.05
    few = wo.findings(_values(np.full(3, 2.0), np.full(3, 2.0), np.full(3, -2.0)), PARAMS)
    assert all(f.verdict == "inconclusive" and "no test can reach" in f.reason for f in few)


def test_representative_facts_are_nearest_the_median():
    v = pd.DataFrame({"l": [0.0, 5.0, 1.0, 2.0, 1.2]}, index=[10, 11, 12, 13, 14])
    assert wo.representative_facts(v, "l", 2) == [14, 12]  # median 1.2
    assert wo.representative_facts(v, "l", 0) == [] and wo.representative_facts(v, "xs", 2) == []


def test_check_groups():
    wo.check_groups(["rewording", "flipped"])
    with pytest.raises(ValueError, match="valid groups: rewording"):
        wo.check_groups(["rewording", "flipd"])


def test_token_contributions_align_with_predicted_tokens():
    ids = [1, 7, 8, 9, 2, 0, 0]  # <bos> a b c <eos> pad pad
    labels = [1, 7, 8, 9, 2, -100, -100]
    by_token = np.array([0.5, -1.0, 2.0, 0.25, 0.0, 0.0, 0.0])
    out = wo.token_contributions(by_token, ids, labels)
    # position t predicts token t+1: <bos>'s output predicts 7, ..., c's output predicts <eos>
    assert out == [(7, 0.5), (8, -1.0), (9, 2.0), (2, 0.25)]
    assert sum(v for _, v in out) == pytest.approx(by_token.sum())


def test_span_share():
    toks = [("The", 1.0), (" cap", 1.0), (" Par", 2.0), ("is", 4.0), (".", 0.0), ("</s>", 2.0)]
    text = "The cap Paris."
    assert wo.span_share(toks, text, "Paris") == pytest.approx(6 / 10)
    assert np.isnan(wo.span_share(toks, text, "Rome"))


def test_token_table_adds_up_to_the_stage_scores(tmp_path, monkeypatch):
    """On a tiny model: each drawn candidate's token terms add up to the stage's candidate
    score, every token is drawn, and the answer's shares are shares."""
    from influence.study.influence_scores import study_scores
    from influence.study.suite import load_suite

    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path))
    tiny = [{"name": "t", "hidden": 16, "layers": 1, "intermediate": 32, "heads": 1}]
    train_cfg = {"epochs": 1, "batch_size": 32, "lr": 3e-3, "warmup_frac": 0.1,
                 "min_lr_ratio": 0.1, "weight_decay": 0.0, "log_every": 2,
                 "threads": 1}  # fmt: skip
    suite = load_suite("smoke", sizes=tiny, train=train_cfg, progress=False)
    st = study_scores(suite, "smoke", progress=False, query_sets=["word_order"],
                      dtype="float64")  # fmt: skip
    queries, cands = st.queries("word_order"), st.candidate_frame("word_order")
    frame = wo.group_frame(st.candidate_per_copy("t", "word_order"), queries, cands, "t")
    fact = int(queries["fact_id"].iloc[1])
    groups = ["rewording", "flipped"]
    t, gap = wo.token_table(st, "t", frame, queries, [fact], groups)
    assert gap < 1e-9  # float64: the token terms sum to the stage's scores
    assert t["group"].tolist() == [wo.GROUP_LABELS[g] for g in groups]
    assert (t["fact_id"] == fact).all()
    assert t["answer_share"].between(0, 1).all() and t["answer_tokens"].between(0, 1).all()
    first = frame[(frame["query"] == 1) & (frame["group"] == "rewording")]
    text = first[first["template_id"] == 0]["text"].iloc[0]
    plain = html.unescape(re.sub(r"<[^>]+>", "", t["tokens"].iloc[0])).replace("·", " ")
    assert text in plain  # every token drawn, in order
    assert ">EOS<" in t["tokens"].iloc[0]  # the end of sequence is drawn
    with pytest.raises(ValueError, match="valid groups"):
        wo.token_table(st, "t", frame, queries, [fact], ["flip"])


def test_figures_fit_the_page_at_five_sizes():
    from test_cross_lingual import fits_the_page

    from influence.study import style

    style.apply()
    models = ("xs", "s", "m", "l", "xl")
    params = {m: 10 ** (3 + i) for i, m in enumerate(models)}
    fr = _frame(n_facts=6, models=models)
    fig = wo.plot_groups(wo.group_summary(fr, n_boot=20), wo.fact_means(fr), list(models))
    assert fits_the_page(fig)
    assert fits_the_page(wo.plot_contrasts(wo.contrast_values(fr), params, n_boot=20))
