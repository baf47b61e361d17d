"""Bad input fails at once with a message that says what to change."""

from __future__ import annotations

import warnings

import pytest
import torch
from brute_force import classification_data, fitted, lm_data, tiny_llama, tiny_mlp
from torch import nn

import influence as inf


def test_model_without_trackable_layers():
    model = nn.Sequential(nn.Embedding(10, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no trackable layers"):
        inf.EKFAC().fit(
            model, inf.ClassificationTask(), (torch.zeros(3, dtype=torch.long), torch.zeros(3))
        )


def test_unknown_module_selector_and_missing_names():
    with pytest.raises(ValueError, match="unknown module selector 'attention'"):
        inf.find_layers(tiny_mlp(), "attention")
    with pytest.raises(ValueError, match=r"not in the model.*valid names"):
        inf.find_layers(tiny_mlp(), ["5"])
    with pytest.raises(ValueError, match="no trackable layers.*modules='mlp'"):
        inf.find_layers(tiny_mlp(), "mlp")  # a plain Sequential has no 'mlp' in its names


@pytest.mark.parametrize("damping", ["big", -1.0, float("nan"), {"0": -2.0}])
def test_unknown_or_invalid_damping(damping):
    with pytest.raises(ValueError, match="damping"):
        inf.EKFAC(damping=damping)


def test_damping_dict_must_cover_every_layer():
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(10)
    with pytest.raises(ValueError, match="no entry for layer '2'"):
        inf.KFAC(damping={"0": 0.1}).fit(model, task, data, progress=False)


def test_factors_loaded_into_another_model(tmp_path):
    task, data = inf.ClassificationTask(), classification_data(10)
    est = fitted(inf.EKFAC, tiny_mlp(), task, data)
    est.save(tmp_path / "f.safetensors")
    wider = tiny_mlp(hidden=7)
    with pytest.raises(ValueError, match=r"other layer shapes: 0: fitted \(6, 5\), model \(7, 5\)"):
        inf.EKFAC.load(tmp_path / "f.safetensors", wider, task)
    with pytest.raises(ValueError, match="holds a EKFAC, not a KFAC"):
        inf.KFAC.load(tmp_path / "f.safetensors", tiny_mlp(), task)


def test_scoring_with_factors_of_another_model():
    task, data = inf.ClassificationTask(), classification_data(10)
    est = fitted(inf.KFAC, tiny_mlp(), task, data)
    with pytest.raises(ValueError, match="other layer shapes"):
        inf.pairwise_scores(tiny_mlp(hidden=5), task, est, data, data, progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        inf.pairwise_scores(tiny_mlp(), task, inf.EKFAC(), data, data, progress=False)


def test_nan_in_covariance_names_the_layer():
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(10)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    # The weights are checked before any pass: the layer holding the NaN is named.
    for est in (inf.KFAC(), inf.Diagonal(), inf.EKFAC(), inf.Identity(), inf.CG(damping=0.1)):
        with pytest.raises(FloatingPointError, match="NaN or Inf in the weight of layer '2'"):
            est.fit(model, task, data, progress=False)


def test_query_and_training_data_of_different_kinds():
    model, task = tiny_llama(), inf.LanguageModelingTask()
    data = lm_data(6)
    est = fitted(inf.Identity, model, task, data)
    with pytest.raises(TypeError, match="expects dict batches with 'input_ids'"):
        inf.pairwise_scores(model, task, est, classification_data(3), data, progress=False)
    mlp, ctask = tiny_mlp(), inf.ClassificationTask()
    est = fitted(inf.Identity, mlp, ctask, classification_data(5))
    # ClassificationTask also takes dict batches with labels: the kinds must still agree.
    with pytest.raises(TypeError, match=r"different kinds \(tuple vs dict"):
        inf.pairwise_scores(mlp, ctask, est, classification_data(3), data, progress=False)


def test_bad_rank_and_batch_size():
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(10)
    est = fitted(inf.Identity, model, task, data)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        inf.pairwise_scores(model, task, est, data, data, rank=0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        inf.pairwise_scores(model, task, est, data, data, batch_size=0, progress=False)


def test_unsupported_data_type():
    model, task = tiny_mlp(), inf.ClassificationTask()
    with pytest.raises(TypeError, match="cannot iterate data of type int"):
        inf.Diagonal().fit(model, task, 5, progress=False)


def test_saved_scores_round_trip_atomically(tmp_path):
    s = torch.randn(3, 4)
    inf.save_scores(tmp_path / "s.safetensors", s, estimator="ekfac", n=4)
    loaded, meta = inf.load_scores(tmp_path / "s.safetensors")
    assert torch.equal(loaded, s) and meta == {"estimator": "ekfac", "n": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


# -- argument validation ------------------------------------------------------------------------


def _setting():
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(10)
    return model, task, data, fitted(inf.Identity, model, task, data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": None}, r"batch_size must be a positive integer, got None"),
        ({"batch_size": 2.5}, r"batch_size must be a positive integer, got 2\.5"),
        ({"query_batch_size": -2}, r"query_batch_size must be a positive integer or None"),
        ({"query_batch_size": 0}, r"query_batch_size must be a positive integer or None"),
        ({"rank": 1.5}, r"rank must be a positive integer or None, got 1\.5"),
        ({"rank": "4"}, r"rank must be a positive integer or None, got '4'"),
        ({"rank": True}, r"rank must be a positive integer"),
        ({"by_layer": "yes"}, r"by_layer must be True or False"),
        ({"device": "gpu"}, r"device must be None, 'cpu'"),
        ({"device": "meta"}, r"device='meta' is refused"),
    ],
)
def test_scoring_arguments_are_validated(kwargs, match):
    model, task, data, est = _setting()
    with pytest.raises(ValueError, match=match):
        inf.pairwise_scores(model, task, est, data, data, progress=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": None}, "batch_size must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"device": "meta"}, "device='meta' is refused"),
        ({"progress": None}, "progress must be True or False"),
    ],
)
def test_fit_arguments_are_validated(kwargs, match):
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(10)
    with pytest.raises(ValueError, match=match):
        inf.EKFAC().fit(model, task, data, **kwargs)


def test_task_given_as_a_string():
    model, _, data, est = _setting()
    with pytest.raises(TypeError, match=r"task must be an influence.Task, got str \(a task is"):
        inf.EKFAC().fit(model, "classification", data)
    with pytest.raises(TypeError, match="task must be an influence.Task"):
        inf.pairwise_scores(model, "classification", est, data, data)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        inf.pairwise_scores("model", inf.ClassificationTask(), est, data, data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": 0}, "tol must be a positive finite number"),
        ({"max_iter": 2.5}, "max_iter must be a positive integer"),
        ({"strict": "no"}, "strict must be True or False"),
    ],
)
def test_cg_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inf.CG(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": -1.0}, "scale must be a positive finite number"),
        ({"scale": "big"}, "scale must be 'auto' or a positive number"),
        ({"depth": "10"}, "depth must be a positive integer"),
        ({"repeats": 0}, "repeats must be a positive integer"),
        ({"batch_size": None}, "batch_size must be a positive integer"),
    ],
)
def test_lissa_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inf.LiSSA(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"tol": -1.0}, "tol must be a positive finite number"),
        ({"batch_size": None}, "batch_size must be a positive integer"),
        ({"device": "meta"}, "device='meta' is refused"),
        ({"strict": 1}, "strict must be True or False"),
    ],
)
def test_pbrf_arguments(kwargs, match):
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(6)
    with pytest.raises(ValueError, match=match):
        inf.pbrf_scores(model, task, data, data, [0], damping=0.1, progress=False, **kwargs)


