"""Run bookkeeping of the pipeline: locations, run ids, provenance, the clean-tree rule, the
reports lock, and publishing a notebook's outputs all together or not at all.

Publishing: a notebook's outputs (its report page and JSON, the index, the README's findings
table at the committed preset, and its figures folder) are first written next to their
targets under staged names (`.<name>.<run id>.new`), and a journal `<reports>/.publish.json`
lists them. Only when all are staged does the journal say "commit"; then each staged file is
renamed over its target (a folder: the old one renamed aside first). A run interrupted
before the commit leaves the old outputs and staged leftovers, which the next run deletes
(roll back); one interrupted during the renames is finished by the next run (roll forward):
`recover` runs under the reports lock before anything else.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

from influence.io import atomic_write_json

from .cache import MARKER, REPO_ROOT, artifacts_root
from .run_context import PUBLISHED_PRESETS

PACKAGES = (
    "influence",
    "torch",
    "numpy",
    "safetensors",
    "transformers",
    "datasets",
    "tokenizers",
    "scipy",
    "pandas",
    "scikit-learn",
    "matplotlib",
    "seaborn",
    "powerlaw",
    "bm25s",
    "papermill",
    "jupytext",
    "nbconvert",
    "nbclient",
    "ipykernel",
)
JOURNAL = ".publish.json"


class PipelineError(Exception):
    """A failure the pipeline reports in one message and exits non-zero on."""


# -- locations ---------------------------------------------------------------------------------
def notebooks_dir() -> Path:
    return Path(os.environ.get("INFLUENCE_NOTEBOOKS_DIR", REPO_ROOT / "notebooks"))


def reports_root() -> Path:
    """Committed reports (`reports/`; `INFLUENCE_REPORTS` overrides it)."""
    return Path(os.environ.get("INFLUENCE_REPORTS", REPO_ROOT / "reports"))


def reports_dir(preset: str) -> Path:
    """`reports/` (default), `reports/validation/`, else `artifacts/reports/<preset>/`."""
    if preset in PUBLISHED_PRESETS:
        return reports_root() / PUBLISHED_PRESETS[preset]
    return artifacts_root() / "reports" / preset


def runs_dir(preset: str) -> Path:
    return artifacts_root() / "runs" / preset


def cached_kinds() -> list[str]:
    """The kinds of artifact (`corpus`, `suite`, ...) with at least one complete entry in the
    artifacts folder now; empty for a run that starts from nothing. Run records and rendered
    reports are no cache and are not counted."""
    root = artifacts_root()
    if not root.is_dir():
        return []
    return sorted(
        kind.name
        for kind in root.iterdir()
        if kind.is_dir()
        and kind.name not in {"runs", "reports"}
        and any((entry / MARKER).is_file() for entry in kind.iterdir() if entry.is_dir())
    )


def committed_reports(directory: Path) -> bool:
    """Is `directory` one of the repository's committed report folders?"""
    committed = {(REPO_ROOT / "reports" / sub).resolve() for sub in PUBLISHED_PRESETS.values()}
    return directory.resolve() in committed


def new_run_id() -> str:
    """A run's own id: UTC time to the second and the process id (unique on one machine)."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}"


def display_path(path: Path | str) -> str:
    """Path relative to the repository when inside it (committed files carry no home dirs)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(path)


# -- provenance --------------------------------------------------------------------------------
def git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    # rstrip only: `status --porcelain` lines start with a meaningful space (" M path").
    return out.stdout.rstrip() if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> dict[str, str]:
    """The CPU's model name, family, model and microcode from /proc/cpuinfo (Linux; empty
    elsewhere), a short sha256 of its feature flags, its cache sizes (sysfs), and the vector
    instruction set torch computes with. Trained weights differ between hosts at rounding
    level, and 8 epochs of training amplify it, so a report names its host closely enough to
    tell two hosts with one model name apart."""
    wanted = {
        "model name": "model_name",
        "cpu family": "family",
        "model": "model",
        "microcode": "microcode",
        "flags": "flags",
    }
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in wanted and wanted[key.strip()] not in info:
                info[wanted[key.strip()]] = value.strip()
    except OSError:
        pass
    if "flags" in info:  # ~100 words: a digest is enough to tell two hosts apart
        flags = " ".join(sorted(info.pop("flags").split()))
        info["flags_sha256"] = hashlib.sha256(flags.encode()).hexdigest()[:12]
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip().lower()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        name = f"cache_l{level}" + ("" if kind == "unified" else f"_{kind[0]}")
        info[name] = size
    try:
        import torch

        info["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception as exc:  # noqa: BLE001 - provenance must never fail a run
        info["torch_capability_error"] = repr(exc)
    return info


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "requested": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
    }
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(torch.device(device))
                info["cuda"] = torch.version.cuda
        except Exception as exc:  # noqa: BLE001 - provenance must never fail a run
            info["gpu_error"] = repr(exc)
    return info


