"""The study cache verifies what it loads: corrupted, truncated, unmarked, legacy or littered
entries are moved aside (named on stderr) and rebuilt; builds killed mid-write leave nothing
that a later run trusts or trips over; a relative INFLUENCE_ARTIFACTS means one folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from influence.lds import retrain_measurements
from influence.study import cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", str(tmp_path / "artifacts"))
    return tmp_path / "artifacts"


def _build(path: Path, payload: bytes = b"weights" * 100) -> None:
    with cache.building(path) as tmp:
        (tmp / "model.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "log.json").write_text('{"loss": [1.0, 0.5]}')


def _entry(root: Path) -> Path:
    return cache.entry_dir("model", {"size": "t"})


def test_fresh_entry_records_every_file_and_verifies(root):
    path = _entry(root)
    assert not cache.verified(path)
    _build(path)
    record = json.loads((path / cache.MARKER).read_text())
    assert sorted(record["files"]) == ["model.bin", "sub/log.json"]
    assert record["files"]["model.bin"]["size"] == 700
    assert cache.verified(path) and cache.is_complete(path)


def _damage_then_expect_rebuild(path: Path, capsys, reason: str) -> None:
    assert not cache.verified(path)
    err = capsys.readouterr().err
    assert f"entry model/{path.name} failed verification" in err and reason in err, err
    assert not path.exists()
    broken = list((path.parent / cache.BROKEN).iterdir())
    assert len(broken) == 1 and broken[0].name.startswith(path.name)
    _build(path)  # the rebuild takes the entry's place
    assert cache.verified(path)


def test_corrupted_file_same_size_is_moved_aside_and_rebuilt(root, capsys):
    path = _entry(root)
    _build(path)
    assert cache.verified(path)
    data = bytearray((path / "model.bin").read_bytes())
    data[10] ^= 0xFF  # a flipped byte: same size, other content (e.g. sign-flipped weights)
    (path / "model.bin").write_bytes(bytes(data))
    _damage_then_expect_rebuild(path, capsys, "does not match its recorded checksum")


def test_truncated_file_is_moved_aside_and_rebuilt(root, capsys):
    path = _entry(root)
    _build(path)
    with open(path / "model.bin", "r+b") as f:
        f.truncate(100)
    _damage_then_expect_rebuild(path, capsys, "has 100 bytes, 700 recorded (truncated?)")


def test_entry_without_marker_no_longer_blocks_forever(root, capsys):
    path = _entry(root)
    path.mkdir(parents=True)
    (path / "model.bin").write_bytes(b"half")  # what a foreign or interrupted copy leaves
    _damage_then_expect_rebuild(path, capsys, "no completion marker")


def test_legacy_marker_and_leftover_files(root, capsys):
    path = _entry(root)
    _build(path)
    (path / cache.MARKER).write_text("ok\n")  # the old marker had no checksums
    _damage_then_expect_rebuild(path, capsys, "marker without checksums")
    (path / "notes.txt").write_text("left behind")
    assert not cache.verified(path)
    assert "leftover files not in its record ['notes.txt']" in capsys.readouterr().err


def test_build_killed_mid_write_leaves_nothing_trusted_and_is_cleaned(root, tmp_path, capsys):
    path = _entry(root)
    ready = tmp_path / "ready"
    script = f"""
import sys, time
from pathlib import Path
from influence.study import cache
with cache.building(Path({str(path)!r})) as tmp:
    with open(tmp / "model.bin", "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        Path({str(ready)!r}).write_text("1")
        time.sleep(60)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        for _ in range(600):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), "the builder never started writing"
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup handler runs
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.bin").stat().st_size == 4096
    assert not path.exists() and not cache.verified(path)  # nothing half-built is trusted
    assert "removed temporary folders of killed builds" in capsys.readouterr().err
    assert not leftovers[0].exists()
    _build(path)
    assert cache.verified(path)


def test_live_builders_temporary_folder_is_kept(root):
    path = _entry(root)
    path.parent.mkdir(parents=True)
    mine = path.parent / f".{path.name}.tmp-{os.getpid()}-abc"
    mine.mkdir()
    cache.clean_stale(path.parent)
    assert mine.exists()


