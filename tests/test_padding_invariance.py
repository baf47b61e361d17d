"""Curvature from real tokens only: padding and batch size change no factor and no score.

For every task on real tiny Hugging Face models (float64): the same ragged examples fitted and
scored one at a time (no padding at all), as one padded batch, and padded 5 positions wider
give equal factors (each layer's covariances A and S and its implied curvature block, which
holds its token count; the diagonal; the resolved damping) and equal pairwise and
self-influence scores, to 1e-10 relative. Padded positions that entered the covariances and
token counts moved the scores by percents (measured before the token masks, scores of four
more padded positions: BERT 10% EK-FAC, 19% K-FAC; T5 4%, 10%).
"""

from __future__ import annotations

import pytest
import torch

import influence as inf
from tests.test_families import build
from tests.test_tasks_hf import HEADS, HID, VOCAB, classifier, seq2seq

t = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

TIGHT = 1e-10


def float64_llama():
    """The test's Llama with transformers' float32 islands made float64: its RMSNorm, RoPE and
    eager softmax run in float32 whatever the model's dtype, and on AVX2 the vectorised float32
    kernels round differently for batches of other shapes (2.3e-8 to 7.1e-8 relative between
    padded and unpadded batches, below 1e-10 with ATEN_CPU_CAPABILITY=default). What is tested
    here is the library's handling of padding, at 1e-10."""
    import types

    model = build("llama")

    def rms_norm(self, h):
        return self.weight * (
            h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    def rope(self, x, position_ids):
        freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(x.device, x.dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = types.MethodType(rms_norm, m)
        elif type(m).__name__ == "LlamaRotaryEmbedding":
            m.forward = types.MethodType(rope, m)
    return model


@pytest.fixture(autouse=True)
def float64_softmax(request, monkeypatch):
    """In the Llama cases, eager attention's softmax in float64 where transformers asks for
    float32 on float64 scores (the third float32 island)."""
    if (
        getattr(request.node, "callspec", None) is None
        or request.node.callspec.params.get("case") != "llama"
    ):
        return
    softmax = torch.nn.functional.softmax

    def float64_softmax(x, dim=None, dtype=None, **kw):
        if x.dtype == torch.float64 and dtype == torch.float32:
            dtype = None
        return softmax(x, dim=dim, dtype=dtype, **kw)

    monkeypatch.setattr(torch.nn.functional, "softmax", float64_softmax)


EXTRA = 5  # extra right padding
LENGTHS = [5, 8, 3, 7, 4, 6]
QUERY_LENGTHS = [6, 2]
TARGET_LENGTHS = {"seq2seq": [3, 5, 2, 4, 1, 3], "seq2seq-equal": [3, 8, 3, 7, 2, 6]}
ESTIMATORS = {"identity": inf.Identity, "diagonal": inf.Diagonal, "kfac": inf.KFAC}
ESTIMATORS["ekfac"] = inf.EKFAC


def bert_regressor():
    torch.manual_seed(0)
    cfg = t.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HID,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=1,
        attn_implementation="eager",
    )
    model = t.BertForSequenceClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double().eval()


def examples(kind: str, lengths, seed: int) -> list[dict]:
    """Ragged examples as a tokenizer gives them: lists of ids of different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        row = {"input_ids": torch.randint(3, VOCAB, (n,), generator=g).tolist()}
        if kind == "classification":
            row["labels"] = int(torch.randint(0, 3, (1,), generator=g))
        elif kind == "regression":
            row["labels"] = float(torch.randn(1, generator=g, dtype=torch.float64))
        elif kind.startswith("seq2seq"):
            # "seq2seq-equal": source and target equally long in some examples and batches
            m = TARGET_LENGTHS[kind][i % len(TARGET_LENGTHS[kind])]
            row["labels"] = torch.randint(3, VOCAB, (m,), generator=g).tolist()
        rows.append(row)
    return rows


# case: (model builder, task, kind of examples)
CASES = {
    "bert": (lambda: classifier("bert"), inf.SequenceClassificationTask(), "classification"),
    "roberta": (lambda: classifier("roberta"), inf.SequenceClassificationTask(), "classification"),
    "distilbert": (lambda: classifier("distilbert"), inf.ClassificationTask(), "classification"),
    "bert-regression": (bert_regressor, inf.RegressionTask(), "regression"),
    "t5": (lambda: seq2seq("t5"), inf.Seq2SeqLMTask(), "seq2seq"),
    "bart": (lambda: seq2seq("bart"), inf.Seq2SeqLMTask(), "seq2seq"),
    "t5-equal-lengths": (lambda: seq2seq("t5"), inf.Seq2SeqLMTask(), "seq2seq-equal"),
    "bart-equal-lengths": (lambda: seq2seq("bart"), inf.Seq2SeqLMTask(), "seq2seq-equal"),
    "gpt2": (lambda: build("gpt2"), inf.LanguageModelingTask(), "lm"),
    "llama": (float64_llama, inf.LanguageModelingTask(), "lm"),
}


def padded(rows: list[dict], extra: int = 0) -> dict[str, torch.Tensor]:
    """One batch of all `rows`, right-padded `extra` positions wider than the longest."""
    from influence.gradients import collate

    batch = collate(rows)
    pad = torch.nn.functional.pad
    for key in ("input_ids", "attention_mask"):
        batch[key] = pad(batch[key], (0, extra), value=0)
    if "labels" in batch and batch["labels"].dim() == 2:
        batch["labels"] = pad(batch["labels"], (0, extra), value=-100)
    return batch


def ragged(rows: list[dict]):
    """A Hugging Face dataset of the ragged rows (padded by the library, batch by batch)."""
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})


def curvature(est) -> dict[str, torch.Tensor]:
    """What an estimator's scores depend on, in forms that do not depend on the arbitrary
    eigenbasis of a repeated eigenvalue."""
    out = {f"damping {n}": torch.tensor(float(v)) for n, v in est.damping_.items()}
    if isinstance(est, inf.KFAC):
        for n in est.layers_:
            for f in ("A", "S"):
                q, lam = est.state_[f"{n}::eigvecs_{f}"], est.state_[f"{n}::eigvals_{f}"]
                out[f"{n} {f}"] = q @ torch.diag(lam) @ q.T
            out[f"{n} implied"] = est.implied_matrix(n)
    else:
        out.update(est.state_)
    return out


def results(model, task, est_cls, train, queries, batch_size: int) -> dict[str, torch.Tensor]:
    est = est_cls().fit(model, task, train, batch_size=batch_size, progress=False, seed=1)
    out = curvature(est)
    kw = {"batch_size": batch_size, "progress": False}
    out["scores"] = inf.pairwise_scores(model, task, est, queries, train, **kw)
    out["self"] = inf.self_scores(model, task, est, train, **kw)
    return out


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("est_name", list(ESTIMATORS))
@pytest.mark.parametrize("case", list(CASES))
def test_padding_and_batch_size_change_no_factor_and_no_score(case, est_name):
    build_model, task, kind = CASES[case]
    model, est_cls = build_model(), ESTIMATORS[est_name]
    train, queries = examples(kind, LENGTHS, 1), examples(kind, QUERY_LENGTHS, 2)
    alone = results(model, task, est_cls, ragged(train), ragged(queries), batch_size=1)
    variants = {
        "one padded batch": (padded(train), padded(queries)),
        f"{EXTRA} positions of extra padding": (padded(train, EXTRA), padded(queries, EXTRA)),
    }
    for what, (train_batch, query_batch) in variants.items():
        got = results(model, task, est_cls, train_batch, query_batch, batch_size=len(train))
        assert set(got) == set(alone)
        for k, v in alone.items():
            assert rel(got[k], v) < TIGHT, (what, k, rel(got[k], v))


@pytest.mark.parametrize("case", ["bert", "t5"])
def test_cg_scores_do_not_depend_on_padding(case):
    build_model, task, kind = CASES[case]
    model = build_model()
    layers = list(task.tracked_modules(model))
    task = type(task)(modules=[layers[0], layers[-1]])  # a small dense Gauss–Newton matrix
    train, queries = examples(kind, LENGTHS, 1), examples(kind, QUERY_LENGTHS, 2)
    got = []
    for train_data, query_data, batch_size in [
        (ragged(train), ragged(queries), 1),
        (padded(train, EXTRA), padded(queries, EXTRA), len(train)),
    ]:
        cg = inf.CG(damping=0.01, tol=1e-10)
        cg.fit(model, task, train_data, batch_size=batch_size, progress=False)
        kw = {"batch_size": batch_size, "progress": False}
        got.append(inf.pairwise_scores(model, task, cg, query_data, train_data, **kw))
    # CG stops at a relative residual of 1e-10; its iterates from two orders of summation
    # agree to that times the conditioning, not to rounding.
    assert rel(got[1], got[0]) < 1e-6


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_layers_read_the_encoder_or_the_decoder(family):
    """Encoder layers and the decoder's cross-attention keys and values read the encoder's
    positions, the other decoder layers the decoder's: told by a forward whose sequences
    differ in length when a batch's are equally long."""
    from influence.masks import sequences_read

    model, task = seq2seq(family), inf.Seq2SeqLMTask()
    layers = task.tracked_modules(model)
    batch = padded(examples("seq2seq-equal", [4, 8], 1))
    assert batch["input_ids"].shape == batch["labels"].shape  # equal lengths: a probe is needed
    read = sequences_read(model, task, layers, batch)
    cross = ("EncDecAttention.k", "EncDecAttention.v", "encoder_attn.k_proj", "encoder_attn.v_proj")
    for name, sequence in read.items():
        on_encoder = name.startswith(("encoder.", "model.encoder.")) or name.endswith(cross)
        assert sequence == ("encoder" if on_encoder else "decoder"), (name, sequence)


def left_padded(batch: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The right-padded `batch` with every row's padding moved to its start (a causal LM's
    labels with it; a classifier's or a decoder's labels are not the input's positions)."""
    lengths = batch["attention_mask"].sum(1)
    width = batch["attention_mask"].shape[1]
    index = (torch.arange(width)[None] - (width - lengths)[:, None]) % width
    keys = ["input_ids", "attention_mask"] + (["labels"] if kind == "lm" else [])
    return {k: (v.gather(1, index) if k in keys else v) for k, v in batch.items()}


@pytest.mark.parametrize("case", ["gpt2", "llama", "bert", "bart"])
def test_left_padding_gives_the_scores_of_right_padding(case):
    """GPT-2, BERT and BART have absolute positions (left padding moved GPT-2's gradients by
    39%), and eager-attention Llama in float64 attends over padding only on left-padded rows
    (NaN, reported as "half precision or a diverged model"): every row is right-aligned
    before the model sees it, and per-token scores come back at the caller's positions."""
    build_model, task, kind = CASES[case]
    model = build_model()
    train, queries = examples(kind, LENGTHS, 1), examples(kind, QUERY_LENGTHS, 2)
    right, right_q = padded(train, 2), padded(queries, 2)
    left, left_q = left_padded(right, kind), left_padded(right_q, kind)
    assert (left["attention_mask"][:, 0] == 0).any()
    got = {}
    for side, (data, q) in {"right": (right, right_q), "left": (left, left_q)}.items():
        est = inf.EKFAC().fit(model, task, data, batch_size=4, progress=False, seed=1)
        kw = {"batch_size": 4, "progress": False}
        got[side] = curvature(est)
        got[side]["scores"] = inf.pairwise_scores(model, task, est, q, data, **kw)
        got[side]["self"] = inf.self_scores(model, task, est, data, **kw)
        if kind == "lm":  # one sequence: per-token scores (at the caller's positions)
            tokens = inf.pairwise_scores(model, task, est, q, data, by_token=True, **kw)
            if side == "left":  # each row's real tokens back to its start, to compare
                lead = data["attention_mask"].shape[1] - data["attention_mask"].sum(1)
                for i, shift in enumerate(lead.tolist()):
                    tokens[:, i] = tokens[:, i].roll(-shift, dims=-1)
            got[side]["by token"] = tokens
    for k, v in got["right"].items():
        assert rel(got["left"][k], v) < TIGHT, (k, rel(got["left"][k], v))


def test_left_padding_gives_right_padding_cg_and_pbrf_scores():
    """The Gauss–Newton products (CG) and the PBRF's optimisation see right-aligned rows too."""
    model = build("gpt2")
    task = inf.LanguageModelingTask(modules=["transformer.h.0.mlp.c_proj"])
    right = padded(examples("lm", LENGTHS, 1), 2)
    right_q = padded(examples("lm", QUERY_LENGTHS, 2), 2)
    left, left_q = left_padded(right, "lm"), left_padded(right_q, "lm")
    got = {}
    for side, (data, q) in {"right": (right, right_q), "left": (left, left_q)}.items():
        cg = inf.CG(damping=0.1, tol=1e-10).fit(model, task, data, batch_size=4, progress=False)
        got[f"{side} cg"] = inf.pairwise_scores(model, task, cg, q, data, progress=False)
        got[f"{side} pbrf"] = inf.pbrf_scores(
            model, task, q, data, [0, 3], damping=0.1, max_steps=5, progress=False
        )
    assert rel(got["left cg"], got["right cg"]) < 1e-9
    assert rel(got["left pbrf"], got["right pbrf"]) < 1e-9


class _NanAtPadding(torch.nn.Module):
    """A classifier whose tracked layer reads NaN at padded positions (as attention over
    padding only gives), pooled over real positions only: its real tokens are all finite."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 6)
        self.lin = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)
        self.double()

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool().unsqueeze(-1)
        h = torch.where(real, self.emb(input_ids), torch.nan)
        h = torch.where(real, torch.tanh(self.lin(h)), 0.0).sum(1)
        return self.head(h)


def test_nan_at_padded_positions_is_not_an_error():
    """NaN in a layer's inputs at padded positions reaches no real token: the example is
    scored as it is alone (it used to raise "... half precision or a diverged model ...")."""
    model, task = _NanAtPadding(), inf.ClassificationTask()
    train, queries = examples("classification", LENGTHS, 1), examples("classification", [4, 7], 2)
    alone = results(model, task, inf.EKFAC, ragged(train), ragged(queries), batch_size=1)
    got = results(model, task, inf.EKFAC, padded(train, 2), padded(queries, 2), batch_size=6)
    for k, v in alone.items():
        assert rel(got[k], v) < TIGHT, k
    # A NaN at a real position is still an error naming the example.
    broken = padded(train)
    with torch.no_grad():
        model.emb.weight[1] = torch.nan  # token 1, which only example 4 has
    broken["input_ids"][4, 0] = 1
    with pytest.raises(FloatingPointError, match="training example 4"):
        inf.EKFAC().fit(model, task, broken, progress=False)
