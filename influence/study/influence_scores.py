"""The study's influence scores: every query set against every training sequence, per model.

    scores = study_scores(suite, "default")            # fits / loads every model of the suite
    scores.scores("l", "facts")                        # tensor [Q, N], −log p(completion|prompt)
    scores.by_layer("l", "facts")                      # {layer: [Q, N]}, summing to the total
    scores.per_copy("l", "facts")                      # score / N: nats per added copy
    scores.queries("facts")                            # the (sampled) query rows, pandas
    scores.top_k("l", "facts", k=10)                   # top-k training sequences per query
    est = scores.estimator("l")                        # the fitted EK-FAC of model "l"
    scores.self_influence("l")                         # [N] self-influence (cached)
    scores.self_influences(workers=2)                  # every model's, two processes
    scores.candidate_scores("l", "word_order")         # [Q, C] against hypothetical sequences

For each model of the suite (at the stage's `sizes`): EK-FAC fitted on the whole training
corpus with labels sampled from the model (MLP layers tracked, damping 0.1 × mean eigenvalue per
layer: the paper's choices), then pairwise scores of every query set against every training
sequence, total and per tracked layer. Candidate sets (`corpus.candidates`, e.g. the word-order
groups, never trained on) are scored against their query set (`CANDIDATE_QUERIES`) the same
way, with the EK-FAC fitted on the real training set, as if each were one more training
sequence; their per-copy value divides by the real training-set size N too. The query
measurement is −log p(completion | prompt)
(`docs/MATH.md`), so a positive score means the sequence helps the model produce the
completion; score / N is the predicted change in log p(completion) in nats when one copy of the
sequence is added to the N training sequences (the "per copy" value compared with the paper).

Cached per model under `artifacts/influence_scores/<hash>/`, keyed by the model (its own cache
key), the corpus sha256, the estimator settings and the selected queries; written atomically
(`cache.building`). `manifest.json` records every file's size and sha256; an entry whose files
are missing or do not match is deleted and rebuilt, never used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import influence as inf
from influence.io import load_scores, save_scores

from . import cache
from .corpus import CANDIDATE_QUERIES, QUERY_SETS
from .presets import resolve
from .suite import Suite, query_dataset, sequence_dataset, train_dataset

SCORES_VERSION = 2
SECTION = "influence_scores"
LABEL_COLUMNS = (
    "kind",
    "fact_id",
    "relation",
    "template_id",
    "language",
    "group",
    "order",
    "category",
    "topic",
    "subject",
    "object",
    "names",
)
_FILES = ("scores.safetensors", "ekfac.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_names(kind: str, names: Sequence[str], valid: Sequence[str]) -> None:
    """Fail at once, listing the valid names, if any of `names` is not one of `valid`."""
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown {kind} {unknown}; valid {kind}s: {', '.join(valid)}")


def select_queries(suite: Suite, cfg: dict) -> dict[str, list[int]]:
    """Row indices of the queries scored per set: all of them, or `max_queries[set]` drawn
    without replacement with a fixed seed (sorted, so the order follows the corpus)."""
    out = {}
    for i, name in enumerate(cfg["query_sets"]):
        n = len(suite.corpus.queries[name])
        cap = (cfg.get("max_queries") or {}).get(name)
        if cap is None or cap >= n:
            out[name] = list(range(n))
        else:
            rng = np.random.default_rng([cfg["sample_seed"], i])
            out[name] = sorted(int(j) for j in rng.choice(n, size=cap, replace=False))
    return out


def stage_config(suite: Suite, preset: str, **overrides: Any) -> dict:
    """The stage's parameters at `preset`, checked against the suite and the corpus."""
    cfg = resolve(SECTION, preset, **overrides)
    valid_sizes = suite.names()
    cfg["sizes"] = list(cfg["sizes"] or valid_sizes)
    check_names("model size", cfg["sizes"], valid_sizes)
    cfg["query_sets"] = list(cfg["query_sets"] or QUERY_SETS)
    check_names("query set", cfg["query_sets"], QUERY_SETS)
    check_names("query set", list(cfg.get("max_queries") or {}), QUERY_SETS)
    if cfg["dtype"] not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {cfg['dtype']!r}")
    return cfg


def candidate_sets(selected: dict[str, list[int]]) -> list[str]:
    """The candidate sets scored: those whose query set is among the selected ones."""
    return [c for c, qs in CANDIDATE_QUERIES.items() if qs in selected]


