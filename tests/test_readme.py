"""The README's examples run, its printed output is what the code prints, and its links resolve.

Every ```python block of README.md is executed, each in a fresh namespace, in
one subprocess whose working folder is a temporary directory (so the examples'
``runs/`` and registrations stay out of this process). A block may carry a
directive in an HTML comment on the line above its fence (invisible when rendered):

* ``<!-- readme-test: save as NAME.py -->``: the block is a module that a later
  block imports; it is written to NAME.py and not executed by itself;
* ``<!-- readme-test: output of the block above -->`` on a ```text block: the
  previous Python block must print exactly this text;
* ``<!-- readme-test: skip: REASON -->``: not executed, for the stated reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directive: str  # "" when none
    section: str  # the heading above it

    @property
    def id(self) -> str:
        return f"L{self.line}-{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}"


def _blocks(text: str) -> list[Block]:
    out, lines, i, section = [], text.splitlines(), 0, ""
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        m = re.match(r"^```(\w*)\s*$", line)
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            above = lines[i - 1] if i > 0 else ""
            d = DIRECTIVE.search(above)
            out.append(Block(i + 1, m[1], "\n".join(lines[i + 1 : j]) + "\n", d[1] if d else "", section))
            i = j
        i += 1
    return out


BLOCKS = _blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python"]

_RUNNER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(sys.stdin)
results = {}
for b in blocks:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(b["code"], f"README.md:{b['line']}", "exec"), {"__name__": "__readme__"})
        results[b["id"]] = {"ok": True, "out": out.getvalue()}
    except BaseException:
        results[b["id"]] = {"ok": False, "out": out.getvalue(), "error": traceback.format_exc()}
print("\n" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict:
    """Run every executable Python block once, in README order; ``{block id: {"ok", "out", "error"}}``."""
    folder = tmp_path_factory.mktemp("readme")
    for b in PYTHON:
        if b.directive.startswith("save as "):
            (folder / b.directive.removeprefix("save as ").strip()).write_text(b.code)
    run = [{"id": b.id, "line": b.line, "code": b.code} for b in PYTHON if not b.directive]
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("NORMLAB_IMPORT", "NORMLAB_PROGRESS")},
        "OMP_NUM_THREADS": "1",  # the examples are small: one thread is fastest, and the machine may be shared
        "PYTHONPATH": str(folder),
    }
    p = subprocess.run(
        [sys.executable, "-c", _RUNNER], input=json.dumps(run), capture_output=True, text=True,
        cwd=folder, env=env, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.rstrip().splitlines()[-1])


def test_directives_are_known_and_skips_give_a_reason():
    for b in BLOCKS:
        d = b.directive
        assert d == "" or re.fullmatch(r"save as \w+\.py|output of the block above|skip: .{10,}", d), (b.line, d)
        if d.startswith("save as ") or d.startswith("skip"):
            assert b.lang == "python", b.line
        if d == "output of the block above":
            assert b.lang == "text", b.line


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs(block, executed):
    if block.directive.startswith("skip: "):
        pytest.skip(block.directive)
    if block.directive.startswith("save as "):
        importers = [b for b in PYTHON if not b.directive and re.search(rf"\b{block.directive[8:-3]}\b", b.code)]
        assert importers, f"{block.directive}: no block imports it"
        assert all(executed[b.id]["ok"] for b in importers)
        return
    result = executed[block.id]
    assert result["ok"], result.get("error")


def test_printed_output_is_what_the_code_prints(executed):
    checked = 0
    for i, b in enumerate(BLOCKS):
        if b.directive == "output of the block above":
            source = next(p for p in reversed(BLOCKS[:i]) if p.lang == "python")
            assert executed[source.id]["ok"], executed[source.id].get("error")
            assert executed[source.id]["out"].rstrip() == b.code.rstrip()
            checked += 1
    assert checked >= 1


def test_relative_links_resolve_inside_the_repository():
    """Links to files are relative to the repository: each must name a file of it (no ../ out of it)."""
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img[^>]+src="([^"]+)"', text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert local
    for t in local:
        path = (ROOT / t).resolve()
        assert path.is_relative_to(ROOT), f"{t} points outside the repository"
        assert path.is_file(), f"README links {t}, which does not exist"
