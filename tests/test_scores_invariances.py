"""Invariances and decompositions every estimator must satisfy, and the data formats it takes."""

from __future__ import annotations

import pytest
import torch
from brute_force import classification_data, fitted, lm_data, tiny_gpt2, tiny_llama, tiny_mlp
from torch.utils.data import DataLoader, TensorDataset

import influence as inf

ESTIMATORS = [inf.Identity, inf.Diagonal, inf.KFAC, inf.EKFAC]
# float64 models: agreement to 1e-10 relative is rounding; any real difference is far larger.
TIGHT = 1e-10


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def scores(model, task, est, q, t, **kw):
    kw.setdefault("batch_size", 5)
    return inf.pairwise_scores(model, task, est, q, t, progress=False, **kw)


@pytest.fixture(scope="module")
def llama_setting():
    model, task, data = tiny_llama(), inf.LanguageModelingTask(), lm_data(20, min_len=3)
    queries = lm_data(4, seed=7, prompt=2)
    return model, task, data, queries


@pytest.mark.parametrize("est_cls", ESTIMATORS)
def test_scores_and_factors_do_not_depend_on_batch_size(llama_setting, est_cls):
    model, task, data, queries = llama_setting
    a = est_cls().fit(model, task, data, batch_size=3, progress=False, seed=1)
    b = est_cls().fit(model, task, data, batch_size=11, progress=False, seed=1)
    for k in a.state_:
        assert rel(a.state_[k], b.state_[k]) < TIGHT, k
    assert (
        rel(
            scores(model, task, a, queries, data, batch_size=3),
            scores(model, task, b, queries, data, batch_size=7),
        )
        < TIGHT
    )


@pytest.mark.parametrize("est_cls", ESTIMATORS)
def test_padding_changes_nothing(llama_setting, est_cls):
    model, task, data, queries = llama_setting
    pad = 3
    padded = {
        "input_ids": torch.nn.functional.pad(data["input_ids"], (0, pad), value=0),
        "attention_mask": torch.nn.functional.pad(data["attention_mask"], (0, pad), value=0),
        "labels": torch.nn.functional.pad(data["labels"], (0, pad), value=-100),
    }
    a = fitted(est_cls, model, task, data)
    b = fitted(est_cls, model, task, padded)
    for k in a.state_:
        assert rel(a.state_[k], b.state_[k]) < 1e-9, k
    s_a = scores(model, task, a, queries, data, by_token=True)
    s_b = scores(model, task, b, queries, padded, by_token=True)
    assert rel(s_b[..., : s_a.shape[-1]], s_a) < 1e-9
    assert s_b[..., s_a.shape[-1] :].abs().max() == 0


@pytest.mark.parametrize("est_cls", ESTIMATORS)
def test_layer_and_token_contributions_sum_to_the_total(llama_setting, est_cls):
    model, task, data, queries = llama_setting
    est = fitted(est_cls, model, task, data)
    total = scores(model, task, est, queries, data)
    by_layer = scores(model, task, est, queries, data, by_layer=True)
    by_token = scores(model, task, est, queries, data, by_token=True)
    assert set(by_layer) == set(task.tracked_modules(model))
    assert rel(sum(by_layer.values()), total) < TIGHT
    assert by_token.shape == (*total.shape, data["input_ids"].shape[1])
    assert rel(by_token.sum(-1), total) < TIGHT
    both = scores(model, task, est, queries, data, by_layer=True, by_token=True)
    assert rel(sum(v.sum(-1) for v in both.values()), total) < TIGHT


