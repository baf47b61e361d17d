"""The files of a gradient index: raw row-major shards, their records, and the manifest.

A folder holds `manifest.json` (written last: a folder without it is an unfinished build),
`estimator.safetensors` and `projections.safetensors`, and shards `shard-NNNNN.bin`, each the
[rows, D] array of consecutive training examples (in the caller's order) in the index's dtype,
with no header, so that `numpy.memmap` or `torch.from_file` map it directly. Each shard has a
record `shard-NNNNN.json` (its examples, bytes, sha256 and the build's key), written before
the shard is renamed into place: a shard whose file exists with its recorded size is complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path, atomic_write_json

MANIFEST = "manifest.json"
ESTIMATOR = "estimator.safetensors"
PROJECTIONS = "projections.safetensors"
FORMAT = "influence.GradientIndex"
VERSION = 1
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_CHUNK = 16 * 2**20  # bytes hashed and written at a time


def dtype_name(dtype: Any) -> str:
    for name, d in DTYPES.items():
        if dtype == d or dtype == name:
            return name
    raise ValueError(
        f"dtype must be one of {list(DTYPES)} (a torch dtype or its name), got {dtype!r}"
    )


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.bin"


def record_file(k: int) -> str:
    return f"shard-{k:05d}.json"


def _bytes_view(rows: torch.Tensor) -> memoryview:
    # A uint8 view shares the tensor's memory (bfloat16 has no numpy dtype): no copy.
    return memoryview(rows.contiguous().view(torch.uint8).numpy()).cast("B")


def write_shard(folder: Path, k: int, rows: torch.Tensor, record: dict[str, Any]) -> dict:
    """Write shard `k` (a CPU tensor [rows, D]) atomically; its record, with the shard's bytes
    and sha256 added, is written before the shard is renamed into place. Returns the record."""
    data = _bytes_view(rows)
    digest = hashlib.sha256()
    with atomic_path(folder / shard_file(k)) as tmp:
        with open(tmp, "wb") as f:
            for start in range(0, len(data), _CHUNK):
                chunk = data[start : start + _CHUNK]
                f.write(chunk)
                digest.update(chunk)
        record = {**record, "file": shard_file(k), "bytes": len(data), "sha256": digest.hexdigest()}
        atomic_write_json(folder / record_file(k), record)
    return record


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_record(folder: Path, k: int) -> dict[str, Any] | None:
    path = folder / record_file(k)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record: the shard is built again


def complete_shard(folder: Path, k: int, key: str) -> dict[str, Any] | None:
    """The record of shard `k` when its file is whole and belongs to the build `key` (size and
    checksum checked); None when the shard must be built (again)."""
    record = read_record(folder, k)
    path = folder / shard_file(k)
    if record is None or record.get("key") != key or not path.exists():
        return None
    if path.stat().st_size != record["bytes"] or file_sha256(path) != record["sha256"]:
        return None
    return record


def check_shard(folder: Path, shard: dict[str, Any], verify: bool) -> None:
    """Raise, naming the shard, when it is missing, has another size than the manifest
    records, or (with `verify`) another checksum."""
    path = folder / shard["file"]
    fix = (
        "Build the index again with the same arguments: GradientIndex.build rebuilds damaged "
        "shards and keeps the intact ones."
    )
    if not path.exists():
        raise FileNotFoundError(f"index {folder}: shard {shard['file']} is missing. {fix}")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise ValueError(
            f"index {folder}: shard {shard['file']} has {size} bytes, the manifest records "
            f"{shard['bytes']} (truncated or overwritten). {fix}"
        )
    if verify and file_sha256(path) != shard["sha256"]:
        raise ValueError(
            f"index {folder}: shard {shard['file']} does not match its recorded checksum "
            f"(modified or corrupted). {fix}"
        )


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.exists():
        partial = any(folder.glob("shard-*.json")) if folder.is_dir() else False
        raise FileNotFoundError(
            f"no gradient index at {folder}: "
            + (
                "it holds an unfinished build (shards without a manifest); run "
                "GradientIndex.build again with the same arguments to finish it"
                if partial
                else "build one with influence.GradientIndex.build"
            )
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the index manifest {path} ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path} is not a version-{VERSION} influence.GradientIndex manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
        )
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(folder / MANIFEST, manifest)


def iter_blocks(
    folder: Path, shards: list[dict[str, Any]], row_bytes: int, dtype: torch.dtype, cap: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first example, rows [r, D]) of every shard in blocks of at most `cap` bytes,
    read into one reused buffer: at most one block is held, whatever the index's size."""
    width = row_bytes // torch.empty((), dtype=dtype).element_size()
    per_block = max(1, cap // row_bytes)
    buffer = torch.empty(
        min(per_block, max(s["stop"] - s["start"] for s in shards)), width, dtype=dtype
    )
    raw = buffer.view(torch.uint8).numpy()
    for shard in shards:
        with open(folder / shard["file"], "rb", buffering=0) as f:
            for start in range(shard["start"], shard["stop"], len(buffer)):
                rows = min(len(buffer), shard["stop"] - start)
                view = raw[:rows].reshape(-1)
                if f.readinto(view) != view.nbytes:
                    raise ValueError(
                        f"index {folder}: shard {shard['file']} ended early (truncated while "
                        "being read)"
                    )
                yield start, buffer[:rows]
