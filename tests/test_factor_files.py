"""Factor files are validated whole at load: damaged or rewritten files raise, naming why.

A file with flipped bytes in its tensors used to load and score silently; one missing a
tensor, or with its estimator field rewritten, failed only at first use with a KeyError; bad
metadata gave a raw JSONDecodeError. Each now raises a ValueError at `load` that says what is
wrong, and a loaded EK-FAC gives K-FAC (`KFAC.from_ekfac`) as a fitted one does.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from brute_force import classification_data, fitted, tiny_mlp
from safetensors.torch import load_file, safe_open, save_file

import influence as inf

TASK = inf.ClassificationTask()


@pytest.fixture
def saved(tmp_path):
    model, data = tiny_mlp(), classification_data(12)
    est = fitted(inf.EKFAC, model, TASK, data)
    path = tmp_path / "factors.safetensors"
    est.save(path)
    return model, data, est, path


def _rewrite(path, tensors=None, meta=None, raw=None):
    """Write the file again with other tensors and/or metadata (keeping its checksum)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path)) if tensors is None else tensors
    if meta is not None:
        metadata["influence"] = json.dumps(meta)
    if raw is not None:
        metadata["influence"] = raw
    save_file(tensors, str(path), metadata)


def _meta(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["influence"])


def test_flipped_bytes_in_the_tensors_are_detected(saved):
    model, _, _, path = saved
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 0xFF  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="do not match the checksum saved with them"):
        inf.EKFAC.load(path, model, TASK)


def test_a_missing_tensor_is_named_at_load(saved):
    model, _, _, path = saved
    tensors = load_file(str(path))
    del tensors["2::lambda"]
    _rewrite(path, tensors=tensors)
    with pytest.raises(ValueError, match=r"not a complete EKFAC.*missing tensors \['2::lambda'\]"):
        inf.EKFAC.load(path, model, TASK)


def test_a_rewritten_estimator_field_is_named_at_load(saved):
    model, _, _, path = saved
    _rewrite(path, meta={**_meta(path), "estimator": "KFAC"})
    with pytest.raises(ValueError, match=r"not a complete KFAC.*does not have \['0::lambda'"):
        inf.KFAC.load(path, model, TASK)
    with pytest.raises(ValueError, match=r"holds a KFAC, not a EKFAC: load it with inf.KFAC"):
        inf.EKFAC.load(path, model, TASK)


def test_a_rewritten_damping_is_caught_by_the_checksum(saved):
    model, _, _, path = saved
    meta = _meta(path)
    meta["damping_"]["0"] *= 10
    _rewrite(path, meta=meta)
    with pytest.raises(ValueError, match="tensors or metadata do not match the checksum"):
        inf.EKFAC.load(path, model, TASK)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("{not json", r"metadata is not valid JSON"),
        ("[1, 2]", r"metadata is a list, not an object"),
        (json.dumps({"estimator": "EKFAC"}), r"metadata has no 'config' field"),
    ],
)
def test_invalid_metadata_is_named(saved, raw, match):
    model, _, _, path = saved
    _rewrite(path, raw=raw)
    with pytest.raises(ValueError, match=match):
        inf.EKFAC.load(path, model, TASK)


def test_a_truncated_file_is_named(saved):
    model, _, _, path = saved
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read .* as a safetensors file"):
        inf.EKFAC.load(path, model, TASK)


def test_kfac_from_a_loaded_ekfac_equals_kfac_from_the_fitted_one(saved):
    model, data, est, path = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksummed file of this model: no warning
        loaded = inf.EKFAC.load(path, model, TASK)
    a, b = inf.KFAC.from_ekfac(est), inf.KFAC.from_ekfac(loaded)
    assert a.damping_ == b.damping_
    kw = {"progress": False}
    assert torch.equal(
        inf.pairwise_scores(model, TASK, a, data, data, **kw),
        inf.pairwise_scores(model, TASK, b, data, data, **kw),
    )


def test_a_file_without_a_checksum_loads_with_a_warning(saved):
    """Files written before checksums (with one number of tokens for every layer)."""
    model, data, est, path = saved
    with safe_open(str(path), framework="pt") as f:
        metadata = {"influence": f.metadata()["influence"]}
    meta = json.loads(metadata["influence"])
    meta["meta_"]["mean_tokens"] = 1.0
    save_file(load_file(str(path)), str(path), {"influence": json.dumps(meta)})
    with pytest.warns(UserWarning, match="before factor files carried a checksum"):
        loaded = inf.EKFAC.load(path, model, TASK)
    assert loaded.mean_tokens("0") == 1.0
    kfac = inf.KFAC.from_ekfac(loaded)
    assert torch.equal(kfac.eigenvalues("2"), inf.KFAC.from_ekfac(est).eigenvalues("2"))