def test_token_ids_beyond_the_vocabulary_and_too_long_sequences():
    model, task = tiny_llama(), inf.LanguageModelingTask()
    data = lm_data(6)
    est = fitted(inf.Identity, model, task, data)
    bad = {k: v.clone() for k, v in data.items()}
    bad["input_ids"][3, 2] = 13  # VOCAB is 13
    with pytest.raises(ValueError, match=r"training examples \[3\] are outside the .*\[0, 13\)"):
        inf.pairwise_scores(model, task, est, data, bad, progress=False)
    with pytest.raises(ValueError, match=r"queries \[3\] are outside"):
        inf.pairwise_scores(model, task, est, bad, data, progress=False)
    bad = {k: v.clone() for k, v in data.items()}
    bad["labels"][2, 4] = -5
    with pytest.raises(ValueError, match=r"labels of training examples \[2\] are outside"):
        inf.EKFAC().fit(model, task, bad, progress=False)
    long = lm_data(2, seq=40)  # the model has 32 positions
    with pytest.raises(ValueError, match="40 tokens, more than the model's 32 positions"):
        inf.EKFAC().fit(model, task, long, progress=False)


def test_meta_device_leaves_the_model_untouched():
    model, task, data, est = _setting()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="meta"):
        inf.pairwise_scores(model, task, est, data, data, device="meta", progress=False)
    with pytest.raises(ValueError, match="meta"):
        inf.EKFAC().fit(model, task, data, device="meta", progress=False)
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].device.type == "cpu" and torch.equal(after[k], v), k