@pytest.mark.parametrize("est_cls", ESTIMATORS)
def test_full_rank_equals_no_rank_and_low_rank_paths_agree(llama_setting, est_cls):
    model, task, data, queries = llama_setting
    est = fitted(est_cls, model, task, data)
    exact = scores(model, task, est, queries, data)
    assert rel(scores(model, task, est, queries, data, rank=64), exact) < TIGHT
    # rank 1 takes the token-by-token path for some layers; by_token forces it everywhere.
    r1 = scores(model, task, est, queries, data, rank=1)
    r1_tokens = scores(model, task, est, queries, data, rank=1, by_token=True)
    assert rel(r1_tokens.sum(-1), r1) < TIGHT
    assert rel(r1, exact) > 1e-6  # truncation really happened


@pytest.mark.parametrize("est_cls", ESTIMATORS)
def test_queries_preconditioned_batch_by_batch_equal_the_preconditioned_gradients(
    llama_setting, est_cls
):
    """Block-diagonal estimators precondition each batch of queries from its per-token terms
    (K-FAC and EK-FAC in their eigenbasis, truncating there); the result must be the estimator's
    `precondition` of the query gradients and, with a rank, that matrix's truncated SVD."""
    model, task, data, queries = llama_setting
    est = fitted(est_cls, model, task, data)
    dense = est.precondition(
        inf.per_example_gradients(model, task, queries, measurement=True, batch_size=5)
    )
    batched = inf.preconditioned_queries(model, task, est, queries, batch_size=3)
    # rank 2 of 8 columns: the range finder's 10 columns cover every layer, so the randomized
    # truncation is the exact one up to rounding.
    low = inf.preconditioned_queries(model, task, est, queries, rank=2, batch_size=3)
    for n, p in dense.items():
        assert rel(batched[n], p) < TIGHT, n
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        best = u[..., :2] @ torch.diag_embed(s[..., :2]) @ vh[..., :2, :]
        assert rel(low[n].dense(), best) < 1e-8, n


@pytest.mark.parametrize("est_cls", ESTIMATORS)
def test_self_scores_are_the_diagonal_of_pairwise_scores(est_cls):
    model, task = tiny_llama(), inf.LanguageModelingTask()
    data = lm_data(12, min_len=3)
    est = fitted(est_cls, model, task, data)
    pair = scores(model, task, est, data, data)
    self_ = inf.self_scores(model, task, est, data, batch_size=5, progress=False)
    assert rel(self_, pair.diagonal()) < TIGHT
    by_layer = inf.self_scores(model, task, est, data, by_layer=True, progress=False)
    assert rel(sum(by_layer.values()), self_) < TIGHT
    if est_cls is not inf.Identity:
        assert (self_ > 0).all()  # (G + λI)⁻¹ is positive definite


def test_query_chunks_equal_all_queries_at_once(llama_setting):
    model, task, data, queries = llama_setting
    est = fitted(inf.EKFAC, model, task, data)
    assert (
        rel(
            scores(model, task, est, queries, data, query_batch_size=3),
            scores(model, task, est, queries, data),
        )
        < TIGHT
    )


@pytest.mark.parametrize("rank", [None, 1])
def test_buffered_training_gradients_give_the_same_scores(llama_setting, monkeypatch, rank):
    """Training gradients are scored in buffered groups of batches; group boundaries, a batch
    larger than the buffer, a mix of grouped and token-path layers (rank 1) and no buffering at
    all (the memory cap) change nothing."""
    import influence.scores as scores_module

    model, task, data, queries = llama_setting
    est = fitted(inf.EKFAC, model, task, data)
    ref = scores(model, task, est, queries, data, rank=rank, batch_size=20)  # one group
    monkeypatch.setattr(scores_module, "_GROUP_ROWS", 7)
    grouped = scores(model, task, est, queries, data, rank=rank, batch_size=3)  # flush at 6
    growing = DataLoader(
        TensorDataset(*data.values()),
        batch_sampler=[list(range(0, 2)), list(range(2, 12)), list(range(12, 20))],
        collate_fn=lambda rows: dict(
            zip(data, map(torch.stack, zip(*rows, strict=True)), strict=True)
        ),
    )
    assert rel(grouped, ref) < TIGHT
    assert rel(scores(model, task, est, queries, growing, rank=rank), ref) < TIGHT
    # Output rows in cache-sized blocks (CPU): one row at a time, then blocks that leave a
    # partial last block, must sum to the same scores.
    for block_bytes in (1, 2000):
        monkeypatch.setattr(scores_module, "_CPU_BLOCK_BYTES", block_bytes)
        assert rel(scores(model, task, est, queries, data, rank=rank, batch_size=3), ref) < TIGHT
    monkeypatch.setattr(scores_module, "_GROUP_BYTES", 1)  # a large model: no buffering
    assert rel(scores(model, task, est, queries, data, rank=rank, batch_size=3), ref) < TIGHT


