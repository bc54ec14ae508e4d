"""What the built distributions carry: licence, py.typed, C source, version; the sdist: what the README links."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import normlab

ROOT = Path(__file__).resolve().parents[1]

_BUILD = """
import sys
from setuptools import build_meta
print("BUILT", getattr(build_meta, sys.argv[1])(sys.argv[2]))
"""


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """A wheel and an sdist built from a copy of the tree (the working tree gets no build/ or egg-info)."""
    src = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile", "requirements-cpu.txt"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so")
    for folder in ("src", "docs", "benchmarks"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    built = []
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state between the two
        p = subprocess.run(
            [sys.executable, "-c", _BUILD, hook, str(out)], cwd=src, capture_output=True, text=True, timeout=300
        )
        assert p.returncode == 0, p.stderr
        built.append(out / next(l for l in p.stdout.splitlines() if l.startswith("BUILT "))[6:])
    return tuple(built)


def test_wheel_has_license_py_typed_c_source_and_the_package_version(dists):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(info).decode()
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "normlab/py.typed" in names
    # every source the first use compiles: the C kernels (the .c includes the .inc) and the C++ operators
    assert {f"normlab/csrc/{f}" for f in ("norm_kernels.c", "norm_kernels.inc", "eager_ops.cpp")} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert re.search(r"^Version: (.+)$", metadata, re.M)[1] == normlab.__version__
    assert re.search(r"^License-Expression: MIT$", metadata, re.M)
    assert "normlab = normlab.lab.cli:main" in entry_points
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_sdist_carries_every_file_the_readme_links(dists):
    _, sdist = dists
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    text = (ROOT / "README.md").read_text()
    linked = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)}
    assert linked and linked <= names, sorted(linked - names)
    assert {"LICENSE", "src/normlab/py.typed", "Makefile", "requirements-cpu.txt"} <= names
