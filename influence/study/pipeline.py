"""Run the study's notebooks and render their reports.

    python -m influence.study.pipeline --preset default [--only 01_ihvp_accuracy] [--device cuda]
    python -m influence.study.pipeline --sync-notebooks      # refresh notebooks/*.ipynb outputs

Each `notebooks/NN_topic.py` (jupytext py:percent, the reviewed source) is converted and run
with papermill, parameters `preset`, `device`, `seed` (and any `-p NAME=VALUE`, or
`-p NAME.key=VALUE` for one value of a group of settings) injected and checked before anything
runs. Each run has its own id: its executed notebooks and metrics go to
`artifacts/runs/<preset>/<run id>/`. On success a notebook is rendered to `<reports>/<nb>.html`
(figures inline, code folded, a header with the question and provenance, contents, links),
its metrics (written by `influence.study.reporting.Report`) plus provenance to
`<reports>/<nb>.json`, and `<reports>/index.html` is rebuilt. `<reports>` is `reports/`
(committed) at the `default` preset and `artifacts/reports/<preset>/` otherwise; one run at a
time writes it (a lock), and the committed reports are written only from a clean git tree
(`--allow-dirty` overrides).

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
import fcntl
import html
import json
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

from influence.io import atomic_write_json, atomic_write_text
from influence.study.cache import REPO_ROOT, artifacts_root
from influence.study.parameters import check_device, split_dotted, valid_names
from influence.study.presets import PRESET_NAMES, SECTIONS, check_preset, resolve
from influence.study.reporting import COMMITTED_PRESET, VERDICTS, metrics_path

KERNEL_NAME = "python3"
# The kernel's own start-up warnings (e.g. "running over TCP without encryption") are not for
# the reader of the console.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
TEMPLATES = Path(__file__).resolve().parent / "templates"
HEARTBEAT_S = 60.0
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
    "powerlaw",
    "bm25s",
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


def new_run_id() -> str:
    """A run's own id: UTC time to the second and the process id (unique on one machine)."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}"


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
    """`NAME=VALUE` or `NAME.key=VALUE`; VALUE is a Python literal (1, 0.5, 'x', None, True,
    [1, 2]) or else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not all(part.isidentifier() for part in name.strip().split(".")):
        raise PipelineError(f"bad parameter {text!r}; expected NAME=VALUE or NAME.key=VALUE")
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
        # The pipeline's own outputs (reports, figures, README table) do not make a run dirty.
        "git_dirty": None if status is None else bool(changed_sources(status)),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_info(device),
        "packages": package_versions(),
    }


# ---------------------------------------------------------------------------------------------
# Rendering


REPORT_TAGS_REMOVED = ("parameters", "injected-parameters")


def report_notebook(nb):
    """What a reader sees of an executed notebook: no parameter cells (the header lists the
    parameters), no stderr (warnings, progress bars), no title (the header has it)."""
    nb = copy.deepcopy(nb)
    cells = []
    title_dropped = False
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if any(t in tags for t in REPORT_TAGS_REMOVED):
            continue
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if not _is_stderr(o)]
        elif cell.cell_type == "markdown" and not title_dropped:
            lines = cell.source.splitlines()
            if lines and lines[0].startswith("# "):
                cell.source = "\n".join(lines[1:]).strip()
                title_dropped = True
        cells.append(cell)
    nb.cells = cells
    return nb


def _is_stderr(output) -> bool:
    return output.get("output_type") == "stream" and output.get("name") == "stderr"


def render_html(nb, *, title: str = "", header: str = "", footer: str = "") -> str:
    """The report page: nbconvert's lab page without prompts, every code cell folded into a
    `<details>` (click "code" to see it, or the button in the header for all of them)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="report",
        extra_template_basedirs=[str(TEMPLATES)],
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    exporter.embed_images = True
    exporter.log.setLevel("ERROR")  # e.g. "alternative text is missing": not for the console
    resources = {
        "metadata": {"name": title or "Report"},
        "report_header": header,
        "report_footer": footer,
    }
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    return body


_HEADING = re.compile(r'<h2 id="([^"]+)">(.*?)<a class="anchor-link"', re.S)
_TOGGLE = (
    '<button class="report-toggle" type="button" onclick="var d=document.querySelectorAll('
    "'details.report-code'),o=!d[0]||!d[0].open;d.forEach(function(e){e.open=o});"
    "this.textContent=o?'hide all code':'show all code'\">show all code</button>"
)


