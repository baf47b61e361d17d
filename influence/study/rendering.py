"""Rendering of the study's reports: a notebook's page, the index and the README's table.

Every function here is pure: it takes report records (the dicts the pipeline writes as
`<reports>/<notebook>.json`) and returns HTML or Markdown; the pipeline decides where they go.

A report page opens with the answer: the question, the paper's finding (with a link to the
paper), ours, the verdict with its reason and the findings table; then how to reproduce the
page, the provenance and the contents; then the evidence, the executed notebook with its code
folded. A page or index of any preset but the committed one carries a banner saying it is a
plumbing check, and its verdicts are greyed.
"""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import display
from .bookkeeping import PipelineError, display_path
from .findings import COLUMNS as FINDING_COLUMNS
from .run_context import COMMITTED_PRESET, PUBLISHED_PRESETS

TEMPLATES = Path(__file__).resolve().parent / "templates"
PAPER_URL = "https://arxiv.org/abs/2308.03296"
PAPER = (
    "Grosse et al. (2023), <i>Studying Large Language Model Generalization with Influence "
    f'Functions</i> (<a href="{PAPER_URL}">arXiv:2308.03296</a>)'
)
STANDARD = ("preset", "device", "seed")
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
REPORT_TAGS_REMOVED = ("parameters", "injected-parameters")
VERDICT_WORDS = ("agrees", "disagrees", "inconclusive", "not comparable", "mixed")


# -- small pieces ------------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def overrides(report: dict[str, Any]) -> dict[str, Any]:
    """The parameters the run changed from its preset (everything but preset, device, seed)."""
    return {k: v for k, v in report.get("parameters", {}).items() if k not in STANDARD}


def is_plumbing(report: dict[str, Any]) -> bool:
    """A run that is not a committed finding: another preset, or changed parameters."""
    return report.get("preset") not in PUBLISHED_PRESETS or bool(overrides(report))


def banner(preset: str, changed: dict[str, Any] | None = None) -> str:
    if preset not in PUBLISHED_PRESETS:
        text = (
            f"Plumbing check at the {html.escape(preset)} preset, not findings: this run only "
            "shows that the code runs end to end. Its corpus, models and query counts are too "
            "small for its numbers to mean anything; the verdicts are greyed. The findings are "
            f"the reports of the {COMMITTED_PRESET} preset."
        )
    else:
        shown = html.escape(json.dumps(changed, sort_keys=True))
        text = (
            f"Parameters changed from the {html.escape(preset)} preset ({shown}): a check, not "
            "the committed findings; the verdicts are greyed."
        )
    return f'<div class="plumbing-banner" role="note">{text}</div>'


def verdict_class(verdict: str) -> str:
    word = next((w for w in VERDICT_WORDS if verdict.startswith(w)), "not comparable")
    return "verdict " + word.replace(" ", "-")


def verdict_html(verdict: str) -> str:
    return f'<span class="{verdict_class(verdict)}">{html.escape(verdict)}</span>'


def reproduce_commands(report: dict[str, Any]) -> tuple[str, str]:
    """(the `make reproduce` line, the papermill line) that re-run this page's notebook with
    its preset, device, seed and changed parameters."""
    nb = report["notebook"]
    preset, device, seed = report["preset"], report["device"], report["seed"]
    make = f"make reproduce ONLY={nb} PRESET={preset}"
    if device != "cpu":
        make += f" DEVICE={device}"
    if seed:
        make += f" SEED={seed}"
    changed = overrides(report)
    if changed:
        pairs = " ".join(f"-p {k}={json.dumps(v)}" for k, v in changed.items())
        make += " PIPELINE_ARGS=" + shlex.quote(pairs)
    pm = [f".venv/bin/papermill notebooks/{nb}.ipynb out.ipynb", f"-p preset {preset}"]
    if device != "cpu":
        pm.append(f"-p device {device}")
    if seed:
        pm.append(f"-p seed {seed}")
    for k, v in changed.items():
        value = v if isinstance(v, str) else json.dumps(v)
        pm.append(f"-p {k} {shlex.quote(str(value))}")
    return make, " ".join(pm)