def entry_key(suite: Suite, name: str, cfg: dict, selected: dict[str, list[int]]) -> dict:
    return {
        "model": suite.paths[name].name if name in suite.paths else name,
        "corpus": suite.corpus.sha256,
        "seq_len": suite.seq_len,
        "estimator": {
            "name": "EKFAC",
            "modules": cfg["modules"],
            "damping": cfg["damping"],
            "fit_seed": cfg["fit_seed"],
            "dtype": cfg["dtype"],
        },
        "queries": selected,
        "candidates": candidate_sets(selected),
        "version": SCORES_VERSION,
    }


def _valid(path: Path) -> bool:
    """A complete entry whose every file matches the size and sha256 in its manifest."""
    if not cache.is_complete(path) or not (path / "manifest.json").is_file():
        return False
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        for fname, rec in manifest["files"].items():
            f = path / fname
            if not f.is_file() or f.stat().st_size != rec["size"] or _sha256(f) != rec["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _build(suite, name, cfg, selected, entry, progress) -> None:
    dtype = getattr(torch, cfg["dtype"])
    model = suite.models[name].to(dtype).eval()
    task = inf.LanguageModelingTask(modules=cfg["modules"])
    train = train_dataset(suite, suite.corpus)
    rows: dict[str, list] = {"prompt": [], "completion": []}
    offsets = {}
    for qs, idx in selected.items():
        q = suite.corpus.queries[qs].select(idx)
        offsets[qs] = [len(rows["prompt"]), len(rows["prompt"]) + len(idx)]
        rows["prompt"] += q["prompt"]
        rows["completion"] += q["completion"]
    # One query dataset for every set: one pass over the training data per model.
    queries = query_dataset(suite.tokenizer, rows)
    t0, c0 = time.perf_counter(), time.process_time()
    est = inf.EKFAC(damping=cfg["damping"]).fit(
        model, task, train, batch_size=cfg["batch_size"], progress=progress, seed=cfg["fit_seed"]
    )
    fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    layers = inf.pairwise_scores(
        model,
        task,
        est,
        queries,
        train,
        by_layer=True,
        batch_size=cfg["batch_size"],
        progress=progress,
    )
    score_s, score_cpu = time.perf_counter() - t0, time.process_time() - c0
    total = sum(layers.values())  # block-diagonal: the total is the sum over layers
    tensors = {}
    for qs, (a, b) in offsets.items():
        tensors[f"{qs}/total"] = total[a:b].contiguous()
        for layer, s in layers.items():
            tensors[f"{qs}/layer/{layer}"] = s[a:b].contiguous()
    t0, c0 = time.perf_counter(), time.process_time()
    for c in candidate_sets(selected):
        a, b = offsets[CANDIDATE_QUERIES[c]]
        texts = suite.corpus.candidates[c]["text"]
        by_layer = inf.pairwise_scores(
            model,
            task,
            est,
            queries.select(range(a, b)),
            sequence_dataset(suite.tokenizer, texts, suite.seq_len),
            by_layer=True,
            batch_size=cfg["batch_size"],
            progress=progress,
        )
        tensors[f"candidates/{c}/total"] = sum(by_layer.values()).contiguous()
        for layer, s in by_layer.items():
            tensors[f"candidates/{c}/layer/{layer}"] = s.contiguous()
    cand_s, cand_cpu = time.perf_counter() - t0, time.process_time() - c0
    suite.models[name].float()  # leave the suite's model as the suite made it
    with cache.building(entry) as tmp:
        save_scores(tmp / "scores.safetensors", tensors, model=name)
        est.save(tmp / "ekfac.safetensors")
        manifest = {
            "key": entry_key(suite, name, cfg, selected),
            "model": name,
            "n_train": len(train),
            "layers": list(layers),
            "fit_seconds": fit_s,
            "score_seconds": score_s,
            # CPU seconds of this process (all threads): on a shared machine the wall times
            # above include waiting for the cores; these do not.
            "fit_cpu_seconds": fit_cpu,
            "score_cpu_seconds": score_cpu,
            "candidate_seconds": cand_s,
            "candidate_cpu_seconds": cand_cpu,
            "files": {
                f: {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in _FILES
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


@dataclass
class StudyScores:
    """Scores of the stage's query sets against every training sequence, for each model."""

    suite: Suite
    config: dict
    selected: dict[str, list[int]]
    n_train: int
    layers: dict[str, list[str]]
    paths: dict[str, Path]
    timings: pd.DataFrame
    _tensors: dict[str, dict[str, torch.Tensor]] = field(repr=False)

    @property
    def models(self) -> list[str]:
        return list(self.config["sizes"])

    @property
    def query_sets(self) -> list[str]:
        return list(self.config["query_sets"])

    def _check(self, model: str, query_set: str) -> None:
        check_names("model size", [model], self.models)
        check_names("query set", [query_set], self.query_sets)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per query set: queries scored and queries in the corpus."""
        return {
            qs: {"scored": len(idx), "available": len(self.suite.corpus.queries[qs])}
            for qs, idx in self.selected.items()
        }

    def scores(self, model: str, query_set: str, layers: Sequence[str] | None = None):
        """[Q, N] total scores, or the sum over `layers` only (names from `self.layers`)."""
        self._check(model, query_set)
        t = self._tensors[model]
        if layers is None:
            return t[f"{query_set}/total"]
        check_names("layer", list(layers), self.layers[model])
        return sum(t[f"{query_set}/layer/{n}"] for n in layers)

    def by_layer(self, model: str, query_set: str) -> dict[str, torch.Tensor]:
        """{layer: [Q, N]} in model order; the values sum to `scores(model, query_set)`."""
        self._check(model, query_set)
        t = self._tensors[model]
        return {n: t[f"{query_set}/layer/{n}"] for n in self.layers[model]}

    def per_copy(self, model: str, query_set: str, layers: Sequence[str] | None = None):
        """score / N: predicted change of log p(completion) in nats per added copy."""
        return self.scores(model, query_set, layers) / self.n_train

    def queries(self, query_set: str) -> pd.DataFrame:
        """The scored query rows (index `query` = row of the score tensors, `row` = corpus row)."""
        check_names("query set", [query_set], self.query_sets)
        df = self.suite.corpus.queries[query_set].select(self.selected[query_set]).to_pandas()
        df.insert(0, "row", self.selected[query_set])
        df.index.name = "query"
        return df

    @property
    def candidate_sets(self) -> list[str]:
        return candidate_sets(self.selected)

    def candidate_scores(self, model: str, name: str, layers: Sequence[str] | None = None):
        """[Q, C] total scores of the candidate set `name` (rows: the scored queries of its
        query set, `CANDIDATE_QUERIES[name]`; columns: `candidate_frame(name)` rows), or the
        sum over `layers` only."""
        check_names("model size", [model], self.models)
        check_names("candidate set", [name], self.candidate_sets)
        t = self._tensors[model]
        if layers is None:
            return t[f"candidates/{name}/total"]
        check_names("layer", list(layers), self.layers[model])
        return sum(t[f"candidates/{name}/layer/{n}"] for n in layers)

    def candidate_per_copy(self, model: str, name: str, layers: Sequence[str] | None = None):
        """Candidate scores / N, N the real training-set size: the predicted change of
        log p(completion) in nats if one copy of the candidate were added to training."""
        return self.candidate_scores(model, name, layers) / self.n_train

    def candidate_frame(self, name: str) -> pd.DataFrame:
        """The candidate sequences of set `name`: id (= column of the scores), text, labels."""
        check_names("candidate set", [name], self.candidate_sets)
        cols = ["id", "text", *LABEL_COLUMNS]
        return self.suite.corpus.candidates[name].select_columns(cols).to_pandas()

    def train_frame(self) -> pd.DataFrame:
        cols = ["id", "text", *LABEL_COLUMNS]
        return self.suite.corpus.train.select_columns(cols).to_pandas()

    def top_k(
        self, model: str, query_set: str, k: int = 10, layers: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """The k most positively influential training sequences per query (torch.topk order),
        one row each: query, rank (1 = largest), train_id, score, per_copy, related (the
        sequence expresses the query's fact/topic/operation/function/saying), the sequence's
        text and every label column of the corpus, and the query's prompt and completion."""
        s = self.scores(model, query_set, layers)
        if not 1 <= k <= s.shape[1]:
            raise ValueError(f"k must be between 1 and {s.shape[1]}, got {k}")
        val, idx = torch.topk(s, k, dim=1)
        q = self.queries(query_set)
        train = self.train_frame()
        ids = idx.numpy().reshape(-1)
        out = train.iloc[ids].reset_index(drop=True).rename(columns={"id": "train_id"})
        qi = np.repeat(np.arange(s.shape[0]), k)
        related = [set(r) for r in q["related_ids"]]
        out.insert(0, "model", model)
        out.insert(1, "query_set", query_set)
        out.insert(2, "query", qi)
        out.insert(3, "rank", np.tile(np.arange(1, k + 1), s.shape[0]))
        out.insert(5, "score", val.numpy().reshape(-1).astype(np.float64))
        out.insert(6, "per_copy", out["score"] / self.n_train)
        out.insert(7, "related", [int(t) in related[i] for i, t in zip(qi, ids, strict=True)])
        out["query_prompt"] = q["prompt"].to_numpy()[qi]
        out["query_completion"] = q["completion"].to_numpy()[qi]
        return out

    # -- the fitted estimator of each model (read from the stage, never refitted) -----------
    @property
    def task(self) -> inf.LanguageModelingTask:
        """The task the stage fitted and scored with (its tracked modules)."""
        return inf.LanguageModelingTask(modules=self.config["modules"])

    def model(self, model: str) -> torch.nn.Module:
        """The suite's model `model` in the stage's dtype, in eval mode (a copy when the dtype
        differs from the suite's, so the suite's model is never changed)."""
        check_names("model size", [model], self.models)
        net = self.suite.models[model]
        dtype = getattr(torch, self.config["dtype"])
        if next(net.parameters()).dtype != dtype:
            net = copy.deepcopy(net).to(dtype)
        return net.eval()

    def estimator(self, model: str) -> inf.EKFAC:
        """The EK-FAC this stage fitted for `model`, loaded from its cache entry for
        `self.model(model)` (same task, damping and dtype): use the three together."""
        check_names("model size", [model], self.models)
        return inf.EKFAC.load(self.paths[model] / "ekfac.safetensors", self.model(model), self.task)

    def self_influence(self, model: str, *, progress: bool = False) -> torch.Tensor:
        """[N] self-influence ∇L(z)ᵀ(G + λI)⁻¹∇L(z) of every training sequence under `model`'s
        fitted EK-FAC (`influence.self_scores`), cached next to the stage's entry."""
        return self.self_influences([model], progress=progress)[model]

    def self_influences(
        self,
        models: Sequence[str] | None = None,
        *,
        workers: int | None = None,
        progress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """`self_influence` of each of `models` (default: all), the missing ones computed
        `workers` at a time (default: the stage's `workers`) in spawned processes, largest
        first; the values are the same as one at a time (a test)."""
        models = list(dict.fromkeys(self.models if models is None else models))
        check_names("model size", models, self.models)
        workers = (self.config.get("workers") or 1) if workers is None else workers
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        entries = {
            m: cache.entry_dir(
                "self_influence",
                {"scores_entry": self.paths[m].name, "kind": "self_influence", "version": 1},
            )
            for m in models
        }
        todo = [m for m in models if not cache.verified(entries[m])]
        jobs = [
            _SelfJob(
                suite=replace(self.suite, models={m: self.suite.models[m]}),
                name=m,
                cfg=self.config,
                entry=str(entries[m]),
                threads=torch.get_num_threads(),
                progress=progress and (workers == 1 or len(todo) == 1),
                scores_entry=str(self.paths[m]),
            )
            for m in sorted(todo, key=lambda m: -_n_params(self.suite.models[m]))
        ]
        _run_jobs(_run_self, jobs, workers, progress, "self-influence")
        out = {}
        for m in models:
            data, _ = load_scores(entries[m] / "self_influence.safetensors")
            out[m] = data["self"].clone()
        return out


def _n_params(net: torch.nn.Module) -> int:
    """Parameter count: the jobs run largest first, so no worker is left with one at the end."""
    return sum(p.numel() for p in net.parameters())


@dataclass(kw_only=True)
class _Job:
    """One model's work, to run in this process or a spawned one (picklable; with the parent's
    torch thread count, so its results are the same bit for bit)."""

    suite: Suite  # holding only the model
    name: str
    cfg: dict
    entry: str  # the cache entry it writes
    threads: int
    progress: bool = False


@dataclass(kw_only=True)
class _SelfJob(_Job):
    """One model's self-influence, from its stage entry's EK-FAC."""

    scores_entry: str


def _run_self(job: _SelfJob) -> float:
    """Compute and cache one model's self-influence; returns its wall seconds."""
    torch.set_num_threads(job.threads)
    t0 = time.perf_counter()
    dtype = getattr(torch, job.cfg["dtype"])
    net = job.suite.models[job.name]
    if next(net.parameters()).dtype != dtype:  # a copy: the caller's model stays as it was
        net = copy.deepcopy(net).to(dtype)
    net.eval()
    task = inf.LanguageModelingTask(modules=job.cfg["modules"])
    est = inf.EKFAC.load(Path(job.scores_entry) / "ekfac.safetensors", net, task)
    train = train_dataset(job.suite, job.suite.corpus)
    values = inf.self_scores(
        net, task, est, train, batch_size=job.cfg["batch_size"], progress=job.progress
    )
    with cache.building(Path(job.entry)) as tmp:
        save_scores(tmp / "self_influence.safetensors", {"self": values}, model=job.name)
    return time.perf_counter() - t0


@dataclass(kw_only=True)
class _BuildJob(_Job):
    """One model to fit and score on the selected queries."""

    selected: dict[str, list[int]]


def _run_build(job: _BuildJob) -> float:
    """Build one entry (in a worker process, or in this one); returns its wall seconds."""
    torch.set_num_threads(job.threads)
    t0 = time.perf_counter()
    _build(job.suite, job.name, job.cfg, job.selected, Path(job.entry), job.progress)
    return time.perf_counter() - t0


def _run_jobs(fn, jobs: list, workers: int, progress: bool, what: str) -> dict[str, float]:
    """`fn(job)` for every job, in this process when `workers` ≤ 1 or there is one job, else
    in `workers` spawned processes (fork would copy the parent's thread pools), in the jobs'
    order; returns each job's wall seconds by its model name."""
    walls: dict[str, float] = {}
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            walls[job.name] = fn(job)
        return walls
    workers = min(workers, len(jobs))
    if progress:
        names = ", ".join(j.name for j in jobs)
        print(f"{what}: {len(jobs)} model(s), {workers} at a time: {names}")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, j): j.name for j in jobs}
        for fut in as_completed(futures):
            walls[futures[fut]] = fut.result()
            if progress:
                print(f"{what} {futures[fut]}: {walls[futures[fut]]:.0f} s", flush=True)
    return walls


def _build_all(suite, todo: dict[str, Path], cfg, selected, progress) -> dict[str, float]:
    """Build the missing entries, `cfg["workers"]` models at a time (spawned processes,
    largest first, as the suite's training does); returns each model's build wall seconds."""
    workers = cfg.get("workers") or 1
    jobs = [
        _BuildJob(
            suite=replace(suite, models={name: suite.models[name]}),
            name=name,
            cfg=cfg,
            entry=str(entry),
            threads=torch.get_num_threads(),
            progress=progress and (workers == 1 or len(todo) == 1),
            selected=selected,
        )
        for name, entry in sorted(todo.items(), key=lambda kv: -_n_params(suite.models[kv[0]]))
    ]
    return _run_jobs(_run_build, jobs, workers, progress, "fitting and scoring")


def study_scores(
    suite: Suite, preset: str = "default", *, progress: bool = True, **overrides: Any
) -> StudyScores:
    """Fit (or load) EK-FAC and the scores of every query set for every model of the stage.

    Overrides: single values of the preset section `influence_scores` (e.g. `sizes=["l"]`,
    `query_sets=["facts"]`, `workers=1`). Unknown sizes, query sets or parameters fail at
    once. With `workers` > 1 the missing models are fitted and scored in that many spawned
    processes; the scores are the same as with one (a test)."""
    cfg = stage_config(suite, preset, **overrides)
    selected = select_queries(suite, cfg)
    entries = {
        name: cache.entry_dir("influence_scores", entry_key(suite, name, cfg, selected))
        for name in cfg["sizes"]
    }
    todo = {}
    for name, entry in entries.items():
        if not _valid(entry):
            if entry.exists():  # truncated, missing or altered files: never use them
                shutil.rmtree(entry)
            todo[name] = entry
    built = _build_all(suite, todo, cfg, selected, progress)
    tensors, layers, paths, rec = {}, {}, {}, []
    for name, entry in entries.items():
        cached = name not in todo
        t0 = time.perf_counter()
        manifest = json.loads((entry / "manifest.json").read_text())
        data, _ = load_scores(entry / "scores.safetensors")
        # Copies: safetensors may map the file, and a later rebuild must not change them.
        tensors[name] = {k: v.clone() for k, v in data.items()}
        layers[name] = manifest["layers"]
        paths[name] = entry
        rec.append(
            {
                "model": name,
                "cached": cached,
                "fit_s": manifest["fit_seconds"],
                "score_s": manifest["score_seconds"],
                "fit_cpu_s": manifest.get("fit_cpu_seconds", float("nan")),
                "score_cpu_s": manifest.get("score_cpu_seconds", float("nan")),
                "candidate_s": manifest.get("candidate_seconds", float("nan")),
                "candidate_cpu_s": manifest.get("candidate_cpu_seconds", float("nan")),
                "wall_s": built.get(name, 0.0) + time.perf_counter() - t0,  # build + load
            }
        )
    return StudyScores(
        suite=suite,
        config=cfg,
        selected=selected,
        n_train=len(suite.corpus.train),
        layers=layers,
        paths=paths,
        timings=pd.DataFrame(rec).set_index("model"),
        _tensors=tensors,
    )
