"""Atomic writes: a file appears whole or not at all, so a resumed run never reads half a file."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

_UMASK = os.umask(0)
os.umask(_UMASK)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _clean_stale_temporaries(path: Path) -> None:
    """Remove temporary files of `path` left by writers that were killed (their pid is gone)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp$")
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = pattern.match(p.name)
        if m and int(m[1]) != os.getpid() and not _pid_alive(int(m[1])):
            p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path in the target's folder; on success it replaces `path`.
    Temporary files of earlier writers of `path` that were killed are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata
        )


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a file that is not one (truncated, or
    another format) raises a ValueError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(
            f"cannot read {path} as a safetensors file ({type(err).__name__}: {err}): it is "
            "damaged or of another format; write it again"
        ) from None


def tensors_checksum(tensors: dict[str, torch.Tensor], text: str = "") -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes (in name order) and `text`."""
    h = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_scores(
    path: str | Path, scores: torch.Tensor | dict[str, torch.Tensor], **metadata: Any
) -> None:
    """Save a score tensor (or a dict of them, e.g. by layer) atomically, with JSON metadata."""
    tensors = scores if isinstance(scores, dict) else {"scores": scores}
    bad = [k for k, v in tensors.items() if not torch.is_tensor(v)]
    if bad or not tensors:
        raise TypeError(
            "scores must be a tensor or a non-empty dict {name: tensor}; got "
            f"{type(scores).__name__}" + (f" with non-tensor entries {bad[:3]}" if bad else "")
        )
    atomic_save_safetensors(tensors, path, {"influence": json.dumps(metadata, default=str)})


def load_scores(path: str | Path) -> tuple[torch.Tensor | dict[str, torch.Tensor], dict[str, Any]]:
    """Read scores written by `save_scores`: `(scores, metadata)`, the scores a tensor (or the
    dict {name: tensor} that was saved, e.g. by layer) and the metadata the keyword arguments
    of `save_scores` gave, as a dict (JSON types: tuples come back as lists)."""
    tensors, meta = load_safetensors(path)
    try:
        info = json.loads(meta.get("influence", "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its metadata is not valid JSON ({err})") from None
    if set(tensors) == {"scores"}:
        return tensors["scores"], info
    return tensors, info


def weights_fingerprint(modules: dict[str, torch.nn.Module]) -> str:
    """sha256 of the tracked layers' names and weights (as float32, so that a float64 copy of
    float32 weights has the same fingerprint): which weights factors were fitted on."""
    h = hashlib.sha256()
    for name, module in modules.items():
        for pname, p in sorted(module.named_parameters(recurse=False)):
            h.update(f"{name}.{pname}:{tuple(p.shape)};".encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
