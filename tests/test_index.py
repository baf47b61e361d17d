"""GradientIndex: exact without compression, brute-force checked with it, and every bad input.

Tiny float64 models; the index stores float64 where exactness is tested. The references are
`pairwise_scores` (itself tested against brute force) and, for the compressions, explicit
per-example gradients projected by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from brute_force import (
    brute_gradients,
    classification_data,
    fitted,
    lm_data,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
)

import influence as inf
from influence.index import compression as C
from influence.index import gradient_index as GI
from influence.index import storage

TIGHT = 1e-8
ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = [inf.EKFAC, inf.KFAC, inf.Diagonal, inf.Identity]
FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def lm_setup(family="llama", cls=inf.EKFAC, **kw):
    model, task = FAMILIES[family](), inf.LanguageModelingTask(**kw)
    data, queries = lm_data(20, min_len=3), lm_data(4, seed=7, prompt=2)
    return model, task, fitted(cls, model, task, data), data, queries


def build(tmp_path, model, task, est, data, name="index", **kw):
    kw = {"dtype": torch.float64, "batch_size": 3, "progress": False, **kw}
    return inf.GradientIndex.build(model, task, est, data, tmp_path / name, **kw)


def full_size(index_or_layers):
    infos = getattr(index_or_layers, "layers", index_or_layers)
    k_s = {n: i.out_features for n, i in infos.items()}
    k_a = {n: i.in_dim for n, i in infos.items()}
    return k_s, k_a


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.__name__)
def test_uncompressed_index_equals_pairwise_scores(tmp_path, family, cls):
    model, task, est, data, queries = lm_setup(family, cls)
    ref = inf.pairwise_scores(model, task, est, queries, data, batch_size=4, progress=False)
    index = build(tmp_path, model, task, est, data, shard_size=7)  # 3 shards, the last short
    assert [s["stop"] - s["start"] for s in index.shards] == [7, 7, 6]
    reopened = inf.GradientIndex.open(tmp_path / "index", model=model, estimator=est)
    got = reopened.scores(model, task, queries, batch_size=2, memory_cap=5 * 8 * reopened.row_size)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert rel(got, ref) < TIGHT


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cls", [inf.EKFAC, inf.KFAC], ids=lambda c: c.__name__)
@pytest.mark.parametrize("select", C.SELECTIONS)
def test_eigen_compression_at_full_size_equals_exact(tmp_path, family, cls, select):
    model, task, est, data, queries = lm_setup(family, cls)
    ref = inf.pairwise_scores(model, task, est, queries, data, batch_size=4, progress=False)
    k_s, k_a = full_size(inf.layers.layer_infos(task.tracked_modules(model)))
    comp = inf.EigenCompression(k_s, k_a, select=select)
    index = build(tmp_path, model, task, est, data, compression=comp)
    assert rel(index.scores(model, task, queries), ref) < TIGHT


def _brute_projected_scores(model, task, est, data, queries, projections, precondition_first):
    """Σ_layers ⟨query side, P_Sᵀ DW_n P_A⟩ from one-backward-per-example gradients."""
    train = brute_gradients(model, task, data)
    q = brute_gradients(model, task, queries, measurement=True)
    if precondition_first:
        q = est.precondition(q)
    total = 0
    for n, p in projections.items():
        u = p.query_side()
        tq = u.p_s.T @ q[n] @ u.p_a
        if p.scale is not None:
            tq = tq * p.scale
        tn = p.p_s.T @ train[n] @ p.p_a
        total = total + tq.flatten(1) @ tn.flatten(1).T
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_eigen_compression_equals_brute_force_truncation(tmp_path, family):
    """k_s, k_a below full: the stored coefficients and the query's scaled coefficients are
    the hand-made projection on the top eigenvectors, ranked by Σ Λ/(Λ+λ)."""
    model, task, est, data, queries = lm_setup(family)
    comp = inf.EigenCompression(3, 2)
    index = build(tmp_path, model, task, est, data, compression=comp)
    proj = {}
    for n in index.layers:
        lam = est.eigenvalues(n)
        share = lam / (lam + est.damping_[n])
        rs = torch.argsort(share.sum(1), descending=True)[:3]
        ra = torch.argsort(share.sum(0), descending=True)[:2]
        proj[n] = C.LayerProjection(
            est.state_[f"{n}::eigvecs_S"][:, rs],
            est.state_[f"{n}::eigvecs_A"][:, ra],
            1 / (lam[rs][:, ra] + est.damping_[n]),
        )
    want = _brute_projected_scores(model, task, est, data, queries, proj, False)
    assert rel(index.scores(model, task, queries), want) < TIGHT
    # The ranking matters: the last eigenvectors instead give other scores.
    assert index.bytes_per_example == 8 * 6 * len(index.layers)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.__name__)
def test_random_compression_equals_brute_force_projection(tmp_path, cls, whiten):
    """Queries preconditioned in full by the estimator, then projected with the stored query
    side's matrices, the training gradients with the training side's."""
    model, task, est, data, queries = lm_setup("gpt2", cls)
    comp = inf.RandomCompression(4, 3, whiten=whiten)
    index = build(tmp_path, model, task, est, data, compression=comp)
    proj = index._projection()
    whitened = whiten and cls is not inf.Identity
    assert all((p.u_s is not None) == whitened for p in proj.values())
    want = _brute_projected_scores(model, task, est, data, queries, proj, True)
    assert rel(index.scores(model, task, queries), want) < TIGHT
    again = C.layer_projections(comp, est, index.layers)
    assert all(torch.equal(again[n].p_s, proj[n].p_s) for n in proj)  # seeded
    other = C.layer_projections(inf.RandomCompression(4, 3, seed=1), est, index.layers)
    assert not any(torch.equal(other[n].p_s, proj[n].p_s) for n in proj)


class _Diagonal:
    """A stand-in fitted Diagonal for one 6 × 5 layer whose curvature spans about 1e-4 to 1e4,
    nearly separable (a row and a column term, and noise), as K-FAC-like curvature is."""

    def __init__(self, gen):
        self.damping_ = {"w": 1e-3}
        rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
        logs = 3 * rand(6, 1) + 3 * rand(1, 5) + 0.3 * rand(6, 5)
        self.state_ = {"w::diagonal": logs.exp()}


@pytest.mark.parametrize("whiten", [False, True])
def test_random_projection_is_unbiased(whiten):
    """E over seeds of ⟨U_Sᵀ X U_A, P_Sᵀ G P_A⟩ = ⟨X, G⟩: the mean of 4,000 draws lands within
    4 standard errors of the exact inner product; whitening the sides of a preconditioned X
    against a raw G (second moments about the curvature) shrinks the spread."""
    gen = torch.Generator().manual_seed(0)
    est = _Diagonal(gen)
    curv = est.state_["w::diagonal"] + est.damping_["w"]
    g = torch.randn(6, 5, generator=gen, dtype=torch.float64) * curv.sqrt()
    x = (g + 0.5 * torch.randn(6, 5, generator=gen, dtype=torch.float64) * curv.sqrt()) / curv
    info = {"w": inf.LayerInfo("w", 6, 5, False, False)}
    draws = []
    for seed in range(4000):
        comp = inf.RandomCompression(2, 2, seed=seed, whiten=whiten)
        p = C.layer_projections(comp, est, info)["w"]
        u = p.query_side()
        draws.append(((u.p_s.T @ x @ u.p_a) * (p.p_s.T @ g @ p.p_a)).sum())
    draws = torch.stack(draws)
    exact = (x * g).sum()
    assert abs(draws.mean() - exact) < 4 * draws.std() / len(draws) ** 0.5
    assert draws.std() > 0.1 * exact.abs()  # a real spread: the test could fail
    if whiten:
        assert draws.std() < 2 * exact.abs()
    else:
        assert draws.std() > 5 * exact.abs()


def test_projection_orders_agree(monkeypatch):
    """Tokens projected first or the gradient formed first: the same coefficients."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64)
    p = C.LayerProjection(
        torch.randn(6, 2, generator=gen, dtype=torch.float64),
        torch.randn(7, 4, generator=gen, dtype=torch.float64),
    )
    want = p.p_s.T @ torch.bmm(g.transpose(1, 2), a) @ p.p_a
    tokens_first = C.tokens_first
    assert tokens_first(64, 4096, 4096, 16, 16, 1, 4)  # a large layer: never its gradient
    assert not tokens_first(512, 8, 8, 8, 8, 1, 4)  # long sequences, a small layer
    for first in (True, False):
        monkeypatch.setattr(C, "tokens_first", lambda *args, first=first: first)
        assert rel(C.project(a, g, p), want) < 1e-13


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_smaller_dtypes_round_only(tmp_path, dtype, tol):
    model, task, est, data, queries = lm_setup()
    ref = inf.pairwise_scores(model, task, est, queries, data, progress=False)
    index = build(tmp_path, model, task, est, data, dtype=dtype)
    assert index.bytes_per_example == index.row_size * torch.finfo(dtype).bits // 8
    assert index.shard_tensor(0).dtype == dtype
    assert rel(index.scores(model, task, queries), ref) < tol