def test_failed_call_leaves_the_model_as_it_was():
    model, task, data, est = _setting()
    model.train()
    model[0].weight.requires_grad_(False)
    x, y = data
    x = x.clone()
    x[8, 0] = float("nan")  # fails in the third batch, mid-pass
    with pytest.raises(FloatingPointError, match="training example 8"):
        inf.pairwise_scores(model, task, est, data, (x, y), batch_size=3, progress=False)
    with pytest.raises(FloatingPointError, match="training example 8"):
        (kfac := inf.KFAC()).fit(model, task, (x, y), batch_size=3, progress=False)
    with pytest.raises(RuntimeError, match="KFAC is not fitted"):  # not half-fitted
        inf.pairwise_scores(model, task, kfac, data, data, progress=False)
    assert model.training and all(m.training for m in model.modules())
    flags = [p.requires_grad for p in model.parameters()]
    assert flags == [False, True, True, True]


def test_factors_know_their_weights(tmp_path):
    task, data = inf.ClassificationTask(), classification_data(10)
    model = tiny_mlp()
    est = fitted(inf.EKFAC, model, task, data)
    path = tmp_path / "f.safetensors"
    est.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inf.EKFAC.load(path, model, task, strict=True)  # same weights: silent
        inf.EKFAC.load(path, tiny_mlp().float(), task, strict=True)  # fingerprint in float32
    other = tiny_mlp(seed=1)  # same architecture, other weights
    with pytest.warns(UserWarning, match="fitted on other weights than this model"):
        inf.EKFAC.load(path, other, task)
    with pytest.raises(ValueError, match="fitted on other weights"):
        inf.EKFAC.load(path, other, task, strict=True)
    flipped = tiny_mlp()
    with torch.no_grad():
        flipped[2].weight.neg_()  # the cache report's sign-flipped weights
    with pytest.raises(ValueError, match="fitted on other weights"):
        inf.EKFAC.load(path, flipped, task, strict=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_failed_call_on_another_device_moves_the_model_back():
    model, task, data, est = _setting()
    x, y = data
    x = x.clone()
    x[8, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="training example 8"):
        inf.pairwise_scores(model, task, est, data, (x, y), device="cuda", progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_pbrf_refuses_nan_weights():
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(6)
    with torch.no_grad():
        model[0].weight[1, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or Inf in the weight of layer '0'"):
        inf.pbrf_scores(model, task, data, data, [0], damping=0.1, progress=False)


def test_gauss_newton_refuses_the_meta_device():
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(6)
    with pytest.raises(ValueError, match="device='meta' is refused"):
        inf.GaussNewton(model, task, data, device="meta")


def test_other_public_functions_validate_their_arguments(tmp_path):
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(6)
    with pytest.raises(TypeError, match=r"modules=5 is not a valid selector: use None"):
        inf.find_layers(model, 5)
    with pytest.raises(TypeError, match=r"modules must hold module names \(str\); got \[0\]"):
        inf.find_layers(model, [0])
    with pytest.raises(TypeError, match="task must be an influence.Task"):
        inf.per_example_gradients(model, "classification", data)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got None"):
        inf.per_example_gradients(model, task, data, batch_size=None)
    with pytest.raises(ValueError, match="device='meta' is refused"):
        inf.per_example_gradients(model, task, data, device="meta")
    with pytest.raises(TypeError, match="scores must be a tensor or a non-empty dict"):
        inf.save_scores(tmp_path / "s.safetensors", [[1.0]])
    with pytest.raises(ValueError, match=r"num_subsets must be a positive integer, got 2\.5"):
        inf.draw_subsets(10, num_subsets=2.5)
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\), got '0.5'"):
        inf.draw_subsets(10, alpha="0.5")


def test_numpy_damping_is_accepted():
    import numpy as np

    assert inf.EKFAC(damping=np.float32(0.25)).damping == 0.25
    assert inf.CG(damping={"0": np.float64(0.5)}).damping == {"0": 0.5}


# -- raw crashes that are sentences now ------------------------------------------------------


def test_dataset_dict_is_refused_and_a_dict_of_numpy_arrays_accepted():
    import numpy as np
    from datasets import Dataset, DatasetDict

    model, task, data = tiny_llama(), inf.LanguageModelingTask(), lm_data(6)
    splits = DatasetDict({"train": Dataset.from_dict({k: v.tolist() for k, v in data.items()})})
    with pytest.raises(TypeError, match=r"DatasetDict of splits \['train'\]: pass one split"):
        inf.EKFAC().fit(model, task, splits, progress=False)
    as_numpy = {k: v.numpy() for k, v in data.items()}
    a = fitted(inf.EKFAC, model, task, as_numpy)
    b = fitted(inf.EKFAC, model, task, data)
    kw = {"progress": False}
    assert torch.equal(
        inf.pairwise_scores(model, task, a, as_numpy, as_numpy, **kw),
        inf.pairwise_scores(model, task, b, data, data, **kw),
    )
    assert np.array_equal(as_numpy["input_ids"], data["input_ids"].numpy())  # left as given


def test_numpy_integers_are_accepted_where_an_int_is_expected():
    import numpy as np

    model, task, data, est = _setting()
    n = np.int64
    s = inf.pairwise_scores(model, task, est, data, data, batch_size=n(3), rank=n(2), **_QUIET)
    table = inf.top_influences(s, n(2), num_train=n(20))
    assert len(table) == 20 and table["per_copy_linear_estimate"].iloc[0] == s.max(1)[0][0] / 20
    inf.EKFAC().fit(model, task, data, batch_size=n(4), seed=n(2), progress=False)


_QUIET = {"progress": False}


def test_a_meta_device_model_is_refused_and_memory_plan_works_on_meta_bert_and_t5():
    from tests.test_tasks_hf import classifier, cls_batch, s2s_batch, seq2seq

    model, task, data = tiny_mlp().to("meta"), inf.ClassificationTask(), classification_data(6)
    for call in (
        lambda: inf.EKFAC().fit(model, task, data, progress=False),
        lambda: inf.per_example_gradients(model, task, data),
        lambda: inf.GaussNewton(model, task, data),
    ):
        with pytest.raises(ValueError, match=r"on the meta device, which holds shapes but no val"):
            call()
    bert, t5 = classifier("bert").to("meta"), seq2seq("t5").to("meta")
    for meta_model, meta_task, example in (
        (bert, inf.SequenceClassificationTask(), cls_batch()),
        (t5, inf.Seq2SeqLMTask(), s2s_batch()),
    ):
        plan = inf.memory_plan(meta_model, meta_task, num_train=64, num_queries=4, example=example)
        assert plan.peak > 0 and plan.stage("fit: covariances").bytes > 0


def test_a_damping_dict_with_an_unknown_layer_names_it():
    model, task, data = tiny_mlp(), inf.ClassificationTask(), classification_data(10)
    typo = {"0": 0.1, "2": 0.1, "20": 1.0}
    match = r"damping names layers that are not tracked: \['20'\]; the tracked layers are \['0',"
    for est in (inf.EKFAC(damping=typo), inf.Diagonal(damping=typo), inf.CG(damping=typo)):
        with pytest.raises(ValueError, match=match):
            est.fit(model, task, data, progress=False)
    for est in (fitted(inf.EKFAC, model, task, data), inf.CG(damping=0.1).fit(model, task, data)):
        with pytest.raises(ValueError, match=match):
            est.with_damping(typo)
    with pytest.raises(ValueError, match=match):
        inf.pbrf_scores(model, task, data, data, [0], damping=typo, progress=False)


def test_half_precision_overflow_says_what_overflowed():
    model, task = tiny_mlp().half(), inf.ClassificationTask()
    x, y = classification_data(10)
    data = (x.half(), y)
    est = inf.EKFAC(damping=1e-8).fit(model, task, data, progress=False)
    with pytest.raises(FloatingPointError, match=r"overflows torch.float16 \(largest 65504\).*1/λ"):
        inf.pairwise_scores(model, task, est, data, data, progress=False)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"input_ids": torch.tensor([1, 2, 3])}, ValueError, r"integer token ids.*got \[3\]"),
        ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, ValueError, r"got \[2, 0\]"),
        ({"input_ids": torch.rand(2, 3)}, ValueError, r"token ids.*of torch.float32"),
        ([[1, 2, 3], [4, 5]], TypeError, r"examples are lists \(\[1, 2, 3\]\): give token seq"),
    ],
)
def test_malformed_token_data_is_named(data, error, match):
    model, task = tiny_llama(), inf.LanguageModelingTask()
    est = fitted(inf.Identity, model, task, lm_data(6))
    with pytest.raises(error, match=match):
        inf.pairwise_scores(model, task, est, data, lm_data(6), progress=False)


