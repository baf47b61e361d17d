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
ESTIMATORS = [
    (inf.Identity, TOL),
    (inf.Diagonal, TOL),
    (inf.KFAC, TOL),
    (inf.EKFAC, TOL),
    # 'auto' damping of an untrained tiny model's q/k blocks is ~1e-9 (no curvature there),
    # which CG cannot solve to 1e-10; at λ = 0.1 it converges in ~12 iterations.
    (lambda: inf.CG(damping=0.1, tol=1e-12), TOL),
    (lambda: inf.LiSSA(depth=50), TOL),
]


def rel(a, b):
    return ((a.cpu() - b.cpu()).norm() / b.cpu().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("make,tol", ESTIMATORS)
def test_cuda_gives_the_cpu_numbers(build, make, tol):
    model, task = build(), inf.LanguageModelingTask()
    data, queries = lm_data(14, min_len=3), lm_data(3, seed=7, prompt=2)
    kw = {"batch_size": 4, "progress": False}
    cpu_est = make().fit(model, task, data, seed=3, **kw)
    gpu_est = make().fit(model, task, data, seed=3, device="cuda", **kw)
    assert all(p.device.type == "cpu" for p in model.parameters())  # moved back
    cpu = inf.pairwise_scores(model, task, cpu_est, queries, data, by_layer=True, **kw)
    gpu = inf.pairwise_scores(
        model, task, gpu_est, queries, data, by_layer=True, device="cuda", **kw
    )
    for n in cpu:
        assert rel(gpu[n], cpu[n]) < tol, n
    if getattr(cpu_est, "block_diagonal", False):
        for extra in ({"rank": 2}, {"by_token": True}):
            a = inf.pairwise_scores(model, task, cpu_est, queries, data, **extra, **kw)
            b = inf.pairwise_scores(
                model, task, gpu_est, queries, data, device="cuda", **extra, **kw
            )
            assert rel(b, a) < TOL, extra
    a = inf.self_scores(model, task, cpu_est, data, **kw)
    b = inf.self_scores(model, task, gpu_est, data, device="cuda", **kw)
    assert rel(b, a) < tol


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
    for rank in (None, 4, 32):
        a = inf.pairwise_scores(model, task, est, queries, data, rank=rank, **kw)
        b = inf.pairwise_scores(model, task, est, queries, data, rank=rank, device="cuda", **kw)
        assert rel(b, a) < 1e-4, rank  # float32: ~1e-6 measured on the CPU between paths