def table_of_contents(page: str) -> str:
    """An ordered list linking the page's second-level headings."""
    items = [
        f'<li><a href="#{anchor}">{re.sub(r"<[^>]+>", "", text).strip()}</a></li>'
        for anchor, text in _HEADING.findall(page)
    ]
    if not items:
        return ""
    return f'<nav class="report-toc"><b>Contents</b><ul>{"".join(items)}</ul></nav>'


def _duration(seconds: float | None) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _neighbours(name: str) -> tuple[str | None, str | None]:
    names = [p.stem for p in discover()]
    if name not in names:
        return None, None
    i = names.index(name)
    return (names[i - 1] if i > 0 else None), (names[i + 1] if i + 1 < len(names) else None)


def navigation(name: str) -> str:
    prev, nxt = _neighbours(name)
    links = ['<a href="index.html">↑ all reports</a>']
    if prev:
        links.append(f'<a href="{prev}.html">← {html.escape(prev)}</a>')
    if nxt:
        links.append(f'<a href="{nxt}.html">{html.escape(nxt)} →</a>')
    return f'<nav class="report-nav">{"".join(links)}</nav>'


def report_header(report: dict[str, Any], toc: str) -> str:
    """Title, question, paper reference, provenance line, contents and the code toggle."""
    summary = report.get("summary") or {}
    prov = report.get("provenance", {})
    commit = (prov.get("git_commit") or "unknown")[:12]
    if prov.get("git_dirty"):
        commit += " (uncommitted changes)"
    overrides = {
        k: v for k, v in report["parameters"].items() if k not in ("preset", "device", "seed")
    }
    meta = [
        f"preset <b>{html.escape(report['preset'])}</b>",
        f"seed {report['seed']}",
        f"device {html.escape(str(report['device']))}",
        f"commit {html.escape(commit)}",
        f"run {report['started_at'][:10]}",
        f"wall time {_duration(report['wall_time_s']['total'])}",
    ]
    if overrides:
        meta.append("parameters " + html.escape(json.dumps(overrides, sort_keys=True)))
    parts = [navigation(report["notebook"]), f"<h1>{html.escape(report['title'])}</h1>"]
    if summary.get("question"):
        parts.append(f"<p><b>Question.</b> {html.escape(summary['question'])}</p>")
    if summary.get("reference"):
        parts.append(
            "<p><b>Paper.</b> Grosse et al. (2023), <i>Studying Large Language Model "
            f"Generalization with Influence Functions</i>, {html.escape(summary['reference'])}.</p>"
        )
    parts.append(f'<p class="report-meta">{" · ".join(meta)}</p>')
    parts.append(toc)
    parts.append(f"<p>{_TOGGLE}</p>")
    return '<header class="report-header">' + "\n".join(parts) + "</header>"


def render_report(nb, report: dict[str, Any]) -> str:
    """The full report page of an executed notebook and its report record."""
    placeholder = "<!-- table of contents -->"
    header = report_header(report, placeholder)
    footer = f'<footer class="report-footer">{navigation(report["notebook"])}</footer>'
    page = render_html(report_notebook(nb), title=report["title"], header=header, footer=footer)
    return page.replace(placeholder, table_of_contents(page), 1)


def _relative_figures(figures: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: [_display_path(p) for p in paths] for name, paths in figures.items()}


def _headline_png(figures: dict[str, list[str]], reports: Path) -> str | None:
    """The headline PNG's path relative to the reports folder (where index.html links it)."""
    names = ["headline", *figures] if "headline" in figures else list(figures)
    for name in names:
        for path in figures.get(name, []):
            if path.endswith(".png"):
                return os.path.relpath(Path(path).resolve(), reports.resolve())
    return None


