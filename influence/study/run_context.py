"""The one interface between the pipeline and a notebook's `Report`: a run-context file.

The pipeline writes `<run folder>/<notebook>.context.json` before it starts the notebook and
names it in the kernel's environment (`INFLUENCE_RUN_CONTEXT`, the only variable it sets for
the kernel). The file says where the notebook's metrics go, where its figures are staged,
where it reports progress and how many CPU threads it computes with. A notebook run by hand
(papermill, Jupyter) has no context file and gets `RunContext.manual`: metrics under
`artifacts/runs/<preset>/manual/`, figures in their final folder, the same thread count.

Threads: every run computes with `THREADS` intra-op threads (torch), the tests too
(tests/conftest.py), because floating-point sums depend on the thread count: see the README
("Determinism").
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from influence.io import atomic_write_json

from .cache import REPO_ROOT, artifacts_root

ENV = "INFLUENCE_RUN_CONTEXT"
THREADS = 1
COMMITTED_PRESET = "default"
# Presets whose reports and figures are committed, and the sub-folder of `reports/` and
# `figures/` they go to: the study's findings (default) and notebook 01's validation at every
# size of the suite (issue 24), which the default reports cite.
PUBLISHED_PRESETS = {COMMITTED_PRESET: "", "validation": "validation"}


def figures_root() -> Path:
    """Root of the committed figures (`figures/`; `INFLUENCE_FIGURES` overrides it)."""
    return Path(os.environ.get("INFLUENCE_FIGURES", REPO_ROOT / "figures"))


def figure_dir(notebook: str, preset: str) -> Path:
    """Where a notebook's figures end up: `figures/<notebook>/` at the committed preset,
    `figures/validation/<notebook>/` at the validation preset,
    `artifacts/figures/<preset>/<notebook>/` otherwise."""
    if preset in PUBLISHED_PRESETS:
        return figures_root() / PUBLISHED_PRESETS[preset] / notebook
    return artifacts_root() / "figures" / preset / notebook


@dataclass(frozen=True)
class RunContext:
    notebook: str
    preset: str
    metrics_path: Path  # <notebook>.metrics.json, read by the pipeline
    figure_dir: Path  # where figures are written (staged by the pipeline)
    final_figure_dir: Path  # where they are published (recorded in the report)
    progress_path: Path | None  # one line per stage, for the pipeline's console
    threads: int = THREADS

    @classmethod
    def manual(cls, notebook: str, preset: str) -> RunContext:
        final = figure_dir(notebook, preset)
        metrics = artifacts_root() / "runs" / preset / "manual" / f"{notebook}.metrics.json"
        return cls(notebook, preset, metrics, final, final, None)

    @classmethod
    def current(cls, notebook: str, preset: str) -> RunContext:
        """The pipeline's context for this notebook, or the manual one."""
        path = os.environ.get(ENV)
        if not path:
            return cls.manual(notebook, preset)
        ctx = cls.read(Path(path))
        if (ctx.notebook, ctx.preset) != (notebook, preset):
            raise ValueError(
                f"the run context {path} is for notebook {ctx.notebook} at preset {ctx.preset}, "
                f"but this notebook is {notebook} at preset {preset}: the Report's name or "
                "preset does not match the notebook the pipeline runs"
            )
        return ctx

    @classmethod
    def read(cls, path: Path) -> RunContext:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        for key in ("metrics_path", "figure_dir", "final_figure_dir", "progress_path"):
            data[key] = Path(data[key]) if data.get(key) else None
        return cls(**data)

    def write(self, path: Path) -> Path:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        atomic_write_json(path, data)
        return path

    def apply_threads(self) -> None:
        """Compute with the context's thread count (torch intra-op threads)."""
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def progress(self, message: str) -> None:
        """One line for the pipeline's console (nothing in the notebook or its report)."""
        if self.progress_path is not None:
            with open(self.progress_path, "a", encoding="utf-8") as fh:
                fh.write(message.replace("\n", " ") + "\n")