def findings_html(findings: Sequence[dict[str, Any]]) -> str:
    """The findings rows of a report record as the page's table."""
    import pandas as pd

    columns = [c for c in FINDING_COLUMNS if c != "base_rate" or any(f.get(c) for f in findings)]
    rows = [{c: f.get(c, "") or "" for c in columns} for f in findings]
    frame = pd.DataFrame(rows, columns=columns)
    return display.table(
        frame,
        headers=FINDING_COLUMNS,
        formats={"verdict": verdict_html},
        html_columns=["verdict"],
        collapse_after=40,
        stacked=True,
    ).html


# -- the report page ---------------------------------------------------------------------------
def _is_stderr(output) -> bool:
    return output.get("output_type") == "stream" and output.get("name") == "stderr"


def report_notebook(nb):
    """What a reader sees of an executed notebook: no parameter cells (the header lists the
    parameters), no nbval check cells (test fixtures), no stderr (warnings, progress bars),
    no title (the header has it)."""
    nb = copy.deepcopy(nb)
    cells = []
    title_dropped = False
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if any(t in tags for t in REPORT_TAGS_REMOVED):
            continue
        if cell.cell_type == "code":
            if cell.source.lstrip().startswith(CHECK_MARK):
                continue
            cell.outputs = [o for o in cell.get("outputs", []) if not _is_stderr(o)]
        elif cell.cell_type == "markdown" and not title_dropped:
            lines = cell.source.splitlines()
            if lines and lines[0].startswith("# "):
                cell.source = "\n".join(lines[1:]).strip()
                title_dropped = True
        cells.append(cell)
    nb.cells = cells
    return nb


def notebook_html(nb, *, title: str = "", header: str = "", footer: str = "", plumbing=False):
    """The page around an executed notebook: nbconvert's lab page with the study's template
    (code folded into `<details>`, prompts hidden)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        template_name="report",
        extra_template_basedirs=[str(TEMPLATES)],
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    exporter.embed_images = True
    exporter.log.setLevel("ERROR")
    resources = {
        "metadata": {"name": title or "Report"},
        "report_header": header,
        "report_footer": footer,
        "report_body_class": "plumbing" if plumbing else "",
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
    """A list linking the page's second-level headings."""
    items = [
        f'<li><a href="#{anchor}">{re.sub(r"<[^>]+>", "", text).strip()}</a></li>'
        for anchor, text in _HEADING.findall(page)
    ]
    if not items:
        return ""
    return f'<nav class="report-toc"><b>Contents</b><ul>{"".join(items)}</ul></nav>'


def navigation(name: str, names: Sequence[str]) -> str:
    links = ['<a href="index.html">↑ all reports</a>']
    if name in names:
        i = list(names).index(name)
        if i > 0:
            links.append(f'<a href="{names[i - 1]}.html">← {html.escape(names[i - 1])}</a>')
        if i + 1 < len(names):
            links.append(f'<a href="{names[i + 1]}.html">{html.escape(names[i + 1])} →</a>')
    return f'<nav class="report-nav">{"".join(links)}</nav>'


def report_header(report: dict[str, Any], toc: str, names: Sequence[str]) -> str:
    """The answer first (question, the paper's finding, ours, the verdict and its reason, the
    findings table), then how to reproduce the page, provenance, contents, the code toggle."""
    summary = report.get("summary") or {}
    prov = report.get("provenance", {})
    commit = (prov.get("git_commit") or "unknown")[:12]
    if prov.get("git_dirty"):
        commit += " (uncommitted changes)"
    changed = overrides(report)
    meta = [
        f"preset <b>{html.escape(report['preset'])}</b>",
        f"seed {report['seed']}",
        f"device {html.escape(str(report['device']))}",
        f"{report.get('threads', '?')} CPU thread(s)",
        f"commit {html.escape(commit)}",
        f"run {report['started_at'][:10]}",
        f"wall time {duration(report['wall_time_s']['total'])}",
    ]
    if changed:
        meta.append("parameters " + html.escape(json.dumps(changed, sort_keys=True)))
    parts = [navigation(report["notebook"], names), f"<h1>{html.escape(report['title'])}</h1>"]
    if is_plumbing(report):
        parts.append(banner(report["preset"], changed))
    answer = []
    if summary.get("question"):
        answer.append(f"<p><b>Question.</b> {html.escape(summary['question'])}</p>")
    where = f", {html.escape(summary['reference'])}" if summary.get("reference") else ""
    if summary.get("paper"):
        answer.append(
            f"<p><b>The paper found.</b> {html.escape(summary['paper'])} ({PAPER}{where}.)</p>"
        )
    if summary.get("here"):
        answer.append(f"<p><b>We find.</b> {html.escape(summary['here'])}</p>")
    if summary.get("verdict"):
        reason = f" — {html.escape(summary['reason'])}" if summary.get("reason") else ""
        answer.append(f"<p><b>Verdict:</b> {verdict_html(summary['verdict'])}{reason}</p>")
    check = report.get("validation")
    if check:
        warn = "" if check.get("ok") else " report-validation-warn"
        answer.append(
            f'<p class="report-validation{warn}"><b>Estimator check.</b> '
            f"{html.escape(check['sentence'])}</p>"
        )
    if report.get("findings"):
        answer.append(findings_html(report["findings"]))
    if answer:
        parts.append('<section class="report-answer">' + "\n".join(answer) + "</section>")
    make, pm = reproduce_commands(report)
    parts.append(
        '<p class="report-reproduce"><b>Reproduce this page:</b> '
        f"<code>{html.escape(make)}</code>, or run the notebook alone: "
        f"<code>{html.escape(pm)}</code></p>"
    )
    parts.append(f'<p class="report-meta">{" · ".join(meta)}</p>')
    parts.append(toc)
    parts.append(f"<p>{_TOGGLE}</p>")
    return '<header class="report-header">' + "\n".join(parts) + "</header>"


