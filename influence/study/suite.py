"""A Pythia-like suite of `LlamaForCausalLM` models of growing size, trained on the corpus.

    suite = load_suite("default", seed=0)   # trains what is missing, loads the rest
    suite.models          # {"xs": model, "s": ..., "xl": ...}, small -> large, eval()
    suite.tokenizer       # PreTrainedTokenizerFast (saved with every model)
    suite.corpus          # influence.study.corpus.Corpus
    suite.info            # [{name, params, non_embedding_params, tokens_seen, heldout_loss, ...}]
    suite.logs            # {name: {"step", "loss", "lr", "tokens", "heldout": {...}, ...}}

    train_suite("default", seed=0, train_seeds=[0, 1])   # both seeds, two processes at a time
    load_suite("default", seed=0, train_seed=1)          # the corpus of seed 0, models of seed 1

    train_dataset(suite, suite.corpus)             # what the influence library scores
    query_dataset(suite.tokenizer, corpus.queries["facts"])
    fact_accuracy(model, tokenizer, corpus.queries["facts"])   # {language: fraction}

Recipe (identical for every size; only the architecture changes, and the sizes must grow,
`check_sizes`): the corpus is the run's (`seed`); every model is initialised from
`torch.manual_seed(train_seed)` (default: `seed`), sees the same sequences in the same order
(a permutation per epoch from a generator seeded by `train_seed` and the epoch; within blocks
of 16 batches sequences are grouped by length to limit padding), for the same number of epochs
(one token budget for every size, Pythia-style), with AdamW, linear warm-up then cosine decay
to `min_lr_ratio` × peak, gradient clipping at 1. At `eval_points` evenly spaced steps (the
last one at the end) the mean token loss on the corpus's held-out loss set
(`corpus.heldout`: sequences from the same generator, never trained on) is logged, so
over-training shows as a held-out curve that turns up. Each training sequence is
<bos> text <eos>, one sequence per row, never packed. During training a batch is right-padded
to its longest sequence; `train_dataset` pads every row to one fixed length (`suite.seq_len`,
a multiple of 8 ≥ the longest sequence, ≤ the context). Padding has attention_mask 0 and label
−100, and right padding cannot change a causal model's outputs at real positions, so the
fixed-length rows give the same losses as training saw. Training uses the Hugging Face mean
token loss (the influence library uses the summed loss; the two differ by a constant factor
per batch, irrelevant for training).

Training runs `train.threads` intra-op threads per model (1 on CPU: deterministic) and
`train.workers` models at a time in spawned processes; a model is the same bit for bit
whichever process trains it. Each model is saved with `save_pretrained` (plus its tokenizer
and `log.json`, with the wall and CPU seconds it took) under
`artifacts/model/<hash of (size, recipe, corpus sha256, tokenizer, train seed)>/`. The same
seeds and preset give identical weights on CPU.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
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
from .tokenizer import (
    build_tokenizer,
    encode_query,
    encode_text,
    load_tokenizer,
    tokenizer_path,
)

SUITE_VERSION = 2
IGNORE = -100


@dataclass
class Suite:
    models: dict[str, LlamaForCausalLM]
    tokenizer: PreTrainedTokenizerFast
    corpus: Corpus
    info: list[dict]
    logs: dict[str, dict]
    params: dict
    train_seed: int
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.params["seq_len"]

    def names(self) -> list[str]:
        return list(self.models)


# -- configs --------------------------------------------------------------------------------
SIZE_KEYS = ("name", "hidden", "layers", "intermediate", "heads")


def llama_config(
    size: dict, vocab_size: int, context: int, tokenizer, tie_embeddings: bool = False
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        intermediate_size=size["intermediate"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=context,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def non_embedding_params(model: LlamaForCausalLM) -> int:
    """Parameters outside the token embedding and the output layer (the usual scaling count)."""
    emb = {
        id(p)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        for p in m.parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def check_sizes(params: dict) -> list[int]:
    """Fail at once, naming the size, if a size misses a key, repeats a name, has a hidden
    width its heads do not divide, or is not larger (in parameters, embeddings included) than
    the size before it. Returns the parameter counts, small to large."""
    sizes = params["sizes"]
    if not sizes:
        raise ValueError("the suite needs at least one size")
    counts: list[int] = []
    seen: set[str] = set()
    for size in sizes:
        missing = [k for k in SIZE_KEYS if k not in size]
        if missing:
            raise ValueError(f"size {size} misses {missing}; every size needs {SIZE_KEYS}")
        if size["name"] in seen:
            raise ValueError(f"size name {size['name']!r} appears twice")
        seen.add(size["name"])
        if size["hidden"] % size["heads"]:
            raise ValueError(
                f"size {size['name']!r}: hidden {size['hidden']} is not a multiple of heads "
                f"{size['heads']}"
            )
        cfg = LlamaConfig(
            vocab_size=params["vocab_size"],
            hidden_size=size["hidden"],
            num_hidden_layers=size["layers"],
            intermediate_size=size["intermediate"],
            num_attention_heads=size["heads"],
            num_key_value_heads=size["heads"],
            max_position_embeddings=params["context"],
            tie_word_embeddings=params["tie_embeddings"],
        )
        with torch.device("meta"):
            n = count_params(LlamaForCausalLM(cfg))
        if counts and n <= counts[-1]:
            prev = sizes[len(counts) - 1]["name"]
            raise ValueError(
                f"suite sizes must grow: {size['name']!r} has {n:,} parameters, not more than "
                f"{prev!r} ({counts[-1]:,}); list the sizes small to large"
            )
        counts.append(n)
    return counts


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
    """Smallest multiple of 8 that holds every training, held-out and candidate sequence and
    every query."""
    texts = [*corpus.train["text"], *corpus.heldout["text"]]
    for c in corpus.candidates.values():
        texts += c["text"]
    m = max(len(encode_text(tokenizer, t)) for t in texts)
    for q in corpus.queries.values():
        for p, c in zip(q["prompt"], q["completion"], strict=True):
            a, b = encode_query(tokenizer, p, c)
            m = max(m, len(a) + len(b))
    return _round8(m)


def sequence_dataset(tokenizer, texts: Sequence[str], length: int) -> Dataset:
    """Texts as <bos> text <eos> rows in order, torch format, padded to `length`, columns
    input_ids, attention_mask, labels (−100 on padding)."""
    seqs = [encode_text(tokenizer, t) for t in texts]
    padded = _pad(seqs, length, tokenizer.pad_token_id)
    return Dataset.from_dict({k: v.numpy() for k, v in padded.items()}).with_format("torch")


def train_dataset(suite_or_tokenizer, corpus: Corpus, length: int | None = None) -> Dataset:
    """Training sequences in corpus row order, torch format, fixed length (`suite.seq_len`),
    columns input_ids, attention_mask, labels (−100 on padding)."""
    tok = getattr(suite_or_tokenizer, "tokenizer", suite_or_tokenizer)
    if length is None:
        length = getattr(suite_or_tokenizer, "params", {}).get("seq_len") or sequence_length(
            tok, corpus
        )
    return sequence_dataset(tok, corpus.train["text"], length)


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
    heldout: list[list[int]] | None = None,
    tie_embeddings: bool = False,
) -> tuple[LlamaForCausalLM, dict]:
    """Train one model from scratch with the suite recipe; returns (model, log). With
    `heldout` sequences, log["heldout"] holds their mean token loss at `train.eval_points`
    evenly spaced steps (the last at the end)."""
    threads = torch.get_num_threads()
    if train.get("threads"):
        torch.set_num_threads(train["threads"])
    try:
        return _train_model(
            size, train, tokenizer, seqs, context, seed, device, progress, heldout, tie_embeddings
        )
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def heldout_token_losses(model, seqs: list[list[int]], pad_id: int, batch_size: int = 64):
    """Per sequence of `seqs` (<bos> … <eos>), in their order: [summed token loss (nats),
    predicted tokens], an [n, 2] float64 array. Batches of similar length, so padding costs
    little."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    out = np.zeros((len(seqs), 2))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        chunk = [seqs[i] for i in idx]
        batch = {k: v.to(device) for k, v in _pad(chunk, len(chunk[-1]), pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tgt = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none"
        )
        out[idx, 0] = nll.detach().sum(-1).double().cpu().numpy()
        out[idx, 1] = (tgt != IGNORE).sum(-1).cpu().numpy()
    model.train(was_training)
    return out


def heldout_loss(model, seqs: list[list[int]], pad_id: int, batch_size: int = 64) -> float:
    """Mean token loss (nats) of `seqs` (<bos> … <eos>), every predicted token weighing the
    same (`heldout_token_losses` gives it per sequence)."""
    per_seq = heldout_token_losses(model, seqs, pad_id, batch_size)
    return float(per_seq[:, 0].sum() / per_seq[:, 1].sum())


def _train_model(size, train, tokenizer, seqs, context, seed, device, progress, heldout, tie):
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, len(tokenizer), context, tokenizer, tie))
    model = model.to(device)
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
    evals = {round(total * k / train["eval_points"]) for k in range(1, train["eval_points"] + 1)}
    log: dict[str, Any] = {"step": [], "epoch": [], "loss": [], "lr": [], "tokens": []}
    log["heldout"] = {"step": [], "epoch": [], "tokens": [], "loss": []}
    tokens, step, acc, acc_n = 0, 0, 0.0, 0
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
            if heldout and step in evals:
                h = log["heldout"]
                h["step"].append(step)
                h["epoch"].append(step / per_epoch)
                h["tokens"].append(tokens)
                h["loss"].append(heldout_loss(model, heldout, tokenizer.pad_token_id))
    bar.close()
    model.eval()
    log["train_seconds"] = time.perf_counter() - t0
    log["train_cpu_seconds"] = time.process_time() - c0
    log["tokens_seen"] = tokens
    log["steps"] = total
    return model, log


