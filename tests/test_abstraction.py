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


PARAMS = {"xs": 1_000, "s": 10_000, "l": 100_000}


def _labeled(meaning: np.ndarray, surface: np.ndarray, k: int = 10) -> pd.DataFrame:
    """Top-k rows of fact queries: meaning[q, m] of a query's k rows state the same fact in
    other words, surface[q, m] share a name, the rest are unrelated (q queries × 3 sizes)."""
    rows = []
    for q in range(meaning.shape[0]):
        for j, m in enumerate(PARAMS):
            a, b = int(meaning[q, j]), int(surface[q, j])
            rels = [R.OTHER_WORDS] * a + [R.SHARES_NAME] * b + [R.UNRELATED] * (k - a - b)
            rows += [{"query_type": "facts", "query": q, "model": m, "relation": r} for r in rels]
    return pd.DataFrame(rows)


def _inputs(meaning, surface, bm25, max_copy):
    q = meaning.shape[0]
    lab = _labeled(meaning, surface)
    overlap = pd.DataFrame(
        [{"query_type": "facts", "query": i, "model": m, "bm25_pct": bm25[i, j]}
         for i in range(q) for j, m in enumerate(PARAMS)]
    )  # fmt: skip
    mx = overlap.rename(columns={"bm25_pct": "max_per_copy"}).assign(
        max_per_copy=[max_copy[i, j] for i in range(q) for j in range(len(PARAMS))]
    )
    base = pd.DataFrame(
        [{"query_type": "facts", "query": i, "category": c, "base_rate": r}
         for i in range(q) for c, r in ((R.OTHER_WORDS, 0.01), (R.SHARES_NAME, 0.05),
                                        (R.SAME_RELATION, 0.1))]
    )  # fmt: skip
    return {"labeled": lab, "labeled_filtered": lab, "overlap": overlap, "max_copy": mx,
            "params": PARAMS, "base": base}  # fmt: skip


def test_findings_follow_the_trends_with_negative_controls():
    q = 12
    rng = np.random.default_rng(0)
    steps = np.array([0, 2, 4])  # per-query counts of the top 10 at xs, s, l
    noise = rng.integers(0, 2, size=(q, 1))
    rising = noise + steps  # meaning rises by 4 of 10 over two decades
    falling = np.tile(5 - steps, (q, 1))  # surface falls
    bm25 = 0.9 - 0.05 * steps - rng.uniform(0, 0.01, (q, 3))
    mx = 10.0 ** (1 - 0.5 * steps - rng.uniform(0, 0.1, (q, 3)))
    found = {f.name: f for f in A.findings(**_inputs(rising, falling, bm25, mx))}
    assert set(found) == {"meaning share", "meaning share, BM25 candidates", "surface share",
                          "token overlap", "largest influence"}  # fmt: skip
    for f in found.values():
        assert f.verdict == "agrees", (f.name, f.reason)
    assert found["meaning share"].base_rate == "1%"
    assert found["surface share"].base_rate == "15%"  # shares a name + same relation
    assert found["meaning share"].estimate == pytest.approx(0.4)  # +40 points across the suite
    assert "p = 0.00049" in found["meaning share"].test  # 2 / 2**12, all slopes positive
    # negative control: the opposite trends disagree
    opposite = {f.name: f for f in A.findings(**_inputs(falling, rising, bm25[:, ::-1],
                                                         mx[:, ::-1]))}  # fmt: skip
    for f in opposite.values():
        assert f.verdict == "disagrees", (f.name, f.reason)
    # negative control: no change with size is inconclusive
    flat = np.full((q, 3), 3)
    none = A.findings(**_inputs(flat, flat, np.full((q, 3), 0.7), np.ones((q, 3))))
    assert {f.verdict for f in none} == {"inconclusive"}
    assert "no test is possible" in none[0].reason
    # half the queries rise and half fall by the same amount: not significant
    mixed = np.where(np.arange(q)[:, None] % 2 == 0, steps, 4 - steps)
    f = A.findings(**_inputs(mixed, flat, np.full((q, 3), 0.7), np.ones((q, 3))))[0]
    assert f.verdict == "inconclusive" and "not significant" in f.reason
    # no query with a positive influence among its BM25 candidates: no test, not a crash
    inputs = _inputs(rising, falling, bm25, mx)
    inputs["labeled_filtered"] = inputs["labeled"].iloc[:0]
    empty = {f.name: f for f in A.findings(**inputs)}["meaning share, BM25 candidates"]
    assert empty.verdict == "inconclusive" and "no test is possible" in empty.reason


