"""The model suite: a tiny training run learns, training is deterministic and does not depend
on the process that runs it, the cache is reused per training seed, the held-out loss is the
mean token loss, bad sizes fail at once, and the datasets the influence library scores have
the documented layout."""

from __future__ import annotations

import pytest
import torch

from influence.study import suite as S
from influence.study.corpus import build_corpus
from influence.study.tokenizer import build_tokenizer, encode_query, encode_text

TINY = [{"name": "t", "hidden": 16, "layers": 1, "intermediate": 32, "heads": 1}]
TWO = [*TINY, {"name": "u", "hidden": 16, "layers": 2, "intermediate": 32, "heads": 2}]
TRAIN = {
    "epochs": 2,
    "batch_size": 32,
    "lr": 3e-3,
    "warmup_frac": 0.1,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.0,
    "log_every": 2,
    "eval_points": 3,
    "threads": 1,
    "workers": 1,
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
    held = [encode_text(tok, t) for t in corpus.heldout["text"]]
    train = {**TRAIN, "epochs": 4, "lr": 1e-2}
    m1, log = S.train_model(TINY[0], train, tok, seqs, 96, seed=0, progress=False, heldout=held)
    assert log["loss"][-1] < log["loss"][0] - 1.0
    assert log["tokens_seen"] == 4 * sum(len(s) for s in seqs)
    h = log["heldout"]
    assert len(h["loss"]) == 3 and h["step"][-1] == log["steps"]
    assert h["loss"][-1] < h["loss"][0]
    assert h["loss"][-1] == pytest.approx(S.heldout_loss(m1, held, tok.pad_token_id))
    assert log["train_cpu_seconds"] > 0
    m2, _ = S.train_model(TINY[0], train, tok, seqs, 96, seed=0, progress=False, heldout=held)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    m3, _ = S.train_model(TINY[0], train, tok, seqs, 96, seed=1, progress=False)
    assert not torch.equal(m1.lm_head.weight, m3.lm_head.weight)


def test_heldout_loss_is_the_mean_token_loss(corpus_tok):
    corpus, tok = corpus_tok
    torch.manual_seed(0)
    model = S.LlamaForCausalLM(S.llama_config(TINY[0], len(tok), 96, tok)).eval()
    seqs = [encode_text(tok, t) for t in corpus.heldout["text"]]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:  # one sequence at a time, no padding
            ids = torch.tensor([s])
            loss = model(input_ids=ids, labels=ids).loss  # mean over its len(s) - 1 targets
            nll += float(loss) * (len(s) - 1)
            count += len(s) - 1
    got = S.heldout_loss(model, seqs, tok.pad_token_id, batch_size=4)
    assert got == pytest.approx(nll / count, rel=1e-5)


def test_load_suite_reuses_cached_models_per_training_seed(tmp_artifacts, monkeypatch):
    s1 = S.load_suite("smoke", sizes=TINY, train=TRAIN, progress=False)
    assert list(s1.models) == ["t"] and s1.info[0]["params"] > 0 and s1.train_seed == 0
    assert (s1.paths["t"] / "log.json").is_file()
    assert (s1.paths["t"] / "tokenizer.json").is_file()
    info = s1.info[0]
    assert info["train_seed"] == 0 and 0 < info["non_embedding_params"] < info["params"]
    assert info["heldout_loss"] == s1.logs["t"]["heldout"]["loss"][-1]
    other = S.load_suite("smoke", sizes=TINY, train=TRAIN, progress=False, train_seed=1)
    assert other.paths["t"] != s1.paths["t"] and other.corpus.sha256 == s1.corpus.sha256
    assert not torch.equal(s1.models["t"].lm_head.weight, other.models["t"].lm_head.weight)

    def boom(*a, **k):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(S, "train_model", boom)
    s2 = S.load_suite("smoke", sizes=TINY, train=TRAIN, progress=False)
    assert s2.paths == s1.paths
    for a, b in zip(s1.models["t"].parameters(), s2.models["t"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not s2.models["t"].training
    assert S.train_suite("smoke", 0, [0, 1], sizes=TINY, train=TRAIN, progress=False) == []


def test_models_do_not_depend_on_the_process_that_trains_them(tmp_path, monkeypatch):
    weights = {}
    for workers in (1, 2):  # in this process, then two spawned processes
        monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path / str(workers)))
        train = {**TRAIN, "workers": workers}
        done = S.train_suite("smoke", 0, [0, 1], sizes=TWO, train=train, progress=False)
        assert len(done) == 4
        for ts in (0, 1):
            su = S.load_suite("smoke", sizes=TWO, train=train, progress=False, train_seed=ts)
            for name, m in su.models.items():
                weights[workers, ts, name] = m.state_dict()
    for ts in (0, 1):
        for name in ("t", "u"):
            a, b = weights[1, ts, name], weights[2, ts, name]
            for k in a:
                assert torch.equal(a[k], b[k]), (ts, name, k)


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ([TWO[1], TWO[0]], "suite sizes must grow: 't'"),
        ([TINY[0], TINY[0]], "size name 't' appears twice"),
        ([{"name": "t", "hidden": 16, "layers": 1, "heads": 1}], "misses \\['intermediate'\\]"),
        ([{**TINY[0], "heads": 3}], "hidden 16 is not a multiple of heads 3"),
        ([], "at least one size"),
    ],
)
def test_bad_sizes_fail_at_once(sizes, match, tmp_artifacts, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("built something before checking the sizes")

    monkeypatch.setattr(S, "build_corpus", boom)
    with pytest.raises(ValueError, match=match):
        S.load_suite("smoke", sizes=sizes, train=TRAIN, progress=False)


def test_default_suite_spans_a_hundredfold():
    counts = S.check_sizes(S.suite_config("default"))
    assert len(counts) >= 5 and counts[-1] / counts[0] >= 100


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
    cands = corpus.candidates["word_order"]
    cd = S.sequence_dataset(tok, cands["text"], length)
    assert len(cd) == len(cands)
    assert cd[3]["input_ids"][: cd[3]["attention_mask"].sum()].tolist() == encode_text(
        tok, cands[3]["text"]
    )
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


def test_heldout_token_losses_are_per_sequence_in_input_order(corpus_tok):
    corpus, tok = corpus_tok
    torch.manual_seed(0)
    model = S.LlamaForCausalLM(S.llama_config(TINY[0], len(tok), 96, tok)).eval()
    seqs = [encode_text(tok, t) for t in corpus.heldout["text"]][:9]
    got = S.heldout_token_losses(model, seqs, tok.pad_token_id, batch_size=4)
    assert got.shape == (len(seqs), 2)
    with torch.no_grad():
        for row, s in zip(got, seqs, strict=True):  # alone, unpadded
            ids = torch.tensor([s])
            assert row[1] == len(s) - 1
            loss = float(model(input_ids=ids, labels=ids).loss)
            assert row[0] == pytest.approx(loss * row[1], rel=1e-5)
