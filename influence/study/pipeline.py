"""Run the study's notebooks and render their reports.

    python -m influence.study.pipeline --preset default [--only 01_ihvp_accuracy] [--device cuda]
    python -m influence.study.pipeline --sync-notebooks      # refresh notebooks/*.ipynb outputs

Each `notebooks/NN_topic.py` (jupytext py:percent, the reviewed source) is converted and run
with papermill, parameters `preset`, `device`, `seed` (and any `-p NAME=VALUE`) injected. The
executed notebook goes to `artifacts/runs/<preset>/<nb>.ipynb`. On success it is rendered to
`<reports>/<nb>.html`, its metrics (written by `influence.study.reporting.Report`) plus
provenance to `<reports>/<nb>.json`, and `<reports>/index.html` is rebuilt. `<reports>` is
`reports/` (committed) at the `default` preset and `artifacts/reports/<preset>/` otherwise.

A failing notebook stops the pipeline with the notebook and cell named; reports already
rendered stay as they were; a re-run resumes from the cached artifacts.

Every location can be overridden (the tests do): `--notebooks-dir` / `INFLUENCE_NOTEBOOKS_DIR`,
`--reports-dir` / `INFLUENCE_REPORTS`, `--figures-dir` / `INFLUENCE_FIGURES`,
`--artifacts-dir` / `INFLUENCE_ARTIFACTS`. The options are exported to the environment so the
notebook kernels see them too.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime as _dt
import html
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

from influence.io import atomic_write_json, atomic_write_text
from influence.study.cache import REPO_ROOT, artifacts_root
from influence.study.presets import PRESET_NAMES, check_preset
from influence.study.reporting import COMMITTED_PRESET, metrics_path

KERNEL_NAME = "python3"
REQUIRED_PARAMETERS = ("preset", "device", "seed")
NOTEBOOK_GLOB = "[0-9][0-9]_*.py"
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
    "papermill",
    "jupytext",
    "nbconvert",
    "nbclient",
    "ipykernel",
)


class PipelineError(Exception):
    """A failure the pipeline reports in one message and exits non-zero on."""


# ---------------------------------------------------------------------------------------------
# Locations


def notebooks_dir() -> Path:
    return Path(os.environ.get("INFLUENCE_NOTEBOOKS_DIR", REPO_ROOT / "notebooks"))


def reports_root() -> Path:
    """Committed reports (`reports/`; `INFLUENCE_REPORTS` overrides it)."""
    return Path(os.environ.get("INFLUENCE_REPORTS", REPO_ROOT / "reports"))


def reports_dir(preset: str) -> Path:
    if preset == COMMITTED_PRESET:
        return reports_root()
    return artifacts_root() / "reports" / preset


def runs_dir(preset: str) -> Path:
    return artifacts_root() / "runs" / preset


def _display_path(path: Path | str) -> str:
    """Path relative to the repository when inside it (committed files carry no home dirs)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
# Notebooks


def discover(directory: Path | None = None) -> list[Path]:
    directory = directory or notebooks_dir()
    return sorted(p for p in directory.glob(NOTEBOOK_GLOB) if p.is_file())


