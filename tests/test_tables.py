"""Score tables and (prompt, completion) queries."""

from __future__ import annotations

import pytest
import torch

import influence as inf
from tests.brute_force import tiny_llama

pd = pytest.importorskip("pandas")
datasets = pytest.importorskip("datasets")


SCORES = torch.tensor([[0.5, -2.0, 3.0, 1.0, 0.0], [-1.0, 4.0, 2.0, -3.0, 0.25]])
TEXTS = ["zero", "one", "two", "three", "four"]


def test_top_influences_table():
    train = datasets.Dataset.from_dict({"text": TEXTS, "label": [0, 1, 0, 1, 0], "x": [1] * 5})
    queries = [{"prompt": "p0", "completion": "c0"}, {"prompt": "p1", "completion": "c1"}]
    df = inf.top_influences(SCORES, 2, train_data=train, query_data=queries)
    assert list(df.columns) == [
        "query",
        "rank",
        "train",
        "score",
        "per_copy_linear_estimate",
        "train_text",
        "train_label",
        "query_prompt",
        "query_completion",
    ]
    assert df["train"].tolist() == [2, 3, 1, 2]
    assert df["rank"].tolist() == [1, 2, 1, 2]
    assert df["score"].tolist() == [3.0, 1.0, 4.0, 2.0]
    assert df["per_copy_linear_estimate"].tolist() == [3.0 / 5, 1.0 / 5, 4.0 / 5, 2.0 / 5]
    assert df["train_text"].tolist() == ["two", "three", "one", "two"]
    assert df["train_label"].tolist() == [0, 1, 1, 0]
    assert df["query_prompt"].tolist() == ["p0", "p0", "p1", "p1"]


def test_top_influences_most_harmful_and_plain_lists():
    df = inf.top_influences(SCORES, 1, train_data=TEXTS, largest=False, num_train=10)
    assert df["train"].tolist() == [1, 3]
    assert df["train_text"].tolist() == ["one", "three"]
    assert df["per_copy_linear_estimate"].tolist() == [-0.2, -0.3]
    with pytest.raises(KeyError, match="no column 'nope'"):
        inf.top_influences(SCORES, 1, train_data={"text": TEXTS}, columns=["nope"])
    with pytest.raises(ValueError, match="k must be"):
        inf.top_influences(SCORES, 0)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "the", "capital", "of", "france", "is", "paris", "rome"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>")


def test_prompt_completion_queries_mask_the_prompt():
    tok = _tokenizer()
    batch = inf.prompt_completion_queries(
        tok, [("the capital of france is", "paris"), ("rome is", "the capital")]
    )
    assert batch["input_ids"].tolist() == [[2, 3, 4, 5, 6, 7], [8, 6, 2, 3, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, -100, -100, 7],
        [-100, -100, 2, 3, -100, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    # The language model's measurement is −log p(completion | prompt), by hand:
    model = tiny_llama()
    batch["input_ids"] = batch["input_ids"] % 13  # tiny_llama's vocabulary
    batch["labels"] = torch.where(batch["labels"] >= 0, batch["input_ids"], batch["labels"])
    logp = torch.log_softmax(model(input_ids=batch["input_ids"][1:2]).logits, -1)[0]
    by_hand = -(logp[1, batch["input_ids"][1, 2]] + logp[2, batch["input_ids"][1, 3]])
    one = {k: v[1:2] for k, v in batch.items()}
    got = inf.LanguageModelingTask().measurement(model, one)
    assert torch.allclose(got, by_hand, rtol=1e-12, atol=0)


def test_top_influences_leaves_out_nan_and_token_id_columns():
    """A NaN score was ranked first; a language model's dataset filled the table with its
    token-id `labels` column by default."""
    scores = torch.tensor([[float("nan"), 1.0, 2.0, 0.5], [3.0, float("nan"), float("nan"), 1.0]])
    train = datasets.Dataset.from_dict(
        {
            "text": ["a", "b", "c", "d"],
            "input_ids": [[1, 2], [3, 4], [5, 6], [7, 8]],
            "labels": [[1, 2], [3, 4], [5, 6], [7, 8]],
        }
    )
    df = inf.top_influences(scores, 3, train_data=train)
    assert df["train"].tolist() == [2, 1, 3, 0, 3]  # NaN never ranked; query 1 has 2 others
    assert df["query"].tolist() == [0, 0, 0, 1, 1]
    assert df["train"][df["query"] == 0].tolist() == [2, 1, 3]
    assert [c for c in df.columns if c.startswith("train_")] == ["train_text"]
    harmful = inf.top_influences(scores, 1, largest=False)
    assert harmful["score"].tolist() == [0.5, 1.0]
    # Named explicitly, a token-id column is shown.
    shown = inf.top_influences(scores, 1, train_data=train, columns=["labels"])
    assert shown["train_labels"].tolist() == [[5, 6], [1, 2]]


def _template_tokenizer():
    """A tokenizer whose template is `[BOS] $A [EOS]`, and one that adds nothing (GPT-2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "the", "capital", "of", "france", "is", "paris"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    template = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    return template, plain


def test_prompt_completion_queries_put_no_eos_between_prompt_and_completion():
    template, _ = _template_tokenizer()
    assert template("paris")["input_ids"] == [1, 8, 2]
    batch = inf.prompt_completion_queries(template, [("the capital of france is", "paris")])
    # BOS before the prompt, no EOS between prompt and completion.
    assert batch["input_ids"].tolist() == [[1, 3, 4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[-100] * 6 + [8]]


def test_prompt_completion_queries_empty_prompt_and_strings_instead_of_pairs():
    # An empty prompt: the completion's first token is still predicted (from BOS) and counted.
    for tok in _template_tokenizer():
        empty = inf.prompt_completion_queries(tok, [("", "paris is")])
        assert empty["input_ids"].tolist() == [[1, 8, 7]]
        assert empty["labels"].tolist() == [[-100, 8, 7]]
    with pytest.raises(TypeError, match=r"pairs\[0\] is the string 'ab', not a \(prompt"):
        inf.prompt_completion_queries(tok, ["ab", "cd"])
    with pytest.raises(TypeError, match="pairs is the string"):
        inf.prompt_completion_queries(tok, "the capital")
