"""Each notebook is a jupytext pair: notebooks/NN_topic.py (source) and .ipynb (outputs).

The .ipynb is what nbval executes and compares, so it must hold the same cells as the
reviewed .py; refresh it with `make notebooks` after editing the .py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jupytext
import nbformat
import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
REQUIRED = ("preset", "device", "seed")
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def _cells(nb) -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        (c.cell_type, c.source.strip(), tuple(sorted(c.get("metadata", {}).get("tags", []))))
        for c in nb.cells
    ]


def _parameters_cells(nb):
    return [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


def test_jupytext_pairs_py_percent_with_ipynb():
    config = tomllib.loads((ROOT / "jupytext.toml").read_text())
    assert set(config["formats"].split(",")) == {"ipynb", "py:percent"}


def test_every_notebook_is_a_pair():
    ipynbs = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    assert [p.stem for p in SOURCES] == [p.stem for p in ipynbs], (
        "every notebooks/NN_topic.py needs its NN_topic.ipynb and vice versa (make notebooks)"
    )
    for path in SOURCES:
        stem = path.stem
        assert stem[:2].isdigit() and stem[2] == "_" and stem[3:].islower(), stem


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_pair_in_sync(source):
    py = jupytext.read(source)
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), f"missing {paired.name}: run `make notebooks ONLY={source.stem}`"
    ipynb = nbformat.read(paired, as_version=4)
    nbformat.validate(ipynb)
    assert _cells(py) == _cells(ipynb), (
        f"{source.name} and its .ipynb differ: run `make notebooks ONLY={source.stem}`"
    )


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_parameters_cell(source):
    nb = jupytext.read(source)
    cells = _parameters_cells(nb)
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code is cells[0], "the parameters cell is the first code cell"
    values = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    for name in REQUIRED:
        assert name in values, f"the parameters cell must define {name}"
    # The committed .ipynb carries smoke outputs and nbval re-executes it as it is.
    assert values["preset"] == "smoke"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_outputs_are_executed_and_checked(source):
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), f"missing {paired.name}: run `make notebooks ONLY={source.stem}`"
    ipynb = nbformat.read(paired, as_version=4)
    code = [c for c in ipynb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "run `make notebooks`"
    checked = [c for c in code if c.source.lstrip().startswith(CHECK_MARK)]
    assert checked, f"no cell starts with {CHECK_MARK!r}: nbval would compare nothing"
    assert all(c.outputs for c in checked), "headline cells must print their numbers"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, "the committed notebook holds an error output"
