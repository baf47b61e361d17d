"""Every decoder family transformers builds from a small config scores correctly.

For each family: gradient-dot-product (Identity) scores from the library's hooks against dot
products of per-example gradients from plain autograd (one backward per example), in float64 —
agreement to 1e-8 relative to the largest score means the hooks attribute every token of every
layer to the right example. OPT flattens its hidden states to [batch·time, hidden] before its
MLP, which is what the capture must map back. And `modules="mlp"` selects the MLP layers only.
"""

from __future__ import annotations

import pytest
import torch

import influence as inf
from influence.layers import find_layers
from tests.brute_force import brute_gradients, flat

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, N = 64, 8, 3
HID, FF, HEADS = 16, 32, 2
COMMON = dict(vocab_size=VOCAB, attn_implementation="eager", tie_word_embeddings=False)
LLAMA_LIKE = dict(
    hidden_size=HID,
    intermediate_size=FF,
    num_hidden_layers=1,
    num_attention_heads=HEADS,
    num_key_value_heads=HEADS,
    max_position_embeddings=32,
)
GPT2_LIKE = dict(n_embd=HID, n_layer=1, n_head=HEADS, n_positions=32)

# family: (config class, model class, config kwargs, MLP layer names in layer 0 under "mlp")
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**LLAMA_LIKE, "head_dim": 8}),
    "phi": ("PhiConfig", "PhiForCausalLM", LLAMA_LIKE),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2_LIKE),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {**LLAMA_LIKE, "num_key_value_heads": None},
    ),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {**GPT2_LIKE, "rotary_dim": 4}),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=HID, n_layer=1, n_head=HEADS)),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=HID, num_hidden_layers=1, num_attention_heads=HEADS),
    ),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", GPT2_LIKE),
    # CodeGen splits heads over 4 model-parallel groups: 4 heads.
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", {**GPT2_LIKE, "n_head": 4, "rotary_dim": 4}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", LLAMA_LIKE),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", LLAMA_LIKE),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=HID,
            ffn_dim=FF,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            word_embed_proj_dim=HID,
            max_position_embeddings=32,
        ),
    ),
}

# What modules="mlp" must select in each family (one layer): its feed-forward layers, exactly.
LLAMA_MLP = [
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
]
GPT2_MLP = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
NEOX_MLP = ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
MLP_LAYERS = {
    "llama": LLAMA_MLP,
    "mistral": LLAMA_MLP,
    "qwen2": LLAMA_MLP,
    "gemma": LLAMA_MLP,
    "olmo": LLAMA_MLP,
    "stablelm": LLAMA_MLP,
    "phi": ["model.layers.0.mlp.fc1", "model.layers.0.mlp.fc2"],
    "gpt2": GPT2_MLP,
    "gpt_bigcode": GPT2_MLP,
    "gpt_neox": [f"gpt_neox.layers.0.{n}" for n in NEOX_MLP],
    "bloom": [f"transformer.h.0.{n}" for n in NEOX_MLP],
    "falcon": [f"transformer.h.0.{n}" for n in NEOX_MLP],
    "gptj": ["transformer.h.0.mlp.fc_in", "transformer.h.0.mlp.fc_out"],
    "codegen": ["transformer.h.0.mlp.fc_in", "transformer.h.0.mlp.fc_out"],
    "opt": ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"],
}


def build(family: str, seed: int = 0):
    cfg_name, model_name, kwargs = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**COMMON, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).double().eval()
    # Random (not zero) biases and norms, so every parameter path is exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def lm_batch(n: int = N, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[-1, SEQ - 2 :] = 0  # one right-padded example
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_dot_matches_autograd(family):
    model = build(family)
    task = inf.LanguageModelingTask()
    train, query = lm_batch(seed=1), lm_batch(n=2, seed=2)
    est = inf.Identity().fit(model, task, train)
    scores = inf.pairwise_scores(model, task, est, query, train, batch_size=N)
    layers = task.tracked_modules(model)
    infos = {n: None for n in layers}
    gq = flat(brute_gradients(model, task, query, measurement=True), infos)
    gt = flat(brute_gradients(model, task, train), infos)
    expected = gq @ gt.T
    assert scores.shape == (2, N)
    err = (scores - expected).abs().max() / expected.abs().max()
    assert err < 1e-8, f"{family}: relative error {err:.2e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mlp_selector_selects_the_mlp_only(family):
    model = build(family)
    assert list(find_layers(model, "mlp")) == MLP_LAYERS[family]
    # Every other tracked layer is attention (or the input projection of OPT-350m-like models).
    others = set(find_layers(model)) - set(MLP_LAYERS[family])
    assert others and all("attn" in n or "attention" in n for n in others), sorted(others)


