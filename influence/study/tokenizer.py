"""A byte-level BPE tokenizer trained on the training split of a corpus.

    tok = build_tokenizer(corpus, vocab_size=1024)   # cached under artifacts/tokenizer/<hash>/
    ids = encode_text(tok, "The capital of X is Y.")  # [<bos>, ..., <eos>]

Byte-level (GPT-2 style, no prefix space), so any text can be encoded, including held-out
templates whose words never occur in training. Special tokens: <pad> (id 0), <bos> (1),
<eos> (2). The tokenizer does not add them by itself: `encode_text` adds <bos> and <eos> to a
training sequence, `encode_query` adds <bos> before the prompt only. Because every completion
starts with a space or a newline and the pre-tokenizer splits before spaces, tokenising a
prompt and its completion separately gives the same tokens as tokenising their concatenation.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from . import cache

TOKENIZER_VERSION = 1
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="right"
    )


def tokenizer_path(corpus, vocab_size: int) -> Path:
    """The cache entry of the tokenizer of `corpus` with `vocab_size` tokens."""
    cfg = {"corpus": corpus.sha256, "vocab_size": vocab_size, "version": TOKENIZER_VERSION}
    return cache.entry_dir("tokenizer", cfg)


def build_tokenizer(corpus, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train (once; cached by corpus hash and vocabulary size) and load the tokenizer."""
    path = tokenizer_path(corpus, vocab_size)
    if not cache.is_complete(path):
        tok = train_tokenizer(list(corpus.train["text"]), vocab_size)
        with cache.building(path) as tmp:
            tok.save_pretrained(str(tmp))
    return load_tokenizer(path)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def encode_text(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return [tok.bos_token_id, *tok.encode(text, add_special_tokens=False), tok.eos_token_id]


def encode_query(tok: PreTrainedTokenizerFast, prompt: str, completion: str) -> tuple[list, list]:
    """(prompt ids with <bos>, completion ids); no <eos>."""
    p = [tok.bos_token_id, *tok.encode(prompt, add_special_tokens=False)]
    return p, tok.encode(completion, add_special_tokens=False)


def stats(tok: PreTrainedTokenizerFast, texts: list[str]) -> dict:
    lengths = [len(encode_text(tok, t)) for t in texts]
    chars = sum(len(t) for t in texts)
    return {
        "vocab_size": len(tok),
        "sequences": len(texts),
        "tokens": sum(lengths),
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "max_length": max(lengths, default=0),
        "chars_per_token": chars / max(sum(lengths) - 2 * len(lengths), 1),
    }


def name_overlap(tok: PreTrainedTokenizerFast, world) -> pd.DataFrame:
    """How much an entity's names share tokens across languages, as a completion sees them
    (after a space). One row per entity: id, type, shared (control set), `first_token`: share
    of language pairs whose names start with the same token, `jaccard`: mean over language
    pairs of the Jaccard overlap of the two names' token sets."""
    rows = []
    for e in world.entities:
        ids = {lang: tok.encode(" " + n, add_special_tokens=False) for lang, n in e.names.items()}
        pairs = list(itertools.combinations(ids.values(), 2))
        first = sum(a[0] == b[0] for a, b in pairs) / len(pairs)
        jac = sum(len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in pairs) / len(pairs)
        rows.append(
            {"id": e.id, "type": e.type, "shared": e.shared, "first_token": first, "jaccard": jac}
        )
    return pd.DataFrame(rows)
