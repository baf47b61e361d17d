"""Relation of training sequences to queries, from the corpus labels (influence.study.relations)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from influence.study import corpus as C
from influence.study import relations as R
from influence.study.presets import resolve


def _row(**kw):
    base = {
        "kind": "fact",
        "fact_id": -1,
        "relation": "",
        "template_id": -1,
        "language": "en",
        "group": "",
        "order": "",
        "category": "",
        "topic": "",
        "subject": "",
        "object": "",
    }
    return {**base, **kw}


def _fact(fid, rel, s, o, t=0, lang="en", kind="fact", group=""):
    return _row(
        kind=kind, fact_id=fid, relation=rel, template_id=t, language=lang, group=group,
        subject=s, object=o,
    )  # fmt: skip


@pytest.fixture
def train():
    rows = [
        _fact(0, "capital", "Astrobia", "Zor", t=0),  # 0 same words
        _fact(0, "capital", "Astrobia", "Zor", t=1),  # 1 other template
        _fact(0, "capital", "Astrobia", "Zor", t=0, lang="fr"),  # 2 other language
        _fact(0, "capital", "Astrobia", "Zor", kind="word_order", group="rewording"),  # 3
        _fact(0, "capital", "Astrobia", "Zor", kind="word_order", group="flipped"),  # 4 names
        _fact(1, "leader", "Astrobia", "Pfaff"),  # 5 shares the subject
        _fact(2, "birthplace", "Pfaff", "Zor"),  # 6 shares the object (other role)
        _fact(3, "capital", "Bel", "Qua"),  # 7 same relation only
        _fact(4, "leader", "Bel", "Kim"),  # 8 unrelated
        _row(kind="math", group="add"),  # 9
        _row(kind="math", group="mul"),  # 10
        _row(kind="code", language="code", group="sort"),  # 11
        _row(kind="role_play", category="fiction", topic="shutdown"),  # 12
        _row(kind="role_play", category="fiction", topic="resources"),  # 13
        _row(kind="quote", group="1"),  # 14
    ]
    return pd.DataFrame(rows)


def test_fact_categories_follow_the_labels(train):
    q = _fact(0, "capital", "Astrobia", "Zor", t=0)
    got = R.relation_labels(q, train)
    want = [R.SAME_WORDS, *[R.OTHER_WORDS] * 3, R.SHARES_NAME, R.SHARES_NAME, R.SHARES_NAME]
    want += [R.SAME_RELATION, R.UNRELATED] + [R.UNRELATED] * 6
    assert got.tolist() == want
    # a held-out template (paraphrase) never matches the seen text: no "same words"
    para = R.relation_labels({**q, "template_id": 3}, train)
    assert para[0] == R.OTHER_WORDS and (para == R.SAME_WORDS).sum() == 0
    # asked in German: the English and French statements are both "other words"
    de = R.relation_labels({**q, "language": "de"}, train)
    assert de[:4].tolist() == [R.OTHER_WORDS] * 4


def test_math_code_role_play_quote(train):
    assert R.relation_labels(_row(kind="math", group="add"), train)[9:11].tolist() == [
        "same operation",
        "other",
    ]
    code = R.relation_labels(_row(kind="code", group="sort"), train)
    assert code[11] == "same function kind" and (code == "same function kind").sum() == 1
    rp = R.relation_labels(_row(kind="role_play", category="assistant", topic="shutdown"), train)
    assert rp[12] == "fiction" and rp[13] == "unrelated" and rp[0] == "unrelated"
    qt = R.relation_labels(_row(kind="quote", group="1"), train)
    assert qt.tolist() == ["other"] * 14 + ["same saying"]


def test_bad_input_names_the_problem(train):
    with pytest.raises(ValueError, match="unknown query kind"):
        R.relation_labels(_row(kind="poem"), train)
    with pytest.raises(ValueError, match="missing label column 'subject'"):
        R.relation_labels(_row(), train.drop(columns="subject"))


def test_smoke_corpus_related_ids_are_the_same_fact():
    """On the generated corpus: every fact query's related rows are 'same fact' (one of them
    the seen text for the facts set, none for paraphrases and cross-lingual queries), and no
    unrelated row is labelled 'same fact'."""
    rows, _, queries, _, _ = C.generate(resolve("corpus", "smoke"), 0)
    train = pd.DataFrame(rows)
    for qs in ("facts", "paraphrase", "cross_lingual", "word_order"):
        for q in queries[qs]:
            lab = R.relation_labels(q, train)
            same = np.isin(lab, (R.SAME_WORDS, R.OTHER_WORDS))
            rel = np.zeros(len(train), bool)
            rel[q["related_ids"]] = True
            assert (same == rel).all()
            n_seen = int((lab == R.SAME_WORDS).sum())
            assert n_seen == (1 if qs in ("facts", "word_order") else 0), (qs, q)
    for q in queries["math"]:
        lab = R.relation_labels(q, train)
        assert set(np.flatnonzero(lab == "same operation")) == set(q["related_ids"])


def test_label_top_k_and_composition(train):
    queries = pd.DataFrame(
        [_fact(0, "capital", "Astrobia", "Zor"), _fact(3, "capital", "Bel", "Qua")]
    )
    queries.index.name = "query"
    # query 0: top-4 = rows 0, 1, 5, 8 -> 1/4 each of same words, other words, name, unrelated
    # query 1: top-4 = rows 7, 0, 8, 9 -> same words (7), same relation (0), name (8), unrel.
    ids = [0, 1, 5, 8, 7, 0, 8, 9]
    top = train.iloc[ids].reset_index(drop=True)
    top.insert(0, "query", [0] * 4 + [1] * 4)
    top.insert(0, "model", "m")
    lab = R.label_top_k(top, queries)
    assert lab.relation.tolist()[4:] == [R.SAME_WORDS, R.SAME_RELATION, R.SHARES_NAME, R.UNRELATED]
    comp = R.composition(lab, by=["model"], order=R.FACT_CATEGORIES, n_boot=200).set_index(
        "category"
    )
    expected = {R.SAME_WORDS: 0.25, R.OTHER_WORDS: 0.125, R.SHARES_NAME: 0.25}
    expected |= {R.SAME_RELATION: 0.125, R.UNRELATED: 0.25}
    for cat, share in expected.items():
        assert comp.loc[cat, "share"] == pytest.approx(share, abs=1e-12)
        assert comp.loc[cat, "low"] <= share <= comp.loc[cat, "high"]
    assert comp["share"].sum() == pytest.approx(1.0, abs=1e-12)
    # other words: 0.25 and 0 in the two queries -> bootstrap means lie in [0, 0.25]
    assert comp.loc[R.OTHER_WORDS, "low"] >= 0 and comp.loc[R.OTHER_WORDS, "high"] <= 0.25
    assert (lab.level == lab.relation.map(R.LEVELS)).all()