def test_relative_artifacts_path_is_resolved_once_for_every_process(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INFLUENCE_ARTIFACTS", "rel/artifacts")
    root = cache.artifacts_root()
    assert root == tmp_path / "rel" / "artifacts" and root.is_absolute()
    assert os.environ["INFLUENCE_ARTIFACTS"] == str(root)  # exported for child processes
    # A kernel started in notebooks/ (as papermill does) sees the same folder.
    out = subprocess.run(
        [sys.executable, "-c", "from influence.study import cache; print(cache.artifacts_root())"],
        cwd=tmp_path / "notebooks",
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(root)
    monkeypatch.chdir(tmp_path / "notebooks")
    assert cache.artifacts_root() == root


def test_read_json_names_the_file(tmp_path):
    p = tmp_path / "log.json"
    p.write_text('{"loss": [1.0,')
    with pytest.raises(RuntimeError, match=r"cannot read .*log.json"):
        cache.read_json(p)


def test_lds_retrain_truncated_or_modified_is_retrained(root, capsys):
    calls = []

    def train_fn(idx):
        calls.append(len(idx))
        return float(len(idx))

    def measure_fn(m):
        return torch.tensor([m, 2 * m])

    masks = np.array([[True, False, True], [False, True, True]])
    first = retrain_measurements(train_fn, measure_fn, masks, cache={"r": 1}, progress=False)
    assert len(calls) == 2
    folder = next((root / "lds_retrains").iterdir())
    (folder / "00000.json").write_text('{"subset": 0, "measu')  # truncated
    record = json.loads((folder / "00001.json").read_text())
    record["measurements"][0] = -record["measurements"][0]  # silently modified
    (folder / "00001.json").write_text(json.dumps(record))
    again = retrain_measurements(train_fn, measure_fn, masks, cache={"r": 1}, progress=False)
    assert len(calls) == 4 and np.array_equal(first, again)
    err = capsys.readouterr().err
    assert "00000.json unreadable (JSONDecodeError" in err
    assert "00001.json checksum or subset mismatch" in err
    retrain_measurements(train_fn, measure_fn, masks, cache={"r": 1}, progress=False)
    assert len(calls) == 4  # the rewritten records verify


def test_load_suite_rebuilds_a_model_whose_weights_were_changed(root, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file
    from test_suite import TINY, TRAIN

    from influence.study import suite as S

    s1 = S.load_suite("smoke", sizes=TINY, train=TRAIN, progress=False)
    path = s1.paths["t"]
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: -v for k, v in tensors.items()}, str(weights), {"format": "pt"})  # sign flip
    trained = []
    real_train = S.train_model
    monkeypatch.setattr(S, "train_model", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    s2 = S.load_suite("smoke", sizes=TINY, train=TRAIN, progress=False)
    assert trained == [1]  # rebuilt, not used
    assert f"entry model/{path.name} failed verification" in capsys.readouterr().err
    for (n, a), b in zip(
        s1.models["t"].state_dict().items(), s2.models["t"].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), n  # deterministic training: the same model again


def test_atomic_writes_clean_temporaries_of_killed_writers(tmp_path):
    from influence.io import atomic_write_json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".00003.json.{dead.pid}.abc123.tmp"
    stale.write_text('{"half')
    alive = tmp_path / f".00003.json.{os.getpid()}.xyz.tmp"  # a live writer's: kept
    alive.write_text("{")
    other = tmp_path / f".00004.json.{dead.pid}.abc.tmp"  # another target: left for its writer
    other.write_text("{")
    atomic_write_json(tmp_path / "00003.json", {"ok": 1})
    assert not stale.exists() and alive.exists() and other.exists()
    assert json.loads((tmp_path / "00003.json").read_text()) == {"ok": 1}


def test_legacy_entries_can_be_adopted_on_request(root, monkeypatch, capsys):
    path = _entry(root)
    _build(path)
    (path / cache.MARKER).write_text("ok\n")
    monkeypatch.setenv("INFLUENCE_CACHE_ADOPT_LEGACY", "1")
    assert cache.verified(path)
    assert "adopted legacy entry" in capsys.readouterr().err
    monkeypatch.delenv("INFLUENCE_CACHE_ADOPT_LEGACY")
    cache._VERIFIED.clear()
    assert cache.verified(path)  # checksums recorded: verified from now on
    (path / "model.bin").write_bytes(b"other" * 140)
    assert not cache.verified(path)


def test_legacy_lds_records_can_be_adopted_on_request(root, monkeypatch):
    calls = []

    def train_fn(idx):
        calls.append(1)
        return float(len(idx))

    masks = np.array([[True, False, True], [False, True, True]])
    kw = dict(cache={"r": 2}, progress=False)
    first = retrain_measurements(train_fn, lambda m: torch.tensor([m]), masks, **kw)
    folder = next((root / "lds_retrains").iterdir())
    for f in folder.glob("0*.json"):  # strip the checksums: records of the older format
        rec = json.loads(f.read_text())
        del rec["sha256"]
        f.write_text(json.dumps(rec))
    monkeypatch.setenv("INFLUENCE_CACHE_ADOPT_LEGACY", "1")
    again = retrain_measurements(train_fn, lambda m: torch.tensor([m]), masks, **kw)
    assert len(calls) == 2 and np.array_equal(first, again)  # adopted, not retrained
    assert all("sha256" in json.loads(f.read_text()) for f in folder.glob("0*.json"))