def select(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    """Notebooks named in `only` (full name, `NN` prefix or path), in study order."""
    if not only:
        return notebooks
    by_name = {p.stem: p for p in notebooks}
    chosen: set[Path] = set()
    for item in only:
        key = Path(item).stem
        matches = [p for name, p in by_name.items() if name == key or name.split("_")[0] == key]
        if not matches:
            raise PipelineError(
                f"unknown notebook {item!r}; valid notebooks: {', '.join(by_name) or '(none)'}"
            )
        chosen.update(matches)
    return [p for p in notebooks if p in chosen]


def read_notebook(path: Path):
    import jupytext

    return jupytext.read(path)


def notebook_parameters(nb) -> dict[str, Any]:
    """Parameters declared in the notebook's `parameters` cell, with their defaults."""
    from papermill.inspection import _infer_parameters

    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise PipelineError(f"expected exactly one cell tagged 'parameters', found {len(cells)}")
    nb = copy.deepcopy(nb)
    for cell in nb.cells:  # papermill expects every cell to have tags
        cell.metadata.setdefault("tags", [])
    inferred = _infer_parameters(nb, name=KERNEL_NAME, language="python")
    params = {p.name: p.default for p in inferred}
    missing = [name for name in REQUIRED_PARAMETERS if name not in params]
    if missing:
        raise PipelineError(
            f"the parameters cell lacks {missing}; it must define preset/device/seed"
        )
    return params


def notebook_title(nb, fallback: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


def parse_param(text: str) -> tuple[str, Any]:
    """`NAME=VALUE`; VALUE is a Python literal (1, 0.5, 'x', None, True) or else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise PipelineError(f"bad parameter {text!r}; expected NAME=VALUE")
    special = {"none": None, "null": None, "true": True, "false": False}
    if raw.strip().lower() in special:
        return name.strip(), special[raw.strip().lower()]
    try:
        return name.strip(), ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return name.strip(), raw


# ---------------------------------------------------------------------------------------------
# Provenance


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "requested": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
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


def provenance(device: str) -> dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_info(device),
        "packages": package_versions(),
    }


# ---------------------------------------------------------------------------------------------
# Rendering


def render_html(nb) -> str:
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    exporter.embed_images = True
    body, _ = exporter.from_notebook_node(nb)
    return body


def _relative_figures(figures: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: [_display_path(p) for p in paths] for name, paths in figures.items()}


def _headline_png(figures: dict[str, list[str]]) -> str | None:
    names = ["headline", *figures] if "headline" in figures else list(figures)
    for name in names:
        for path in figures.get(name, []):
            if path.endswith(".png"):
                return path
    return None


INDEX_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
section { border-top: 1px solid #ddd; padding: 1rem 0; }
img { max-width: 100%; border: 1px solid #eee; }
.pvh { background: #f6f6f6; padding: .5rem .75rem; border-left: 3px solid #888; }
.meta { color: #666; font-size: .9em; }
"""


def write_index(directory: Path) -> Path:
    """`index.html` linking every report in `directory`, one section per notebook."""
    sections = []
    entries = []
    for path in sorted(directory.glob("[0-9][0-9]_*.json")):
        try:
            entries.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    preset = entries[0]["preset"] if entries else "?"
    for entry in entries:
        nb = entry["notebook"]
        figure = entry.get("headline_figure")
        img = ""
        if figure:
            fig_path = Path(figure)
            if not fig_path.is_absolute():
                fig_path = REPO_ROOT / fig_path
            rel = os.path.relpath(fig_path, directory)
            img = f'<p><a href="{nb}.html"><img src="{html.escape(rel)}" alt="{nb}"></a></p>'
        prov = entry.get("provenance", {})
        commit = (prov.get("git_commit") or "unknown")[:12]
        wall = entry.get("wall_time_s", {}).get("total")
        wall_text = f"{wall:.0f} s" if isinstance(wall, int | float) else "?"
        sections.append(
            f'<section id="{nb}">\n<h2><a href="{nb}.html">{html.escape(nb)}</a>: '
            f"{html.escape(entry.get('title', ''))}</h2>\n{img}\n"
            f'<p class="pvh">{html.escape(entry.get("paper_vs_here") or "(no summary)")}</p>\n'
            f'<p class="meta">preset {entry["preset"]}, device {entry["device"]}, seed '
            f"{entry['seed']}, commit {commit}, {wall_text}; "
            f'<a href="{nb}.json">metrics and provenance</a></p>\n</section>'
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Influence study: reports ({preset})</title>\n<style>{INDEX_CSS}</style>\n"
        "</head>\n<body>\n<h1>Studying LLM generalisation with influence functions, "
        "at small scale</h1>\n"
        f"<p>One section per research question, preset <b>{preset}</b>. Each links the "
        "executed notebook and its metrics.</p>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
    out = directory / "index.html"
    atomic_write_text(out, page)
    return out


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Job:
    path: Path
    nb: Any
    parameters: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.stem


def _prepare_environment() -> None:
    """What every kernel inherits: deterministic hashing, no display, the venv's kernels."""
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")


def plan(
    preset: str,
    only: list[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> list[Job]:
    """Check everything up front: preset, notebook names, parameter names."""
    check_preset(preset)
    notebooks = select(discover(), only)
    if not notebooks:
        raise PipelineError(f"no notebooks matching {NOTEBOOK_GLOB} in {notebooks_dir()}")
    extra = dict(extra or {})
    jobs = []
    declared: dict[str, list[str]] = {}
    for path in notebooks:
        nb = read_notebook(path)
        try:
            params = notebook_parameters(nb)
        except PipelineError as exc:
            raise PipelineError(f"notebook {path.stem}: {exc}") from None
        declared[path.stem] = sorted(params)
        values = {"preset": preset, "device": device, "seed": seed}
        values.update({k: v for k, v in extra.items() if k in params})
        jobs.append(Job(path, nb, values))
    unknown = sorted(k for k in extra if not any(k in names for names in declared.values()))
    if unknown:
        listing = "; ".join(f"{nb}: {', '.join(names)}" for nb, names in declared.items())
        raise PipelineError(f"unknown parameter(s) {unknown}; valid parameters: {listing}")
    return jobs


def _failure_message(job: Job, exc: Exception, executed: Path) -> str:
    cell_index = getattr(exc, "cell_index", None)
    exec_count = getattr(exc, "exec_count", None)
    source = (getattr(exc, "source", "") or "").strip().splitlines()
    first = next((line for line in source if not line.startswith("#")), source[0] if source else "")
    where = "outside any cell (kernel start or death)"
    if cell_index is not None:
        # Papermill's index counts the injected-parameters cell; name the cell of the .py.
        offset = 1 if cell_index > _param_cell_index(job.nb) else 0
        where = (
            f"in cell {cell_index - offset} (counted from 0, markdown included; "
            f"In [{exec_count}] of the executed notebook): {first[:100]}"
        )
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    return (
        f"notebook {job.name} ({_display_path(job.path)}) failed {where}\n"
        f"  {ename}: {evalue}\n"
        f"  executed notebook with the traceback: {_display_path(executed)}\n"
        f"  reports already rendered are unchanged; a re-run resumes from cached artifacts"
    )


def _param_cell_index(nb) -> int:
    for i, cell in enumerate(nb.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return i
    return -1


def run_job(job: Job, *, log_output: bool = False) -> dict[str, Any]:
    """Execute one notebook and render its report; raises PipelineError on failure."""
    import nbformat
    import papermill

    preset = job.parameters["preset"]
    runs = runs_dir(preset)
    runs.mkdir(parents=True, exist_ok=True)
    source = runs / f"{job.name}.source.ipynb"
    executed = runs / f"{job.name}.ipynb"
    nbformat.write(job.nb, str(source))
    metrics_file = metrics_path(job.name, preset)
    if metrics_file.exists():
        metrics_file.unlink()  # never report a previous run's metrics

    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    try:
        nb = papermill.execute_notebook(
            str(source),
            str(executed),
            parameters=job.parameters,
            kernel_name=KERNEL_NAME,
            language="python",
            cwd=str(job.path.parent),
            progress_bar=False,
            log_output=log_output,
        )
    except Exception as exc:  # PapermillExecutionError, dead kernel, timeouts
        raise PipelineError(_failure_message(job, exc, executed)) from exc
    wall = time.perf_counter() - t0

    if metrics_file.exists():
        data = json.loads(metrics_file.read_text())
    else:
        print(f"warning: {job.name} did not call report.save(); no metrics", file=sys.stderr)
        data = {"metrics": {}, "paper_vs_here": "", "stages": {}, "figures": {}, "params": {}}
    figures = _relative_figures(data.get("figures", {}))
    out_dir = reports_dir(preset)
    metrics = data.get("metrics", {})
    report = {
        "notebook": job.name,
        "title": notebook_title(job.nb, job.name),
        "source": _display_path(job.path),
        "preset": preset,
        "device": job.parameters["device"],
        "seed": job.parameters["seed"],
        "parameters": job.parameters,
        "params": data.get("params", {}),
        "metrics": sorted(metrics),
        "paper_vs_here": data.get("paper_vs_here", ""),
        "figures": figures,
        "headline_figure": _headline_png(figures),
        "wall_time_s": {
            "total": round(wall, 3),
            "stages": {k: round(v, 3) for k, v in data.get("stages", {}).items()},
        },
        "started_at": started.isoformat(timespec="seconds"),
        "provenance": provenance(job.parameters["device"]),
    }
    # Headline metrics sit at the top level (e.g. `settings`, `corpus_sha256`), as the
    # notebooks' report schemas say; `metrics` lists their names.
    clash = sorted(set(metrics) & set(report))
    if clash:
        raise PipelineError(f"{job.name}: metric names {clash} clash with provenance fields")
    report.update(metrics)
    atomic_write_text(out_dir / f"{job.name}.html", render_html(nb))
    atomic_write_json(out_dir / f"{job.name}.json", report)
    write_index(out_dir)
    return report


def run(
    preset: str = COMMITTED_PRESET,
    only: list[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    log_output: bool = False,
) -> list[dict[str, Any]]:
    _prepare_environment()
    jobs = plan(preset, only, device, seed, extra)
    results = []
    for job in jobs:
        print(f"[pipeline] {job.name}: running at preset {preset} on {device}", flush=True)
        report = run_job(job, log_output=log_output)
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in report["wall_time_s"]["stages"].items())
        print(
            f"[pipeline] {job.name}: done in {report['wall_time_s']['total']:.1f}s"
            + (f" ({stages})" if stages else "")
            + f" -> {_display_path(reports_dir(preset) / (job.name + '.html'))}",
            flush=True,
        )
        results.append(report)
    print(f"[pipeline] index: {_display_path(reports_dir(preset) / 'index.html')}", flush=True)
    return results


def sync_notebooks(only: list[str] | None = None, timeout: int | None = None) -> list[Path]:
    """Re-execute each notebook as written (its parameters cell says `smoke`) and store the
    outputs in the paired `.ipynb`, the file nbval compares against."""
    import jupytext
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    _prepare_environment()
    written = []
    for path in select(discover(), only):
        nb = read_notebook(path)
        notebook_parameters(nb)  # same checks as a pipeline run
        for i, cell in enumerate(nb.cells):  # stable ids: a re-sync only diffs real changes
            cell["id"] = f"cell-{i:03d}"
        print(f"[sync] {path.stem}: executing", flush=True)
        client = NotebookClient(
            nb,
            kernel_name=KERNEL_NAME,
            timeout=timeout,
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        try:
            client.execute()
        except CellExecutionError as exc:
            raise PipelineError(f"notebook {path.stem} failed while syncing:\n{exc}") from exc
        target = path.with_suffix(".ipynb")
        atomic_write_text(target, jupytext.writes(nb, fmt="ipynb"))
        written.append(target)
        print(f"[sync] {path.stem}: wrote {_display_path(target)}", flush=True)
    return written


# ---------------------------------------------------------------------------------------------
# Command line


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    items = [item for value in values for item in value.replace(",", " ").split()]
    return items or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m influence.study.pipeline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--preset", default=COMMITTED_PRESET, help=f"one of {PRESET_NAMES}")
    parser.add_argument("--only", action="append", help="notebook name(s), e.g. 01_ihvp_accuracy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "-p", "--param", action="append", default=[], metavar="NAME=VALUE",
        help="set a notebook parameter (repeatable)",
    )  # fmt: skip
    parser.add_argument("--sync-notebooks", action="store_true", help="refresh notebooks/*.ipynb")
    parser.add_argument("--list", action="store_true", help="list notebooks and parameters")
    parser.add_argument("--log-output", action="store_true", help="stream notebook output")
    parser.add_argument("--notebooks-dir", type=Path)
    parser.add_argument("--reports-dir", type=Path, help="committed reports root (reports/)")
    parser.add_argument("--figures-dir", type=Path, help="committed figures root (figures/)")
    parser.add_argument("--artifacts-dir", type=Path)
    args = parser.parse_args(argv)

    for option, var in [
        (args.notebooks_dir, "INFLUENCE_NOTEBOOKS_DIR"),
        (args.reports_dir, "INFLUENCE_REPORTS"),
        (args.figures_dir, "INFLUENCE_FIGURES"),
        (args.artifacts_dir, "INFLUENCE_ARTIFACTS"),
    ]:
        if option is not None:
            os.environ[var] = str(option.resolve())

    only = _split(args.only)
    try:
        if args.sync_notebooks:
            sync_notebooks(only)
            return 0
        extra = dict(parse_param(p) for p in args.param)
        if args.list:
            for job in plan(args.preset, only, args.device, args.seed, extra):
                print(f"{job.name}: {notebook_parameters(job.nb)}")
            return 0
        run(args.preset, only, args.device, args.seed, extra, log_output=args.log_output)
    except (PipelineError, ValueError) as exc:
        print(f"[pipeline] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
