"""What a notebook hands to the pipeline: headline metrics, stage timings and figures.

A notebook makes one `Report`::

    report = Report("01_ihvp_accuracy", preset=preset, device=device, seed=seed, params=cfg)
    with report.stage("fit"):
        ...
    report.metrics["settings"] = {...}
    report.summarize(question=..., paper=..., here=..., verdict="partly", reason=...)
    report.paper_vs_here = "paper: ...; here: ..."
    report.savefig(fig, "headline")
    report.save()

At the `default` preset figures go to `figures/<notebook>/` (committed); at any other preset
to `artifacts/figures/<preset>/<notebook>/`, so smoke runs and tests never touch committed
files. `save()` writes `<notebook>.metrics.json` atomically into the pipeline's run folder
(`INFLUENCE_RUN_DIR`, one per run, so concurrent runs never read each other's metrics) or, in a
notebook run by hand, `artifacts/runs/<preset>/manual/`; the pipeline reads it and adds
provenance. `summarize` gives the index its row: the question, the paper's finding, ours (from
this run's numbers) and a verdict. Environment overrides (used by the tests):
`INFLUENCE_FIGURES` replaces the committed `figures/` root, `INFLUENCE_ARTIFACTS` the
artifacts root.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from influence.io import atomic_path, atomic_write_json
from influence.study.cache import REPO_ROOT, artifacts_root
from influence.study.presets import check_preset

COMMITTED_PRESET = "default"
FIGURE_FORMATS = ("png", "svg")


def figures_root() -> Path:
    """Root of the committed figures (`figures/`; `INFLUENCE_FIGURES` overrides it)."""
    return Path(os.environ.get("INFLUENCE_FIGURES", REPO_ROOT / "figures"))


def figure_dir(notebook: str, preset: str) -> Path:
    if preset == COMMITTED_PRESET:
        return figures_root() / notebook
    return artifacts_root() / "figures" / preset / notebook


VERDICTS = ("agrees", "partly", "disagrees", "not comparable")


def metrics_path(notebook: str, preset: str) -> Path:
    run_dir = os.environ.get("INFLUENCE_RUN_DIR")
    root = Path(run_dir) if run_dir else artifacts_root() / "runs" / preset / "manual"
    return root / f"{notebook}.metrics.json"


def _jsonable(obj: Any) -> Any:
    """Best-effort conversion of numpy / torch scalars and arrays for JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and obj != obj:  # NaN is not valid JSON
        return None
    return obj


class Report:
    """Collects one notebook run's headline metrics, stage wall times and figures."""

    def __init__(
        self,
        notebook: str,
        *,
        preset: str,
        device: str = "cpu",
        seed: int = 0,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.notebook = notebook
        self.preset = check_preset(preset)
        self.device = device
        self.seed = seed
        self.params = dict(params or {})
        self.metrics: dict[str, Any] = {}
        self.paper_vs_here: str = ""
        self.summary: dict[str, str] = {}
        self.stages: dict[str, float] = {}
        self.figures: dict[str, list[str]] = {}
        self._started = time.perf_counter()

    @property
    def figure_dir(self) -> Path:
        return figure_dir(self.notebook, self.preset)

    @property
    def metrics_path(self) -> Path:
        return metrics_path(self.notebook, self.preset)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; repeated names add up. Recorded even if the stage raises."""
        start = time.perf_counter()
        self.progress(f"stage {name}")
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def summarize(
        self,
        *,
        question: str,
        paper: str,
        here: str,
        verdict: str,
        reason: str = "",
        reference: str = "",
    ) -> None:
        """The notebook's row in the index: its question, the paper's finding (and where in the
        paper, `reference`), ours in words built from this run's numbers, and a verdict."""
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}; valid: {', '.join(VERDICTS)}")
        if verdict != "agrees" and not reason:
            raise ValueError(f"a verdict of {verdict!r} needs its reason")
        self.summary = {
            "question": question,
            "paper": paper,
            "here": here,
            "verdict": verdict,
            "reason": reason,
            "reference": reference,
        }

    def progress(self, message: str) -> None:
        """One line for the pipeline's console (nothing in the notebook or its report)."""
        path = os.environ.get("INFLUENCE_PROGRESS_FILE")
        if path:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(message.replace("\n", " ") + "\n")

    def savefig(self, fig: Any, name: str, formats: tuple[str, ...] = FIGURE_FORMATS) -> Path:
        """Save a matplotlib figure as `<figure_dir>/<name>.<fmt>`; returns the PNG path.

        The figure is left open (the notebook may still show it). SVGs carry no date and a
        fixed hash salt, so re-running a deterministic notebook rewrites identical files.
        """
        out = []
        for fmt in formats:
            path = self.figure_dir / f"{name}.{fmt}"
            kwargs: dict[str, Any] = {"bbox_inches": "tight"}
            if fmt == "svg":
                kwargs["metadata"] = {"Date": None}
            elif fmt == "pdf":
                kwargs["metadata"] = {"CreationDate": None, "ModDate": None}
            elif fmt == "png":
                kwargs["dpi"] = 150
                kwargs["metadata"] = {"Software": None}
            import matplotlib

            with matplotlib.rc_context({"svg.hashsalt": "influence"}), atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, **kwargs)
            out.append(path)
        self.figures[name] = [str(p) for p in out]
        return out[0]

    def as_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "notebook": self.notebook,
                "preset": self.preset,
                "device": self.device,
                "seed": self.seed,
                "params": self.params,
                "metrics": self.metrics,
                "paper_vs_here": self.paper_vs_here,
                "summary": self.summary,
                "stages": self.stages,
                "figures": self.figures,
                "wall_time_s": time.perf_counter() - self._started,
            }
        )

    def save(self) -> None:
        """Write the metrics file atomically (call it as often as you like; last one wins).

        Returns None so that a trailing `report.save()` prints nothing into the notebook."""
        data = self.as_dict()
        json.dumps(data)  # fail here, in the notebook, if something is not serialisable
        atomic_write_json(self.metrics_path, data)

    def __repr__(self) -> str:
        return f"Report({self.notebook!r}, preset={self.preset!r}, stages={list(self.stages)})"
