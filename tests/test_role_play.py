"""Notebook 06's analysis (influence.study.role_play) on small synthetic inputs with known
answers, and its findings with negative controls."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from influence.study import capability, style  # noqa: E402
from influence.study import role_play as rp  # noqa: E402

LABEL_COLUMNS = ("kind", "fact_id", "relation", "template_id", "language", "group", "order",
                 "category", "topic", "subject", "object")  # fmt: skip


def _row(**kw):
    base = dict.fromkeys(LABEL_COLUMNS, "")
    base.update(fact_id=-1, template_id=-1, language="en")
    return {**base, **kw}


def _train():
    """Two topics × (assistant, fiction, essay, distractor), 2 each (ids 0-15); 2 format
    controls (16, 17); 2 unrelated passages (18, 19); 4 facts (20-23)."""
    rows = []
    for topic in ("a", "b"):
        for cat in ("assistant", "fiction", "essay", "distractor"):
            rows += [_row(kind="role_play", category=cat, topic=topic)] * 2
    rows += [_row(kind="role_play", category="format_control")] * 2
    rows += [_row(kind="role_play", category="unrelated")] * 2
    rows += [_row(kind="fact", fact_id=i, relation="capital", subject=f"S{i}", object=f"O{i}")
             for i in range(4)]  # fmt: skip
    train = pd.DataFrame(rows)
    train.insert(0, "id", range(len(train)))
    train["text"] = [f"seq {i}" for i in train.id]
    return train


def _queries(topics=("a", "b")):
    q = pd.DataFrame([_row(kind="role_play", category="assistant", topic=t) for t in topics])
    q["prompt"], q["completion"] = "Human: hi\nAssistant:", " no"
    q["group"] = "seen_completion"
    q.index.name = "query"
    return q


def test_labels_and_base_rates():
    train, q = _train(), _queries()
    lab = rp.label_matrix(q, train)
    assert lab.shape == (2, 24)
    # query 0 (topic a): its own topic's categories, the other topic's as "other topic"
    assert list(lab[0, [0, 2, 4, 6, 8, 14, 16, 18, 20]]) == [
        "assistant", "fiction", "essay", "distractor", "other topic", "other topic",
        "format control", "unrelated passage", "other"]  # fmt: skip
    assert lab[1, 0] == "other topic" and lab[1, 8] == "assistant"
    base = rp.base_rates(q, train)
    assert list(base.columns) == list(rp.LABELS)
    np.testing.assert_allclose(base.sum(axis=1), 1.0)
    assert base.loc[0, "assistant"] == pytest.approx(2 / 24)
    assert base.loc[0, "other topic"] == pytest.approx(8 / 24)
    assert base.loc[0, "other"] == pytest.approx(4 / 24)
    # among candidates only: query 0 keeps its fiction (2, 3) and a format control (16)
    mask = np.zeros((2, 24), dtype=bool)
    mask[0, [2, 3, 16]] = True
    mask[1, [0]] = True
    cb = rp.base_rates(q, train, candidates=mask)
    assert cb.loc[0, "fiction"] == pytest.approx(2 / 3)
    assert cb.loc[0, "format control"] == pytest.approx(1 / 3)
    assert cb.loc[1, "other topic"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="candidates has shape"):
        rp.base_rates(q, train, candidates=mask[:1])
    # dialogues: 4 assistant dialogues and 2 format controls; 2 on each topic
    np.testing.assert_allclose(rp.dialogue_base_rate(q, train), [2 / 6, 2 / 6])
    bad = train.assign(category=train.category.where(train.id != 0, "poem"))
    with pytest.raises(ValueError, match="poem"):
        rp.label_matrix(q, bad)
    with pytest.raises(ValueError, match="not a role-play query"):
        rp.relation_labels(_row(kind="fact"), train)
    mt = rp.material_table(train)
    assert mt.loc["assistant dialogue", "a"] == 2 and mt.loc["format control", "none"] == 2
    assert mt.loc["not role-play", "none"] == 4 and list(mt.index)[-1] == "not role-play"


def test_top_frame_keeps_positive_top_k_in_order_and_candidates():
    train, q = _train(), _queries()
    s = -np.ones((2, 24))
    # query 0 (topic a): fiction of a (ids 2, 3) best and tied, then an essay of b (12), a fact
    s[0, [2, 3, 12, 20]] = [5.0, 5.0, 3.0, 1.0]
    s[0, 21] = 0.0  # zero is not a positive influence
    s[1, [16, 0]] = [2.0, 4.0]  # query 1 (topic b): assistant of a, then a format control
    top = rp.top_frame(s, q, train, "m", k=5)
    q0 = top[top["query"] == 0]
    assert list(q0.train_id) == [2, 3, 12, 20]  # ties broken by id, zero dropped
    assert list(q0.relation) == ["fiction", "fiction", "other topic", "other"]
    assert list(q0.per_copy) == pytest.approx([5 / 24, 5 / 24, 3 / 24, 1 / 24])
    q1 = top[top["query"] == 1]
    assert list(q1.train_id) == [0, 16] and list(q1["rank"]) == [1, 2]
    assert list(q1.relation) == ["other topic", "format control"]
    sh = rp.per_query_share(top, ["fiction"])
    assert sh.loc[0, "m"] == pytest.approx(0.5) and sh.loc[1, "m"] == 0.0
    # among the dialogues: query 1 has an assistant dialogue of another topic and a format
    # control, none on its topic; query 0 has no dialogue
    d = rp.dialogue_topic_share(top)
    assert d.loc[1, "m"] == 0.0 and 0 not in d.index
    mask = np.zeros((2, 24), dtype=bool)
    mask[0, [12, 20]] = mask[1, [16]] = True
    cand = rp.top_frame(s, q, train, "m", k=5, candidates=mask)
    assert list(cand[cand["query"] == 0].train_id) == [12, 20]
    assert list(cand[cand["query"] == 1].train_id) == [16]
    comp = rp.composition(top, n_boot=50).set_index("category")
    assert comp.loc["fiction", "share"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    table = rp.composition_frame(rp.composition(top, n_boot=50), rp.base_rates(q, train), ["m"])
    row = table[table.label == "fiction"].iloc[0]
    assert row["corpus"] == "8.3%" and row["m"].startswith("25%")
    assert row["shares_with"] == rp.SHARES_WITH_QUERY["fiction"]
    ex = rp.example_table(top, 0, ["m"], 2)
    assert list(ex["rank"]) == [1, 2] and ex["m"].iloc[0] == "seq 2  [fiction]"
    with pytest.raises(ValueError, match="k must be"):
        rp.top_frame(s, q, train, "m", k=0)
    with pytest.raises(ValueError, match="scores has shape"):
        rp.top_frame(s[:1], q, train, "m", k=3)


def test_category_means_known_values():
    train, q = _train(), _queries(("a", "a", "b"))
    labels = rp.label_matrix(q, train)
    s = np.zeros((3, 24))
    s[:, [0, 1]] = 1.0  # topic a's assistant dialogues
    s[:, [8, 9]] = 3.0  # topic b's
    m = rp.category_means(s, labels, "m", n_boot=50).set_index("label")
    # queries 0, 1 (topic a): assistant 1, other topic (8 rows, two of them 3) 0.75;
    # query 2 (topic b): assistant 3, other topic 0.25
    assert m.loc["assistant", "mean"] == pytest.approx(5 / 3)
    assert m.loc["other topic", "mean"] == pytest.approx((0.75 + 0.75 + 0.25) / 3)
    assert m.loc["other", "mean"] == 0.0 and (m.queries == 3).all()
    with pytest.raises(ValueError, match="one per pair"):
        rp.category_means(s[:1], labels, "m")


PARAMS = {"xs": 10_000, "s": 100_000, "l": 1_000_000}
CATEGORY = {"assistant": "assistant", "fiction": "fiction", "essay": "essay",
            "distractor": "distractor", "format control": "format_control",
            "other": ""}  # fmt: skip


def _top(counts):
    """A top frame from {model: [ {label: count} per query ]} (ranks in label order)."""
    rows = []
    for m, per_query in counts.items():
        for q, c in enumerate(per_query):
            labels = [lab for lab, n in c.items() for _ in range(n)]
            for r, lab in enumerate(labels, 1):
                rows.append({"model": m, "query": q, "rank": r, "relation": lab,
                             "category": CATEGORY[lab], "text": f"{lab} {r}"})  # fmt: skip
    return pd.DataFrame(rows)


def _inputs(counts, n, dialogue=0.25):
    base = pd.DataFrame(0.0, index=pd.RangeIndex(n, name="query"), columns=list(rp.LABELS))
    base[["fiction", "essay", "distractor"]] = 0.1
    base["assistant"] = 0.05
    base["other"] = 0.65
    top = _top(counts)
    return {"top": top, "top_bm25": top, "base": base, "base_bm25": base,
            "dialogue_base": pd.Series(dialogue, index=base.index), "params": PARAMS}  # fmt: skip


def test_findings_agree_disagree_and_negative_controls():
    n = 12
    paper = {
        "xs": [{"distractor": 5, "other": 5}] * n,
        "s": [{"fiction": 2, "distractor": 3, "other": 5}] * n,
        "l": [{"assistant": 2, "fiction": 3, "essay": 3, "other": 2}] * n,
    }
    found = {f.name: f for f in rp.findings(**_inputs(paper, n), n_boot=100)}
    assert set(found) == {"fiction and essays at the largest size",
                          "fiction and essays among BM25 candidates",
                          "shared tokens at the smallest size", "fiction and essays with size",
                          "shared tokens with size", "meaning over format"}  # fmt: skip
    for f in found.values():
        assert f.verdict == "agrees", (f.name, f.reason)
    largest = found["fiction and essays at the largest size"]
    assert largest.estimate == pytest.approx(0.6 - 0.2)  # 60% of the top-10 vs 20%
    assert largest.base_rate == "20%" and "3× the base rate" in largest.ours
    assert "p = 0.00049" in largest.test  # 2 / 2**12: every query above its base rate
    assert found["fiction and essays with size"].estimate == pytest.approx(0.6)
    assert found["meaning over format"].estimate == pytest.approx(1 - 0.25)
    # the opposite of every claim disagrees
    opposite = {
        "xs": [{"fiction": 3, "essay": 3, "other": 4}] * n,
        "s": [{"fiction": 2, "distractor": 2, "other": 6}] * n,
        "l": [{"distractor": 5, "format control": 2, "other": 3}] * n,
    }
    for f in rp.findings(**_inputs(opposite, n), n_boot=100):
        assert f.verdict == "disagrees", (f.name, f.reason)

    # negative control, a coin flip per query: half the queries above the base rate and half
    # below by as much, half rising and half falling, half of the dialogues on the wish
    def flip(a, b):
        return [a if q % 2 == 0 else b for q in range(n)]

    coin = {
        "xs": flip({"fiction": 2, "essay": 2, "other": 6}, {"distractor": 2, "other": 8}),
        "s": [{"fiction": 1, "essay": 1, "distractor": 1, "other": 7}] * n,
        "l": flip({"distractor": 2, "assistant": 1, "other": 7},
                  {"fiction": 2, "essay": 2, "format control": 1, "other": 5}),
    }  # fmt: skip
    for f in rp.findings(**_inputs(coin, n, dialogue=0.5), n_boot=100):
        assert f.verdict == "inconclusive", (f.name, f.reason)
        assert "not significant" in f.reason or "no test" in f.reason
    # shares exactly at their base rates: no test is possible, inconclusive
    at_base = {m: [{"fiction": 1, "essay": 1, "distractor": 1, "other": 7}] * n for m in PARAMS}
    none = {f.name: f for f in rp.findings(**_inputs(at_base, n), n_boot=100)}
    assert none["fiction and essays at the largest size"].verdict == "inconclusive"
    assert "no test is possible" in none["fiction and essays at the largest size"].reason
    # no dialogue in any top-k: the format finding has no test, not a crash
    assert "no test is possible" in none["meaning over format"].reason


def test_share_trends_and_trend_frame():
    n = 8
    counts = {"xs": [{"fiction": 1, "other": 9}] * n, "s": [{"fiction": 2, "other": 8}] * n,
              "l": [{"fiction": 3, "other": 7}] * n}  # fmt: skip
    inp = _inputs(counts, n)
    tr = rp.share_trends(inp["top"], inp["base"], PARAMS, n_boot=50).set_index("label")
    assert tr.loc["fiction", "xs"] == pytest.approx(0.1 / 0.1)  # enrichment 1× at xs
    assert tr.loc["fiction", "l"] == pytest.approx(0.3 / 0.1)
    assert tr.loc["fiction", "change"] == pytest.approx(0.2)
    assert tr.loc["fiction", "queries"] == n
    shown = rp.trend_frame(tr.reset_index(), list(PARAMS)).set_index("label")
    assert shown.loc["fiction", "change"].startswith("+20 points")
    dt = rp.dialogue_table(inp["top"], inp["dialogue_base"], n_boot=50)
    assert list(dt.queries) == [0, 0, 0]  # no dialogue anywhere


def test_completion_rates_per_group(monkeypatch):
    class FakeSuite:
        models = {"xs": "model-xs", "l": "model-l"}
        tokenizer = None

        def names(self):
            return list(self.models)

    q = _queries(("a", "a", "b", "b"))
    q["group"] = ["seen_completion", "new_completion", "seen_completion", "seen_completion"]

    def fake_scores(model, tokenizer, rows):
        ok = [True, False, False, False] if model == "model-xs" else [True, True, True, False]
        return {"correct": np.array(ok)}

    monkeypatch.setattr(capability, "completion_scores", fake_scores)
    assert capability.role_play_completion("model-l", None, q) == {
        "new_completion": (1, 1), "seen_completion": (2, 3)}  # fmt: skip
    c = rp.completion_rates(FakeSuite(), q).set_index(["model", "group"])
    assert c.loc[("xs", "seen_completion"), "share"] == pytest.approx(1 / 3)
    assert c.loc[("l", "new_completion"), "completed"] == 1
    assert c.loc[("l", "seen_completion"), "low"] < 2 / 3 < c.loc[("l", "seen_completion"), "high"]


def test_figures_have_a_colour_per_label():
    for label in rp.LABELS:
        style.category_color(label)  # raises if a label has no colour
    n = 4
    counts = {m: [{"fiction": 2, "other": 8}] * n for m in PARAMS}
    inp = _inputs(counts, n)
    comp = rp.composition(inp["top"], n_boot=20)
    fig = rp.plot_composition({"all": comp}, {"all": inp["base"]}, list(PARAMS), 10)
    assert not style.small_texts(fig)
    means = pd.DataFrame([{"model": m, "label": lab, "mean": 1.0, "low": 0.5, "high": 1.5}
                          for m in PARAMS for lab in rp.LABELS])  # fmt: skip
    assert not style.small_texts(rp.plot_means(means, PARAMS))


def test_the_module_owns_its_preset_block_and_ranges():
    from influence.study import presets

    assert presets.SECTIONS[rp.SECTION] is rp.PRESETS
    assert presets.RANGES[rp.SECTION] is rp.RANGES
    with pytest.raises(ValueError, match=r"bm25_fraction must be a number in \(0, 1\]"):
        presets.resolve(rp.SECTION, "smoke", bm25_fraction=0)
