"""The same numbers on a CUDA device as on the CPU. Skipped where no GPU is present (CI); run
on a lent GPU machine with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import pytest
import torch
from brute_force import lm_data, tiny_gpt2, tiny_llama

import influence as inf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# float64 on both devices: the kernels sum in other orders, so results differ by rounding
# (~1e-14 relative), and eigenvectors of (near-)equal eigenvalues may differ by a rotation
# that scores do not see. 1e-8 is far below any real difference (a wrong damping, a lost token).
TOL = 1e-8
# A fixed damping: 'auto' of an untrained tiny model's q/k blocks is ~1e-9 (no curvature
# there), and at that conditioning the two devices' rounding differs by ~1e-7 in those layers.
DAMPING = 1e-3
ESTIMATORS = [
    lambda: inf.Identity(DAMPING),
    lambda: inf.Diagonal(DAMPING),
    lambda: inf.KFAC(DAMPING),
    lambda: inf.EKFAC(DAMPING),
    lambda: inf.CG(damping=DAMPING, tol=1e-12),
    lambda: inf.LiSSA(damping=DAMPING, depth=50),
]


def rel(a, b, scale=None):
    """Relative difference; per-layer scores are measured against the total's norm (`scale`):
    an untrained model's q/k gradients are ~1e-7 of the others, the remainder of a
    cancellation, and carry the rounding of the terms that cancelled."""
    a, b = a.cpu(), b.cpu()
    return ((a - b).norm() / (b.norm() if scale is None else scale).clamp_min(1e-300)).item()


def _run(model, task, make, data, queries, device):
    kw = {"batch_size": 4, "progress": False, "device": device}
    est = make().fit(model, task, data, seed=3, **kw)
    out = {"layers": inf.pairwise_scores(model, task, est, queries, data, by_layer=True, **kw)}
    out["self"] = inf.self_scores(model, task, est, data, **kw)
    if getattr(est, "block_diagonal", False):
        out["rank 2"] = inf.pairwise_scores(model, task, est, queries, data, rank=2, **kw)
        out["by token"] = inf.pairwise_scores(model, task, est, queries, data, by_token=True, **kw)
    return out


# transformers computes Llama's rotary tables in float32 on either device, and the two
# devices' float32 cos/sin differ in the last bits: ~1e-7 relative in every gradient, before
# any influence code runs. GPT-2 is float64 throughout.
MODELS = [(tiny_llama, 1e-6), (tiny_gpt2, TOL)]


@pytest.mark.parametrize("build,tol", MODELS, ids=["llama", "gpt2"])
@pytest.mark.parametrize(
    "make", ESTIMATORS, ids=["identity", "diagonal", "kfac", "ekfac", "cg", "lissa"]
)
def test_cuda_gives_the_cpu_numbers(build, tol, make):
    model, task = build(), inf.LanguageModelingTask()
    data, queries = lm_data(14, min_len=3), lm_data(3, seed=7, prompt=2)
    cpu = _run(model, task, make, data, queries, "cpu")
    gpu = _run(model, task, make, data, queries, "cuda")
    # A device given to a call is where the model stays (as after `model.to(device)`).
    assert all(p.device.type == "cuda" for p in model.parameters())
    total = sum(cpu["layers"].values())
    assert rel(sum(gpu["layers"].values()), total) < tol
    for n in cpu["layers"]:
        assert rel(gpu["layers"][n], cpu["layers"][n], total.norm()) < tol, n
    for k in set(cpu) - {"layers"}:
        assert rel(gpu[k], cpu[k]) < tol, k


def test_float32_model_on_cuda_takes_every_scoring_path():
    """A float32 model whose layers are scored both ways (rank 4: some layers token by token,
    some through dense per-example gradients) gives the CPU's scores to float32 rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    model, task = LlamaForCausalLM(cfg).eval(), inf.LanguageModelingTask()
    data, queries = lm_data(40, seq=24, min_len=4), lm_data(6, seq=24, seed=7, prompt=8)
    kw = {"batch_size": 8, "progress": False}
    est = inf.EKFAC().fit(model, task, data, **kw)
    ranks = (None, 4, 32)
    cpu = [inf.pairwise_scores(model, task, est, queries, data, rank=r, **kw) for r in ranks]
    kw["device"] = "cuda"
    gpu = [inf.pairwise_scores(model, task, est, queries, data, rank=r, **kw) for r in ranks]
    for r, a, b in zip(ranks, cpu, gpu, strict=True):
        # float32, and TF32 products where torch allows them: 1e-3 is rounding, a lost layer
        # or token is O(1).
        assert rel(b, a) < 1e-3, r


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memory_plan_matches_cuda_peaks(family):
    """The plan's CUDA probe (the allocator's peak of one pass at batch 1 and 2) and its
    per-stage sizes, against the allocator's peak of each stage of a real fit and scoring
    run on the device; the same 25% as the CPU test (tests/test_memory.py)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from influence.memory import StagePeaks

    device = torch.device("cuda")
    n, q, bs, rank, seq, vocab = 96, 8, 16, 8, 128, 8192
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n + q, seq), generator=g)
    train = {"input_ids": ids[:n], "labels": ids[:n].clone()}
    labels = ids[n:].clone()
    labels[:, : seq // 2] = -100
    queries = {"input_ids": ids[n:], "labels": labels}
    task = inf.LanguageModelingTask()
    # A device's first passes also allocate what lives on (cuBLAS workspaces): done once on a
    # small model before the baseline, as the CPU test imports its libraries before it.
    with device:
        small = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=vocab))
    small_data = {"input_ids": ids[:4, :16], "labels": ids[:4, :16]}
    est = inf.EKFAC().fit(small.eval(), task, small_data, batch_size=2, progress=False)
    inf.pairwise_scores(small, task, est, small_data, small_data, rank=2, progress=False)
    del small, est
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    with device:
        if family == "gpt2":
            cfg = GPT2Config(n_embd=768, n_layer=2, n_head=12, vocab_size=vocab, n_positions=seq)
            model = GPT2LMHeadModel(cfg)
        else:
            cfg = LlamaConfig(
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=2,
                num_attention_heads=12,
                num_key_value_heads=12,
                vocab_size=vocab,
                max_position_embeddings=seq,
                tie_word_embeddings=False,
            )
            model = LlamaForCausalLM(cfg)
    model.eval()
    plan = inf.memory_plan(
        model, task, num_train=n, num_queries=q, seq_len=seq, rank=rank, batch_size=bs
    )
    kw = {"batch_size": bs, "progress": False, "device": device}
    with StagePeaks(device) as peaks:
        est = inf.EKFAC().fit(model, task, train, **kw)
        stored = torch.cuda.memory_allocated(device) - base
        inf.pairwise_scores(model, task, est, queries, train, rank=rank, **kw)
    measured = {k: v - base for k, v in peaks.peaks.items()}
    measured["stored factors"] = stored
    mib = 2**20
    report = "; ".join(
        f"{s.name}: planned {s.bytes / mib:.0f} MiB, measured {measured.get(s.name, 0) / mib:.0f}"
        for s in plan.stages
    )
    print(f"{family}: {report}")
    for s in plan.stages:
        meas = measured.get(s.name, 0)
        if meas >= 32 * mib:
            assert abs(s.bytes - meas) <= 0.25 * meas, f"{s.name} off by more than 25%. {report}"
    checked = {s.name for s in plan.stages if measured.get(s.name, 0) >= 32 * mib}
    assert {"fit: covariances", "fit: eigenvalues", "queries", "scores"} <= checked, report