def test_classification_on_tuples_and_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    model, task = tiny_mlp(), inf.ClassificationTask()
    x, y = classification_data(30)
    train, queries = (x[:26], y[:26]), (x[26:], y[26:])
    est = fitted(inf.EKFAC, model, task, train)
    ref = inf.pairwise_scores(model, task, est, queries, train, progress=False)
    index = build(tmp_path, model, task, est, train, shard_size=10)
    assert rel(index.scores(model, task, queries), ref) < TIGHT
    lm_model, lm_task, lm_est, data, lm_queries = lm_setup()
    hf = datasets.Dataset.from_dict({k: v.tolist() for k, v in data.items()})
    loader = torch.utils.data.DataLoader(hf.with_format("torch"), batch_size=4)
    ref = inf.pairwise_scores(lm_model, lm_task, lm_est, lm_queries, data, progress=False)
    for name, train_data in (("hf", hf), ("loader", loader)):
        index = build(tmp_path, lm_model, lm_task, lm_est, train_data, name=name, shard_size=8)
        assert rel(index.scores(lm_model, lm_task, lm_queries), ref) < TIGHT, name


def test_a_task_tracking_some_of_the_index_layers_scores_those(tmp_path):
    model, task, est, data, queries = lm_setup()
    by_layer = inf.pairwise_scores(model, task, est, queries, data, by_layer=True, progress=False)
    index = build(tmp_path, model, task, est, data)
    mlp = inf.LanguageModelingTask(modules="mlp")
    names = list(mlp.tracked_modules(model))
    assert 0 < len(names) < len(index.layers)
    want = sum(by_layer[n] for n in names)
    assert rel(index.scores(model, mlp, queries), want) < TIGHT