def test_encoder_and_seq2seq_mlp_selector():
    """BERT's intermediate/output dense (not attention.output.dense), DistilBERT's ffn, T5's
    DenseReluDense and BART's fc1/fc2."""
    t = transformers
    torch.manual_seed(0)
    bert = t.BertForSequenceClassification(
        t.BertConfig(
            vocab_size=VOCAB,
            hidden_size=HID,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            intermediate_size=FF,
        )
    )
    assert list(find_layers(bert, "mlp")) == [
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense",
    ]
    roberta = t.RobertaForSequenceClassification(
        t.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=HID,
            num_hidden_layers=1,
            num_attention_heads=HEADS,
            intermediate_size=FF,
        )
    )
    assert list(find_layers(roberta, "mlp")) == [
        "roberta.encoder.layer.0.intermediate.dense",
        "roberta.encoder.layer.0.output.dense",
    ]
    distil = t.DistilBertForSequenceClassification(
        t.DistilBertConfig(vocab_size=VOCAB, dim=HID, n_layers=1, n_heads=HEADS, hidden_dim=FF)
    )
    assert list(find_layers(distil, "mlp")) == [
        "distilbert.transformer.layer.0.ffn.lin1",
        "distilbert.transformer.layer.0.ffn.lin2",
    ]
    t5 = t.T5ForConditionalGeneration(
        t.T5Config(vocab_size=VOCAB, d_model=HID, d_kv=8, d_ff=FF, num_layers=1, num_heads=HEADS)
    )
    assert list(find_layers(t5, "mlp")) == [
        "encoder.block.0.layer.1.DenseReluDense.wi",
        "encoder.block.0.layer.1.DenseReluDense.wo",
        "decoder.block.0.layer.2.DenseReluDense.wi",
        "decoder.block.0.layer.2.DenseReluDense.wo",
    ]
    bart = t.BartForConditionalGeneration(
        t.BartConfig(
            vocab_size=VOCAB,
            d_model=HID,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS,
            encoder_ffn_dim=FF,
            decoder_ffn_dim=FF,
        )
    )
    assert list(find_layers(bart, "mlp")) == [
        "model.encoder.layers.0.fc1",
        "model.encoder.layers.0.fc2",
        "model.decoder.layers.0.fc1",
        "model.decoder.layers.0.fc2",
    ]


def test_opt_mlp_only_scores_match_autograd():
    """Tracking only OPT's fc1/fc2 (inputs [batch·time, d]) gives [Q, N] scores, exactly."""
    model = build("opt")
    task = inf.LanguageModelingTask(modules="mlp")
    train, query = lm_batch(seed=1), lm_batch(n=2, seed=2)
    scores = inf.pairwise_scores(
        model, task, inf.Identity().fit(model, task, train), query, train, batch_size=N
    )
    infos = dict.fromkeys(MLP_LAYERS["opt"])
    expected = (
        flat(brute_gradients(model, task, query, measurement=True), infos)
        @ flat(brute_gradients(model, task, train), infos).T
    )
    assert scores.shape == (2, N)
    assert (scores - expected).abs().max() / expected.abs().max() < 1e-8


class _Routed(torch.nn.Module):
    """A token-routed layer: `proj` sees only the tokens the router picks (5 of 2·4)."""

    def __init__(self, name: str = "proj"):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 4)
        self.add_module(name, torch.nn.Linear(4, 4))
        self.name = name
        self.head = torch.nn.Linear(4, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        flat_h = h.reshape(-1, 4)
        routed = getattr(self, self.name)(flat_h[:5])
        flat_h = torch.cat([routed, flat_h[5:]])
        return self.head(flat_h.reshape(h.shape))


def test_unmappable_layer_inputs_raise_naming_the_layer():
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 4))}
    task = inf.LanguageModelingTask(modules=["proj"])
    with pytest.raises(RuntimeError, match=r"'proj'.*modules="):
        inf.per_example_gradients(_Routed().double(), task, batch)
    # Layers under an `experts` module are refused before any pass, by name.
    model = _Routed("experts").double()
    with pytest.raises(ValueError, match=r"experts.*modules="):
        inf.per_example_gradients(model, inf.LanguageModelingTask(modules=["experts"]), batch)
