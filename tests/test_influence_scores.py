"""The scores stage: cached per model, rebuilt when a file is damaged, one API for the
notebooks (scores, per-layer scores, per-copy values, top-k frames), clear errors."""

from __future__ import annotations

import pytest
import torch

import influence as inf
from influence.io import load_safetensors
from influence.study import influence_scores as IS
from influence.study.corpus import QUERY_SETS
from influence.study.suite import load_suite, query_dataset, sequence_dataset, train_dataset

TINY = [{"name": "t", "hidden": 16, "layers": 1, "intermediate": 32, "heads": 1}]
TRAIN = {
    "epochs": 2,
    "batch_size": 32,
    "lr": 3e-3,
    "warmup_frac": 0.1,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.0,
    "log_every": 2,
    "threads": 1,
}
STAGE = {
    "query_sets": ["facts", "quotes", "word_order"],
    "max_queries": {"facts": 3},
    "dtype": "float64",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("INFLUENCE_ARTIFACTS", str(tmp_path_factory.mktemp("artifacts")))
    suite = load_suite("smoke", sizes=TINY, train=TRAIN, progress=False)
    sc = IS.study_scores(suite, "smoke", progress=False, **STAGE)
    yield suite, sc
    mp.undo()


@pytest.fixture
def env(built, monkeypatch):
    # The module fixture's artifacts root stays in force for every test.
    return built


def test_scores_match_the_library_and_layers_sum_to_total(env):
    suite, sc = env
    n_facts = len(suite.corpus.queries["facts"])
    assert sc.counts() == {
        "facts": {"scored": 3, "available": n_facts},
        "quotes": {"scored": 3, "available": 3},
        "word_order": {"scored": 3, "available": 3},
    }
    assert not sc.timings.loc["t", "cached"]
    assert (sc.timings[["fit_s", "score_s", "fit_cpu_s", "score_cpu_s"]] > 0).all(axis=None)
    model = suite.models["t"].double()
    task = inf.LanguageModelingTask(modules="mlp")
    train = train_dataset(suite, suite.corpus)
    est = inf.EKFAC().fit(model, task, train, progress=False, seed=0)
    q = query_dataset(suite.tokenizer, suite.corpus.queries["facts"].select(sc.selected["facts"]))
    ref = inf.pairwise_scores(model, task, est, q, train, progress=False)
    suite.models["t"].float()
    s = sc.scores("t", "facts")
    assert s.shape == (3, len(suite.corpus.train)) and s.dtype == torch.float64
    # Same model, data and seed: only the query padding length differs (all sets share one
    # query dataset in the stage), which changes nothing but summation order.
    torch.testing.assert_close(s, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    layers = sc.by_layer("t", "facts")
    assert list(layers) == sc.layers["t"] and len(layers) == 3  # gate, up, down
    torch.testing.assert_close(sum(layers.values()), s, rtol=1e-12, atol=1e-12)
    one = sc.layers["t"][:1]
    torch.testing.assert_close(sc.scores("t", "facts", layers=one), layers[one[0]])
    torch.testing.assert_close(sc.per_copy("t", "facts"), s / len(suite.corpus.train))


def test_candidates_are_scored_as_if_they_were_training_sequences(env):
    suite, sc = env
    assert sc.candidate_sets == ["word_order"]
    cands = suite.corpus.candidates["word_order"]
    s = sc.candidate_scores("t", "word_order")
    assert s.shape == (3, len(cands)) and s.dtype == torch.float64
    model = suite.models["t"].double()
    task = inf.LanguageModelingTask(modules="mlp")
    train = train_dataset(suite, suite.corpus)
    est = inf.EKFAC().fit(model, task, train, progress=False, seed=0)  # the real training set
    q = query_dataset(suite.tokenizer, sc.queries("word_order"))
    cand = sequence_dataset(suite.tokenizer, cands["text"], suite.seq_len)
    # A candidate's score is the score it would get as one more training sequence: score the
    # training set with the candidates appended, and read the appended columns.
    both = {
        k: torch.cat([train[:][k], cand[:][k]]) for k in ("input_ids", "attention_mask", "labels")
    }
    ref = inf.pairwise_scores(model, task, est, q, both, progress=False)
    suite.models["t"].float()
    n = len(suite.corpus.train)
    torch.testing.assert_close(s, ref[:, n:], rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    torch.testing.assert_close(
        sc.scores("t", "word_order"), ref[:, :n], rtol=1e-9, atol=1e-9 * ref.abs().max().item()
    )
    layers = sc.layers["t"]
    torch.testing.assert_close(
        sum(sc.candidate_scores("t", "word_order", layers=[n_]) for n_ in layers), s
    )
    torch.testing.assert_close(sc.candidate_per_copy("t", "word_order"), s / n)
    frame = sc.candidate_frame("word_order")
    assert frame["id"].tolist() == list(range(len(cands))) and set(frame["kind"]) == {"word_order"}
    assert (frame["fact_id"].isin(sc.queries("word_order")["fact_id"])).all()
    with pytest.raises(ValueError, match="valid candidate sets: word_order"):
        sc.candidate_scores("t", "poems")


def test_query_sampling_is_seeded_and_sorted(env):
    suite, sc = env
    cfg = IS.stage_config(suite, "smoke", **STAGE)
    again = IS.select_queries(suite, cfg)
    assert again == sc.selected
    assert sc.selected["facts"] == sorted(sc.selected["facts"])
    other = IS.select_queries(suite, {**cfg, "sample_seed": 1})
    assert other["facts"] != sc.selected["facts"]
    qf = sc.queries("facts")
    assert qf["row"].tolist() == sc.selected["facts"]
    assert (
        qf["prompt"].tolist()
        == suite.corpus.queries["facts"].select(sc.selected["facts"])["prompt"]
    )


def test_cache_hit_loads_identical_tensors_without_rebuilding(env, monkeypatch):
    suite, sc = env

    def boom(*a, **k):
        raise AssertionError("rebuilt a valid cache entry")

    monkeypatch.setattr(IS, "_build", boom)
    again = IS.study_scores(suite, "smoke", progress=False, **STAGE)
    assert bool(again.timings.loc["t", "cached"])
    assert again.paths == sc.paths
    for qs in STAGE["query_sets"]:
        assert torch.equal(again.scores("t", qs), sc.scores("t", qs))
        for n, v in again.by_layer("t", qs).items():
            assert torch.equal(v, sc.by_layer("t", qs)[n])


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_damaged_entry_is_rebuilt_never_used(env, monkeypatch, damage):
    suite, sc = env
    before = sc.scores("t", "facts").clone()
    path = sc.paths["t"] / "scores.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        path.unlink()
    else:  # same size, one byte changed: only the sha256 notices
        i = len(data) - 5
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    calls = []
    real = IS._build
    monkeypatch.setattr(IS, "_build", lambda *a, **k: (calls.append(1), real(*a, **k)))
    again = IS.study_scores(suite, "smoke", progress=False, **STAGE)
    assert calls == [1] and not bool(again.timings.loc["t", "cached"])
    assert IS._valid(again.paths["t"])
    # Deterministic on CPU: the rebuilt entry holds the same scores.
    torch.testing.assert_close(again.scores("t", "facts"), before, rtol=0, atol=0)
    # Tensors already loaded are copies: damaging and rebuilding the files left them intact.
    torch.testing.assert_close(sc.scores("t", "facts"), before, rtol=0, atol=0)


def test_top_k_frame(env):
    suite, sc = env
    k = 4
    df = sc.top_k("t", "quotes", k=k)
    for col in ("query", "rank", "train_id", "score", "per_copy", "related", "text"):
        assert col in df.columns
    for col in IS.LABEL_COLUMNS:
        assert col in df.columns
    s = sc.scores("t", "quotes")
    val, idx = torch.topk(s, k, dim=1)
    assert len(df) == s.shape[0] * k
    assert df["train_id"].tolist() == idx.reshape(-1).tolist()
    assert df["score"].tolist() == val.reshape(-1).tolist()
    assert df["rank"].tolist() == list(range(1, k + 1)) * s.shape[0]
    assert (df["per_copy"] == df["score"] / len(suite.corpus.train)).all()
    train = suite.corpus.train
    related = sc.queries("quotes")["related_ids"]
    for r in df.itertuples():
        assert r.text == train[r.train_id]["text"] and r.kind == train[r.train_id]["kind"]
        assert r.related == (r.train_id in set(related.iloc[r.query]))
    with pytest.raises(ValueError, match="k must be"):
        sc.top_k("t", "quotes", k=0)


def test_unknown_names_fail_at_once_listing_valid_ones(env):
    suite, sc = env
    with pytest.raises(ValueError, match=r"unknown model size \['xl'\].*valid model sizes: t"):
        IS.study_scores(suite, "smoke", progress=False, sizes=["xl"])
    with pytest.raises(ValueError, match="unknown query set") as err:
        IS.study_scores(suite, "smoke", progress=False, query_sets=["poems"])
    for name in QUERY_SETS:
        assert name in str(err.value)
    # A group of settings is merged key by key: an unknown key names the valid ones.
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['poem'\].*max_queries.*facts"):
        IS.study_scores(suite, "smoke", progress=False, max_queries={"poem": 2})
    with pytest.raises(ValueError, match="valid model sizes: t"):
        sc.scores("xl", "facts")
    with pytest.raises(ValueError, match="valid query sets: facts, quotes, word_order"):
        sc.top_k("t", "math")
    with pytest.raises(ValueError, match="unknown layer"):
        sc.scores("t", "facts", layers=["nope"])
    with pytest.raises(ValueError, match="unknown parameter"):
        IS.study_scores(suite, "smoke", progress=False, rank=3)


def test_fitted_estimator_and_self_influence_come_from_the_stage(env, monkeypatch):
    """`estimator(size)` loads the stage's EK-FAC (scores equal the stage's); the stage's
    model copy leaves the suite's model as it was; `self_influence` is the diagonal of the
    training set scored against itself, cached."""
    suite, sc = env
    net, est = sc.model("t"), sc.estimator("t")
    assert next(net.parameters()).dtype == torch.float64  # the stage's dtype
    assert next(suite.models["t"].parameters()).dtype == torch.float32  # suite untouched
    q = query_dataset(suite.tokenizer, suite.corpus.queries["facts"].select(sc.selected["facts"]))
    train = train_dataset(suite, suite.corpus)
    again = inf.pairwise_scores(net, sc.task, est, q, train, progress=False)
    ref = sc.scores("t", "facts")
    torch.testing.assert_close(again, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    si = sc.self_influence("t")
    assert si.shape == (len(suite.corpus.train),) and (si > 0).all()
    first = train.select(range(5))
    diag = inf.pairwise_scores(net, sc.task, est, first, first, progress=False).diagonal()
    torch.testing.assert_close(si[:5], diag, rtol=1e-9, atol=1e-12)

    def boom(*a, **k):
        raise AssertionError("recomputed a cached self-influence")

    monkeypatch.setattr(inf, "self_scores", boom)
    assert torch.equal(sc.self_influence("t"), si)
    with pytest.raises(ValueError, match=r"unknown model size \['xl'\]"):
        sc.estimator("xl")


def test_two_workers_give_the_same_entries_as_one(tmp_path, monkeypatch):
    """Models fitted and scored in spawned processes: the same files, bit for bit."""
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path / "one"))
    sizes = [TINY[0], {**TINY[0], "name": "u", "hidden": 24, "intermediate": 48}]
    suite = load_suite("smoke", sizes=sizes, train=TRAIN, progress=False)
    one = IS.study_scores(suite, "smoke", progress=False, workers=1, **STAGE)
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path / "two"))
    two = IS.study_scores(suite, "smoke", progress=False, workers=2, **STAGE)
    assert not two.timings["cached"].any() and list(two.models) == ["t", "u"]
    for name in ("t", "u"):
        assert two.paths[name] != one.paths[name]
        assert two.paths[name].name == one.paths[name].name  # the key ignores `workers`
        for f in ("scores.safetensors", "ekfac.safetensors"):
            # tensors and metadata, not bytes: safetensors writes metadata keys in hash order
            (a, meta_a), (b, meta_b) = (load_safetensors(s.paths[name] / f) for s in (one, two))
            assert meta_a == meta_b and a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
    # self-influence of both models in two spawned processes: the same values as one by one
    both = two.self_influences(workers=2)  # the artifacts folder is still "two"
    assert torch.equal(two.self_influences(["u"], workers=2)["u"], both["u"])  # cached
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path / "one"))
    serial = {name: one.self_influence(name) for name in ("t", "u")}
    assert list(both) == ["t", "u"] and all(torch.equal(both[m], serial[m]) for m in serial)
    with pytest.raises(ValueError, match="workers"):
        IS.study_scores(suite, "smoke", progress=False, workers=0, **STAGE)
    with pytest.raises(ValueError, match="workers"):
        two.self_influences(workers=0)
    with pytest.raises(ValueError, match=r"unknown model size \['xl'\]"):
        two.self_influences(["xl"])
