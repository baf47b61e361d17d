"""The model suite: a tiny training run learns, training is deterministic, the cache is reused,
and the datasets the influence library scores have the documented layout."""

from __future__ import annotations

import pytest
import torch

from influence.study import suite as S
from influence.study.corpus import build_corpus
from influence.study.tokenizer import build_tokenizer, encode_query, encode_text

TINY = [{"name": "t", "hidden": 16, "layers": 1, "intermediate": 32, "heads": 1}]
TRAIN = {
    "epochs": 2,
    "batch_size": 32,
    "lr": 3e-3,
    "warmup_frac": 0.1,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.0,
    "log_every": 2,
    "threads": 1,
}


@pytest.fixture
def tmp_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path))
    return tmp_path


@pytest.fixture
def corpus_tok(tmp_artifacts):
    corpus = build_corpus("smoke", 0)
    return corpus, build_tokenizer(corpus, 512)


def test_tiny_training_lowers_the_loss_and_is_deterministic(corpus_tok):
    corpus, tok = corpus_tok
    seqs = [encode_text(tok, t) for t in corpus.train["text"]]
    train = {**TRAIN, "epochs": 4, "lr": 1e-2}
    m1, log = S.train_model(TINY[0], train, tok, seqs, 96, seed=0, progress=False)
    assert log["loss"][-1] < log["loss"][0] - 1.0
    assert log["tokens_seen"] == 4 * sum(len(s) for s in seqs)
    m2, _ = S.train_model(TINY[0], train, tok, seqs, 96, seed=0, progress=False)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_load_suite_reuses_cached_models(tmp_artifacts, monkeypatch):
    s1 = S.load_suite("smoke", sizes=TINY, train=TRAIN, progress=False)
    assert list(s1.models) == ["t"] and s1.info[0]["params"] > 0
    assert (s1.paths["t"] / "log.json").is_file()
    assert (s1.paths["t"] / "tokenizer.json").is_file()

    def boom(*a, **k):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(S, "train_model", boom)
    s2 = S.load_suite("smoke", sizes=TINY, train=TRAIN, progress=False)
    assert s2.paths == s1.paths
    for a, b in zip(s1.models["t"].parameters(), s2.models["t"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not s2.models["t"].training


def test_train_and_query_datasets(corpus_tok):
    corpus, tok = corpus_tok
    ds = S.train_dataset(tok, corpus)
    length = S.sequence_length(tok, corpus)
    assert len(ds) == len(corpus.train) and ds[0]["input_ids"].shape == (length,)
    for i in (0, len(ds) - 1):
        ids = encode_text(tok, corpus.train[i]["text"])
        row = ds[i]
        assert row["input_ids"][: len(ids)].tolist() == ids
        assert row["attention_mask"].sum() == len(ids)
        assert (row["labels"][len(ids) :] == -100).all()
        assert row["labels"][: len(ids)].tolist() == ids
    q = corpus.queries["facts"]
    qd = S.query_dataset(tok, q)
    for i in range(3):
        p, c = encode_query(tok, q[i]["prompt"], q[i]["completion"])
        lab = qd[i]["labels"]
        assert (lab != -100).sum() == len(c)
        assert lab[len(p) : len(p) + len(c)].tolist() == c


def test_completion_scores_match_greedy_generation(corpus_tok):
    corpus, tok = corpus_tok
    seqs = [encode_text(tok, t) for t in corpus.train["text"]]
    model, _ = S.train_model(TINY[0], TRAIN, tok, seqs, 96, seed=0, progress=False)
    q = corpus.queries["facts"].select(range(6))
    sc = S.completion_scores(model, tok, q)
    for i in range(len(q)):
        p, c = encode_query(tok, q[i]["prompt"], q[i]["completion"])
        ids = torch.tensor([p])
        for _ in c:
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        assert bool(sc["correct"][i]) == (ids[0, len(p) :].tolist() == c)
        assert sc["logprob"][i] <= 0