# What the pipeline itself writes; changes there do not make a tree dirty for it.
_OWN_OUTPUTS = ("reports/", "figures/", "README.md")


def changed_sources(status: str | None) -> list[str]:
    """Paths of `git status --porcelain` that are not the pipeline's own outputs."""
    return [
        line[3:]
        for line in (status or "").splitlines()
        if line[3:] and not line[3:].startswith(_OWN_OUTPUTS)
    ]


def provenance(device: str) -> dict[str, Any]:
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": git("rev-parse", "HEAD"),
        # The pipeline's own outputs (reports, figures, README table) do not make a run dirty.
        "git_dirty": None if status is None else bool(changed_sources(status)),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_info(device),
        "packages": package_versions(),
    }


def check_clean_tree(status: str | None) -> None:
    """Refuse to write the committed reports from uncommitted code (`git status --porcelain`)."""
    changed = changed_sources(status)
    if changed:
        shown = ", ".join(changed[:5]) + (" …" if len(changed) > 5 else "")
        raise PipelineError(
            f"the committed reports are rendered only from a clean tree at a commit; "
            f"uncommitted changes: {shown}. Commit them, or pass --allow-dirty "
            f"(make reproduce PIPELINE_ARGS=--allow-dirty) for a report that says so."
        )


@contextmanager
def reports_lock(directory: Path, run_id: str) -> Iterator[None]:
    """One run at a time writes a reports folder; a second one stops with a clear message."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise PipelineError(
                f"another pipeline run ({holder}) is writing {display_path(directory)}; wait "
                "for it to finish, or give this run its own --reports-dir and --artifacts-dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"run {run_id}, pid {os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- publishing --------------------------------------------------------------------------------
def _sibling(target: Path, run_id: str, suffix: str) -> Path:
    return target.parent / f".{target.name}.{run_id}.{suffix}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Publication:
    """The outputs of one notebook, staged and then replaced together (see the module doc).

    pub = Publication(reports_dir, run_id)
    staged = pub.stage(reports_dir / "02.html")   # write the new page to `staged`
    ...
    pub.begin()       # before anything is staged: the journal lists what will be
    pub.commit()      # once everything is staged: rename all into place
    """

    def __init__(self, reports_dir: Path, run_id: str) -> None:
        self.journal = reports_dir / JOURNAL
        self.run_id = run_id
        self.targets: list[Path] = []

    def stage(self, target: Path) -> Path:
        """The staged path of `target` (a file or a folder), registered for the commit."""
        target = Path(target).resolve()
        if target not in self.targets:
            self.targets.append(target)
        return _sibling(target, self.run_id, "new")

    def _items(self) -> list[list[str]]:
        return [
            [str(_sibling(t, self.run_id, "new")), str(t), str(_sibling(t, self.run_id, "old"))]
            for t in self.targets
        ]

    def _write(self, state: str) -> None:
        atomic_write_json(self.journal, {"run_id": self.run_id, "state": state,
                                         "items": self._items()})  # fmt: skip

    def begin(self) -> None:
        """Record the staged names (so an interrupted run's leftovers can be deleted)."""
        self._write("staging")

    def commit(self) -> None:
        """Every staged output replaces its target; then the journal goes."""
        missing = [t for t in self.targets if not _sibling(t, self.run_id, "new").exists()]
        if missing:
            raise PipelineError(f"cannot publish: not staged: {[display_path(m) for m in missing]}")
        self._write("commit")
        _apply(self._items())
        self.journal.unlink()

    def abort(self) -> None:
        """Delete what was staged; the published outputs stay as they were."""
        for staged, _, _ in self._items():
            _remove(Path(staged))
        self.journal.unlink(missing_ok=True)


def _apply(items: list[list[str]]) -> None:
    """Rename each staged output over its target; safe to repeat after an interruption."""
    for staged, target, old in items:
        staged, target, old = Path(staged), Path(target), Path(old)
        if not staged.exists():
            continue  # done before the interruption
        if staged.is_dir() and target.exists():
            os.rename(target, old)
        os.replace(staged, target)
    for _, _, old in items:
        _remove(Path(old))


def recover(reports_dir: Path) -> str | None:
    """Finish (state "commit") or roll back (state "staging") a publication that an earlier
    run left half done; returns what was done, or None when there was nothing to do."""
    journal = reports_dir / JOURNAL
    if not journal.exists():
        return None
    try:
        record = json.loads(journal.read_text(encoding="utf-8"))
        items, state = record["items"], record["state"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(
            f"{display_path(journal)} is unreadable ({exc}): an earlier run was interrupted "
            "while publishing; check the reports and delete the journal by hand"
        ) from None
    if state == "commit":
        _apply(items)
        done = f"finished publishing run {record.get('run_id')} (interrupted midway)"
    else:
        for staged, _, _ in items:
            _remove(Path(staged))
        done = f"rolled back the unpublished outputs of run {record.get('run_id')}"
    journal.unlink()
    return done
