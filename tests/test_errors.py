"""Bad input fails at once with a message that says what to change."""

from __future__ import annotations

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
    # The NaN reaches every layer's output gradient; the first layer checked is named.
    with pytest.raises(FloatingPointError, match="NaN or Inf in covariance S of layer '0'"):
        inf.KFAC().fit(model, task, data, progress=False)
    with pytest.raises(FloatingPointError, match=r"NaN or Inf .*'0::diagonal' \(layer '0'\)"):
        inf.Diagonal().fit(model, task, data, progress=False)


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