def test_token_path_and_dense_path_give_the_same_low_rank_scores(llama_setting, monkeypatch):
    """Which path scores a low-rank layer is a matter of speed only: forcing every layer onto
    the token path, or onto the dense one, leaves the rank-3 scores unchanged."""
    import influence.scores as scores_module

    model, task, data, queries = llama_setting
    est = fitted(inf.EKFAC, model, task, data)
    monkeypatch.setattr(scores_module, "_TOKEN_PATH_SPEEDUP", 0.0)  # never the token path
    dense = scores(model, task, est, queries, data, rank=3, batch_size=6)
    monkeypatch.setattr(scores_module, "_TOKEN_PATH_SPEEDUP", 1e9)  # always
    token = scores(model, task, est, queries, data, rank=3, batch_size=6)
    assert rel(dense, scores(model, task, est, queries, data, rank=64)) > 1e-6  # truncated
    assert rel(token, dense) < TIGHT


@pytest.mark.parametrize("est_cls", ESTIMATORS)
def test_save_then_load_gives_identical_scores(tmp_path, llama_setting, est_cls):
    model, task, data, queries = llama_setting
    est = fitted(est_cls, model, task, data)
    path = tmp_path / "factors.safetensors"
    est.save(path)
    loaded = est_cls.load(path, model, task)
    assert loaded.damping_ == est.damping_
    # Same memory layout as the loaded tensors, so no product can take another CPU kernel.
    assert all(t.is_contiguous() for t in est.state_.values())
    assert all(t.is_contiguous() for t in loaded.state_.values())
    assert torch.equal(
        scores(model, task, loaded, queries, data), scores(model, task, est, queries, data)
    )
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_same_seed_same_factors_other_seed_other_factors(llama_setting):
    model, task, data, _ = llama_setting
    a = inf.EKFAC().fit(model, task, data, progress=False, seed=4)
    b = inf.EKFAC().fit(model, task, data, progress=False, seed=4)
    c = inf.EKFAC().fit(model, task, data, progress=False, seed=5)
    assert all(torch.equal(a.state_[k], b.state_[k]) for k in a.state_)
    assert any(not torch.equal(a.state_[k], c.state_[k]) for k in a.state_ if "lambda" in k)


def test_data_formats_give_the_same_scores():
    from datasets import Dataset

    model, task = tiny_mlp(), inf.ClassificationTask()
    x, y = classification_data(30)
    est = fitted(inf.EKFAC, model, task, (x, y))
    ref = scores(model, task, est, (x[:3], y[:3]), (x, y))
    as_dataset = TensorDataset(x, y)
    as_loader = DataLoader(as_dataset, batch_size=4)
    assert torch.equal(scores(model, task, est, (x[:3], y[:3]), as_dataset), ref)
    assert rel(scores(model, task, est, (x[:3], y[:3]), as_loader), ref) < TIGHT  # batch 4 here

    lm, lm_task = tiny_llama(), inf.LanguageModelingTask()
    data = lm_data(10)
    est = fitted(inf.KFAC, lm, lm_task, data)
    hf = Dataset.from_dict({k: v.tolist() for k, v in data.items()}).with_format("torch")
    assert rel(scores(lm, lm_task, est, hf, hf), scores(lm, lm_task, est, data, data)) < TIGHT


