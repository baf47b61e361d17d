"""environment.yml (conda) installs the same packages as the pip path of the Makefile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ENV = yaml.safe_load((ROOT / "environment.yml").read_text())
MAKEFILE = (ROOT / "Makefile").read_text()


def _extra_used_by_make() -> str:
    match = re.search(r'install -e "\.\[(\w+)\]"', MAKEFILE)
    assert match, 'the Makefile should install the package with `pip install -e ".[extra]"`'
    return match.group(1)


def _closure(extra: str) -> list[Requirement]:
    """pyproject's dependencies plus everything `extra` pulls in (self-references followed)."""
    name = canonicalize_name(PROJECT["name"])
    extras = PROJECT["optional-dependencies"]
    reqs, seen, todo = [Requirement(r) for r in PROJECT["dependencies"]], set(), [extra]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for raw in extras[current]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == name:
                todo.extend(req.extras)
            else:
                reqs.append(req)
    return reqs


def _env_pip() -> list[str]:
    pips = [d["pip"] for d in ENV["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one pip: section"
    return pips[0]


def _env_requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in _env_pip():
        if line.startswith("-e"):
            continue
        req = Requirement(line)
        reqs[canonicalize_name(req.name)] = req
    return reqs


def test_environment_yml_parses():
    assert ENV["name"] == "influence"
    assert "conda-forge" in ENV["channels"]
    conda = [d for d in ENV["dependencies"] if isinstance(d, str)]
    assert "pip" in conda
    assert any(d.startswith("python=") for d in conda)
    assert any(line.replace(" ", "") in ("-e.", "-e.[dev]") for line in _env_pip()), (
        "environment.yml should install the package itself with `-e .`"
    )


def test_same_packages_as_pip_path():
    expected = {canonicalize_name(r.name): r for r in _closure(_extra_used_by_make())}
    got = _env_requirements()
    assert set(got) == set(expected), (
        f"missing from environment.yml: {sorted(set(expected) - set(got))}; "
        f"not in pyproject: {sorted(set(got) - set(expected))}"
    )
    for name, req in expected.items():
        if name == "torch":
            continue  # pinned exactly by both install paths, checked below
        assert got[name].specifier == req.specifier, (name, str(got[name]), str(req))


def test_torch_pinned_the_same_everywhere():
    match = re.search(r"^TORCH_VERSION \?= (\S+)$", MAKEFILE, re.M)
    assert match, "Makefile should set TORCH_VERSION"
    pinned = match.group(1)
    assert pinned == "2.13.0"
    assert str(_env_requirements()["torch"].specifier) == f"=={pinned}"
    assert "torch==$(TORCH_VERSION)" in MAKEFILE
    torch_req = next(Requirement(r) for r in PROJECT["dependencies"] if r.startswith("torch"))
    assert Version(pinned) in torch_req.specifier, "the pin must satisfy pyproject's range"


def test_python_version_consistent():
    conda = [d for d in ENV["dependencies"] if isinstance(d, str)]
    version = next(d for d in conda if d.startswith("python=")).split("=", 1)[1]
    assert Version(version) in SpecifierSet(PROJECT["requires-python"])