# -- top-k and search -----------------------------------------------------------------------


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_equals_top_influences_of_the_scores(tmp_path, largest):
    model, task, est, data, queries = lm_setup()
    index = build(tmp_path, model, task, est, data, compression=inf.EigenCompression(4, 4))
    scores = index.scores(model, task, queries)
    texts = [f"text {i}" for i in range(20)]
    want = inf.top_influences(scores, 5, largest=largest, train_data=texts)
    got = index.top_k(
        model, task, queries, 5, largest=largest, train_data=texts, memory_cap=3 * 8 * 96
    )
    assert got.columns.tolist() == want.columns.tolist()
    assert got[["query", "rank", "train", "train_text"]].equals(
        want[["query", "rank", "train", "train_text"]]
    )
    assert torch.allclose(torch.tensor(got["score"].values), torch.tensor(want["score"].values))


@pytest.mark.parametrize(
    "dtype, kind", [(torch.float64, "IndexIVFFlat"), (torch.float16, "IndexIVFScalarQuantizer")]
)
def test_faiss_probing_every_list_is_exact_search(tmp_path, dtype, kind):
    pytest.importorskip("faiss")
    model, task, est, data, queries = lm_setup()
    data = lm_data(60, min_len=3)
    est = fitted(inf.EKFAC, model, task, data)
    comp = inf.EigenCompression(4, 4)
    index = build(tmp_path, model, task, est, data, compression=comp, dtype=dtype)
    exact = index.top_k(model, task, queries, 5)
    ivf = index.faiss_index(nlist=6)
    assert type(ivf).__name__ == kind  # 16-bit rows stay 16-bit in memory
    assert ivf.ntotal == 60 and ivf.nlist == 6
    every = index.top_k(model, task, queries, 5, search="faiss", nlist=6, nprobe=6)
    assert every["train"].tolist() == exact["train"].tolist()
    assert torch.allclose(
        torch.tensor(every["score"].values), torch.tensor(exact["score"].values), rtol=1e-3
    )
    worst = index.top_k(model, task, queries, 5, search="faiss", nlist=6, nprobe=6, largest=False)
    assert (
        worst["train"].tolist()
        == index.top_k(model, task, queries, 5, largest=False)["train"].tolist()
    )
    # Built once: saved beside the shards, under a name keyed by their checksums.
    assert len(list((tmp_path / "index").glob("faiss-ivf6-*.index"))) == 1


# -- bad input ------------------------------------------------------------------------------


def test_another_models_weights_are_refused(tmp_path):
    model, task, est, data, queries = lm_setup()
    index = build(tmp_path, model, task, est, data, compression=inf.EigenCompression(2, 2))
    other = tiny_llama(seed=1)
    for call in (
        lambda: inf.GradientIndex.open(index.path, model=other),
        lambda: index.scores(other, task, queries),
        lambda: index.top_k(other, task, queries),
    ):
        with pytest.raises(ValueError, match=r"built from other weights .*\(fingerprint"):
            call()
    with pytest.raises(ValueError, match="other layer shapes"):
        inf.GradientIndex.open(index.path, model=_wider_llama())
    with pytest.raises(ValueError, match="the estimator was fitted on other weights"):
        build(tmp_path, other, task, est, data, name="mixed")