def test_gpt2_conv1d_layers_are_tracked_and_mlp_selector_works():
    gpt2 = tiny_gpt2()
    names = set(inf.find_layers(gpt2))
    assert names == {
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    }
    assert set(inf.find_layers(gpt2, "mlp")) == {
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    }
    llama = tiny_llama()
    assert set(inf.find_layers(llama, "mlp")) == {
        f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert "lm_head" not in inf.find_layers(llama)
    assert list(inf.find_layers(llama, ["lm_head"])) == ["lm_head"]  # explicit names may track it
    picked = inf.find_layers(llama, lambda n, m: n.endswith("q_proj"))
    assert list(picked) == ["model.layers.0.self_attn.q_proj"]


def test_mlp_only_scores_equal_the_mlp_layers_of_all_layer_scores(llama_setting):
    model, _, data, queries = llama_setting
    all_task, mlp_task = inf.LanguageModelingTask(), inf.LanguageModelingTask(modules="mlp")
    est_all = fitted(inf.EKFAC, model, all_task, data)
    est_mlp = fitted(inf.EKFAC, model, mlp_task, data)
    by_layer = scores(model, all_task, est_all, queries, data, by_layer=True)
    mlp_total = scores(model, mlp_task, est_mlp, queries, data)
    assert rel(sum(v for k, v in by_layer.items() if ".mlp." in k), mlp_total) < TIGHT


def test_model_mode_is_restored_and_parameters_stay_trainable(llama_setting):
    model, task, data, queries = llama_setting
    model.train()
    est = fitted(inf.Diagonal, model, task, data)
    scores(model, task, est, queries, data)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was formed
    model.eval()


def test_randomized_truncation_is_near_the_exact_truncated_svd():
    from influence.lowrank import LowRank, low_rank

    g = torch.Generator().manual_seed(0)
    # Preconditioned query gradients have decaying spectra; build matrices that do too.
    u = torch.linalg.qr(torch.randn(5, 60, 60, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(5, 40, 40, generator=g, dtype=torch.float64)).Q
    sv = 1.0 / torch.arange(1, 41, dtype=torch.float64) ** 1.0
    p = u[..., :40] @ torch.diag(sv) @ v.transpose(-1, -2)
    approx = low_rank(p, 8)
    assert isinstance(approx, LowRank) and approx.u.shape == (5, 60, 8)
    exact_u, exact_s, exact_vh = torch.linalg.svd(p, full_matrices=False)
    best = p - exact_u[..., :8] @ torch.diag_embed(exact_s[..., :8]) @ exact_vh[..., :8, :]
    err, best_err = (p - approx.dense()).norm(), best.norm()
    # Halko et al.: with 8 extra columns and one power iteration the error is within a few
    # percent of the optimum for a 1/k spectrum (measured: 1.01).
    assert err <= 1.03 * best_err, (err / best_err).item()
    assert torch.allclose(approx.s, exact_s[..., :8], rtol=3e-2)  # measured: within 1.7%
    assert low_rank(p, 40) is p  # rank covers the matrix: nothing to truncate
    assert torch.equal(low_rank(p, 8).dense(), approx.dense())  # seeded: deterministic


def _pad_right(data, pad):
    return {
        "input_ids": torch.nn.functional.pad(data["input_ids"], (0, pad), value=0),
        "attention_mask": torch.nn.functional.pad(data["attention_mask"], (0, pad), value=0),
        "labels": torch.nn.functional.pad(data["labels"], (0, pad), value=-100),
    }


def _all_results(model, task, est_cls, data, queries):
    """Factors and every score path, from one fit on `data`."""
    est = est_cls().fit(model, task, data, batch_size=3, progress=False, seed=2)
    out = {f"factor {k}": v for k, v in est.state_.items()}
    out["total"] = scores(model, task, est, queries, data, batch_size=4)
    out["rank 1"] = scores(model, task, est, queries, data, rank=1, batch_size=4)
    out["by token"] = scores(model, task, est, queries, data, by_token=True, batch_size=4)
    for n, v in scores(model, task, est, queries, data, by_layer=True, batch_size=4).items():
        out[f"layer {n}"] = v
    out["self"] = inf.self_scores(model, task, est, data, batch_size=4, progress=False)
    return out


@pytest.mark.parametrize("est_cls", ESTIMATORS)
def test_length_ordering_and_trimming_change_nothing(llama_setting, monkeypatch, est_cls):
    """Batches ordered by real length and trimmed to it (the default) give the factors and
    scores of batches in the caller's order at full width, in the caller's order; so does data
    shuffled and padded wider (sampled labels follow the example's index, not its batch)."""
    import influence.gradients as gradients_module

    model, task, data, queries = llama_setting
    ordered = _all_results(model, task, est_cls, data, queries)
    monkeypatch.setattr(gradients_module, "ORDER_BY_LENGTH", False)
    plain = _all_results(model, task, est_cls, data, queries)
    assert set(ordered) == set(plain)
    for k, v in plain.items():
        assert rel(ordered[k], v) < TIGHT, k
    monkeypatch.setattr(gradients_module, "ORDER_BY_LENGTH", True)
    # Shuffled rows and queries, padded to a wider width: the same numbers, permuted. The
    # sampled labels of a shuffled example differ (its index changed), so the factors are fitted
    # on the original data and only the scores are compared.
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    shuffled = _pad_right({k: v[perm] for k, v in data.items()}, 4)
    est = est_cls().fit(model, task, data, batch_size=3, progress=False, seed=2)
    q_perm = torch.tensor([2, 0, 3, 1])
    q_shuffled = _pad_right({k: v[q_perm] for k, v in queries.items()}, 2)
    got = scores(model, task, est, q_shuffled, shuffled, batch_size=4)
    assert rel(got, plain["total"][q_perm][:, perm]) < TIGHT
    got_tokens = scores(model, task, est, q_shuffled, shuffled, by_token=True, batch_size=4)
    width = data["input_ids"].shape[1]
    assert got_tokens.shape[-1] == width + 4  # the caller's width, whatever the trimming
    assert rel(got_tokens[..., :width], plain["by token"][q_perm][:, perm]) < TIGHT
    assert got_tokens[..., width:].abs().max() == 0
    self_ = inf.self_scores(model, task, est, shuffled, batch_size=4, progress=False)
    assert rel(self_, plain["self"][perm]) < TIGHT


def test_passes_run_on_real_tokens_only(llama_setting):
    """Every influence pass feeds the model batches of similar real lengths cut to their
    longest one: the tokens it processes are the real ones plus little padding."""
    model, task, data, queries = llama_setting
    padded = _pad_right(data, 40)  # mostly padding, like the study's rows of 72
    widths: list[tuple[int, int]] = []
    handle = model.model.embed_tokens.register_forward_hook(
        lambda m, args, out: widths.append(tuple(args[0].shape))
    )
    try:
        est = inf.EKFAC().fit(model, task, padded, batch_size=4, progress=False)
        scores(model, task, est, queries, padded, batch_size=4)
        inf.self_scores(model, task, est, padded, batch_size=4, progress=False)
    finally:
        handle.remove()
    real = data["attention_mask"].sum(1)
    processed = sum(b * t for b, t in widths)
    passes = 4  # two fit passes, the scores' training pass, self-influence
    lengths = sorted(real.tolist(), reverse=True)
    best = sum(max(lengths[i : i + 4]) * len(lengths[i : i + 4]) for i in range(0, 20, 4))
    query_tokens = 4 * queries["input_ids"].shape[1]
    assert processed == passes * best + query_tokens, (processed, widths)
    assert processed < 0.25 * (passes * padded["input_ids"].numel())