def test_share_trends_and_composition_table(fake):
    lab = A.labeled_top_k(fake, k=2)
    base = A.corpus_composition(fake)
    facts = base[base.query_type == "facts"].set_index("category")["base_rate"]
    # the fact query against the 6 training rows: 1 seen text, 1 other words, 1 shares a name,
    # 1 same relation, 2 unrelated (the math rows)
    assert facts[R.SAME_WORDS] == pytest.approx(1 / 6)
    assert facts[R.UNRELATED] == pytest.approx(2 / 6)
    comp = A.composition_by_type(lab, n_boot=20)
    table = A.composition_table(comp, base, ["xs", "l"])
    row = table[(table.query_type == "facts") & (table.category == R.OTHER_WORDS)].iloc[0]
    assert row["corpus"] == "17%" and row["xs"] == "0%" and row["l"] == "50%"
    trends = A.share_trends(lab, {"xs": 1000, "l": 8000}, n_boot=20)
    meaning = trends[(trends.query_type == "facts") & (trends.share_of == "meaning")].iloc[0]
    assert meaning["xs"] == 0.0 and meaning["l"] == 0.5 and meaning["queries"] == 1


def test_bm25_candidates_restrict_the_ranking(fake):
    bm25 = {"facts": np.array([[0.0, 5.0, 4.0, 0.0, 0.0, 0.0]]),
            "math": np.array([[0.0, 0.0, 0.0, 0.0, 1.0, 2.0]])}  # fmt: skip
    cands = A.bm25_candidates(bm25, 2 / 6)  # keep 2 of 6 sequences per query
    assert cands["facts"].tolist() == [[False, True, True, False, False, False]]
    lab = A.labeled_top_k(fake, 2, query_sets=("facts",), candidates=cands)
    top = lab[lab.model == "l"].sort_values("rank")
    # at l the fact query's top score is row 1 (3.0); row 2 is negative, so only one is kept
    assert top.train_id.tolist() == [1] and top.relation.tolist() == [R.OTHER_WORDS]
    xs = lab[lab.model == "xs"].sort_values("rank")
    assert xs.train_id.tolist() == [2]  # row 0 (3.0) is not a candidate


def test_jaccard_and_query_types():
    assert A.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert A.jaccard(set(), set()) == 0.0
    with pytest.raises(ValueError, match="query_set must be one of"):
        A.query_types(pd.DataFrame(), "quotes")


def _meaning_rows(model, query_type, query_set, shares, k=4):
    """Labeled top-k rows whose meaning share per query is `shares[q]` (multiples of 1/k)."""
    rows = []
    for q, share in enumerate(shares):
        hits = round(share * k)
        for r in range(k):
            rel = A.MEANING["fact"] if r < hits else R.UNRELATED
            rows.append({"model": model, "query_type": query_type, "query_set": query_set,
                         "query": q, "rank": r + 1, "relation": rel})  # fmt: skip
    return rows


def test_meaning_vs_fit_is_spearman_over_queries_per_model_and_type():
    shares_m = [0.0, 0.25, 0.5, 0.75, 1.0]  # rises with log p: ρ = +1
    shares_l = [1.0, 0.75, 0.5, 0.25, 0.0]  # falls with log p: ρ = -1
    shares_c = [0.5, 0.5, 0.5, 0.5, 0.5]  # constant share: ρ undefined, never 0
    labeled = pd.DataFrame(
        _meaning_rows("m", "facts", "facts", shares_m)
        + _meaning_rows("l", "facts", "facts", shares_l)
        + _meaning_rows("m", "paraphrase (near)", "paraphrase", shares_c)
    )
    lp = np.array([-5.0, -2.0, -1.0, -0.5, -0.1])
    logprobs = pd.DataFrame(
        [{"model": m, "query_set": qs, "query": q, "logprob": v}
         for m in ("m", "l") for qs in ("facts", "paraphrase") for q, v in enumerate(lp)]
    )  # fmt: skip
    out = A.meaning_vs_fit(labeled, logprobs, order=["m", "l"]).set_index(["query_type", "model"])
    assert out.loc[("facts", "m"), "spearman"] == pytest.approx(1.0)
    assert out.loc[("facts", "l"), "spearman"] == pytest.approx(-1.0)
    assert out.loc[("facts", "m"), "p"] < 0.05 and out.loc[("facts", "m"), "queries"] == 5
    assert out.loc[("facts", "m"), "median_logprob"] == pytest.approx(-1.0)
    assert out.loc[("facts", "l"), "mean_share"] == pytest.approx(0.5)
    assert np.isnan(out.loc[("paraphrase (near)", "m"), "spearman"])
    assert ("paraphrase (near)", "l") not in out.index  # no rows for that model
    # the log p of the right query set and model is used: shuffle another set, nothing moves
    other = logprobs.copy()
    other.loc[other.query_set == "paraphrase", "logprob"] = lp[::-1].tolist() * 2
    again = A.meaning_vs_fit(labeled, other, order=["m", "l"]).set_index(["query_type", "model"])
    assert again.loc[("facts", "m"), "spearman"] == pytest.approx(1.0)
    text = A.describe_fit(out.reset_index())
    assert "facts: ρ from -1 to 1, p < 0.05 at 2 of 2 sizes (negative or positive there)" in text
    assert "paraphrase (near): ρ undefined at every size" in text
    with pytest.raises(ValueError, match="logprobs lack queries"):
        A.meaning_vs_fit(labeled, logprobs[logprobs["query"] != 3], order=["m", "l"])
