"""Tasks for Hugging Face models beyond causal LMs, against brute force.

Sequence classification (BERT, RoBERTa, DistilBERT) and seq2seq language modelling (T5,
BART), tiny float64 models built from configs: gradient-dot-product scores against explicit
per-example autograd gradients (1e-8), the measurement against the model's own loss, the
output Hessian against autograd, and CG against the exact damped Gauss–Newton inverse.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

import influence as inf
from influence.gnvp import eager_attention
from tests.brute_force import brute_gradients, exact_gauss_newton, flat

t = pytest.importorskip("transformers")

VOCAB, SEQ, N, HID, FF, HEADS, LABELS = 64, 8, 3, 16, 32, 2, 3


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double().eval()


def classifier(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, num_labels=LABELS, attn_implementation="eager")
    bert_like = dict(
        hidden_size=HID,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        intermediate_size=FF,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if family == "bert":
        model = t.BertForSequenceClassification(t.BertConfig(**common, **bert_like))
    elif family == "roberta":
        model = t.RobertaForSequenceClassification(
            t.RobertaConfig(**common, **bert_like, pad_token_id=0)
        )
    else:
        model = t.DistilBertForSequenceClassification(
            t.DistilBertConfig(
                **common, dim=HID, n_layers=1, n_heads=HEADS, hidden_dim=FF, dropout=0.0
            )
        )
    return _perturb(model)


def seq2seq(family: str):
    torch.manual_seed(0)
    if family == "t5":
        cfg = t.T5Config(
            vocab_size=VOCAB,
            d_model=HID,
            d_kv=8,
            d_ff=FF,
            num_layers=1,
            num_heads=HEADS,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        return _perturb(t.T5ForConditionalGeneration(cfg))
    cfg = t.BartConfig(
        vocab_size=VOCAB,
        d_model=HID,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FF,
        decoder_ffn_dim=FF,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        decoder_start_token_id=2,
    )
    return _perturb(t.BartForConditionalGeneration(cfg))


def cls_batch(n=N, seed=1, token_types=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[-1, SEQ - 3 :] = 0
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.randint(0, LABELS, (n,), generator=g),
    }
    if token_types:
        batch["token_type_ids"] = (torch.arange(SEQ) >= SEQ // 2).long().expand(n, SEQ)
    return batch


def s2s_batch(n=N, seed=1, tgt=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[-1, SEQ - 2 :] = 0
    labels = torch.randint(3, VOCAB, (n, tgt), generator=g)
    labels[-1, -2:] = -100  # a shorter target
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _check_dot_scores(model, task, train, query):
    est = inf.Identity().fit(model, task, train)
    scores = inf.pairwise_scores(model, task, est, query, train, batch_size=N)
    infos = dict.fromkeys(task.tracked_modules(model))
    expected = (
        flat(brute_gradients(model, task, query, measurement=True), infos)
        @ flat(brute_gradients(model, task, train), infos).T
    )
    assert scores.shape == expected.shape
    assert (scores - expected).abs().max() / expected.abs().max() < 1e-8


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_sequence_classification_matches_autograd(family):
    model = classifier(family)
    task = inf.SequenceClassificationTask()
    tt = family == "bert"  # RoBERTa and DistilBERT have no token types
    train, query = cls_batch(token_types=tt), cls_batch(n=2, seed=2, token_types=tt)
    _check_dot_scores(model, task, train, query)
    # The measurement is −log p(label | text), with every input forwarded (token types too).
    inputs = {k: v for k, v in query.items() if k != "labels"}
    logp = F.log_softmax(model(**inputs).logits, -1)
    expected = -logp.gather(1, query["labels"][:, None]).sum()
    assert torch.allclose(task.measurement(model, query), expected, rtol=1e-12, atol=0)
    if tt:  # token types change the logits, so forwarding them is observable
        no_types = {k: v for k, v in inputs.items() if k != "token_type_ids"}
        assert not torch.allclose(model(**no_types).logits, model(**inputs).logits)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_matches_autograd(family):
    model = seq2seq(family)
    task = inf.Seq2SeqLMTask()
    train, query = s2s_batch(), s2s_batch(n=2, seed=2)
    _check_dot_scores(model, task, train, query)
    # −log p(target | source) summed over target tokens: the model's own mean loss × count.
    hf = model(**query).loss * (query["labels"] != -100).sum()
    assert torch.allclose(task.measurement(model, query), hf, rtol=1e-10, atol=0)


def test_seq2seq_output_hessian_and_cg_exact():
    """output_hvp of the unshifted (seq2seq) loss equals autograd's Hessian, and CG scores
    equal the exact (G + λI)⁻¹ scores from an explicit Gauss–Newton matrix."""
    model = seq2seq("t5")
    # One encoder and one decoder layer (1,024 parameters): a small dense G.
    task = inf.Seq2SeqLMTask(
        modules=[
            "encoder.block.0.layer.1.DenseReluDense.wo",
            "decoder.block.0.layer.2.DenseReluDense.wi",
        ]
    )
    train = s2s_batch(n=4)
    train["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=train["labels"])
    query = {k: v[:2] for k, v in train.items()}
    h = task.outputs(model, train).detach()[:1]
    one = {k: v[:1] for k, v in train.items()}
    tgt = task.targets(one)
    hess = hessian(lambda o: task.loss_from_outputs(o, one, tgt))(h).reshape(h.numel(), -1)
    v = torch.randn(h.shape, dtype=torch.float64)
    assert torch.allclose(task.output_hvp(h, one, v).reshape(-1), hess @ v.reshape(-1), atol=1e-12)

    lam = 1e-2
    est = inf.CG(damping=lam, tol=1e-12).fit(model, task, train, batch_size=2)
    scores = inf.pairwise_scores(model, task, est, query, train, batch_size=2)
    infos = dict.fromkeys(task.tracked_modules(model))
    with eager_attention(model):  # the default fused attention has no double backward
        gn = exact_gauss_newton(model, task, train)
    gq = flat(brute_gradients(model, task, query, measurement=True), infos)
    gt = flat(brute_gradients(model, task, train), infos)
    expected = gq @ torch.linalg.solve(gn + lam * torch.eye(len(gn), dtype=gn.dtype), gt.T)
    assert (scores - expected).abs().max() / expected.abs().max() < 1e-7


def test_language_model_forwards_position_ids():
    from tests.test_families import build, lm_batch

    model = build("llama")
    batch = lm_batch()
    batch["position_ids"] = torch.arange(SEQ).flip(0).expand(N, SEQ)
    out = inf.LanguageModelingTask().outputs(model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(out, model(**inputs).logits)
    del inputs["position_ids"]
    assert not torch.allclose(out, model(**inputs).logits)


def test_dict_batches_need_labels():
    with pytest.raises(TypeError, match="'labels'"):
        inf.SequenceClassificationTask().check_batch({"input_ids": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="'labels'"):
        inf.Seq2SeqLMTask().check_batch({"input_ids": torch.zeros(2, 3)})


def test_model_inputs_follow_the_forward_signature():
    from influence.tasks import model_inputs

    batch = {k: torch.zeros(1, 2) for k in ("input_ids", "attention_mask", "labels", "extra")}

    class Named(torch.nn.Module):
        def forward(self, input_ids, extra=None): ...

    class Wrapper(torch.nn.Module):
        def forward(self, input_ids, **kwargs): ...

    class Anything(torch.nn.Module):
        def forward(self, *args, **kwargs): ...

    assert sorted(model_inputs(Named(), batch)) == ["extra", "input_ids"]
    assert sorted(model_inputs(Wrapper(), batch)) == ["attention_mask", "input_ids"]
    assert sorted(model_inputs(Anything(), batch)) == ["attention_mask", "extra", "input_ids"]