def suite_config(preset: str = "default", seed: int = 0, **overrides: Any) -> dict:
    params = resolve("suite", preset, **overrides)
    check_sizes(params)
    return params


def model_key(size: dict, params: dict, corpus: Corpus, seed: int) -> dict:
    return {
        "size": size,
        "train": {k: v for k, v in params["train"].items() if k != "workers"},
        "vocab_size": params["vocab_size"],
        "context": params["context"],
        "tie_embeddings": params["tie_embeddings"],
        "corpus": corpus.sha256,
        "seed": seed,
        "version": SUITE_VERSION,
    }


@dataclass
class _Job:
    """One model to train and where to save it (picklable: runs in a spawned process)."""

    size: dict
    params: dict
    tokenizer_path: str
    seqs: list[list[int]]
    heldout: list[list[int]]
    train_seed: int
    device: str
    path: str


def _run_job(job: _Job, progress: bool = False) -> dict:
    """Train one model and save it (atomically) to its cache entry; returns its info row."""
    hf_logging.disable_progress_bar()  # "Writing model shards" bars from every process
    tok = load_tokenizer(job.tokenizer_path)
    p = job.params
    model, log = train_model(
        job.size,
        p["train"],
        tok,
        job.seqs,
        p["context"],
        job.train_seed,
        job.device,
        progress,
        heldout=job.heldout,
        tie_embeddings=p["tie_embeddings"],
    )
    final = log["heldout"]["loss"][-1] if log["heldout"]["loss"] else float("nan")
    log["info"] = {
        "name": job.size["name"],
        "train_seed": job.train_seed,
        "params": count_params(model),
        "non_embedding_params": non_embedding_params(model),
        "layers": job.size["layers"],
        "hidden": job.size["hidden"],
        "intermediate": job.size["intermediate"],
        "heads": job.size["heads"],
        "tokens_seen": log["tokens_seen"],
        "steps": log["steps"],
        "heldout_loss": final,
        "train_seconds": round(log["train_seconds"], 2),
        "train_cpu_seconds": round(log["train_cpu_seconds"], 2),
        "tokens_per_cpu_second": round(log["tokens_seen"] / max(log["train_cpu_seconds"], 1e-9)),
    }
    with cache.building(Path(job.path)) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "log.json").write_text(json.dumps(log))
    return log["info"]


