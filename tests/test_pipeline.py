"""The notebook pipeline end to end, on throwaway notebooks in a temporary folder."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import nbformat
import pytest

from influence.study import bookkeeping, pipeline, rendering

GOOD = """\
# %% [markdown]
# # Toy question: does the pipeline work?
# Some prose under the title.

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
scale = None

# %%
import sys

import matplotlib.pyplot as plt

import pandas as pd

from influence.study.findings import judge
from influence.study.parameters import notebook_config
from influence.study.reporting import Report
from influence.study.stats import Interval, Test

notebook_config("00_toy", globals())  # checks preset, device, seed and injected names
cfg = {"scale": 2 if scale is None else scale}
report = Report("00_toy", preset=preset, device=device, seed=seed, params=cfg)
print("a warning the reader must not see", file=sys.stderr)

# %% [markdown]
# ## The figure

# %%
with report.stage("compute"):
    value = cfg["scale"] * (seed + 1)
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([0, 1], [0, value])
report.figure(fig, "headline", caption="A toy line that rises to the value.")
report.table(pd.DataFrame({"query_set": ["a"], "p": [1e-7], "n": [3.0]}), caption="A toy table.")
report.metrics["value"] = value
from influence.study.validation_citation import build_check

report.cite_validation(build_check({"xs": "toy-model"}, pd.DataFrame()))
found = [
    judge("toy rise", "the toy rises", "rises", effect=Interval(value, value - 1, value + 1),
          test=Test("toy test", 0.01, 10), expected=+1, threshold=1, what="the rise"),
    judge("toy fall", "the toy falls", "falls", effect=Interval(0.1, -1, 1),
          test=Test("toy test", 0.5, 10), expected=-1, threshold=1, what="the fall"),
]
report.conclude(
    question="Does the pipeline work?",
    paper="it does",
    here=f"value {value}",
    findings=found,
    reference="§0",
)
report.save()

# %% [markdown]
# ## The number

# %%
# NBVAL_CHECK_OUTPUT
print(f"value = {value}")
"""

BAD = """\
# %% [markdown]
# # Toy question that fails

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0

# %%
x = 1

