"""Where the study keeps what it generates, keyed by a hash of the configuration that made it.

`artifacts/` (git-ignored; `INFLUENCE_ARTIFACTS` overrides it) holds corpora, models,
fitted factors, scores and retrains. Every entry is written atomically: it is built in a
temporary folder and renamed into place, so an interrupted run never leaves a half entry
that a later run would trust.

Every entry also records the sha256 and size of each of its files in its `.complete` marker,
and `verified(path)` (also `is_complete`) checks them before the entry is used: an entry with
a wrong checksum, a missing or extra file, or no marker is moved aside to `<kind>/.broken/`
and reported by name, and the caller rebuilds it. Temporary folders left by killed builds
(their process no longer runs) are removed on the next build or check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER = ".complete"
BROKEN = ".broken"
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[^.]+$")


def artifacts_root() -> Path:
    """The artifacts folder, absolute. A relative `INFLUENCE_ARTIFACTS` is resolved against the
    current folder once and written back to the environment, so that processes started from
    here (notebook kernels, whose working folder is notebooks/) use the same folder."""
    raw = os.environ.get("INFLUENCE_ARTIFACTS")
    if not raw:
        return REPO_ROOT / "artifacts"
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() / path).resolve()
        os.environ["INFLUENCE_ARTIFACTS"] = str(path)
    return path


def config_hash(config: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable configuration."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def entry_dir(kind: str, config: Any) -> Path:
    """Folder of the artifact of `kind` made from `config` (may not exist yet)."""
    return artifacts_root() / kind / config_hash(config)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` except the marker, by relative POSIX path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel != MARKER and not p.is_dir():
            out[rel] = p
    return out


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"sha256", "size"}} of every file of an entry."""
    return {
        rel: {"sha256": file_sha256(p), "size": p.stat().st_size}
        for rel, p in _files(folder).items()
    }


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(parent: Path) -> list[Path]:
    """Remove temporary build folders in `parent` whose building process has died."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _TMP.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        names = ", ".join(p.name for p in removed)
        print(f"[cache] removed temporary folders of killed builds: {names}", file=sys.stderr)
    return removed


@contextmanager
def building(path: Path) -> Iterator[Path]:
    """Build an entry in a temporary sibling folder; rename it to `path` on success.

    Usage: `with building(entry) as tmp: write files into tmp`. The marker written last
    records every file's checksum. If a verified `path` appeared meanwhile (another process
    finished first), the fresh copy is discarded; a broken one is moved aside first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    if path.exists():
        verified(path)  # a broken entry is moved aside, so the rename below can take its place
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        record = {"version": 1, "files": manifest(tmp)}
        (tmp / MARKER).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if not verified(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Entries verified in this process, with the (size, mtime) of each file then: unchanged files
# are not hashed again when several loaders of one process check the same entry.
_VERIFIED: dict[Path, dict[str, tuple[int, int]]] = {}


def _stats(path: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for rel, p in _files(path).items():
        st = p.stat()
        out[rel] = (st.st_size, st.st_mtime_ns)
    st = (path / MARKER).stat()
    out[MARKER] = (st.st_size, st.st_mtime_ns)
    return out


def check_entry(path: Path) -> str | None:
    """Why the entry at `path` cannot be trusted, or None when every checksum matches."""
    if not path.is_dir():
        return "missing"
    marker = path / MARKER
    if not marker.is_file():
        return "no completion marker (an interrupted or foreign build)"
    text = marker.read_text()
    if text.strip() == "ok" and os.environ.get("INFLUENCE_CACHE_ADOPT_LEGACY") == "1":
        # Opt-in migration: trust an entry built before checksums once, and record them now.
        record = {"version": 1, "files": manifest(path), "adopted": True}
        marker.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"[cache] adopted legacy entry {path.parent.name}/{path.name}", file=sys.stderr)
        return None
    try:
        record = json.loads(text)
        expected = record["files"]
    except (ValueError, KeyError, TypeError):
        return (
            "marker without checksums (written by an older version, or damaged; "
            "INFLUENCE_CACHE_ADOPT_LEGACY=1 adopts such entries instead)"
        )
    files = _files(path)
    missing = sorted(set(expected) - set(files))
    extra = sorted(set(files) - set(expected))
    if missing:
        return f"missing files {missing[:3]}"
    if extra:
        return f"leftover files not in its record {extra[:3]}"
    for rel, p in files.items():
        want = expected[rel]
        if p.stat().st_size != want["size"]:
            return f"{rel} has {p.stat().st_size} bytes, {want['size']} recorded (truncated?)"
        if file_sha256(p) != want["sha256"]:
            return f"{rel} does not match its recorded checksum (modified or corrupted)"
    return None


def verified(path: Path) -> bool:
    """True when the entry exists and every file matches its recorded checksum. A present but
    failing entry is moved aside to `<kind>/.broken/` and named on stderr; the caller then
    rebuilds it (returns False)."""
    path = Path(path)
    clean_stale(path.parent)
    if not path.exists():
        return False
    try:
        if _VERIFIED.get(path) == _stats(path):
            return True
    except OSError:
        pass
    reason = check_entry(path)
    if reason is None:
        _VERIFIED[path] = _stats(path)
        return True
    _VERIFIED.pop(path, None)
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}.{time.time_ns() % 10**9:09d}.{os.getpid()}"
    aside = path.parent / BROKEN / f"{path.name}.{stamp}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(path, aside)
        where = f"moved to {aside}"
    except FileNotFoundError:  # another process moved it first
        where = "already moved aside by another process"
    print(
        f"[cache] entry {path.parent.name}/{path.name} failed verification ({reason}): "
        f"{where}; it will be rebuilt",
        file=sys.stderr,
    )
    return False


def is_complete(path: Path) -> bool:
    """An entry is usable only if it was renamed into place after a complete build and its
    files still match their checksums (see `verified`)."""
    return verified(path)


def read_json(path: Path) -> Any:
    """A JSON file of a verified entry, with an error that names it when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"cannot read {path} ({err}): delete {Path(path).parent} and run again"
        ) from None