INDEX_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
section { border-top: 1px solid #ddd; padding: 1rem 0; }
img { max-width: 100%; border: 1px solid #eee; }
table.summary { border-collapse: collapse; font-size: .92rem; }
table.summary th, table.summary td { border-bottom: 1px solid #ddd; padding: .45rem .5rem;
       text-align: left; vertical-align: top; }
table.summary th { background: #f3f4f6; }
.verdict { font-weight: 600; white-space: nowrap; }
.agrees { color: #1a7f37; } .partly { color: #9a6700; } .disagrees { color: #cf222e; }
.not-comparable { color: #57606a; }
.reason { color: #555; font-size: .88em; }
.meta { color: #666; font-size: .9em; }
"""


def _read_reports(directory: Path) -> list[dict[str, Any]]:
    entries = []
    for path in sorted(directory.glob("[0-9][0-9]_*.json")):
        try:
            entries.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return entries


def _verdict_cell(summary: dict[str, str]) -> str:
    verdict = summary.get("verdict") or "not comparable"
    reason = summary.get("reason") or ""
    cls = verdict.replace(" ", "-")
    out = f'<span class="verdict {cls}">{html.escape(verdict)}</span>'
    return out + (f'<div class="reason">{html.escape(reason)}</div>' if reason else "")


def write_index(directory: Path) -> Path:
    """`index.html`: a summary table (question, the paper's finding, ours, a verdict with its
    reason, the wall time), then each notebook's headline figure."""
    entries = _read_reports(directory)
    preset = entries[0]["preset"] if entries else "?"
    rows, sections = [], []
    total = 0.0
    for entry in entries:
        nb = entry["notebook"]
        summary = entry.get("summary") or {}
        wall = entry.get("wall_time_s", {}).get("total")
        total += wall if isinstance(wall, int | float) else 0.0
        rows.append(
            f'<tr><td><a href="{nb}.html">{html.escape(nb)}</a></td>'
            f"<td>{html.escape(summary.get('question') or entry.get('title', ''))}</td>"
            f"<td>{html.escape(summary.get('paper', ''))}</td>"
            f"<td>{html.escape(summary.get('here') or entry.get('paper_vs_here') or '')}</td>"
            f"<td>{_verdict_cell(summary)}</td><td>{_duration(wall)}</td></tr>"
        )
        figure = entry.get("headline_figure")  # relative to the reports folder
        img = ""
        if figure:
            img = f'<p><a href="{nb}.html"><img src="{html.escape(figure)}" alt="{nb}"></a></p>'
        prov = entry.get("provenance", {})
        commit = (prov.get("git_commit") or "unknown")[:12]
        sections.append(
            f'<section id="{nb}">\n<h2><a href="{nb}.html">{html.escape(nb)}</a>: '
            f"{html.escape(entry.get('title', ''))}</h2>\n{img}\n"
            f'<p class="meta">preset {entry["preset"]}, device {entry["device"]}, seed '
            f"{entry['seed']}, commit {commit}, wall time {_duration(wall)}; "
            f'<a href="{nb}.json">metrics and provenance</a></p>\n</section>'
        )
    table = (
        '<table class="summary"><thead><tr><th>notebook</th><th>question</th>'
        "<th>the paper found</th><th>we find</th><th>verdict</th><th>wall time</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Influence study: reports ({preset})</title>\n<style>{INDEX_CSS}</style>\n"
        "</head>\n<body>\n<h1>Studying LLM generalisation with influence functions, "
        "at small scale</h1>\n"
        f"<p>Grosse et al. (2023) asked, of models up to 52B parameters, which training "
        f"sequences make a model say what it says. We ask each of their questions again on a "
        f"suite of small models trained here. Preset <b>{preset}</b>; the whole study took "
        f"{_duration(total)}. Verdicts: {', '.join(VERDICTS)}.</p>\n"
        + table
        + "\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
    out = directory / "index.html"
    atomic_write_text(out, page)
    return out


FINDINGS_START = "<!-- findings: written by the pipeline from reports/*.json -->"
FINDINGS_END = "<!-- end of findings -->"


def findings_table(directory: Path) -> str:
    """The README's table of findings, one row per report in `directory`, from its numbers."""
    lines = [
        "| notebook | question | what we find (default preset) | verdict | report |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in _read_reports(directory):
        nb = entry["notebook"]
        summary = entry.get("summary") or {}
        verdict = summary.get("verdict", "")
        if summary.get("reason"):
            verdict += f": {summary['reason']}"
        cells = [
            f"[{nb}](notebooks/{nb}.py)",
            summary.get("question", entry.get("title", "")),
            summary.get("here", ""),
            verdict,
            f"[html](reports/{nb}.html) · [json](reports/{nb}.json)",
        ]
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(readme: Path, directory: Path) -> bool:
    """Rewrite the README's findings table from the reports; False if it has no markers."""
    text = readme.read_text()
    if FINDINGS_START not in text or FINDINGS_END not in text:
        return False
    head, rest = text.split(FINDINGS_START, 1)
    _, tail = rest.split(FINDINGS_END, 1)
    new = f"{head}{FINDINGS_START}\n{findings_table(directory)}\n{FINDINGS_END}{tail}"
    if new != text:
        atomic_write_text(readme, new)
    return True


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
    """What every kernel inherits: deterministic hashing, inline figures, the venv's kernels,
    and absolute locations (a kernel runs in `notebooks/`, so a relative path would point
    elsewhere there)."""
    os.environ.setdefault("PYTHONHASHSEED", "0")
    # Inline, not Agg: with Agg `plt.show()` draws nothing and the reports have no figures.
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # The pipeline checks parameters itself; papermill's own warnings (a name outside the
    # parameters cell) would only be noise on the console.
    logging.getLogger("papermill").setLevel(logging.ERROR)
    for var in ("INFLUENCE_ARTIFACTS", "INFLUENCE_REPORTS", "INFLUENCE_FIGURES"):
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).resolve())


def plan(
    preset: str,
    only: list[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> list[Job]:
    """Check everything up front: preset, device, notebook names, parameter names and values.

    `extra` may name one value of a group of settings with a dotted name
    (`language_model.n_queries`); it is passed to the notebook as a dict that is merged into
    the preset's."""
    check_preset(preset)
    check_device(device)
    notebooks = select(discover(), only)
    if not notebooks:
        raise PipelineError(f"no notebooks matching {NOTEBOOK_GLOB} in {notebooks_dir()}")
    extra = split_dotted(dict(extra or {}))
    jobs = []
    declared: dict[str, list[str]] = {}
    for path in notebooks:
        nb = read_notebook(path)
        try:
            params = notebook_parameters(nb)
        except PipelineError as exc:
            raise PipelineError(f"notebook {path.stem}: {exc}") from None
        names = sorted(set(params) | set(valid_names(path.stem, preset)))
        declared[path.stem] = names
        values = {"preset": preset, "device": device, "seed": seed}
        values.update({k: v for k, v in extra.items() if k in names})
        if path.stem in SECTIONS:  # values of the wrong type fail now, not minutes later
            settings = {k: v for k, v in values.items() if k in SECTIONS[path.stem][preset]}
            try:
                resolve(path.stem, preset, **settings)
            except ValueError as exc:
                raise PipelineError(f"notebook {path.stem}: {exc}") from None
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


@contextmanager
def _console(name: str, progress_file: Path) -> Iterator[None]:
    """While a notebook runs, print each stage it enters (`Report.stage` and
    `Report.progress` write them to `progress_file`) with the elapsed time, and a heartbeat
    every minute inside long stages."""
    stop = threading.Event()
    started = time.perf_counter()

    def elapsed() -> str:
        seconds = int(time.perf_counter() - started)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def watch() -> None:
        seen, last, quiet_since = 0, "starting", time.perf_counter()
        while not stop.wait(1.0):
            try:
                lines = progress_file.read_text(encoding="utf-8").splitlines()
            except OSError:
                lines = []
            for line in lines[seen:]:
                last = line
                print(f"[pipeline] {name}: {line} ({elapsed()} elapsed)", flush=True)
                quiet_since = time.perf_counter()
            seen = max(seen, len(lines))
            if time.perf_counter() - quiet_since >= HEARTBEAT_S:
                print(f"[pipeline] {name}: still in {last} ({elapsed()} elapsed)", flush=True)
                quiet_since = time.perf_counter()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_job(job: Job, *, run_dir: Path, log_output: bool = False) -> dict[str, Any]:
    """Execute one notebook and render its report; raises PipelineError on failure."""
    import nbformat
    import papermill

    preset = job.parameters["preset"]
    run_dir.mkdir(parents=True, exist_ok=True)
    source = run_dir / f"{job.name}.source.ipynb"
    executed = run_dir / f"{job.name}.ipynb"
    progress_file = run_dir / f"{job.name}.progress"
    nbformat.write(job.nb, str(source))
    os.environ["INFLUENCE_RUN_DIR"] = str(run_dir)
    os.environ["INFLUENCE_PROGRESS_FILE"] = str(progress_file)
    metrics_file = metrics_path(job.name, preset)

    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    try:
        with _console(job.name, progress_file):
            nb = papermill.execute_notebook(
                str(source),
                str(executed),
                parameters=job.parameters,
                kernel_name=KERNEL_NAME,
                language="python",
                cwd=str(job.path.parent),
                progress_bar=False,
                log_output=log_output,
                extra_arguments=KERNEL_ARGUMENTS,
            )
    except Exception as exc:  # PapermillExecutionError, dead kernel, timeouts
        raise PipelineError(_failure_message(job, exc, executed)) from exc
    wall = time.perf_counter() - t0

    if not metrics_file.exists():
        raise PipelineError(
            f"notebook {job.name} ran but produced no metrics: it must call report.save() "
            f"(executed notebook: {_display_path(executed)})"
        )
    data = json.loads(metrics_file.read_text())
    out_dir = reports_dir(preset)
    headline = _headline_png(data.get("figures", {}), out_dir)
    figures = _relative_figures(data.get("figures", {}))
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
        "summary": data.get("summary", {}),
        "paper_vs_here": data.get("paper_vs_here", ""),
        "figures": figures,
        "headline_figure": headline,
        "wall_time_s": {
            "total": round(wall, 3),
            "stages": {k: round(v, 3) for k, v in data.get("stages", {}).items()},
        },
        "started_at": started.isoformat(timespec="seconds"),
        "run_id": run_dir.name,
        "provenance": provenance(job.parameters["device"]),
    }
    # Headline metrics sit at the top level (e.g. `settings`, `corpus_sha256`), as the
    # notebooks' report schemas say; `metrics` lists their names.
    clash = sorted(set(metrics) & set(report))
    if clash:
        raise PipelineError(f"{job.name}: metric names {clash} clash with provenance fields")
    report.update(metrics)
    atomic_write_text(out_dir / f"{job.name}.html", render_report(nb, report))
    atomic_write_json(out_dir / f"{job.name}.json", report)
    write_index(out_dir)
    return report


def committed_reports(directory: Path) -> bool:
    return directory.resolve() == (REPO_ROOT / "reports").resolve()


# What the pipeline itself writes; changes there do not make a tree dirty for it.
_OWN_OUTPUTS = ("reports/", "figures/", "README.md")


def changed_sources(status: str | None) -> list[str]:
    """Paths of `git status --porcelain` that are not the pipeline's own outputs."""
    return [
        line[3:]
        for line in (status or "").splitlines()
        if line[3:] and not line[3:].startswith(_OWN_OUTPUTS)
    ]


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
                f"another pipeline run ({holder}) is writing {_display_path(directory)}; wait "
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


def run(
    preset: str = COMMITTED_PRESET,
    only: list[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    log_output: bool = False,
    allow_dirty: bool = False,
) -> list[dict[str, Any]]:
    _prepare_environment()
    jobs = plan(preset, only, device, seed, extra)
    out_dir = reports_dir(preset)
    committed = preset == COMMITTED_PRESET and committed_reports(out_dir)
    if committed and not allow_dirty:
        check_clean_tree(_git("status", "--porcelain", "--untracked-files=no"))
    run_id = new_run_id()
    run_dir = runs_dir(preset) / run_id
    results = []
    with reports_lock(out_dir, run_id):
        for i, job in enumerate(jobs, 1):
            print(
                f"[pipeline] {job.name} ({i}/{len(jobs)}): preset {preset}, device {device}, "
                f"run {run_id}",
                flush=True,
            )
            report = run_job(job, run_dir=run_dir, log_output=log_output)
            print(
                f"[pipeline] {job.name}: done in {_duration(report['wall_time_s']['total'])} -> "
                f"{_display_path(out_dir / (job.name + '.html'))}",
                flush=True,
            )
            results.append(report)
        if committed and update_readme(REPO_ROOT / "README.md", out_dir):
            print("[pipeline] README: findings table rewritten from the reports", flush=True)
    print(f"[pipeline] index: {_display_path(out_dir / 'index.html')}", flush=True)
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
            extra_arguments=KERNEL_ARGUMENTS,
            resources={"metadata": {"path": str(path.parent)}},
        )
        try:
            client.execute()
        except CellExecutionError as exc:
            raise PipelineError(f"notebook {path.stem} failed while syncing:\n{exc}") from exc
        for cell in nb.cells:  # warnings and progress bars are not results
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if not _is_stderr(o)]
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
        help="set a notebook parameter (repeatable); NAME.key=VALUE sets one value of a group",
    )  # fmt: skip
    parser.add_argument("--sync-notebooks", action="store_true", help="refresh notebooks/*.ipynb")
    parser.add_argument("--list", action="store_true", help="list notebooks and parameters")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the preset, device and parameters, print what would run, run nothing",
    )
    parser.add_argument("--log-output", action="store_true", help="stream notebook output")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write the committed reports from a tree with uncommitted changes",
    )
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
        if args.dry_run:
            for job in plan(args.preset, only, args.device, args.seed, extra):
                print(f"[pipeline] would run {job.name} with {job.parameters}")
            return 0
        run(
            args.preset,
            only,
            args.device,
            args.seed,
            extra,
            log_output=args.log_output,
            allow_dirty=args.allow_dirty,
        )
    except (PipelineError, ValueError) as exc:
        print(f"[pipeline] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