def test_one_example_without_a_batch_dimension_and_lds_indices_out_of_range():
    import numpy as np

    model, task, data, est = _setting()
    x, y = data
    with pytest.raises(ValueError, match=r"shapes \[\[4\], \[\]\].*\(x\[None\], y\[None\]\)"):
        inf.pairwise_scores(model, task, est, (x[0], y[0]), data, progress=False)
    with pytest.raises(ValueError, match=r"subsets\[0\] holds indices outside .*\[100\]"):
        inf.lds(torch.randn(2, 6), [[0, 100]], np.zeros((1, 2)))


def test_per_token_scores_over_layers_that_read_different_positions():
    from tests.test_tasks_hf import classifier, cls_batch

    model, task = classifier("bert"), inf.SequenceClassificationTask()
    batch = cls_batch()
    est = inf.Identity().fit(model, task, batch, progress=False)
    with pytest.raises(ValueError, match=r"by_token=True needs every tracked layer to read the"):
        inf.pairwise_scores(model, task, est, batch, batch, by_token=True, progress=False)
    mlp = inf.SequenceClassificationTask(modules="mlp")  # encoder layers only: one sequence
    est = inf.Identity().fit(model, mlp, batch, progress=False)
    tokens = inf.pairwise_scores(model, mlp, est, batch, batch, by_token=True, progress=False)
    total = inf.pairwise_scores(model, mlp, est, batch, batch, progress=False)
    assert torch.allclose(tokens.sum(-1), total, rtol=1e-10, atol=0)
