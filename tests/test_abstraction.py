"""Notebook 03's analysis (influence.study.abstraction) on small synthetic scores with known
answers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from influence.study import abstraction as A
from influence.study import relations as R

LABELS = ("kind", "fact_id", "relation", "template_id", "language", "group", "order",
          "category", "topic", "subject", "object")  # fmt: skip


def _row(**kw):
    base = dict.fromkeys(LABELS, "")
    base.update(fact_id=-1, template_id=-1, language="en")
    return {**base, **kw}


class FakeScores:
    """The part of StudyScores' API the analysis uses, over given [Q, N] score tensors."""

    def __init__(self, train, queries, scores, params):
        self._train, self._queries, self._scores = train, queries, scores
        self.models = list(params)
        self.query_sets = list(queries)
        self.n_train = len(train)
        self.suite = SimpleNamespace(info=[{"name": m, "params": p} for m, p in params.items()])

    def train_frame(self):
        return self._train.copy()

    def queries(self, qs):
        q = self._queries[qs].copy()
        q.index.name = "query"
        return q

    def scores(self, m, qs):
        return self._scores[m][qs]

    def per_copy(self, m, qs):
        return self.scores(m, qs) / self.n_train

    def top_k(self, m, qs, k):
        s = self.scores(m, qs)
        val, idx = torch.topk(s, k, dim=1)
        out = self._train.iloc[idx.reshape(-1).numpy()].reset_index(drop=True)
        out = out.rename(columns={"id": "train_id"})
        out.insert(0, "model", m)
        out.insert(1, "query_set", qs)
        out.insert(2, "query", np.repeat(np.arange(s.shape[0]), k))
        out.insert(3, "rank", np.tile(np.arange(1, k + 1), s.shape[0]))
        out["score"] = val.reshape(-1).double().numpy()
        out["per_copy"] = out["score"] / self.n_train
        out["query_prompt"] = "p"
        out["query_completion"] = "c"
        return out


def _fact(fid, rel, s, o, t=0, lang="en", text=""):
    return _row(kind="fact", fact_id=fid, relation=rel, template_id=t, language=lang,
                subject=s, object=o, text=text)  # fmt: skip


@pytest.fixture
def fake():
    train = pd.DataFrame(
        [
            _fact(0, "capital", "Ast", "Zor", text="capital of Ast is Zor"),  # 0 seen text
            _fact(0, "capital", "Ast", "Zor", t=1, text="Zor rules Ast"),  # 1 other words
            _fact(1, "leader", "Ast", "Kim", text="leader of Ast is Kim"),  # 2 shares a name
            _fact(2, "capital", "Bel", "Qua", text="capital of Bel is Qua"),  # 3 same relation
            _row(kind="math", group="add", text="2 + 3 = 5"),  # 4
            _row(kind="math", group="mul", text="2 * 3 = 6"),  # 5
        ]
    )
    train.insert(0, "id", range(len(train)))
    queries = {
        "facts": pd.DataFrame([_fact(0, "capital", "Ast", "Zor") | {"prompt": "capital of Ast is",
                                                                      "completion": " Zor"}]),
        "math": pd.DataFrame([_row(kind="math", group="add", prompt="4 + 1",
                                   completion=" = 5")]),
    }  # fmt: skip
    # small model: seen text, then a name-sharer; large: other words first, then seen text
    scores = {
        "xs": {
            "facts": torch.tensor([[3.0, -1.0, 2.0, 0.5, 0.1, 0.0]]),
            "math": torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 2.0]]),
        },
        "l": {
            "facts": torch.tensor([[2.0, 3.0, -1.0, -2.0, 0.1, 0.0]]),
            "math": torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0, -1.0]]),
        },
    }
    return FakeScores(train, queries, scores, {"xs": 1000, "l": 8000})


