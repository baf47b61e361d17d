"""The memory plan against measured peaks, its largest batch for a budget, and its errors.

Each model is fitted (EK-FAC) and scored in a fresh process whose peak resident memory is
taken per stage (`influence.memory.StagePeaks`: the kernel's high-water mark, reset at each
pass), minus the RSS before the model was built; glibc's mmap threshold is fixed so that
freed tensors leave the RSS. The stored factors are the RSS right after the fit. Stages
are checked when they measure at least FLOOR (below it the interpreter's own allocations are
a large share); the sizes are chosen so that the main stages measure 100-600 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import influence as inf

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
FLOOR = 48 * MIB
TOLERANCE = 0.25

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    torch.set_num_threads(1)
    import influence as inf
    from influence.memory import StagePeaks

    def rss(key="VmRSS"):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    family = sys.argv[1]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    example = None
    if family == "mlp":
        n, q, bs, rank = 96, 8, 32, None
        x = torch.randn(n + q, 512, generator=g)
        y = torch.randint(0, 10, (n + q,), generator=g)
        train, queries = (x[:n], y[:n]), (x[n:], y[n:])
        task, example, seq = inf.ClassificationTask(), (x[:1], y[:1]), None
    else:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
        n, q, bs, rank, seq, vocab = 48, 8, 16, 8, 64, 8192
        ids = torch.randint(0, vocab, (n + q, seq), generator=g)
        train = {"input_ids": ids[:n], "labels": ids[:n].clone()}
        labels = ids[n:].clone()
        labels[:, : seq // 2] = -100
        queries = {"input_ids": ids[n:], "labels": labels}
        task = inf.LanguageModelingTask()
    # The plan's first probe imports torch's dispatch machinery (~80 MiB of modules): done
    # once before the baseline, so that the baseline holds the interpreter and libraries.
    inf.memory_plan(nn.Linear(4, 2), inf.RegressionTask(), num_train=1, num_queries=1,
                    example=(torch.zeros(1, 4), torch.zeros(1, 2)))
    base = rss()
    if family == "mlp":
        model = nn.Sequential(
            nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
        )
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            n_embd=512, n_layer=2, n_head=8, vocab_size=vocab, n_positions=seq))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
            max_position_embeddings=seq, tie_word_embeddings=False))
    model.eval()
    plan = inf.memory_plan(model, task, num_train=n, num_queries=q, seq_len=seq, rank=rank,
                           batch_size=bs, example=example)
    with StagePeaks() as peaks:
        est = inf.EKFAC().fit(model, task, train, batch_size=bs, progress=False)
        stored = rss() - base
        inf.pairwise_scores(model, task, est, queries, train, rank=rank, batch_size=bs,
                            progress=False)
    measured = {k: v - base for k, v in peaks.peaks.items()}
    measured["stored factors"] = stored
    print(json.dumps({"measured": measured,
                      "planned": {s.name: s.bytes for s in plan.stages}}))
    """
)


def _run(family: str) -> subprocess.Popen:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, family],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def measurements() -> dict[str, dict]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS per stage needs Linux /proc")
    procs = {f: _run(f) for f in ("llama", "gpt2", "mlp")}  # in parallel: about 2 cores' worth
    out = {}
    for family, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        out[family] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "mlp"])
def test_plan_within_25_percent_of_measured_peaks(measurements, family):
    m, p = measurements[family]["measured"], measurements[family]["planned"]
    checked, report = [], []
    for stage, planned in p.items():
        meas = m.get(stage, 0)
        report.append(f"{stage}: planned {planned / MIB:.0f} MiB, measured {meas / MIB:.0f} MiB")
        if meas >= FLOOR:
            checked.append((stage, planned, meas))
    msg = f"{family}: " + "; ".join(report)
    print(msg)
    names = {c[0] for c in checked}
    # The passes over data are always large enough to check.
    assert {"fit: covariances", "fit: eigenvalues", "queries", "scores"} <= names, msg
    for stage, planned, meas in checked:
        assert abs(planned - meas) <= TOLERANCE * meas, f"{stage} off by more than 25%. {msg}"


# -- budget and errors (in-process, tiny models) -------------------------------------------


def _tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=256)).eval()


def test_largest_batch_for_budget_fits_and_one_more_does_not():
    model, task = _tiny_lm(), inf.LanguageModelingTask()
    kw = dict(num_train=512, num_queries=16, seq_len=32, rank=8)
    full = inf.memory_plan(model, task, batch_size=64, **kw)
    budget = int(full.peak * 0.8)
    plan = inf.memory_plan(model, task, batch_size=64, budget=budget, **kw)
    b = plan.max_batch_size
    assert 1 <= b < 64
    assert inf.memory_plan(model, task, batch_size=b, **kw).peak <= budget
    assert inf.memory_plan(model, task, batch_size=b + 1, **kw).peak > budget
    assert f"largest batch size that fits: {b}" in plan.table()