def report_page(nb, report: dict[str, Any], names: Sequence[str]) -> str:
    """The full report page of an executed notebook and its report record; `names` are the
    study's notebooks in order (for the previous / next links)."""
    placeholder = "<!-- table of contents -->"
    header = report_header(report, placeholder, names)
    footer = f'<footer class="report-footer">{navigation(report["notebook"], names)}</footer>'
    page = notebook_html(
        report_notebook(nb),
        title=report["title"],
        header=header,
        footer=footer,
        plumbing=is_plumbing(report),
    )
    return page.replace(placeholder, table_of_contents(page), 1)


# -- the index ---------------------------------------------------------------------------------
INDEX_CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 1.5rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
a { color: #0b5cad; text-decoration: underline; }
section { border-top: 1px solid #ddd; padding: 1rem 0; }
figure { margin: .5rem 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: .92rem; max-width: 60rem; }
.table-wrap { overflow-x: auto; }
table.summary { border-collapse: collapse; font-size: .92rem; min-width: 40rem; }
table.summary th, table.summary td { border-bottom: 1px solid #ddd; padding: .45rem .5rem;
       text-align: left; vertical-align: top; }
table.summary th { background: #f3f4f6; }
.verdict { font-weight: 600; }
.agrees { color: #1a7f37; } .disagrees { color: #cf222e; } .inconclusive { color: #9a6700; }
.mixed { color: #8250df; } .not-comparable { color: #57606a; }
.plumbing .verdict { color: #8c8c8c; font-weight: 400; }
.plumbing-banner { background: #fff4ce; border: 1px solid #d4a72c; padding: .6rem .9rem;
       margin: .8rem 0; border-radius: 4px; }
.reason { color: #555; font-size: .88em; }
.meta { color: #666; font-size: .9em; }
@media (max-width: 640px) {
  table.summary { min-width: 0; }
  table.summary thead { display: none; }
  table.summary, table.summary tbody, table.summary tr, table.summary td { display: block; }
  table.summary tr { border-bottom: 2px solid #bbb; padding: .4rem 0; }
  table.summary td { border: none; padding: .15rem 0; }
  table.summary td::before { content: attr(data-label) ": "; font-weight: 600; }
}
"""
INDEX_COLUMNS = ("notebook", "question", "the paper found", "we find", "verdict", "wall time")


def headline_figure(report: dict[str, Any], reports_dir: Path) -> dict[str, Any] | None:
    """The headline figure of a report record: src (relative to the reports folder), width
    and caption; the notebook's first figure when none is called "headline"."""
    figures = report.get("figures") or {}
    names = ["headline", *figures] if "headline" in figures else list(figures)
    for name in names:
        rec = figures[name]
        if not isinstance(rec, dict):  # a report written before figures carried captions
            rec = {"files": rec}
        for path in rec.get("files", []):
            if path.endswith(".png"):
                src = os.path.relpath(Path(path).resolve(), reports_dir.resolve())
                return {"src": src, "width": rec.get("width"), "caption": rec.get("caption", "")}
    return None


def stage_times(entry: dict[str, Any], share: float = 0.05, minute: float = 60.0) -> str:
    """The stages that took a minute or `share` of a notebook's wall time, in the order of its
    record ("evaluate 2 min 10 s, train suite 43 min 10 s"); empty when none did."""
    wall = entry.get("wall_time_s", {})
    total = wall.get("total")
    if not isinstance(total, int | float) or total <= 0:
        return ""
    return ", ".join(
        f"{name.replace('_', ' ')} {duration(seconds)}"
        for name, seconds in (wall.get("stages") or {}).items()
        if isinstance(seconds, int | float) and seconds >= min(minute, share * total)
    )


# The artifact kinds whose building is a long stage of the default study: what a run that
# found them cached leaves out of its times (corpus and tokenizer take seconds).
COSTLY_KINDS = {
    "model": "training the suite",
    "influence_scores": "the influence stage",
    "self_influence": "self-influence",
    "lm_validation": "notebook 01's language-model checks",
}


def run_sentence(entries: Sequence[dict[str, Any]]) -> str:
    """How the index's wall times were measured: in one run or several, and whether the run
    started from an empty artifacts folder (so that training and the influence stage are in
    the times) or found artifacts cached (`cache_at_start` of each report)."""
    total = sum(
        w for e in entries if isinstance(w := e.get("wall_time_s", {}).get("total"), int | float)
    )
    runs = {e.get("run_id") for e in entries}
    caches = [e.get("cache_at_start") for e in entries]
    if len(runs) == 1 and caches and caches[0] == []:
        return (
            f"the whole study took {duration(total)} in one run from an empty artifacts "
            "folder, training the suite and computing its influence scores included (the "
            "stages of each notebook are under its wall time)"
        )
    if len(runs) == 1 and caches and caches[0]:
        costly = [COSTLY_KINDS[k] for k in caches[0] if k in COSTLY_KINDS]
        missing = (
            f"so {' and '.join(costly)} {'is' if len(costly) == 1 else 'are'} not in its times"
            if costly
            else "which take seconds to build, so every costly stage is in its times"
        )
        return (
            f"the whole study took {duration(total)} in one run that found "
            f"{', '.join(caches[0])} cached by an earlier run, {missing}"
        )
    if caches and all(c == [] for c in caches):
        return (
            f"its notebooks took {duration(total)} in all, over {len(runs)} runs, each from an "
            "empty artifacts folder, so training the suite and computing its influence scores "
            "are in these times (the stages of each notebook are under its wall time)"
        )
    # Several runs: a costly stage is surely missing from the times when every run found it
    # cached (one run may have built what another found cached, so nothing less is certain).
    always = set.intersection(*map(set, caches)) if caches and None not in caches else set()
    costly = [label for kind, label in COSTLY_KINDS.items() if kind in always]
    if costly:
        return (
            f"its notebooks took {duration(total)} in all, over {len(runs)} runs, each of which "
            f"found {', '.join(sorted(always))} cached by an earlier run, so "
            f"{' and '.join(costly)} {'is' if len(costly) == 1 else 'are'} not in these times"
        )
    return (
        f"its notebooks took {duration(total)} in all, over {len(runs)} runs, some of which "
        "found artifacts cached by earlier runs, so training and the influence stage are not "
        "all in these times"
    )


def index_page(entries: Sequence[dict[str, Any]], reports_dir: Path) -> str:
    """`index.html`: the question, the paper's finding, ours, the verdict with its reason and
    the wall time of every notebook, then each notebook's headline figure."""
    preset = entries[0]["preset"] if entries else "?"
    plumbing = any(is_plumbing(e) for e in entries)
    rows, sections = [], []
    for entry in entries:
        nb = entry["notebook"]
        summary = entry.get("summary") or {}
        wall = entry.get("wall_time_s", {}).get("total")
        verdict = summary.get("verdict") or "not comparable"
        reason = summary.get("reason") or ""
        stages = stage_times(entry)
        cell = verdict_html(verdict) + (
            f'<div class="reason">{html.escape(reason)}</div>' if reason else ""
        )
        cells = [
            f'<a href="{nb}.html">{html.escape(nb)}</a>',
            html.escape(summary.get("question") or entry.get("title", "")),
            html.escape(summary.get("paper", "")),
            html.escape(summary.get("here") or ""),
            cell,
            duration(wall) + (f'<div class="reason">{html.escape(stages)}</div>' if stages else ""),
        ]
        rows.append(
            "<tr>"
            + "".join(
                f'<td data-label="{h}">{c}</td>' for h, c in zip(INDEX_COLUMNS, cells, strict=True)
            )
            + "</tr>"
        )
        fig = headline_figure(entry, reports_dir)
        img = ""
        if fig:
            width = f' width="{fig["width"]}"' if fig.get("width") else ""
            caption = fig["caption"] or f"The headline figure of {nb}."
            img = (
                f'<figure><a href="{nb}.html"><img src="{html.escape(fig["src"])}"{width} '
                f'alt="{html.escape(caption, quote=True)}"></a>'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        prov = entry.get("provenance", {})
        commit = (prov.get("git_commit") or "unknown")[:12]
        sections.append(
            f'<section id="{nb}">\n<h2><a href="{nb}.html">{html.escape(nb)}</a>: '
            f"{html.escape(entry.get('title', ''))}</h2>\n{img}\n"
            f'<p class="meta">preset {entry["preset"]}, device {entry["device"]}, seed '
            f"{entry['seed']}, commit {commit}, wall time {duration(wall)}; "
            f'<a href="{nb}.json">metrics and provenance</a></p>\n</section>'
        )
    head = "".join(f"<th>{h}</th>" for h in INDEX_COLUMNS)
    validation = ""
    if preset == COMMITTED_PRESET and (reports_dir / "validation" / "index.html").is_file():
        validation = (
            "<p>EK-FAC against exact Gauss–Newton CG on the suite's language models, beyond "
            'what notebook 01 runs here: <a href="validation/index.html">the validation '
            "reports</a>. Notebooks 02–07 cite the check for every size they use.</p>\n"
        )
    table = (
        f'<div class="table-wrap"><table class="summary"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Influence study: reports ({html.escape(preset)})</title>\n"
        f"<style>{INDEX_CSS}</style>\n</head>\n"
        f'<body class="{"plumbing" if plumbing else ""}">\n'
        "<h1>Studying LLM generalisation with influence functions, at small scale</h1>\n"
        + (banner(preset, overrides(entries[0])) if plumbing and entries else "")
        + f"<p>{PAPER} asked, of models up to 52B parameters, which training sequences make "
        "a model say what it says. We ask each of their questions again on a suite of small "
        f"models trained here. Preset <b>{html.escape(preset)}</b>; {run_sentence(entries)}. "
        "A finding agrees when it is significant (p &lt; 0.05), in the "
        "paper's direction and at least its stated threshold; disagrees when significant and "
        "opposite; is inconclusive otherwise; a notebook agrees only if all its comparable "
        "findings do, else it is mixed.</p>\n"
        + validation
        + table
        + "\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


# -- the README's table ------------------------------------------------------------------------
FINDINGS_START = "<!-- findings: written by the pipeline from reports/*.json -->"
FINDINGS_END = "<!-- end of findings -->"


def findings_table(entries: Sequence[dict[str, Any]]) -> str:
    """The README's table of findings, one row per report, from its numbers."""
    lines = [
        "| notebook | question | what we find (default preset) | verdict | report |",
        "| --- | --- | --- | --- | --- |",
    ]
    for entry in entries:
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


def readme_with_findings(text: str, entries: Sequence[dict[str, Any]]) -> str | None:
    """The README text with its findings table rewritten; None if it has no markers."""
    if FINDINGS_START not in text or FINDINGS_END not in text:
        return None
    head, rest = text.split(FINDINGS_START, 1)
    _, tail = rest.split(FINDINGS_END, 1)
    return f"{head}{FINDINGS_START}\n{findings_table(entries)}\n{FINDINGS_END}{tail}"


def read_reports(directory: Path) -> list[dict[str, Any]]:
    """Every `<notebook>.json` report record of a reports folder, in notebook order. One that
    cannot be read stops here, named: the index must never drop a notebook silently."""
    entries = []
    for path in sorted(directory.glob("[0-9][0-9]_*.json")):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            entry["notebook"]  # noqa: B018 - a record without its name is not a report
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PipelineError(
                f"the report record {display_path(path)} cannot be read ({exc}); the index "
                "would drop that notebook. Re-run it (make reproduce ONLY="
                f"{path.stem}) or delete its .json and .html"
            ) from None
        entries.append(entry)
    return entries
