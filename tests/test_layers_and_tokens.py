"""Notebook 07's analysis (influence.study.layers_and_tokens): depths and thirds, block shares,
the per-block restriction experiment and the tokenwise attribution on inputs with known
answers, and its findings with negative controls."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from brute_force import fitted, lm_data, tiny_llama  # noqa: E402

import influence as inf  # noqa: E402
from influence.study import layers_and_tokens as lt  # noqa: E402
from influence.study import style  # noqa: E402
from influence.study.tokenizer import train_tokenizer  # noqa: E402


def _layers(n_blocks):
    return [f"model.layers.{b}.mlp.{p}" for b in range(n_blocks) for p in ("up_proj", "down_proj")]


L4 = _layers(4)


def test_layer_depths_and_thirds():
    d = lt.layer_depths(L4)
    assert d["block"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert d["rel_depth"].tolist() == [0.125, 0.125, 0.375, 0.375, 0.625, 0.625, 0.875, 0.875]
    # four blocks: thirds of 1, 2 and 1 blocks; five: 2, 1, 2; one block: the middle only
    assert d.drop_duplicates("block")["third"].tolist() == ["lower", "middle", "middle", "upper"]
    five = lt.layer_depths(_layers(5)).drop_duplicates("block")["third"].tolist()
    assert five == ["lower", "lower", "middle", "upper", "upper"]
    assert lt.layer_depths(_layers(1))["third"].unique().tolist() == ["middle"]
    # blocks without a tracked layer do not count
    gap = lt.layer_depths(["model.layers.2.mlp.up_proj", "model.layers.7.mlp.up_proj"])
    assert gap["block"].tolist() == [0, 1] and gap["n_blocks"].iloc[0] == 2
    with pytest.raises(ValueError, match="block index"):
        lt.block_index("mlp.up_proj")
    with pytest.raises(ValueError, match="relative depth"):
        lt.third_of(1.5)


def test_layer_shares_known_answer():
    # Two layers, 1 query, 4 sequences. Totals 3, 1, 5, -2 -> top-2 = {2, 0}.
    by_layer = {
        "model.layers.0.mlp.up_proj": torch.tensor([[1.0, 0.0, 4.0, -1.0]]),
        "model.layers.1.mlp.up_proj": torch.tensor([[2.0, 1.0, 1.0, -1.0]]),
    }
    s = lt.layer_shares(by_layer, k=2)
    assert s.iloc[0].tolist() == pytest.approx([5 / 8, 3 / 8])  # (4 + 1) / 8, (1 + 2) / 8
    neg = {n: -v.abs() - 1 for n, v in by_layer.items()}
    assert lt.layer_shares(neg, 2).isna().all().all()  # top-k total not positive: no share


class FakeScores:
    """The part of StudyScores the analysis reads, over given per-layer scores."""

    def __init__(self, by, layers, train=None, queries=None, params=None):
        self.by, self.layers = by, layers
        self.models = list(layers)
        self.query_sets = list(next(iter(by.values())))
        self._train, self._queries = train, queries or {}
        params = params or {m: 1000 * (i + 1) for i, m in enumerate(self.models)}
        self.suite = SimpleNamespace(info=[{"name": m, "params": p} for m, p in params.items()])

    def by_layer(self, model, qs):
        return self.by[model][qs]

    def scores(self, model, qs):
        return sum(self.by[model][qs].values())

    def train_frame(self):
        return self._train.copy()

    def queries(self, qs):
        q = self._queries[qs].copy()
        q.index.name = "query"
        return q


def _block_scores(weights, n_queries=3, n_train=20):
    """Per layer [Q, N] scores: sequence j scores j + 1 in every block, scaled per block by
    `weights` (split evenly over the block's two layers)."""
    base = torch.arange(1.0, n_train + 1).repeat(n_queries, 1)
    layers = _layers(len(weights))
    return {n: base * weights[i // 2] / 2 for i, n in enumerate(layers)}


def test_block_shares_evenness_centroid_and_contrasts():
    weights = {"facts": [1, 1, 1, 5], "math": [1, 3, 3, 1]}  # facts upper, math middle
    st = FakeScores({"m": {qs: _block_scores(w) for qs, w in weights.items()}}, {"m": L4})
    shares = lt.layer_share_table(st, k=5)
    blocks = lt.block_share_table(shares)
    sums = blocks.groupby(["query_set", "query"])["share"].sum()
    np.testing.assert_allclose(sums, 1.0)
    facts = blocks[(blocks.query_set == "facts") & (blocks["query"] == 0)].set_index("block")
    assert facts["share"].tolist() == pytest.approx([1 / 8, 1 / 8, 1 / 8, 5 / 8])
    assert facts["even"].tolist() == pytest.approx([0.5, 0.5, 0.5, 2.5])  # × 4 blocks
    even = lt.evenness(blocks).set_index("query_set")
    assert not even.loc["facts", "even_spread"].any()  # 2.5× > 2×
    assert even.loc["math", "even_spread"].all()  # 1.5×
    table = lt.evenness_table(lt.evenness(blocks)).iloc[0]
    assert table["blocks"] == 4 and table["even_share"] == 0.5
    cen = lt.depth_centroid(blocks).set_index(["query_set", "query"])["centroid"]
    assert cen.loc[("facts", 0)] == pytest.approx((0.125 + 0.375 + 0.625 + 5 * 0.875) / 8)
    assert cen.loc[("math", 0)] == pytest.approx(0.5)
    # upper third (block 3) against blocks 0-2; middle third (blocks 1, 2) against 0 and 3:
    # the mean per block, so the middle's two blocks do not count double
    up = lt.depth_contrast(blocks[blocks.query_set == "facts"], "upper")
    assert up["contrast"].tolist() == pytest.approx([2.5 - 0.5] * 3)
    mid = lt.depth_contrast(blocks[blocks.query_set == "math"], "middle")
    assert mid["contrast"].tolist() == pytest.approx([1.5 - 0.5] * 3)
    even_math = {"m": {"math": _block_scores([1, 1, 1, 1])}}
    flat = lt.block_share_table(lt.layer_share_table(FakeScores(even_math, {"m": L4}), k=5))
    assert lt.depth_contrast(flat, "middle")["contrast"].tolist() == pytest.approx([0.0] * 3)
    with pytest.raises(ValueError, match="where must be"):
        lt.depth_contrast(blocks, "lower")
    ct = lt.contrast_table(blocks, ["m"], n_boot=20).iloc[0]
    assert ct["upper"].startswith("2") and ct["middle"].startswith("1")
    depth = lt.depth_table(st).iloc[0]
    assert (depth["blocks"], depth["layers"], depth["lower"], depth["middle"]) == (4, 8, 1, 2)
    centroids = lt.centroid_table(lt.depth_centroid(blocks), ["m"], n_boot=20)
    assert centroids["query type"].tolist() == ["facts", "math"]
    fig = lt.plot_block_shares(blocks, ["m"], ["facts", "math"])
    assert not style.small_texts(fig)


class WordTokenizer:
    """Whitespace words as tokens (ids in order of first appearance); 0 is special."""

    def __init__(self, texts):
        self.vocab = {"<s>": 0}
        for t in texts:
            for w in t.split():
                self.vocab.setdefault(w, len(self.vocab))
        self.words = {i: w for w, i in self.vocab.items()}
        self.all_special_ids = [0]

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, add_special_tokens=False):
        return [self.vocab[w] for w in text.split()]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def _row(**kw):
    base = dict.fromkeys(("kind", "relation", "group", "order", "category", "topic", "subject",
                          "object", "language"), "")  # fmt: skip
    base.update(fact_id=-1, template_id=-1, language="en")
    return {**base, **kw}


def test_restriction_per_block_with_unequal_thirds():
    # Math queries (operation "add"); training rows 0-9 are "add" problems (same meaning, no
    # shared word), rows 10-19 other problems sharing the query's words.
    train = pd.DataFrame(
        [_row(kind="math", group="add", text=f"plus{i} total{i}") for i in range(10)]
        + [_row(kind="math", group="mul", text="seven eight apples") for _ in range(10)]
    )
    train.insert(0, "id", range(len(train)))
    q = pd.DataFrame([_row(kind="math", group="add", prompt="seven eight", completion=" apples")
                      for _ in range(3)])  # fmt: skip
    tok = WordTokenizer([*train.text, "seven eight apples"])
    # 4 blocks: the middle blocks 1 and 2 rank the "add" rows first, the outer blocks the
    # overlapping rows; block 2 half as sharply, so each middle block counts on its own
    same_first = torch.cat([torch.arange(20.0, 10, -1), torch.arange(10.0, 0, -1)]).repeat(3, 1)
    overlap_first = same_first.flip(1)
    w = {0: overlap_first, 1: same_first, 2: same_first * 0.5, 3: overlap_first}
    by = {n: w[i // 2] / 2 for i, n in enumerate(L4)}
    st = FakeScores({"m": {"math": by}}, {"m": L4}, train=train, queries={"math": q})
    restr = lt.restriction_table(st, 5, tok, ["math"])
    assert set(restr.ranking) == {"all layers", "block 0", "block 1", "block 2", "block 3"}
    b1 = restr[(restr.ranking == "block 1") & (restr["query"] == 0)]
    assert sorted(b1.train_index) == [0, 1, 2, 3, 4] and set(b1.level) == {"same meaning"}
    assert set(b1.overlap) == {0.0}
    b0 = restr[(restr.ranking == "block 0") & (restr["query"] == 0)]
    assert set(b0.level) == {"unrelated"} and set(b0.overlap) == {1.0}  # same three words
    per_query = lt.restriction_per_query(restr)
    by_third = lt.restriction_by_third(per_query)
    mid = by_third[by_third.third == "middle"]
    assert mid["same_meaning"].tolist() == [1.0] * 3  # the mean of blocks 1 and 2
    contrast = lt.middle_contrast(by_third, "same_meaning")["contrast"]
    assert contrast.tolist() == [1.0] * 3
    assert lt.middle_contrast(by_third, "overlap")["contrast"].tolist() == [-1.0] * 3
    summary = lt.restriction_summary(per_query, ["m"]).set_index("ranking")
    assert list(summary.index) == ["all layers", "lower", "middle", "upper"]
    assert summary.loc["upper", "overlap"] == 1.0
    assert not style.small_texts(lt.plot_restriction(per_query, ["m"], 5))


def _blocks(model, n_blocks, per_query_even, query_sets):
    """A block table: per query set, each query's `even` values per block (list per block)."""
    d = lt.layer_depths(_layers(n_blocks)).drop_duplicates("block")
    rows = []
    for qs in query_sets:
        for qi, values in enumerate(per_query_even[qs]):
            for (_, r), v in zip(d.iterrows(), values, strict=True):
                rows.append({"model": model, "query_set": qs, "query": qi, "block": r.block,
                             "n_blocks": n_blocks, "rel_depth": r.rel_depth, "third": r.third,
                             "share": v / n_blocks, "even": v})  # fmt: skip
    return pd.DataFrame(rows)


def _restriction(model, mid_meaning, out_meaning, mid_overlap, out_overlap):
    """A per-query restriction table (5 blocks) with given per-query values (lists)."""
    d = lt.layer_depths(_layers(5)).drop_duplicates("block")
    rows = []
    for qi in range(len(mid_meaning)):
        for _, r in d.iterrows():
            mid = r.third == "middle"
            rows.append({"model": model, "ranking": f"block {r.block}", "block": r.block,
                         "rel_depth": r.rel_depth, "third": r.third, "query_set": "facts",
                         "query": qi,
                         "same_meaning": (mid_meaning if mid else out_meaning)[qi],
                         "overlap": (mid_overlap if mid else out_overlap)[qi]})  # fmt: skip
    return pd.DataFrame(rows)


def _tokens(share, base):
    return pd.DataFrame({"query_set": "facts", "query": range(len(share)), "share": share,
                         "base_rate": base})  # fmt: skip


def test_findings_agree_disagree_and_negative_controls():
    n = 12
    sets = ["facts", "quotes", "math", "code"]
    rng = np.random.default_rng(0)
    noise = rng.uniform(-0.05, 0.05, n)
    # paper-like: even spread, facts and quotes upper, math and code middle, the middle blocks
    # thematic and less overlapping, query tokens carry the influence
    upper = [[0.8, 0.8, 1.0, 1.2 + e, 1.2 - e] for e in noise]
    middle = [[0.8, 0.8, 1.6 + e, 0.9 - e, 0.9] for e in noise]
    paper = _blocks("xl", 5, {"facts": upper, "quotes": upper, "math": middle, "code": middle},
                    sets)  # fmt: skip
    restr = _restriction("xl", 0.6 + noise, [0.3] * n, [0.2] * n, 0.3 + noise)
    toks = _tokens(0.6 + noise, [0.3] * n)
    found = {f.name: f for f in lt.findings(paper, restr, toks, "xl", n_boot=100)}
    assert found["translation middle"].verdict == "not comparable"
    for name, f in found.items():
        if name != "translation middle":
            assert f.verdict == "agrees", (name, f.reason)
    assert found["facts and quotes upper"].estimate == pytest.approx(1.2 - 2.6 / 3)
    assert found["middle third thematic"].estimate == pytest.approx(0.3 + noise.mean())
    assert found["query tokens carry the influence"].base_rate == "30%"
    # the opposite of every claim disagrees: one block holds 3× even share, facts and quotes
    # lower, math and code outer, the middle blocks less thematic and more overlapping
    low = [[3.0 + e, 0.5, 0.5, 0.5 - e, 0.5] for e in noise]
    opposite = _blocks("xl", 5, {"facts": low, "quotes": low, "math": low, "code": low}, sets)
    restr_o = _restriction("xl", [0.3] * n, 0.6 + noise, 0.3 + noise, [0.2] * n)
    toks_o = _tokens([0.1] * n, 0.3 + noise)
    for f in lt.findings(opposite, restr_o, toks_o, "xl", n_boot=100):
        if f.name != "translation middle":
            assert f.verdict == "disagrees", (f.name, f.reason)
    # negative control, a coin flip per query: the last block 2.5× or −0.5× an even share
    # (half the queries spread evenly, every contrast ± the same amount)
    sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    flip = [[1.0, 1.0, 1.0, 1.0, 1.0 + 1.5 * s] for s in sign]
    coin = _blocks("xl", 5, {"facts": flip, "quotes": flip, "math": flip, "code": flip}, sets)
    restr_c = _restriction("xl", 0.5 + 0.2 * sign, [0.5] * n, 0.3 + 0.1 * sign, [0.3] * n)
    toks_c = _tokens(0.3 + 0.2 * sign, [0.3] * n)
    for f in lt.findings(coin, restr_c, toks_c, "xl", n_boot=100):
        if f.name != "translation middle":
            assert f.verdict == "inconclusive", (f.name, f.reason)
    # too shallow for thirds: not comparable, with the reason from the depth
    one = _blocks("xs", 1, {qs: [[1.0]] * n for qs in sets}, sets)
    shallow = {f.name: f for f in lt.findings(one, restr, toks, "xs", n_boot=100)}
    for name in ("spread over layers", "facts and quotes upper", "math and code middle",
                 "middle third thematic", "outer thirds token overlap"):  # fmt: skip
        assert shallow[name].verdict == "not comparable"
        assert shallow[name].reason.startswith("xs has 1 block:")
    two = _blocks("l", 2, {qs: [[0.9, 1.1]] * n for qs in sets}, sets)
    f2 = {f.name: f for f in lt.findings(two, restr, toks, "l", n_boot=100)}
    assert f2["math and code middle"].verdict == "not comparable"
    assert f2["facts and quotes upper"].verdict != "not comparable"
    with pytest.raises(ValueError, match="no block shares of model 'xxl'"):
        lt.findings(paper, restr, toks, "xxl")


def test_tokenwise_scores_sum_to_totals_and_check_reports_it():
    model, task = tiny_llama(), inf.LanguageModelingTask()
    train, queries = lm_data(10, min_len=3), lm_data(2, seed=7, prompt=2)
    est = fitted(inf.EKFAC, model, task, train)
    tok = inf.pairwise_scores(model, task, est, queries, train, by_token=True, progress=False)
    tot = inf.pairwise_scores(model, task, est, queries, train, progress=False)
    chk = lt.token_check(tok, tot)
    assert chk["max_rel_diff"] < 1e-10  # float64: rounding only
    assert lt.token_check(tok, tot * 1.01)["max_rel_diff"] > 1e-3  # the check can fail


TEXTS = ["the capital of Astrobia is Zorald", "the leader of Belvia is Kimmet",
         "Zorald is the capital of Astrobia", "the river of Corvia is Quanto"] * 3  # fmt: skip


def test_token_attribution_on_a_tiny_language_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=12,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=32, attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(cfg).double().eval()
    task = inf.LanguageModelingTask(modules="mlp")
    from influence.study.suite import query_dataset, train_dataset

    corpus = SimpleNamespace(train={"text": TEXTS[:4]})
    suite = SimpleNamespace(tokenizer=tok, corpus=corpus, params={"seq_len": 16})
    train_ds = train_dataset(suite, corpus)
    est = fitted(inf.EKFAC, model, task, train_ds)
    queries = pd.DataFrame([_row(kind="fact", prompt="the capital of Astrobia is",
                                 completion=" Zorald"),
                            _row(kind="fact", prompt="the river of Corvia is",
                                 completion=" Quanto")])  # fmt: skip
    qd = query_dataset(tok, queries)
    scores = inf.pairwise_scores(model, task, est, qd, train_ds, progress=False)

    class Stage(FakeScores):
        def model(self, m):
            return model

        def estimator(self, m):
            return est

        task = inf.LanguageModelingTask(modules="mlp")

        def scores(self, m, qs):
            return scores

    st = Stage({"m": {"facts": {}}}, {"m": []}, queries={"facts": queries})
    st.suite = suite
    rows = lt.token_attribution(st, "m", "facts", 2, 2)
    assert rows.top.tolist() == lt.top_k_indices(scores, 2).tolist()
    assert rows.check["vs_stage"] < 1e-10 and rows.check["vs_score"] < 1e-10
    for qi in range(2):
        for s, j in enumerate(rows.top[qi]):
            ids = rows.token_ids[qi][s]
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # real tokens
            assert len(rows.by_token[qi][s]) == len(ids)
            assert rows.by_token[qi][s].sum() == pytest.approx(float(scores[qi, j]), rel=1e-9)
            assert rows.by_token[qi][s][-1] == 0  # the last position predicts nothing
    # decoded tokens are text, never the byte-level form
    pieces = lt.decode_tokens(tok, rows.token_ids[0][0])
    assert pieces[0] == "<bos>" and all("Ġ" not in p for p in pieces)
    assert "".join(pieces[1:-1]) == TEXTS[int(rows.top[0][0])]
    page = lt.token_heatmaps(rows, tok, "m")
    assert page.count("<li>") == 4 and ">EOS<" in page and "Ġ" not in page
    # the share of positive token influence on positions predicting a query token
    stop = lt.content_stopword_ids(tok)
    share = lt.query_token_share(rows, tok, stop)
    assert ((share["share"] >= 0) & (share["share"] <= 1)).all()
    qset = lt.content_sets(tok, ["the capital of Astrobia is Zorald"], stop)[0]
    ids = [i for s in range(2) for i in rows.token_ids[0][s][1:]]
    assert share["base_rate"].iloc[0] == pytest.approx(np.isin(ids, list(qset)).mean())


def test_query_token_share_known_values():
    rows = lt.TokenRows(
        query_set="facts",
        queries=pd.DataFrame({"prompt": ["a b"], "completion": [" c"]}),
        top=np.array([[0]]),
        total=np.array([[3.0]]),
        # positions 0..3 predict tokens 1..4: ids [0, 5, 1, 6, 3] -> 5 (no), 1, 6 (no), 3
        by_token=[[np.array([1.0, 2.0, -1.0, 1.0, 0.0])]],
        token_ids=[[[0, 5, 1, 6, 3]]],
        check={},
    )
    tok = WordTokenizer(["a b c d e f"])  # a=1, b=2, c=3, d=4, e=5, f=6
    share = lt.query_token_share(rows, tok, {0}).iloc[0]
    # positive terms 1 (pos 0, token 5), 2 (pos 1, token 1: a), 1 (pos 3, token 3: c)
    assert share["share"] == pytest.approx(3 / 4)
    assert share["base_rate"] == pytest.approx(2 / 4)


def test_the_module_owns_its_preset_block_and_ranges():
    from influence.study import presets

    assert presets.SECTIONS[lt.SECTION] is lt.PRESETS
    assert presets.RANGES[lt.SECTION] is lt.RANGES
    with pytest.raises(ValueError, match="token_sequences must be an integer ≥ 1"):
        presets.resolve(lt.SECTION, "smoke", token_sequences=0)