# %%
raise RuntimeError("boom in the toy")
"""


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A throwaway study layout; every location the pipeline writes is under tmp_path."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "00_toy.py").write_text(GOOD)
    for var, sub in [
        ("INFLUENCE_NOTEBOOKS_DIR", "notebooks"),
        ("INFLUENCE_REPORTS", "reports"),
        ("INFLUENCE_FIGURES", "figures"),
        ("INFLUENCE_ARTIFACTS", "artifacts"),
    ]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    for var, value in [("MPLBACKEND", "Agg"), ("PYTHONHASHSEED", "0")]:
        monkeypatch.setenv(var, value)
    return tmp_path


def test_run_renders_reports_then_a_failure_names_notebook_and_cell(study, capsys):
    assert pipeline.main(["--preset", "default", "--seed", "1", "-p", "scale=3"]) == 0
    reports = study / "reports"
    html = (reports / "00_toy.html").read_text()
    assert "value 6" in html  # the injected parameters reached the kernel
    report = json.loads((reports / "00_toy.json").read_text())
    assert report["value"] == 6 and report["metrics"] == ["value"]
    assert report["params"] == {"scale": 3}
    assert report["parameters"] == {"preset": "default", "device": "cpu", "seed": 1, "scale": 3}
    assert report["threads"] == 1
    assert report["title"] == "Toy question: does the pipeline work?"
    # findings: claim, verdict, p or ci; the notebook's verdict follows from them
    assert [f["verdict"] for f in report["findings"]] == ["agrees", "inconclusive"]
    assert all({"claim", "verdict", "p", "ci", "reason"} <= set(f) for f in report["findings"])
    assert report["summary"]["verdict"] == "mixed: 1 of 2 agree"
    assert report["figures"]["headline"]["caption"] == "A toy line that rises to the value."
    # the estimator check cited by the notebook reaches the record and the answer box
    assert report["validation"]["sizes"] == {"xs": "not validated"}
    assert '<p class="report-validation report-validation-warn"><b>Estimator check.</b>' in html
    assert set(report["wall_time_s"]["stages"]) == {"compute"}
    assert report["wall_time_s"]["total"] > 0
    prov = report["provenance"]
    assert {"git_commit", "python", "platform", "device", "packages"} <= set(prov)
    assert prov["packages"]["torch"] and prov["packages"]["numpy"]
    assert prov["device"]["cpu_model"]["torch_capability"]  # the host that made the numbers
    # default preset: figures in the committed figures/ root, linked from the index
    assert (study / "figures" / "00_toy" / "headline.png").is_file()
    assert (study / "figures" / "00_toy" / "headline.svg").is_file()
    index = (reports / "index.html").read_text()
    assert 'href="00_toy.html"' in index
    assert "../figures/00_toy/headline.png" in index
    assert "value 6" in index and "it does" in index
    assert report["cache_at_start"] == []  # the toy's artifacts folder started empty
    assert "in one run from an empty artifacts folder" in index
    assert not list(study.rglob(".*.new")) and not (reports / ".publish.json").exists()
    (run,) = (study / "artifacts" / "runs" / "default").iterdir()  # this run's own folder
    assert run.name == report["run_id"]
    executed = nbformat.read(run / "00_toy.ipynb", 4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)

    # A failing notebook: named with its cell; the rendered reports stay as they were.
    (study / "notebooks" / "01_fail.py").write_text(BAD)
    before = {p.name: p.read_bytes() for p in reports.iterdir()}
    capsys.readouterr()
    assert pipeline.main(["--preset", "default", "--only", "01_fail"]) == 1
    err = capsys.readouterr().err
    assert "notebook 01_fail" in err
    assert "cell 3" in err and 'raise RuntimeError("boom in the toy")' in err
    assert "RuntimeError: boom in the toy" in err
    after = {p.name: p.read_bytes() for p in reports.iterdir() if p.name in before}
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }
    assert not (reports / "01_fail.html").exists()


def test_other_presets_never_write_committed_reports(study):
    assert pipeline.main(["--preset", "smoke", "--only", "00"]) == 0
    assert not (study / "reports").exists()
    assert not (study / "figures").exists()
    out = study / "artifacts" / "reports" / "smoke"
    assert {"00_toy.html", "00_toy.json", "index.html"} <= {p.name for p in out.iterdir()}
    page = (out / "00_toy.html").read_text()
    assert "scale = None" not in page
    assert (study / "artifacts" / "figures" / "smoke" / "00_toy" / "headline.png").is_file()
    index = (out / "index.html").read_text()
    assert "../../figures/smoke/00_toy/headline.png" in index
    # a plumbing check, said on every page and the index, verdicts greyed
    for html in (page, index):
        assert "Plumbing check at the smoke preset, not findings" in html
        assert re.search(r'<body class="[^"]*plumbing', html)


def test_validation_preset_writes_its_own_committed_folder(study):
    # notebook 01's validation at every size (issue 24) is committed beside the findings
    assert pipeline.main(["--preset", "validation", "--only", "00"]) == 0
    out = study / "reports" / "validation"
    assert {"00_toy.html", "00_toy.json", "index.html"} <= {p.name for p in out.iterdir()}
    assert not (study / "reports" / "00_toy.json").exists()  # the default's are untouched
    assert (study / "figures" / "validation" / "00_toy" / "headline.png").is_file()
    assert not (study / "artifacts" / "reports" / "validation").exists()
    page = (out / "00_toy.html").read_text()
    assert "Plumbing check" not in page and '<div class="plumbing-banner"' not in page
    assert pipeline.main(["--preset", "validation", "--only", "00", "-p", "scale=3"]) == 0
    page = (out / "00_toy.html").read_text()
    assert "Parameters changed from the validation preset" in page
    # the default index links the validation reports once they exist
    assert pipeline.main(["--preset", "default", "--only", "00"]) == 0
    assert 'href="validation/index.html"' in (study / "reports" / "index.html").read_text()


def test_unknown_parameter_fails_at_once_listing_valid_ones(study, capsys):
    assert pipeline.main(["--preset", "smoke", "-p", "nope=1"]) == 1
    err = capsys.readouterr().err
    assert "unknown parameter(s) ['nope']" in err
    for name in ("preset", "device", "seed", "scale"):
        assert name in err
    assert not (study / "artifacts" / "runs").exists()  # nothing was executed


def test_unknown_preset_and_notebook_fail_at_once(study, capsys):
    assert pipeline.main(["--preset", "huge"]) == 1
    assert "valid presets: smoke, default, large" in capsys.readouterr().err
    assert pipeline.main(["--only", "07_missing"]) == 1
    assert "valid notebooks: 00_toy" in capsys.readouterr().err


def test_parameters_cell_must_define_preset_device_seed(study, capsys):
    (study / "notebooks" / "01_noseed.py").write_text(
        textwrap.dedent(
            """\
            # %% tags=["parameters"]
            preset = "smoke"
            device = "cpu"
            """
        )
    )
    assert pipeline.main(["--preset", "smoke"]) == 1
    assert "01_noseed" in capsys.readouterr().err


def test_parse_param():
    assert pipeline.parse_param("n=3") == ("n", 3)
    assert pipeline.parse_param("lr=1e-3") == ("lr", 1e-3)
    assert pipeline.parse_param("name=abc") == ("name", "abc")
    assert pipeline.parse_param("x=none") == ("x", None)
    with pytest.raises(pipeline.PipelineError):
        pipeline.parse_param("novalue")


def test_sync_writes_the_paired_ipynb(study):
    assert pipeline.main(["--sync-notebooks"]) == 0
    nb = nbformat.read(study / "notebooks" / "00_toy.ipynb", 4)
    outputs = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert "value = 2\n" in outputs  # the notebook as written: smoke preset, no injection
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert [c.id for c in nb.cells] == [f"cell-{i:03d}" for i in range(len(nb.cells))]


def _visible_text(page: str) -> str:
    page = re.sub(r"<(script|style|details)\b.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"<[^>]+>", " ", page)


def test_report_page_is_readable(study):
    """Figures inline, code folded, no parameters cell, no stderr, no machine path, a title,
    a header with provenance, contents and links to the index and the neighbours."""
    (study / "notebooks" / "01_next.py").write_text(GOOD.replace("00_toy", "01_next"))
    assert pipeline.main(["--preset", "default", "--only", "00"]) == 0
    page = (study / "reports" / "00_toy.html").read_text()
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', page)) == 1  # one figure
    assert "<title>Toy question: does the pipeline work?</title>" in page
    assert page.count("<h1>") == 1  # the header's, not the notebook's copy
    # every code cell folded away (a <details> per input, closed), no prompts
    code_cells = len(re.findall(r'class="jp-Cell jp-CodeCell', page))
    assert code_cells == 2 and page.count('<details class="report-code">') == code_cells
    assert "<details open" not in page and "In&nbsp;[" not in page
    text = _visible_text(page)
    assert page.count("a warning the reader must not see") == 1  # in the folded code only
    assert "preset = " not in text and "injected" not in text.lower()
    for bad in (str(study), str(Path.home()), "/tmp/", "/work/", "/root/"):
        assert bad not in text
    assert "Does the pipeline work?" in text and "§0" in text
    assert re.search(r"preset\s+default", text) and "seed 1" not in text
    assert '<a href="index.html">' in page and '<a href="01_next.html">' in page
    toc = re.search(r'<nav class="report-toc">(.*?)</nav>', page, re.S).group(1)
    assert "The figure" in toc and "The number" in toc
    assert "value = " not in page  # the nbval check cell is a test fixture, not on the page
    assert "show all code" in page
    # the answer first: question, the paper (linked), ours, the verdict, the findings table
    order = [text.index(s) for s in ("Question.", "The paper found.", "We find.", "Verdict:")]
    assert order == sorted(order) and order[-1] < text.index("the toy rises")
    assert text.index("the toy falls") < text.index("Reproduce this page")
    assert 'href="https://arxiv.org/abs/2308.03296"' in page
    assert "make reproduce ONLY=00_toy PRESET=default" in text
    assert ".venv/bin/papermill notebooks/00_toy.ipynb out.ipynb -p preset default" in text
    assert 'name="viewport"' in page
    # figures numbered, captioned, alt text from the caption; tables as HTML, numbered
    assert "Figure 1." in text and "A toy line that rises to the value." in text
    assert re.search(r'<img[^>]+alt="Figure 1\. A toy line', page)
    assert "No description has been provided" not in page
    assert "Table 1. A toy table." in text and 'class="study-table"' in page
    assert "&lt; 1e-4" in page and "3.0" not in text  # p formatted, integers as integers
    assert "Plumbing check" not in text  # default preset, no overrides
    index = (study / "reports" / "index.html").read_text()
    assert '<td data-label="the paper found">it does</td>' in index and "value 2" in index
    assert "mixed: 1 of 2 agree" in index
    assert 'name="viewport"' in index and 'alt="A toy line that rises' in index
    assert index.index('class="summary"') < index.index("<img")  # the table comes first


def test_unknown_injected_name_fails_in_the_first_cell(study, tmp_path):
    """papermill by hand: a misspelt name stops the notebook in its first code cell."""
    import papermill

    (study / "notebooks" / "00_toy.py").write_text(GOOD)
    nb = pipeline.read_notebook(study / "notebooks" / "00_toy.py")
    src = tmp_path / "toy.ipynb"
    nbformat.write(nb, str(src))
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(
            str(src),
            str(tmp_path / "out.ipynb"),
            parameters={"scael": 3},
            kernel_name="python3",
            language="python",
            progress_bar=False,
        )
    assert "unknown parameter(s) ['scael']" in str(err.value)
    assert "scale" in str(err.value)
    assert err.value.exec_count == 3  # parameters cell, injected cell, then the first cell


def test_bad_device_fails_before_anything_runs(study, capsys):
    assert pipeline.main(["--preset", "smoke", "--device", "gpu"]) == 1
    assert "valid devices: cpu, cuda, cuda:N, mps" in capsys.readouterr().err
    assert not (study / "artifacts" / "runs").exists()


def test_provenance_is_dirty_only_for_changed_sources(monkeypatch):
    """The reports, figures and README table the pipeline writes do not make a run dirty."""
    status = {"value": " M reports/01.html\n M figures/a.png\n M README.md\n"}
    monkeypatch.setattr(
        bookkeeping, "git", lambda *a: status["value"] if a[0] == "status" else "abc"
    )
    assert bookkeeping.provenance("cpu")["git_dirty"] is False
    status["value"] += " M influence/scores.py\n"
    assert bookkeeping.provenance("cpu")["git_dirty"] is True


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_cpu_model_names_the_host_without_its_whole_flag_list():
    info = bookkeeping.cpu_model()
    assert info["model_name"] and info["torch_capability"]
    assert "flags" not in info and re.fullmatch(r"[0-9a-f]{12}", info["flags_sha256"])
    assert json.loads(json.dumps(info)) == info  # goes into the report's JSON as is


def test_committed_reports_need_a_clean_tree():
    bookkeeping.check_clean_tree("")
    bookkeeping.check_clean_tree(" M reports/01.html\n M figures/a.png\n M README.md\n")
    with pytest.raises(pipeline.PipelineError, match="clean tree.*influence/x.py"):
        bookkeeping.check_clean_tree(" M influence/x.py\n M reports/01.html\n")


def test_a_second_run_on_the_same_reports_is_refused(study):
    with bookkeeping.reports_lock(study / "reports", "first"):
        with pytest.raises(pipeline.PipelineError, match="another pipeline run.*first"):
            with bookkeeping.reports_lock(study / "reports", "second"):
                pass
    with bookkeeping.reports_lock(study / "reports", "third"):  # released after the first
        pass


def test_a_notebook_without_metrics_fails(study, capsys):
    (study / "notebooks" / "00_toy.py").write_text(GOOD.replace("report.save()", "pass"))
    assert pipeline.main(["--preset", "smoke"]) == 1
    assert "produced no metrics" in capsys.readouterr().err


def test_findings_table_in_readme_matches_the_reports():
    """Every number of the README's findings comes from the committed reports' JSON."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert rendering.FINDINGS_START in readme
    assert rendering.findings_table(rendering.read_reports(root / "reports")) in readme