def test_labeled_top_k_and_composition(fake):
    lab = A.labeled_top_k(fake, k=2)
    # only positive scores are kept: math at l has one positive sequence in its top 2
    assert len(lab) == 2 + 2 + 2 + 1
    got = lab.set_index(["model", "query_type", "rank"])["relation"]
    assert got[("xs", "facts", 1)] == R.SAME_WORDS and got[("xs", "facts", 2)] == R.SHARES_NAME
    assert got[("l", "facts", 1)] == R.OTHER_WORDS and got[("l", "facts", 2)] == R.SAME_WORDS
    assert got[("xs", "math", 1)] == "other" and got[("l", "math", 1)] == "same operation"
    comp = A.composition_by_type(lab, n_boot=50).set_index(["query_type", "model", "category"])
    assert comp.loc[("facts", "xs", R.SAME_WORDS), "share"] == 0.5
    assert comp.loc[("facts", "l", R.OTHER_WORDS), "share"] == 0.5
    assert comp.loc[("facts", "l", R.SHARES_NAME), "share"] == 0.0
    assert comp.loc[("math", "xs", "same operation"), "share"] == 0.5
    assert comp.loc[("math", "l", "same operation"), "share"] == 1.0
    shares = A.per_query_share(lab, "facts", [R.OTHER_WORDS])
    assert shares.loc[0, "xs"] == 0.0 and shares.loc[0, "l"] == 0.5


def test_overlap_table_against_hand_computed_values(fake):
    vocab: dict[str, int] = {}  # word -> id >= 0 (BM25 counts only non-negative ids)
    tok = SimpleNamespace(
        encode=lambda t, add_special_tokens=False: [
            vocab.setdefault(w, len(vocab)) for w in t.split()
        ]
    )
    ov = A.overlap_table(fake, tok, k=1, query_sets=("facts",)).set_index("model")
    # query tokens {capital, of, Ast, is, Zor}; row 0 has the same set (Jaccard 1), row 1
    # {Zor, rules, Ast} (2/6), row 2 {leader, of, Ast, is, Kim} (3/7), row 3 (3/7), rows 4-5 0
    corpus = (1 + 2 / 6 + 3 / 7 + 3 / 7) / 6
    assert ov.loc["xs", "jaccard_top"] == pytest.approx(1.0)
    assert ov.loc["l", "jaccard_top"] == pytest.approx(2 / 6)
    assert ov.loc["xs", "jaccard_corpus"] == pytest.approx(corpus)
    # row 0 holds every query token: the highest BM25 of the six -> percentile 6/6
    assert ov.loc["xs", "bm25_pct"] == pytest.approx(1.0)
    assert ov.loc["l", "bm25_pct"] < 1.0


def test_max_per_copy_and_top_texts(fake):
    mx = A.max_per_copy(fake).set_index(["model", "query_type"])["max_per_copy"]
    assert mx[("xs", "facts")] == pytest.approx(3.0 / 6)
    assert mx[("l", "math")] == pytest.approx(2.0 / 6)
    lab = A.labeled_top_k(fake, k=2)
    t = A.top_texts(lab, "facts", 0, n=2)
    assert list(t.columns) == ["xs", "l"] and list(t.index) == [1, 2]
    assert t.loc[1, "l"].startswith("Zor rules Ast  [same fact, other words, 0.5]")


def test_paired_trend_and_verdicts():
    up = pd.DataFrame({"a": np.zeros(10), "b": np.linspace(0.1, 1.0, 10)})
    t = A.paired_trend(up, "a", "b")
    # exact Wilcoxon, n = 10, all positive: two-sided p = 2 / 2**10
    assert t["word"] == "rises" and t["p"] == pytest.approx(2 / 1024)
    assert (t["rises"], t["falls"], t["ties"]) == (10, 0, 0)
    assert A.verdict(t, "rises") == ("agrees", "")
    assert A.verdict(t, "falls")[0] == "disagrees"
    few = A.paired_trend(up.iloc[:5], "a", "b")
    assert few["word"] == "too few queries" and np.isnan(few["p"])
    assert A.verdict(few, "rises")[0] == "not comparable"
    mixed = pd.DataFrame({"a": np.zeros(8), "b": [1, -1, 2, -2, 3, -3, 0.5, 0.0]})
    m = A.paired_trend(mixed, "a", "b")
    assert m["word"] == "no clear change" and m["ties"] == 1
    assert A.verdict(m, "rises")[0] == "partly"  # mean +0.0625 > 0, p large
    assert A.overall_verdict(["agrees", "not comparable"]) == "agrees"
    assert A.overall_verdict(["agrees", "disagrees"]) == "partly"
    assert A.overall_verdict(["not comparable"]) == "not comparable"


def test_direction_and_jaccard():
    assert A.direction([1, 2, 3]) == "rises with every size"
    assert A.direction([3, 2, 2, 1]) == "falls with every size"
    assert A.direction([1, 3, 2]) == "rises overall, not monotonically"
    assert A.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert A.jaccard(set(), set()) == 0.0
    with pytest.raises(ValueError, match="query_set must be one of"):
        A.query_types(pd.DataFrame(), "quotes")
