"""The notebook pipeline end to end, on throwaway notebooks in a temporary folder."""

from __future__ import annotations

import json
import textwrap

import nbformat
import pytest

from influence.study import pipeline

GOOD = """\
# %% [markdown]
# # Toy question: does the pipeline work?

# %% tags=["parameters"]
preset = "smoke"
device = "cpu"
seed = 0
scale = None

# %%
import matplotlib.pyplot as plt

from influence.study.reporting import Report

cfg = {"scale": 2 if scale is None else scale}
report = Report("00_toy", preset=preset, device=device, seed=seed, params=cfg)
with report.stage("compute"):
    value = cfg["scale"] * (seed + 1)
fig, ax = plt.subplots()
ax.plot([0, 1], [0, value])
report.savefig(fig, "headline")
report.metrics["value"] = value
report.paper_vs_here = f"paper: 1; here: {value}"
report.save()

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
    assert "value = 6" in html  # the injected parameters reached the kernel
    report = json.loads((reports / "00_toy.json").read_text())
    assert report["value"] == 6 and report["metrics"] == ["value"]
    assert report["params"] == {"scale": 3}
    assert report["parameters"] == {"preset": "default", "device": "cpu", "seed": 1, "scale": 3}
    assert report["paper_vs_here"] == "paper: 1; here: 6"
    assert report["title"] == "Toy question: does the pipeline work?"
    assert set(report["wall_time_s"]["stages"]) == {"compute"}
    assert report["wall_time_s"]["total"] > 0
    prov = report["provenance"]
    assert {"git_commit", "python", "platform", "device", "packages"} <= set(prov)
    assert prov["packages"]["torch"] and prov["packages"]["numpy"]
    # default preset: figures in the committed figures/ root, linked from the index
    assert (study / "figures" / "00_toy" / "headline.png").is_file()
    assert (study / "figures" / "00_toy" / "headline.svg").is_file()
    index = (reports / "index.html").read_text()
    assert 'href="00_toy.html"' in index
    assert "../figures/00_toy/headline.png" in index
    assert "paper: 1; here: 6" in index
    executed = nbformat.read(study / "artifacts" / "runs" / "default" / "00_toy.ipynb", 4)
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
    assert {p.name: p.read_bytes() for p in reports.iterdir() if p.name in before} == before
    assert not (reports / "01_fail.html").exists()


def test_other_presets_never_write_committed_reports(study):
    assert pipeline.main(["--preset", "smoke", "--only", "00"]) == 0
    assert not (study / "reports").exists()
    assert not (study / "figures").exists()
    out = study / "artifacts" / "reports" / "smoke"
    assert {"00_toy.html", "00_toy.json", "index.html"} <= {p.name for p in out.iterdir()}
    assert (study / "artifacts" / "figures" / "smoke" / "00_toy" / "headline.png").is_file()
    assert "../../figures/smoke/00_toy/headline.png" in (out / "index.html").read_text()


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