def _wider_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=13,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).double()


def test_another_estimator_damping_or_factors_are_refused(tmp_path):
    model, task, est, data, queries = lm_setup()
    build(tmp_path, model, task, est, data)
    path = tmp_path / "index"
    kfac = inf.KFAC.from_ekfac(est)
    with pytest.raises(ValueError, match="built with EKFAC, not KFAC"):
        inf.GradientIndex.open(path, estimator=kfac)
    with pytest.raises(ValueError, match=r"another damping: damping='auto' there, 0.5 here"):
        inf.GradientIndex.open(path, estimator=est.with_damping(0.5))
    reseeded = inf.EKFAC().fit(model, task, data, batch_size=5, progress=False, seed=4)
    with pytest.raises(ValueError, match="factors other than these"):
        inf.GradientIndex.open(path, estimator=reseeded)
    inf.GradientIndex.open(path, model=model, estimator=est)  # the right ones pass


def test_truncated_missing_or_modified_shards_are_named(tmp_path):
    model, task, est, data, queries = lm_setup()
    index = build(tmp_path, model, task, est, data, shard_size=8)
    shard = index.path / "shard-00001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-8])
    with pytest.raises(ValueError, match=r"shard-00001.bin has \d+ bytes, the manifest records"):
        inf.GradientIndex.open(index.path)
    with pytest.raises(ValueError, match="ended early|has .* bytes"):
        index.scores(model, task, queries)  # opened before: caught while reading
    shard.write_bytes(raw[:8] + bytes(8) + raw[16:])  # same size, other values
    inf.GradientIndex.open(index.path)  # sizes match: found only by the checksum
    with pytest.raises(ValueError, match="shard-00001.bin does not match its recorded checksum"):
        inf.GradientIndex.open(index.path, verify=True)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.bin is missing"):
        inf.GradientIndex.open(index.path)
    # Building again repairs it: the intact shards are kept, the scores are right again.
    kept = (index.path / "shard-00000.bin").stat().st_ino
    repaired = build(tmp_path, model, task, est, data, shard_size=8)
    assert (index.path / "shard-00000.bin").stat().st_ino == kept
    ref = inf.pairwise_scores(model, task, est, queries, data, progress=False)
    assert rel(repaired.scores(model, task, queries), ref) < TIGHT


def test_queries_for_layers_the_index_lacks(tmp_path):
    model, _, est, data, queries = lm_setup(modules="mlp")
    index = build(tmp_path, model, inf.LanguageModelingTask(modules="mlp"), est, data)
    with pytest.raises(ValueError, match=r"tracks layers \['model.layers.0.self_attn.q_proj'"):
        index.scores(model, inf.LanguageModelingTask(), queries)


def test_compression_larger_than_a_layer_and_unsuitable_estimators(tmp_path):
    model, task, est, data, _ = lm_setup()
    with pytest.raises(ValueError, match=r"EigenCompression\(k_s=9, k_a=2\) is larger than layer"):
        build(tmp_path, model, task, est, data, compression=inf.EigenCompression(9, 2))
    with pytest.raises(ValueError, match=r"RandomCompression\(k_s=2, k_a=13\) is larger than"):
        build(tmp_path, model, task, est, data, compression=inf.RandomCompression(2, 13))
    with pytest.raises(ValueError, match="k_s has no entry for layer"):
        build(tmp_path, model, task, est, data, compression=inf.EigenCompression({"x": 2}, 2))
    with pytest.raises(ValueError, match="k_s must be a positive integer"):
        inf.EigenCompression(0, 2)
    with pytest.raises(ValueError, match="select must be one of"):
        inf.EigenCompression(2, 2, select="mass")
    diag = fitted(inf.Diagonal, model, task, data)
    with pytest.raises(ValueError, match="Diagonal has none. Use RandomCompression"):
        build(tmp_path, model, task, diag, data, compression=inf.EigenCompression(2, 2))
    cg = inf.CG(damping=0.1).fit(model, task, data, progress=False)
    with pytest.raises(ValueError, match="CG cannot do"):
        build(tmp_path, model, task, cg, data)
    with pytest.raises(TypeError, match="compression must be None"):
        build(tmp_path, model, task, est, data, compression="eigen")
    with pytest.raises(ValueError, match="dtype must be one of"):
        build(tmp_path, model, task, est, data, dtype=torch.int8)
    assert not (tmp_path / "index" / "manifest.json").exists()


