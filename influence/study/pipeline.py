"""Run the study's notebooks and publish their reports.

    python -m influence.study.pipeline --preset default [--only 01_ihvp_accuracy] [--device cuda]
    python -m influence.study.pipeline --sync-notebooks --only 02      # refresh notebooks/*.ipynb
    python -m influence.study.pipeline --index-only      # rewrite the index from the records

Each `notebooks/NN_topic.py` (jupytext py:percent, the reviewed source) is converted and run
with papermill, parameters `preset`, `device`, `seed` (and any `-p NAME=VALUE`, or
`-p NAME.key=VALUE` for one value of a group of settings) injected and checked, values and
ranges, before anything runs (`plan`). Each run has its own id: its executed notebooks,
metrics and run-context files go to `artifacts/runs/<preset>/<run id>/`. The notebook's
`Report` learns where to write from its run-context file (`run_context.RunContext`), the one
interface between the two. On success the notebook's report page, its JSON record, the index
(and, for the committed reports, the README's findings table) and its figures are published
together (`bookkeeping.Publication`): `<reports>` is `reports/` (committed) at the `default`
preset, `reports/validation/` (committed, cited by the default reports) at the `validation`
preset and `artifacts/reports/<preset>/` otherwise; one run at a time writes it (a lock), and
the committed reports are written only from a clean git tree (`--allow-dirty` overrides).

A failing notebook stops the pipeline with the notebook and cell named; reports already
published stay as they were; a re-run resumes from the cached artifacts.

Locations can be overridden (the tests do): `--notebooks-dir` / `INFLUENCE_NOTEBOOKS_DIR`,
`--reports-dir` / `INFLUENCE_REPORTS`, `--figures-dir` / `INFLUENCE_FIGURES`,
`--artifacts-dir` / `INFLUENCE_ARTIFACTS` (the kernels inherit the last one for the caches).
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from influence.io import atomic_write_json, atomic_write_text

from . import rendering
from .bookkeeping import (
    PipelineError,
    Publication,
    cached_kinds,
    check_clean_tree,
    committed_reports,
    display_path,
    git,
    new_run_id,
    notebooks_dir,
    provenance,
    recover,
    reports_dir,
    reports_lock,
    runs_dir,
)
from .parameters import check_device, check_seed, split_dotted, valid_names
from .presets import PRESET_NAMES, SECTIONS, check_preset, preset_block, resolve
from .run_context import (
    COMMITTED_PRESET,
    ENV,
    PUBLISHED_PRESETS,
    THREADS,
    RunContext,
    figure_dir,
)

__all__ = ["PipelineError", "main", "plan", "run", "sync_notebooks"]

KERNEL_NAME = "python3"
# The kernel's own start-up warnings (e.g. "running over TCP without encryption") are not for
# the reader of the console.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
HEARTBEAT_S = 60.0
REQUIRED_PARAMETERS = ("preset", "device", "seed")
NOTEBOOK_GLOB = "[0-9][0-9]_*.py"


# -- planning ----------------------------------------------------------------------------------
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
    """Parameters declared in the notebook's `parameters` cell, with their defaults: the
    cell's assignments `name = literal` (annotated or not), read with `ast`."""
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise PipelineError(f"expected exactly one cell tagged 'parameters', found {len(cells)}")
    params: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        try:
            params[target.id] = ast.literal_eval(value)
        except ValueError:
            raise PipelineError(
                f"the parameters cell sets {target.id} to an expression; parameters must be "
                f"literals (numbers, strings, None, lists, dicts): {ast.unparse(value)}"
            ) from None
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


@dataclass
class Job:
    path: Path
    nb: Any
    parameters: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.stem


