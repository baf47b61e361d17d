"""Where the study keeps what it generates, keyed by a hash of the configuration that made it.

`artifacts/` (git-ignored; `INFLUENCE_ARTIFACTS` overrides it) holds corpora, models,
fitted factors, scores and retrains. Every entry is written atomically: it is built in a
temporary folder and renamed into place, so an interrupted run never leaves a half entry
that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def artifacts_root() -> Path:
    return Path(os.environ.get("INFLUENCE_ARTIFACTS", REPO_ROOT / "artifacts"))


def config_hash(config: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable configuration."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def entry_dir(kind: str, config: Any) -> Path:
    """Folder of the artifact of `kind` made from `config` (may not exist yet)."""
    return artifacts_root() / kind / config_hash(config)


@contextmanager
def building(path: Path) -> Iterator[Path]:
    """Build an entry in a temporary sibling folder; rename it to `path` on success.

    Usage: `with building(entry) as tmp: write files into tmp`. If `path` appeared meanwhile
    (another process finished first), the fresh copy is discarded.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, path)
        except OSError:
            if not is_complete(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(path: Path) -> bool:
    """An entry is usable only if it was renamed into place after a complete build."""
    return (path / ".complete").is_file()
