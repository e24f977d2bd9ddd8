"""The releases this run uses are inside pyproject's tested ranges (what a fresh machine installs is
the newest inside them; the run's header names them: tests/conftest.py)."""
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name: Requirement(r) for r in reqs if not r.startswith("spinfx")}


@pytest.mark.parametrize("name", ["transformers", "compressed-tensors"])
def test_the_tested_range_is_bounded_above(name):
    # an unbounded range lets a fresh machine install an untested release (transformers 5.24 once
    # silently disabled the backend); the upper bound moves only after the suite passed on the new one
    spec = _requirements()[name].specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"{name}{spec} has no upper bound"


def test_installed_releases_are_inside_the_declared_ranges():
    outside = []
    for name, req in _requirements().items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if req.specifier and not req.specifier.contains(re.sub(r"\+.*$", "", version), prereleases=True):
            outside.append(f"{name} {version} not in {req.specifier}")
    assert not outside, outside


def test_the_run_header_names_the_releases(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    result = pytester.runpytest_subprocess()
    header = [line for line in result.outlines if line.startswith("spinfx against: ")]
    assert header, result.outlines[:10]
    assert f"transformers {metadata.version('transformers')}" in header[0]
    assert f"torch {metadata.version('torch')}" in header[0]