def plan(
    preset: str,
    only: list[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> list[Job]:
    """Check everything up front: preset, device, seed, notebook names, parameter names,
    types and ranges.

    `extra` may name one value of a group of settings with a dotted name
    (`language_model.n_queries`); it is passed to the notebook as a dict that is merged into
    the preset's."""
    check_preset(preset)
    check_device(device)
    check_seed(seed)
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
        if path.stem in SECTIONS:  # wrong types and values out of range fail now
            settings = {k: v for k, v in values.items() if k in preset_block(path.stem, preset)}
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


# -- running -----------------------------------------------------------------------------------
def _prepare_environment() -> None:
    """What every kernel inherits: deterministic hashing, inline figures, the venv's kernels,
    one thread per BLAS pool, and an absolute artifacts location (a kernel runs in
    `notebooks/`, so a relative path would point elsewhere there)."""
    os.environ.setdefault("PYTHONHASHSEED", "0")
    # Inline, not Agg: with Agg `plt.show()` draws nothing and the reports have no figures.
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    os.environ.pop(ENV, None)  # set per job, never inherited from a caller
    # The pipeline checks parameters itself; papermill's own warnings (a name outside the
    # parameters cell) would only be noise on the console.
    logging.getLogger("papermill").setLevel(logging.ERROR)
    for var in ("INFLUENCE_ARTIFACTS", "INFLUENCE_REPORTS", "INFLUENCE_FIGURES"):
        if os.environ.get(var):
            os.environ[var] = str(Path(os.environ[var]).resolve())


def _failure_message(job: Job, exc: BaseException, executed: Path) -> str:
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
        f"notebook {job.name} ({display_path(job.path)}) failed {where}\n"
        f"  {ename}: {evalue}\n"
        f"  executed notebook with the traceback: {display_path(executed)}\n"
        f"  reports already published are unchanged; a re-run resumes from cached artifacts"
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


def _record(job: Job, data: dict[str, Any], wall: float, started, run_id: str,
            out_dir: Path, final_figures: Path,
            cache_at_start: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The report record (`<reports>/<notebook>.json`) of a finished notebook."""
    figures = {
        name: {**rec, "files": [display_path(final_figures / f) for f in rec.get("files", [])]}
        for name, rec in (data.get("figures") or {}).items()
    }
    metrics = data.get("metrics", {})
    report = {
        "notebook": job.name,
        "title": notebook_title(job.nb, job.name),
        "source": display_path(job.path),
        "preset": job.parameters["preset"],
        "device": job.parameters["device"],
        "seed": job.parameters["seed"],
        "parameters": job.parameters,
        "params": data.get("params", {}),
        "threads": data.get("threads"),
        "metrics": sorted(metrics),
        "summary": data.get("summary", {}),
        "findings": data.get("findings", []),
        "validation": data.get("validation"),
        "figures": figures,
        "wall_time_s": {
            "total": round(wall, 3),
            "stages": {k: round(v, 3) for k, v in data.get("stages", {}).items()},
        },
        "started_at": started.isoformat(timespec="seconds"),
        "run_id": run_id,
        # What the run found cached when it began ([] = an empty artifacts folder): the index
        # says whether its wall times include training and the influence stage.
        "cache_at_start": cache_at_start,
        "provenance": provenance(job.parameters["device"]),
    }
    fig = rendering.headline_figure(report, out_dir)
    report["headline_figure"] = fig["src"] if fig else None
    # Headline metrics sit at the top level (e.g. `settings`, `corpus_sha256`), as the
    # notebooks' report schemas say; `metrics` lists their names.
    clash = sorted(set(metrics) & set(report))
    if clash:
        raise PipelineError(f"{job.name}: metric names {clash} clash with report fields")
    report.update(metrics)
    return report


def run_job(
    job: Job,
    *,
    run_dir: Path,
    out_dir: Path,
    readme: Path | None,
    log_output: bool = False,
    cache_at_start: list[str] | None = None,
) -> dict[str, Any]:
    """Execute one notebook and publish its outputs together; raises PipelineError on
    failure (nothing of the notebook published then)."""
    import nbformat
    import papermill

    preset = job.parameters["preset"]
    run_dir.mkdir(parents=True, exist_ok=True)
    source = run_dir / f"{job.name}.source.ipynb"
    executed = run_dir / f"{job.name}.ipynb"
    final_figures = figure_dir(job.name, preset)
    pub = Publication(out_dir, run_dir.name)
    staged = {
        "html": pub.stage(out_dir / f"{job.name}.html"),
        "json": pub.stage(out_dir / f"{job.name}.json"),
        "index": pub.stage(out_dir / "index.html"),
        "figures": pub.stage(final_figures),
    }
    if readme is not None:
        staged["readme"] = pub.stage(readme)
    context = RunContext(
        notebook=job.name,
        preset=preset,
        metrics_path=run_dir / f"{job.name}.metrics.json",
        figure_dir=staged["figures"],
        final_figure_dir=final_figures,
        progress_path=run_dir / f"{job.name}.progress",
        threads=THREADS,
    )
    nbformat.write(job.nb, str(source))
    pub.begin()
    try:
        staged["figures"].mkdir(parents=True, exist_ok=True)
        os.environ[ENV] = str(context.write(run_dir / f"{job.name}.context.json"))
        started = _dt.datetime.now(_dt.timezone.utc)
        t0 = time.perf_counter()
        try:
            with _console(job.name, context.progress_path):
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
        finally:
            os.environ.pop(ENV, None)
        wall = time.perf_counter() - t0
        if not context.metrics_path.exists():
            raise PipelineError(
                f"notebook {job.name} ran but produced no metrics: it must call report.save() "
                f"(executed notebook: {display_path(executed)})"
            )
        data = json.loads(context.metrics_path.read_text())
        report = _record(
            job, data, wall, started, run_dir.name, out_dir, final_figures, cache_at_start
        )
        others = [e for e in rendering.read_reports(out_dir) if e["notebook"] != job.name]
        entries = sorted([*others, report], key=lambda e: e["notebook"])
        names = [p.stem for p in discover()]
        atomic_write_text(staged["html"], rendering.report_page(nb, report, names))
        atomic_write_json(staged["json"], report)
        _write_index(staged, entries, out_dir, readme)
    except BaseException:
        pub.abort()
        raise
    pub.commit()
    return report


def _write_index(
    staged: dict[str, Path], entries: list[dict[str, Any]], out_dir: Path, readme: Path | None
) -> None:
    """Write the index of `entries` to `staged["index"]` and, when `readme` is given, that
    README with its findings table of `entries` to `staged["readme"]`."""
    atomic_write_text(staged["index"], rendering.index_page(entries, out_dir))
    if readme is not None:
        text = rendering.readme_with_findings(readme.read_text(), entries)
        atomic_write_text(staged["readme"], text if text is not None else readme.read_text())


def _checked_readme(preset: str, out_dir: Path, allow_dirty: bool) -> Path | None:
    """Refuse to write committed reports from a tree with uncommitted changes (unless
    `allow_dirty`); the README whose findings table follows `out_dir`'s reports (only the
    committed default ones have one), or None."""
    committed = preset in PUBLISHED_PRESETS and committed_reports(out_dir)
    if committed and not allow_dirty:
        check_clean_tree(git("status", "--porcelain", "--untracked-files=no"))
    if committed and preset == COMMITTED_PRESET:
        from .cache import REPO_ROOT

        return REPO_ROOT / "README.md"
    return None


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
    readme = _checked_readme(preset, out_dir, allow_dirty)
    run_id = new_run_id()
    run_dir = runs_dir(preset) / run_id
    results = []
    cache_at_start = cached_kinds()
    with reports_lock(out_dir, run_id):
        done = recover(out_dir)
        if done:
            print(f"[pipeline] {display_path(out_dir)}: {done}", flush=True)
        for i, job in enumerate(jobs, 1):
            print(
                f"[pipeline] {job.name} ({i}/{len(jobs)}): preset {preset}, device {device}, "
                f"run {run_id}",
                flush=True,
            )
            report = run_job(
                job,
                run_dir=run_dir,
                out_dir=out_dir,
                readme=readme,
                log_output=log_output,
                cache_at_start=cache_at_start,
            )
            print(
                f"[pipeline] {job.name}: done in "
                f"{rendering.duration(report['wall_time_s']['total'])} -> "
                f"{display_path(out_dir / (job.name + '.html'))}",
                flush=True,
            )
            results.append(report)
    print(f"[pipeline] index: {display_path(out_dir / 'index.html')}", flush=True)
    return results


def rewrite_index(preset: str = COMMITTED_PRESET, allow_dirty: bool = False) -> Path:
    """Rewrite the index (and, for the committed reports, the README's findings table) from
    the report records already published, running no notebook: for when the index's code
    changed but no result did. Both are replaced together, as after a run."""
    check_preset(preset)
    out_dir = reports_dir(preset)
    readme = _checked_readme(preset, out_dir, allow_dirty)
    run_id = new_run_id()
    with reports_lock(out_dir, run_id):
        recover(out_dir)
        entries = rendering.read_reports(out_dir)
        if not entries:
            raise PipelineError(
                f"no report records in {display_path(out_dir)}: run the pipeline for preset "
                f"{preset} first"
            )
        pub = Publication(out_dir, run_id)
        staged = {"index": pub.stage(out_dir / "index.html")}
        if readme is not None:
            staged["readme"] = pub.stage(readme)
        pub.begin()
        try:
            _write_index(staged, entries, out_dir, readme)
        except BaseException:
            pub.abort()
            raise
        pub.commit()
    print(f"[pipeline] index: {display_path(out_dir / 'index.html')}", flush=True)
    return out_dir / "index.html"


def sync_notebooks(only: list[str] | None = None, timeout: int | None = None) -> list[Path]:
    """Re-execute each notebook as written (its parameters cell says `smoke`) and store the
    outputs in the paired `.ipynb`, the file nbval compares against."""
    import jupytext
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from .rendering import _is_stderr

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
        print(f"[sync] {path.stem}: wrote {display_path(target)}", flush=True)
    return written


# -- command line ------------------------------------------------------------------------------
def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    items = [item for value in values for item in value.replace(",", " ").split()]
    return items or None


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seed must be a non-negative integer, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m influence.study.pipeline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--preset", default=COMMITTED_PRESET, help=f"one of {PRESET_NAMES}")
    parser.add_argument("--only", action="append", help="notebook name(s), e.g. 01_ihvp_accuracy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument(
        "-p", "--param", action="append", default=[], metavar="NAME=VALUE",
        help="set a notebook parameter (repeatable); NAME.key=VALUE sets one value of a group",
    )  # fmt: skip
    parser.add_argument("--sync-notebooks", action="store_true", help="refresh notebooks/*.ipynb")
    parser.add_argument("--list", action="store_true", help="list notebooks and parameters")
    parser.add_argument(
        "--index-only",
        action="store_true",
        help="rewrite the index (and the README's findings table) from the published reports; "
        "run no notebook",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the preset, device, seed and parameters (names, types, ranges), print what "
        "would run, run nothing",
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
        if args.index_only:
            if args.dry_run:
                check_preset(args.preset)
                print(
                    f"[pipeline] would rewrite {display_path(reports_dir(args.preset))}/index.html"
                )
            else:
                rewrite_index(args.preset, allow_dirty=args.allow_dirty)
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