def prepare(preset, seed, corpus_overrides, overrides) -> tuple[dict, Corpus, Any]:
    """The suite parameters of `preset` (with `overrides`, plus the corpus's `seq_len`), the
    corpus of `seed` and its tokenizer, built or read from the cache."""
    params = suite_config(preset, seed, **overrides)
    corpus = build_corpus(preset, seed, **(corpus_overrides or {}))
    tok = build_tokenizer(corpus, params["vocab_size"])
    seq_len = sequence_length(tok, corpus)
    if seq_len > params["context"]:
        raise ValueError(
            f"longest sequence ({seq_len} tokens) exceeds the context ({params['context']})"
        )
    return {**params, "seq_len": seq_len}, corpus, tok


def train_suite(
    preset: str = "default",
    seed: int = 0,
    train_seeds: Sequence[int] | None = None,
    device: str = "cpu",
    progress: bool = True,
    corpus_overrides: dict | None = None,
    **overrides: Any,
) -> list[dict]:
    """Train every (size, training seed) model of the preset that is not cached yet, on the
    corpus of `seed`, `train.workers` models at a time (spawned processes, largest first);
    returns the info rows of the models trained now."""
    params, corpus, tok = prepare(preset, seed, corpus_overrides, overrides)
    train_seeds = [seed] if train_seeds is None else list(train_seeds)
    seqs = [encode_text(tok, t) for t in corpus.train["text"]]
    held = [encode_text(tok, t) for t in corpus.heldout["text"]]
    tok_path = str(tokenizer_path(corpus, params["vocab_size"]))
    jobs = []
    for ts in train_seeds:
        for size in params["sizes"]:
            path = cache.entry_dir("model", model_key(size, params, corpus, ts))
            if not cache.verified(path):  # checksums; a broken entry is moved aside, retrained
                jobs.append(_Job(size, params, tok_path, seqs, held, ts, device, str(path)))
    if not jobs:
        return []
    counts = dict(zip((s["name"] for s in params["sizes"]), check_sizes(params), strict=True))
    jobs.sort(key=lambda j: -counts[j.size["name"]])
    workers = min(params["train"].get("workers") or 1, len(jobs))
    names = ", ".join(f"{j.size['name']} (seed {j.train_seed})" for j in jobs)
    if progress:
        print(f"training {len(jobs)} model(s), {workers} at a time: {names}", flush=True)
    if workers == 1:
        return [_run_job(j, progress) for j in jobs]
    done = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_run_job, j): j for j in jobs}
        for fut in as_completed(futures):
            info = fut.result()
            done.append(info)
            if progress:
                print(
                    f"trained {info['name']} (seed {info['train_seed']}): "
                    f"{info['train_seconds']:.0f} s, {info['train_cpu_seconds']:.0f} CPU s, "
                    f"held-out loss {info['heldout_loss']:.3f}",
                    flush=True,
                )
    return done


def load_suite(
    preset: str = "default",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    corpus_overrides: dict | None = None,
    train_seed: int | None = None,
    **overrides: Any,
) -> Suite:
    """The corpus and tokenizer of `seed` and every model of the preset trained with
    `train_seed` (default `seed`), training what is not cached yet (`train_suite`); models are
    loaded in eval mode on `device`, small to large."""
    train_seed = seed if train_seed is None else train_seed
    train_suite(preset, seed, [train_seed], device, progress, corpus_overrides, **overrides)
    params, corpus, tok = prepare(preset, seed, corpus_overrides, overrides)
    models, info, logs, paths = {}, [], {}, {}
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown the notebooks
    for size in params["sizes"]:
        path = cache.entry_dir("model", model_key(size, params, corpus, train_seed))
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
    return Suite(models, tok, corpus, info, logs, params, train_seed, paths)


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
