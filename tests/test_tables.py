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
        "per_copy_score",
        "train_text",
        "train_label",
        "query_prompt",
        "query_completion",
    ]
    assert df["train"].tolist() == [2, 3, 1, 2]
    assert df["rank"].tolist() == [1, 2, 1, 2]
    assert df["score"].tolist() == [3.0, 1.0, 4.0, 2.0]
    assert df["per_copy_score"].tolist() == [3.0 / 5, 1.0 / 5, 4.0 / 5, 2.0 / 5]
    assert df["train_text"].tolist() == ["two", "three", "one", "two"]
    assert df["train_label"].tolist() == [0, 1, 1, 0]
    assert df["query_prompt"].tolist() == ["p0", "p0", "p1", "p1"]


def test_top_influences_most_harmful_and_plain_lists():
    df = inf.top_influences(SCORES, 1, train_data=TEXTS, largest=False, num_train=10)
    assert df["train"].tolist() == [1, 3]
    assert df["train_text"].tolist() == ["one", "three"]
    assert df["per_copy_score"].tolist() == [-0.2, -0.3]
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