def test_plan_scales_with_data_queries_and_ranks():
    model, task = _tiny_lm(), inf.LanguageModelingTask()
    kw = dict(num_queries=16, seq_len=32, batch_size=8)
    one = inf.memory_plan(model, task, num_train=4096, **kw)
    more_q = inf.memory_plan(model, task, num_train=4096, **{**kw, "num_queries": 64})
    two = inf.memory_plan(model, task, num_train=4096, world_size=2, **kw)
    assert (
        more_q.stage("queries").parts["stored queries"]
        == 4 * (one.stage("queries").parts["stored queries"])
    )
    # Factors are replicated on every rank; a rank holds its share of the data only.
    assert two.stage("stored factors").bytes == one.stage("stored factors").bytes
    assert two.stage("scores").bytes <= one.stage("scores").bytes
    low = inf.memory_plan(model, task, num_train=4096, rank=4, **kw)
    assert (
        low.stage("queries").parts["stored queries"] < one.stage("queries").parts["stored queries"]
    )


def test_meta_device_model_is_planned_without_allocating():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    task = inf.LanguageModelingTask()
    plan = inf.memory_plan(
        model, task, num_train=1000, num_queries=8, seq_len=256, rank=16, dtype=torch.bfloat16
    )
    infos = inf.layers.layer_infos(task.tracked_modules(model))
    cov = sum(8 * (i.in_dim**2 + i.out_features**2) for i in infos.values())
    assert plan.stage("fit: eigendecompositions").parts["covariances/eigenvectors"] == cov
    params = sum(p.numel() for p in model.parameters())
    assert 0 <= plan.stage("stored factors").parts["model"] - 2 * params < MIB  # + buffers
    assert plan.stage("scores").parts["batch"] > 0
    assert "bfloat16" in str(plan)


def test_errors_name_what_to_change():
    model, task = _tiny_lm(), inf.LanguageModelingTask()
    kw = dict(num_train=64, num_queries=4, seq_len=16)
    with pytest.raises(ValueError, match=r"unknown estimator 'lissa'.*\['ekfac', 'kfac'\]"):
        inf.memory_plan(model, task, estimator="lissa", **kw)
    for name in ("num_train", "num_queries", "seq_len"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            inf.memory_plan(model, task, **{**kw, name: 0})
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        inf.memory_plan(model, task, batch_size=-1, **kw)
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        inf.memory_plan(model, task, world_size=0, **kw)
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        inf.memory_plan(model, task, dtype=torch.int8, **kw)
    with pytest.raises(ValueError, match=r"even batch size 1 needs .*Lower `rank`.*more ranks"):
        inf.memory_plan(model, task, budget=1024, **kw)
    mlp = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="needs `example=`"):
        inf.memory_plan(mlp, inf.ClassificationTask(), **kw)


@pytest.mark.parametrize("rank", [None, 1])
def test_a_training_batch_is_captured_with_at_most_the_planned_terms_held(monkeypatch, rank):
    """While scoring, each forward runs with only the earlier batches of an unfinished group
    held: a group is scored as soon as another batch would not fit, and a finished batch's
    terms are let go (the plan's "held terms"). Weak references to every batch's terms are
    counted at each forward; holding one batch more (scoring a full group only after the next
    capture, or a loop variable keeping the last batch) fails this. At rank 1 layers take the
    token path, whose terms must not outlive their batch."""
    import weakref

    from brute_force import fitted, lm_data, tiny_llama

    import influence.scores as scores_module

    model, task = tiny_llama(), inf.LanguageModelingTask()
    data, queries = lm_data(20, min_len=3), lm_data(4, seed=7, prompt=2)
    est = fitted(inf.EKFAC, model, task, data)
    monkeypatch.setattr(scores_module, "_GROUP_ROWS", 7)  # batches of 3: groups of 6 rows
    refs: list[tuple[str, int, weakref.ref]] = []
    held: list[dict[str, int]] = []  # at each forward, the rows of each layer's terms alive
    grouped: list[str] = []
    original = scores_module.iter_layer_terms

    class Group(scores_module._TermGroup):
        def __init__(self, names, *args, **kwargs):
            grouped.extend(names)
            super().__init__(names, *args, **kwargs)

    def tracked(*args, **kwargs):
        it = original(*args, **kwargs)
        while (item := next(it, None)) is not None:
            if kwargs.get("desc") == "scores":
                rows = len(item.indices)
                refs.extend((n, rows, weakref.ref(g)) for n, (_, g) in item.terms.items())
            yield item
            del item  # the wrapper itself must not hold a batch through the next capture

    def alive() -> dict[str, int]:
        per_layer: dict[str, int] = {}
        for n, rows, ref in refs:
            per_layer[n] = per_layer.get(n, 0) + (rows if ref() is not None else 0)
        return per_layer

    monkeypatch.setattr(scores_module, "iter_layer_terms", tracked)
    monkeypatch.setattr(scores_module, "_TermGroup", Group)
    hook = model.register_forward_pre_hook(lambda *_: held.append(alive()))
    try:
        scores_module.pairwise_scores(
            model, task, est, queries, data, rank=rank, batch_size=3, progress=False
        )
    finally:
        hook.remove()
    layers = list(task.tracked_modules(model))
    assert len(refs) == 7 * len(layers)  # 20 rows in batches of 3
    # rank None: every layer grouped; rank 1: token-path layers too.
    assert (len(grouped) == len(layers)) == (rank is None), grouped
    for n in layers:
        most = max(h.get(n, 0) for h in held)
        # One batch of a grouped layer (reached: grouping happened); a token-path layer: none.
        assert most == (3 if n in grouped else 0), (n, [h.get(n, 0) for h in held])