ROOT = Path(__file__).resolve().parents[1]


def _readme_commands(prefix: str) -> list[str]:
    found = []
    for line in (ROOT / "README.md").read_text().splitlines():
        line = line.strip()
        for start in (prefix, f".venv/bin/{prefix}"):
            if line.startswith(start + " "):
                found.append(line.split("  #")[0].strip())
    return found


def test_every_pipeline_command_of_the_readme_and_makefile_is_valid(monkeypatch, capsys):
    """Each `make reproduce ...` and `python -m influence.study.pipeline ...` line shown to
    readers, expanded by make itself (`make -n`), passes the pipeline's up-front checks."""
    import shlex
    import subprocess

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the CUDA examples
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    lines = _readme_commands("make reproduce")
    makefile_example = re.search(r'PIPELINE_ARGS="([^"]+)"', (ROOT / "Makefile").read_text())
    lines.append(f'make reproduce PRESET=smoke PIPELINE_ARGS="{makefile_example.group(1)}"')
    pipeline_lines = _readme_commands("python -m influence.study.pipeline")
    assert len(lines) >= 4 and len(pipeline_lines) >= 2
    for line in lines:
        out = subprocess.run(
            ["make", "-n", "--no-print-directory", *shlex.split(line)[1:]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (command,) = [c for c in out.splitlines() if "influence.study.pipeline" in c]
        pipeline_lines.append(command.replace("\\", " "))
    for command in pipeline_lines:
        args = shlex.split(command)
        args = args[args.index("influence.study.pipeline") + 1 :]
        args = [a for a in args if a not in ("--allow-dirty", "--log-output")]
        assert pipeline.main([*args, "--dry-run"]) == 0, (command, capsys.readouterr().err)


def test_every_papermill_command_of_the_readme_is_valid(tmp_path, monkeypatch):
    """papermill's own CLI parses each README line; the parameters it injects pass the
    notebook's first-cell checks (`notebook_config`), as they would in the kernel."""
    import shlex

    import papermill
    import torch
    from click.testing import CliRunner
    from papermill.cli import papermill as papermill_cli

    from influence.study.parameters import notebook_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    lines = _readme_commands("papermill")
    assert len(lines) >= 3
    for line in lines:
        args = shlex.split(line)[1:]
        source = ROOT / args[0]
        out = tmp_path / "prepared.ipynb"
        result = CliRunner().invoke(
            papermill_cli, [str(source), str(out), *args[2:], "--prepare-only", "-k", "python3"]
        )
        assert result.exit_code == 0, (line, result.output)
        nb = nbformat.read(out, 4)
        cells = [c.source for c in nb.cells if c.cell_type == "code"]
        namespace: dict = {"In": ["", cells[0], cells[1]]}
        exec(cells[0], namespace)  # the parameters cell, then papermill's injected one
        exec(cells[1], namespace)
        assert "injected-parameters" in nb.cells[2].metadata.tags or "Parameters" in cells[1]
        stem = source.stem
        cfg = notebook_config(stem, namespace)
        injected = nb.metadata.papermill.parameters
        for name, value in injected.items():
            if isinstance(value, dict):
                assert all(cfg[name][k] == v for k, v in value.items()), line
    assert papermill  # imported for its CLI's side effects (engines registered)


def _published(reports: Path) -> tuple[str, int, str]:
    """(the page's "We find" value, the JSON's value, the index's row) of the toy notebook."""
    page = (reports / "00_toy.html").read_text()
    value = int(re.search(r"We find\.</b> value (\d+)", page).group(1))
    record = json.loads((reports / "00_toy.json").read_text())
    index = (reports / "index.html").read_text()
    return (
        value,
        record["value"],
        re.search(r'<td data-label="we find">value (\d+)</td>', index).group(1),
    )


def test_ctrl_c_right_after_the_page_is_renamed_is_finished_by_the_next_run(study, monkeypatch):
    """A notebook's page, JSON, index and figures are replaced together or not at all."""
    assert pipeline.main(["--preset", "default", "-p", "scale=2"]) == 0
    reports = study / "reports"
    assert _published(reports) == (2, 2, "2")
    real_replace = bookkeeping.os.replace
    calls = []

    def interrupted(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if str(dst).endswith("00_toy.html"):
            raise KeyboardInterrupt  # Ctrl-C right after the page is renamed into place

    monkeypatch.setattr(bookkeeping.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(["--preset", "default", "-p", "scale=5"])
    monkeypatch.setattr(bookkeeping.os, "replace", real_replace)
    assert (reports / ".publish.json").exists()  # the journal says: finish this
    assert _published(reports)[:2] == (5, 2)  # new page, old JSON: the state to repair
    # the next run (here: a dry run does not touch reports; a real one does) finishes it first
    assert bookkeeping.recover(reports).startswith("finished publishing run")
    assert _published(reports) == (5, 5, "5")
    assert not (reports / ".publish.json").exists() and not list(study.rglob(".*.new"))
    assert not list(study.rglob(".*.old"))


def test_an_interrupted_notebook_publishes_nothing(study, monkeypatch):
    assert pipeline.main(["--preset", "default"]) == 0
    reports = study / "reports"
    before = {p.name: p.read_bytes() for p in reports.iterdir() if p.name != ".lock"}
    figures = {p.name: p.read_bytes() for p in (study / "figures" / "00_toy").iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("papermill.execute_notebook", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(["--preset", "default", "-p", "scale=9"])
    after = {p.name: p.read_bytes() for p in reports.iterdir() if p.name != ".lock"}
    assert after == before
    assert {p.name: p.read_bytes() for p in (study / "figures" / "00_toy").iterdir()} == figures
    assert not list(study.rglob(".*.new")) and not (reports / ".publish.json").exists()


def test_a_run_killed_while_staging_is_rolled_back(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "01.html").write_text("old")
    pub = bookkeeping.Publication(reports, "run1")
    staged = pub.stage(reports / "01.html")
    folder = pub.stage(tmp_path / "figures" / "01")
    pub.begin()
    staged.write_text("new, half written")
    folder.mkdir(parents=True)
    # the process dies here (kill -9): no commit, no abort
    assert bookkeeping.recover(reports).startswith("rolled back")
    assert (reports / "01.html").read_text() == "old"
    assert not staged.exists() and not folder.exists()
    assert bookkeeping.recover(reports) is None


def test_an_unreadable_report_record_stops_the_index_naming_it(study, capsys):
    (study / "notebooks" / "01_next.py").write_text(GOOD.replace("00_toy", "01_next"))
    assert pipeline.main(["--preset", "default", "--only", "00"]) == 0
    reports = study / "reports"
    (reports / "00_toy.json").write_text('{"notebook": "00_toy", "summ')  # truncated
    capsys.readouterr()
    assert pipeline.main(["--preset", "default", "--only", "01"]) == 1
    err = capsys.readouterr().err
    assert "00_toy.json cannot be read" in err and "would drop that notebook" in err
    assert not (reports / "01_next.html").exists()  # nothing of 01 published either
    assert "01_next" not in (reports / "index.html").read_text()


def test_index_only_rewrites_the_index_from_the_records_and_runs_nothing(study, capsys):
    assert pipeline.main(["--preset", "default", "--index-only"]) == 1
    assert "no report records" in capsys.readouterr().err
    assert pipeline.main(["--preset", "default"]) == 0
    reports = study / "reports"
    index, record = reports / "index.html", reports / "00_toy.json"
    written, before = index.read_text(), record.read_bytes()
    runs = sorted((study / "artifacts" / "runs" / "default").iterdir())
    index.write_text("stale")
    assert pipeline.main(["--preset", "default", "--index-only"]) == 0
    assert index.read_text() == written and record.read_bytes() == before
    assert sorted((study / "artifacts" / "runs" / "default").iterdir()) == runs  # ran nothing
    leftovers = [p.name for p in reports.iterdir() if p.name.startswith(".")]
    assert leftovers == [".lock"]  # nothing staged is left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "seed must be a non-negative integer, got -1"),
        (["--only", "02", "-p", "tail_share=0"], "tail_share must be a number in (0, 1)"),
        (["--only", "02", "-p", "top_k=0"], "top_k must be an integer ≥ 1"),
        (["--only", "02", "-p", "bootstrap=0"], "bootstrap must be an integer ≥ 1"),
        (["--only", "02", "-p", "min_tail=-5"], "min_tail must be an integer ≥ 1"),
        (["--only", "03", "-p", "k=[10, 0]"], "every element of k must be an integer ≥ 1"),
        (["--only", "06", "-p", "n_boot=0"], "n_boot must be an integer ≥ 1"),
    ],
)
def test_the_dry_run_checks_value_ranges_of_the_real_notebooks(args, message, capsys):
    assert pipeline.main(["--preset", "smoke", *args, "--dry-run"]) == 1
    assert message in capsys.readouterr().err


def test_the_validation_preset_plans_every_notebook(capsys):
    # Every section without a validation block falls back to default (presets.FALLBACK); a
    # value of notebook 01's validation-only block is checked like any other.
    assert pipeline.main(["--preset", "validation", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would run 01_ihvp_accuracy with {'preset': 'validation'" in out
    assert "would run 02_sparsity_and_tails" in out
    args = ["--preset", "validation", "--only", "02", "-p", "tail_share=0", "--dry-run"]
    assert pipeline.main(args) == 1
    assert "tail_share must be a number in (0, 1)" in capsys.readouterr().err


def test_a_seed_that_is_no_integer_fails_with_a_sentence(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--seed", "1.5", "--dry-run"])
    assert "seed must be a non-negative integer, got '1.5'" in capsys.readouterr().err
    from influence.study.parameters import check_seed

    with pytest.raises(ValueError, match="seed must be a non-negative integer, got 1.5"):
        check_seed(1.5)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"tail_shar": 0.3}, "unknown parameter(s) ['tail_shar']"),
        ({"tail_share": 0}, "tail_share must be a number in (0, 1)"),
    ],
)
def test_notebook_02_by_hand_refuses_bad_parameters_before_any_work(parameters, message, tmp_path):
    """`papermill notebooks/02_sparsity_and_tails.ipynb out.ipynb -p tail_shar 0.3` (and
    `-p tail_share 0`) fail in the first cell after the imports, naming the parameter."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(
            str(ROOT / "notebooks" / "02_sparsity_and_tails.ipynb"),
            str(tmp_path / "out.ipynb"),
            parameters=parameters,
            kernel_name="python3",
            language="python",
            progress_bar=False,
            cwd=str(ROOT / "notebooks"),
        )
    assert message in str(err.value)
    assert err.value.exec_count == 3  # parameters, injected parameters, then notebook_config


def test_index_reads_a_report_whose_figures_are_plain_file_lists(tmp_path):
    # A committed report from before figures carried captions lists its files only; an index
    # rebuilt after re-running one notebook must still find the other reports' headlines.
    reports = tmp_path / "reports"
    png = tmp_path / "figures" / "01" / "headline.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"")
    old = {"figures": {"headline": [str(png), str(png.with_suffix(".svg"))]}}
    fig = rendering.headline_figure(old, reports)
    assert fig == {"src": "../figures/01/headline.png", "width": None, "caption": ""}


def test_cached_kinds_counts_complete_entries_only(study):
    root = study / "artifacts"
    assert bookkeeping.cached_kinds() == []  # no folder at all
    (root / "suite" / "abc").mkdir(parents=True)  # an entry being built: no marker yet
    (root / "runs" / "default" / "r1").mkdir(parents=True)
    (root / "runs" / "default" / "r1" / ".complete").write_text("{}")
    assert bookkeeping.cached_kinds() == []
    (root / "suite" / "abc" / ".complete").write_text("{}")
    (root / "corpus" / "def").mkdir(parents=True)
    (root / "corpus" / "def" / ".complete").write_text("{}")
    assert bookkeeping.cached_kinds() == ["corpus", "suite"]


def _timed(nb: str, run_id: str, cache: list[str] | None, stages: dict[str, float]) -> dict:
    return {
        "notebook": nb,
        "run_id": run_id,
        "cache_at_start": cache,
        "wall_time_s": {"total": sum(stages.values()), "stages": stages},
    }


def test_the_index_says_how_its_wall_times_were_measured():
    cold = [
        _timed("00", "r1", [], {"train_suite": 2600.0, "evaluate": 130.0, "corpus": 0.1}),
        _timed("02", "r1", [], {"influence_scores": 1600.0, "tail_fits": 800.0}),
    ]
    assert rendering.stage_times(cold[0]) == "train suite 43 min 20 s, evaluate 2 min 10 s"
    assert rendering.stage_times(_timed("03", "r1", [], {})) == ""
    sentence = rendering.run_sentence(cold)
    assert "took 85 min 30 s in one run from an empty artifacts folder" in sentence
    warm = [_timed("00", "r2", ["corpus", "suite"], {"evaluate": 130.0})]
    assert "found corpus, suite cached by an earlier run" in rendering.run_sentence(warm)
    assert "every costly stage is in its times" in rendering.run_sentence(warm)
    trained = [_timed("00", "r2", ["corpus", "model", "tokenizer"], {"evaluate": 130.0})]
    assert rendering.run_sentence(trained).endswith(
        "cached by an earlier run, so training the suite is not in its times"
    )
    scored = [_timed("00", "r2", ["model", "influence_scores"], {"evaluate": 130.0})]
    assert rendering.run_sentence(scored).endswith(
        "so training the suite and the influence stage are not in its times"
    )
    mixed = [cold[0], warm[0] | {"notebook": "01"}, _timed("03", "r0", None, {"fit": 5.0})]
    assert "over 3 runs" in rendering.run_sentence(mixed)
    assert "some of which found artifacts cached" in rendering.run_sentence(mixed)
    # two runs that both found the suite trained: training is surely not in the times, the
    # influence stage may be (the second run built what the first found cached, or the reverse)
    rerun = _timed("02", "r3", ["corpus", "lm_validation", "model", "tokenizer"], {"fit": 5.0})
    assert rendering.run_sentence([trained[0], rerun]).endswith(
        "over 2 runs, each of which found corpus, model, tokenizer cached by an earlier run, so "
        "training the suite is not in these times"
    )
    assert "some of which" in rendering.run_sentence([warm[0], rerun])  # nothing costly in both
    # every run from empty (one re-rendered a notebook from scratch): all costly stages are in
    fresh = _timed("00", "r4", [], {"train_suite": 3400.0})
    assert rendering.run_sentence([fresh, cold[1]]).startswith(
        "its notebooks took 96 min 40 s in all, over 2 runs, each from an empty artifacts folder"
    )
