"""A Pythia-like suite of `LlamaForCausalLM` models of growing size, trained on the corpus.

    suite = load_suite("default", seed=0)   # trains what is missing, loads the rest
    suite.models          # {"xs": model, "s": ..., "m": ..., "l": ...}, small -> large, eval()
    suite.tokenizer       # PreTrainedTokenizerFast (saved with every model)
    suite.corpus          # influence.study.corpus.Corpus
    suite.info            # [{name, params, layers, hidden, tokens_seen, train_seconds, ...}]
    suite.logs            # {name: {"step": [...], "loss": [...], "lr": [...], "tokens": [...]}}

    train_dataset(suite, suite.corpus)             # what the influence library scores
    query_dataset(suite.tokenizer, corpus.queries["facts"])
    fact_accuracy(model, tokenizer, corpus.queries["facts"])   # {language: fraction}

Recipe (identical for every size; only the architecture changes): every model is initialised
from `torch.manual_seed(seed)`, sees the same sequences in the same order (a permutation per
epoch from a generator seeded by `seed` and the epoch; within blocks of 16 batches sequences
are grouped by length to limit padding), for the same number of epochs, with AdamW, linear
warm-up then cosine decay to `min_lr_ratio` × peak, gradient clipping at 1. Each training
sequence is <bos> text <eos>, one sequence per row, never packed. During training a batch is
right-padded to its longest sequence; `train_dataset` pads every row to one fixed length
(`suite.seq_len`, a multiple of 8 ≥ the longest sequence, ≤ the context). Padding has
attention_mask 0 and label −100, and right padding cannot change a causal model's outputs at
real positions, so the fixed-length rows give the same losses as training saw. Training uses
the Hugging Face mean token loss (the influence library uses the summed loss; the two differ
by a constant factor per batch, irrelevant for training).

Each model is saved with `save_pretrained` (plus its tokenizer and `log.json`) under
`artifacts/model/<hash of (size, recipe, corpus sha256, tokenizer, seed)>/`. The same seed and
preset give identical weights on CPU.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from . import cache
from .corpus import Corpus, build_corpus
from .presets import resolve
from .tokenizer import build_tokenizer, encode_query, encode_text

SUITE_VERSION = 1
IGNORE = -100


@dataclass
class Suite:
    models: dict[str, LlamaForCausalLM]
    tokenizer: PreTrainedTokenizerFast
    corpus: Corpus
    info: list[dict]
    logs: dict[str, dict]
    params: dict
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.params["seq_len"]

    def names(self) -> list[str]:
        return list(self.models)


# -- configs --------------------------------------------------------------------------------
def llama_config(size: dict, vocab_size: int, context: int, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        intermediate_size=size["intermediate"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=context,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- data -----------------------------------------------------------------------------------
def _pad(seqs: Sequence[list[int]], length: int, pad_id: int, label_masks=None) -> dict:
    n = len(seqs)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    att = torch.zeros((n, length), dtype=torch.long)
    lab = torch.full((n, length), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence of {len(s)} tokens exceeds length {length}")
        t = torch.tensor(s, dtype=torch.long)
        ids[i, : len(s)] = t
        att[i, : len(s)] = 1
        lab[i, : len(s)] = t
        if label_masks is not None:
            lab[i, : label_masks[i]] = IGNORE
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def _round8(n: int) -> int:
    return int(math.ceil(n / 8) * 8)


def sequence_length(tokenizer, corpus: Corpus) -> int:
    """Smallest multiple of 8 that holds every training sequence and every query."""
    m = max(len(encode_text(tokenizer, t)) for t in corpus.train["text"])
    for q in corpus.queries.values():
        for p, c in zip(q["prompt"], q["completion"], strict=True):
            a, b = encode_query(tokenizer, p, c)
            m = max(m, len(a) + len(b))
    return _round8(m)


def train_dataset(suite_or_tokenizer, corpus: Corpus, length: int | None = None) -> Dataset:
    """Training sequences in corpus row order, torch format, fixed length (`suite.seq_len`),
    columns input_ids, attention_mask, labels (−100 on padding)."""
    tok = getattr(suite_or_tokenizer, "tokenizer", suite_or_tokenizer)
    if length is None:
        length = getattr(suite_or_tokenizer, "params", {}).get("seq_len") or sequence_length(
            tok, corpus
        )
    seqs = [encode_text(tok, t) for t in corpus.train["text"]]
    ds = Dataset.from_dict({k: v.numpy() for k, v in _pad(seqs, length, tok.pad_token_id).items()})
    return ds.with_format("torch")


def query_dataset(tokenizer, rows, length: int | None = None) -> Dataset:
    """Queries as <bos> prompt completion, torch format; labels are −100 on the prompt and on
    padding, so the summed loss is −log p(completion | prompt)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    enc = [encode_query(tok, p, c) for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
    seqs = [a + b for a, b in enc]
    if length is None:
        length = _round8(max(len(s) for s in seqs))
    batch = _pad(seqs, length, tok.pad_token_id, label_masks=[len(a) for a, _ in enc])
    return Dataset.from_dict({k: v.numpy() for k, v in batch.items()}).with_format("torch")


def _batches(lengths: list[int], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    block = batch_size * 16
    batches = []
    for s in range(0, len(perm), block):
        chunk = sorted(perm[s : s + block], key=lambda i: (lengths[i], i))
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


# -- training -------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(total - warmup, 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_model(
    size: dict,
    train: dict,
    tokenizer,
    seqs: list[list[int]],
    context: int,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[LlamaForCausalLM, dict]:
    """Train one model from scratch with the suite recipe; returns (model, log)."""
    threads = torch.get_num_threads()
    if train.get("threads"):
        torch.set_num_threads(train["threads"])
    try:
        return _train_model(size, train, tokenizer, seqs, context, seed, device, progress)
    finally:
        torch.set_num_threads(threads)


def _train_model(size, train, tokenizer, seqs, context, seed, device, progress):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, len(tokenizer), context, tokenizer)).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    peak = size.get("lr", train["lr"])
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": train["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=peak,
        betas=(0.9, 0.98),
    )
    lengths = [len(s) for s in seqs]
    epochs = train["epochs"]
    per_epoch = math.ceil(len(seqs) / train["batch_size"])
    total = epochs * per_epoch
    warmup = max(1, int(train["warmup_frac"] * total))
    log: dict[str, list] = {"step": [], "epoch": [], "loss": [], "lr": [], "tokens": []}
    tokens, step, acc, acc_n = 0, 0, 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"train {size['name']}", disable=not progress, mininterval=10.0)
    for epoch in range(epochs):
        for idx in _batches(lengths, train["batch_size"], epoch, seed):
            batch = _pad(
                [seqs[i] for i in idx], max(lengths[i] for i in idx), tokenizer.pad_token_id
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            lr = lr_at(step, total, peak, warmup, train["min_lr_ratio"])
            for g in opt.param_groups:
                g["lr"] = lr
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tokens += int(batch["attention_mask"].sum())
            acc += float(loss.detach())
            acc_n += 1
            step += 1
            bar.update(1)
            if step % train["log_every"] == 0 or step == total:
                log["step"].append(step)
                log["epoch"].append(step / per_epoch)
                log["loss"].append(acc / acc_n)
                log["lr"].append(lr)
                log["tokens"].append(tokens)
                bar.set_postfix(loss=f"{acc / acc_n:.3f}")
                acc, acc_n = 0.0, 0
    bar.close()
    model.eval()
    log["train_seconds"] = time.perf_counter() - t0
    log["tokens_seen"] = tokens
    log["steps"] = total
    return model, log


def suite_config(preset: str = "default", seed: int = 0, **overrides: Any) -> dict:
    return resolve("suite", preset, **overrides)


def model_key(size: dict, params: dict, corpus: Corpus, seed: int) -> dict:
    return {
        "size": size,
        "train": params["train"],
        "vocab_size": params["vocab_size"],
        "context": params["context"],
        "corpus": corpus.sha256,
        "seed": seed,
        "version": SUITE_VERSION,
    }


def load_suite(
    preset: str = "default",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    corpus_overrides: dict | None = None,
    **overrides: Any,
) -> Suite:
    """Build the corpus and tokenizer, train every model of the preset that is not cached yet,
    load all of them (eval mode, on `device`), small to large."""
    params = suite_config(preset, seed, **overrides)
    corpus = build_corpus(preset, seed, **(corpus_overrides or {}))
    tok = build_tokenizer(corpus, params["vocab_size"])
    seq_len = sequence_length(tok, corpus)
    if seq_len > params["context"]:
        raise ValueError(f"longest sequence ({seq_len} tokens) exceeds the context")
    params = {**params, "seq_len": seq_len}
    seqs = [encode_text(tok, t) for t in corpus.train["text"]]
    models, info, logs, paths = {}, [], {}, {}
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown the notebooks
    for size in params["sizes"]:
        path = cache.entry_dir("model", model_key(size, params, corpus, seed))
        if not cache.verified(path):  # checksums; a broken entry is moved aside and retrained
            model, log = train_model(
                size, params["train"], tok, seqs, params["context"], seed, device, progress
            )
            log["info"] = {
                "name": size["name"],
                "params": count_params(model),
                "layers": size["layers"],
                "hidden": size["hidden"],
                "intermediate": size["intermediate"],
                "heads": size["heads"],
                "tokens_seen": log["tokens_seen"],
                "steps": log["steps"],
                "train_seconds": round(log["train_seconds"], 2),
            }
            with cache.building(path) as tmp:
                model.save_pretrained(str(tmp))
                tok.save_pretrained(str(tmp))
                (tmp / "log.json").write_text(json.dumps(log))
        log = cache.read_json(path / "log.json")
        try:
            model = LlamaForCausalLM.from_pretrained(str(path)).to(device).eval()
        except Exception as err:  # verified files that still do not load: name the entry
            raise RuntimeError(
                f"cannot load the cached model {path} ({err}); delete that folder and run again"
            ) from err
        models[size["name"]] = model
        info.append(log["info"])
        logs[size["name"]] = log
        paths[size["name"]] = path
    return Suite(models, tok, corpus, info, logs, params, paths)


# -- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def completion_scores(model, tokenizer, rows, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Per query: `correct` (greedy decoding reproduces the whole completion) and `logprob`
    (log p(completion | prompt), summed over completion tokens).

    Greedy decoding produces the completion exactly when, at every completion position, the
    argmax given the true prefix is the true token, so one teacher-forced pass decides it.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ds = query_dataset(tok, rows)
    device = next(model.parameters()).device
    correct, logprob = [], []
    for s in range(0, len(ds), batch_size):
        b = ds[s : s + batch_size]
        ids, att, lab = (b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        tgt = lab[:, 1:]
        mask = tgt != IGNORE
        lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        hit = (logits.argmax(-1) == tgt) | ~mask
        correct.append(hit.all(-1).cpu())
        logprob.append((lp * mask).sum(-1).cpu())
    return {"correct": torch.cat(correct).numpy(), "logprob": torch.cat(logprob).numpy()}


def fact_accuracy(model, tokenizer, queries, by: str = "language") -> dict[str, float]:
    """Greedy exact-completion accuracy on `queries`, per value of column `by`."""
    ok = completion_scores(model, tokenizer, queries)["correct"]
    keys = np.asarray(queries[by])
    return {k: float(ok[keys == k].mean()) for k in sorted(set(keys.tolist()))}


def accuracy_table(suite: Suite, sets: Sequence[str] = ("facts", "paraphrase", "cross_lingual")):
    """Long pandas table, one row per model × query set × group × language: accuracy (greedy
    exact completion), mean log-prob of the completion, number of queries. `group` is the
    query's group label ("far"/"near" for paraphrases, "" for facts and cross-lingual)."""
    import pandas as pd

    recs = []
    for inf in suite.info:
        model = suite.models[inf["name"]]
        for qs in sets:
            q = suite.corpus.queries[qs]
            sc = completion_scores(model, suite.tokenizer, q)
            df = pd.DataFrame({"language": q["language"], "group": q["group"], **sc})
            for (group, lang), sub in df.groupby(["group", "language"], sort=True):
                recs.append(
                    {
                        "model": inf["name"],
                        "params": inf["params"],
                        "set": qs,
                        "group": group,
                        "language": lang,
                        "accuracy": float(sub["correct"].mean()),
                        "logprob": float(sub["logprob"].mean()),
                        "n": len(sub),
                    }
                )
    return pd.DataFrame(recs)