def test_a_folder_of_another_index_is_never_overwritten(tmp_path):
    model, task, est, data, _ = lm_setup()
    build(tmp_path, model, task, est, data)
    with pytest.raises(FileExistsError, match="built with other settings"):
        build(tmp_path, model, task, est, data, dtype=torch.float32)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        build(tmp_path, model, task, est, data, name="file")
    with pytest.raises(FileNotFoundError, match="build one with influence.GradientIndex.build"):
        inf.GradientIndex.open(tmp_path / "nothing")


# -- interrupted builds ---------------------------------------------------------------------


def test_a_build_interrupted_after_a_shard_resumes_from_it(tmp_path, monkeypatch):
    model, task, est, data, queries = lm_setup()
    written = []
    original = storage.write_shard

    def fail_after_first(folder, k, rows, record):
        if written:
            raise RuntimeError("injected: killed after shard 1")
        written.append(k)
        return original(folder, k, rows, record)

    monkeypatch.setattr(storage, "write_shard", fail_after_first)
    with pytest.raises(RuntimeError, match="injected"):
        build(tmp_path, model, task, est, data, shard_size=6)
    path = tmp_path / "index"
    assert sorted(p.name for p in path.glob("shard-*")) == ["shard-00000.bin", "shard-00000.json"]
    assert not list(path.glob(".*.tmp"))  # the failed writer's temporary files are gone
    with pytest.raises(FileNotFoundError, match="unfinished build"):
        inf.GradientIndex.open(path)
    monkeypatch.setattr(storage, "write_shard", original)
    passed = []
    original_pass = GI.iter_layer_terms

    def counting(*args, **kwargs):
        for item in original_pass(*args, **kwargs):
            passed.append(len(item.indices))
            yield item

    monkeypatch.setattr(GI, "iter_layer_terms", counting)
    inode = (path / "shard-00000.bin").stat().st_ino
    index = build(tmp_path, model, task, est, data, shard_size=6)
    assert sum(passed) == 20 - 6  # the complete shard was not passed over again
    assert (path / "shard-00000.bin").stat().st_ino == inode
    ref = inf.pairwise_scores(model, task, est, queries, data, progress=False)
    assert rel(index.scores(model, task, queries), ref) < TIGHT
    passed.clear()
    build(tmp_path, model, task, est, data, shard_size=6)  # finished: nothing is redone
    assert passed == []


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    sys.path.insert(0, "tests")
    from brute_force import fitted, lm_data, tiny_llama
    import influence as inf
    from influence.index import storage

    model, task = tiny_llama(), inf.LanguageModelingTask()
    data = lm_data(20, min_len=3)
    est = fitted(inf.EKFAC, model, task, data)
    original = storage.atomic_write_json

    def write_json(path, obj):
        if str(path).endswith("shard-00001.json"):  # shard 1's data written, not renamed
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, obj)

    storage.atomic_write_json = write_json
    inf.GradientIndex.build(model, task, est, data, sys.argv[1], dtype=torch.float64,
                            batch_size=3, shard_size=6, progress=False)
    """
)


def test_a_build_killed_mid_shard_resumes_without_its_half_written_file(tmp_path):
    path = tmp_path / "index"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED, str(path)], cwd=ROOT, env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in path.glob(".shard-00001.bin.*.tmp")]
    assert len(leftovers) == 1  # the killed writer's temporary shard
    assert not (path / "shard-00001.bin").exists() and not (path / "manifest.json").exists()
    model, task, est, data, queries = lm_setup()
    index = build(tmp_path, model, task, est, data, shard_size=6)
    assert not list(path.glob(".*.tmp"))  # removed by the next write of that shard
    ref = inf.pairwise_scores(model, task, est, queries, data, progress=False)
    assert rel(index.scores(model, task, queries), ref) < TIGHT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("comp", [None, inf.EigenCompression(3, 3), inf.RandomCompression(3, 3)])
def test_search_on_cuda_equals_the_cpu(tmp_path, comp):
    """Queries and blocked products on the GPU (shards read on the CPU, copied per block)."""
    model, task, est, data, queries = lm_setup()
    index = build(tmp_path, model, task, est, data, compression=comp)
    cpu = index.scores(model, task, queries)
    gpu = index.scores(model.cuda(), task, queries, device="cuda")
    assert gpu.device.type == "cpu" and rel(gpu, cpu) < 1e-10
    model.cpu()
