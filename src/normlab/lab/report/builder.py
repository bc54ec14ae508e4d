"""Collect what the run store holds about every experiment, then write the HTML page and the Markdown summary.

Everything here reads files only: ``<root>/<experiment>/verdict.json``, the
figures it lists, and the run folders' ``config.json`` / ``env.json`` /
``result.json``. Nothing is trained, re-analysed or re-plotted; the registry
(:mod:`normlab.lab.experiments`) is consulted only for names, claim ids, titles
and docstrings, so that a registered claim with nothing stored shows as
**not run**.

What a claim's section shows comes from its ``verdict.json``: the
pre-registration (the claim, its source, its declared parts and margins, as
written in the experiment module's docstring when the verdict was made), every
part's effect with its intervals against its margin, the decision, and the
recheck with another thread count when one was made.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import math
import os
import re
import struct
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab._io import atomic_write
from normlab.lab.store import CONFIG, ENV, METRICS, QUARANTINE, RESULT, RunStore, flatten, read_json

__all__ = [
    "NOT_RUN",
    "ReportError",
    "Figure",
    "RunFiles",
    "Entry",
    "ReportData",
    "collect",
    "build_report",
    "report_main",
]

NOT_RUN = "not run"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AUDIT_FOLDER = "audit"  # <root>/audit/*.json: stored `normlab.audit` results, shown when normlab.audit exists
_ENV_KEYS = (
    "normlab", "python", "torch", "numpy", "device", "cuda", "threads", "cpu_count",
    "processor", "platform", "git_revision", "hostname",
)  # fmt: skip


class ReportError(Exception):
    """A problem with what the report was asked to read (missing store, unknown experiment): one line."""


# --------------------------------------------------------------------------- data


@dataclass
class Figure:
    """One stored figure: where it is, and its PNG bytes when they could be read (``problem`` says why not)."""

    path: Path
    name: str
    data: bytes | None = None
    width: int | None = None
    height: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.data is not None

    def data_uri(self) -> str:
        if self.data is None:
            raise ValueError(f"figure {self.path} could not be read: {self.problem}")
        return "data:image/png;base64," + base64.b64encode(self.data).decode("ascii")


@dataclass
class RunFiles:
    """One run folder of a verdict: its id, seed, the parameters that vary across the sweep, and its files."""

    run_id: str
    path: Path
    complete: bool
    exists: bool
    problem: str | None = None  # a corrupt run: which file does not parse (the run does not count as complete)
    seed: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


@dataclass
class Entry:
    """Everything the report shows about one experiment."""

    name: str
    claim: str | None
    title: str
    description: str
    registered: bool
    folder: Path
    verdict: dict[str, Any] | None = None
    verdict_problem: str | None = None
    figures: list[Figure] = field(default_factory=list)
    runs: list[RunFiles] = field(default_factory=list)
    varying: list[str] = field(default_factory=list)  # config keys that differ across the verdict's runs
    stored_complete: int = 0
    stored_incomplete: int = 0
    stored_corrupt: int = 0  # complete runs whose files do not parse (listed in ``notes``; re-run on resume)
    env: dict[str, list[str]] = field(default_factory=dict)
    env_time: tuple[str, str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.verdict is None:
            return NOT_RUN
        return str(self.verdict.get("status", NOT_RUN))

    @property
    def summary(self) -> str:
        if self.verdict is None:
            if self.stored_corrupt:
                return (
                    f"no verdict: {self.stored_complete} complete, {self.stored_incomplete} incomplete and "
                    f"{self.stored_corrupt} CORRUPT runs stored (see the note)"
                )
            if self.stored_complete or self.stored_incomplete:
                return (
                    f"no verdict yet: {self.stored_complete} complete and {self.stored_incomplete} incomplete runs "
                    "stored (a sweep still running, or interrupted: the command resumes it)"
                )
            return "nothing stored for this experiment"
        return str(self.verdict.get("summary", ""))

    @property
    def command(self) -> str:
        if self.verdict is not None and self.verdict.get("command"):
            return str(self.verdict["command"])
        return f"normlab run {self.name} --scale quick"

    @property
    def scale(self) -> str | None:
        return None if self.verdict is None else self.verdict.get("scale")

    @property
    def seeds(self) -> Any:
        return None if self.verdict is None else self.verdict.get("seeds")

    @property
    def numbers(self) -> dict[str, Any]:
        n = None if self.verdict is None else self.verdict.get("numbers")
        return n if isinstance(n, dict) else {}

    @property
    def parts(self) -> list[dict[str, Any]]:
        """The verdict's parts (deciding first, in declaration order): effect, intervals, margin, decision."""
        parts = [] if self.verdict is None else self.verdict.get("parts")
        if not isinstance(parts, list):
            return []
        ok = [p for p in parts if isinstance(p, dict) and isinstance(p.get("shown"), dict)]
        return [p for p in ok if p.get("decides")] + [p for p in ok if not p.get("decides")]

    @property
    def preregistration(self) -> str:
        """The pre-registration stored with the verdict, else the registered experiment's own."""
        stored = None if self.verdict is None else self.verdict.get("preregistration")
        if isinstance(stored, str) and stored.strip():
            return stored
        from normlab.lab.experiments.framework import preregistration

        return preregistration(self.description)

    @property
    def meaningful(self) -> bool:
        return self.verdict is None or self.verdict.get("meaningful", True) is not False

    @property
    def finding(self) -> str:
        return "" if self.verdict is None else str(self.verdict.get("finding") or "")

    @property
    def recheck(self) -> dict[str, Any] | None:
        r = None if self.verdict is None else self.verdict.get("recheck")
        return r if isinstance(r, dict) else None

    @property
    def anchor(self) -> str:
        return "exp-" + re.sub(r"[^a-z0-9_-]+", "-", self.name.lower())

    @property
    def label(self) -> str:
        return self.claim or "example"


@dataclass
class ReportData:
    """What :func:`collect` found in a run store."""

    root: Path
    generated: str
    entries: list[Entry]
    other: list[
        tuple[str, int, int]
    ]  # stored experiment folders without a verdict or registration: (name, complete, incomplete)
    audit: list[tuple[Path, Any]] | None  # stored audit results (path, parsed JSON), None when normlab.audit is absent
    registry_problem: str | None = None
    normlab_version: str | None = None

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("holds", "does not hold", "inconclusive", NOT_RUN)}
        for e in self.entries:
            if e.claim is not None:
                out[e.status] = out.get(e.status, 0) + 1
        return out


# --------------------------------------------------------------------------- helpers


def _fmt_num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk, or None if ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return (w, h) if w > 0 and h > 0 else None


def _read_figure(path: Path, name: str) -> Figure:
    fig = Figure(path=path, name=name)
    if not path.is_file():
        fig.problem = "file missing"
        return fig
    data = path.read_bytes()
    size = _png_size(data)
    if size is None:
        fig.problem = "not a PNG file" if data else "empty file"
        return fig
    fig.data, (fig.width, fig.height) = data, size
    return fig


def _registry() -> tuple[list[Any], str | None]:
    """The registered experiments (claims in order, then examples) and a problem message if loading failed."""
    try:
        from normlab.lab.experiments import experiment_names, get_experiment
    except Exception as e:  # the report must still read the store
        return [], f"the experiment registry could not be imported ({type(e).__name__}: {e})"
    problem = None
    try:
        names = experiment_names()
    except Exception as e:  # a broken experiment module: keep what registered
        problem = f"an experiment module failed to import ({type(e).__name__}: {e}); the list below may be incomplete"
        try:
            names = experiment_names()
        except Exception:
            names = []
    return [get_experiment(n) for n in names], problem


def _summarise_env(envs: Iterable[Mapping[str, Any]]) -> tuple[dict[str, list[str]], tuple[str, str] | None]:
    values: dict[str, list[str]] = {}
    times: list[str] = []
    for env in envs:
        for k in _ENV_KEYS:
            if k in env:
                v = "—" if env[k] is None else str(env[k])
                bucket = values.setdefault(k, [])
                if v not in bucket:
                    bucket.append(v)
        if isinstance(env.get("time"), str):
            times.append(env["time"])
    ordered = {k: values[k] for k in _ENV_KEYS if k in values}
    return ordered, ((min(times), max(times)) if times else None)


def _safe_json(path: Path) -> tuple[Any, str | None]:
    try:
        return read_json(path), None
    except (OSError, ValueError) as e:
        return None, f"{path.name} unreadable ({type(e).__name__}: {e})"


def _varying(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    flat = [flatten(c) for c in configs]
    keys: list[str] = []
    for f in flat:
        for k in f:
            if k not in keys and k != "seed":
                keys.append(k)

    def canon(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    return [k for k in keys if len({canon(f.get(k)) for f in flat}) > 1]


def _entry(store: RunStore, name: str, exp: Any | None) -> Entry:
    folder = store.root / name
    description = (getattr(exp, "description", "") or "").strip() if exp is not None else ""
    e = Entry(
        name=name,
        claim=getattr(exp, "claim", None),
        title=getattr(exp, "title", "") if exp is not None else "",
        description=description,
        registered=exp is not None,
        folder=folder,
    )
    all_runs = list(store.runs(name, complete_only=False)) if folder.is_dir() else []
    problems = {r.run_id: p for r in all_runs if r.complete and (p := r.problem()) is not None}
    e.stored_corrupt = len(problems)
    e.stored_complete = sum(1 for r in all_runs if r.complete) - e.stored_corrupt
    e.stored_incomplete = len(all_runs) - e.stored_complete - e.stored_corrupt
    if e.stored_incomplete:
        e.notes.append(
            f"{e.stored_incomplete} incomplete run folder(s) "
            "(no result.json: interrupted; the next `normlab run` redoes them)"
        )
    if problems:
        rid, problem = next(iter(problems.items()))
        e.notes.append(
            f"{len(problems)} CORRUPT run(s), not counted as complete: {', '.join(problems)} (e.g. {rid}: {problem}); "
            f"the next `normlab run` moves their files to {store.root / QUARANTINE / name}/ and runs them again"
        )
    quarantined = store.quarantined(name)
    if quarantined:
        e.notes.append(
            f"{len(quarantined)} corrupt run folder(s) kept in {store.root / QUARANTINE / name}/ "
            f"(set aside, never deleted; each holds reason.txt): {', '.join(p.name for p in quarantined[:5])}"
        )

    vpath = folder / "verdict.json"
    if vpath.is_file():
        verdict, problem = _safe_json(vpath)
        if isinstance(verdict, dict) and verdict.get("status"):
            e.verdict = verdict
            if exp is None:
                e.claim = verdict.get("claim") if isinstance(verdict.get("claim"), str) else None
                e.title = str(verdict.get("title") or "")
        else:
            e.verdict_problem = problem or "verdict.json has no status"
            e.notes.append(f"verdict.json could not be used: {e.verdict_problem}")

    by_id = {r.run_id: r for r in all_runs}
    if e.verdict is not None:
        ids = [str(i) for i in e.verdict.get("runs") or []]
        missing = [i for i in ids if i not in by_id or not by_id[i].complete or i in problems]
        if missing:
            e.notes.append(
                f"{len(missing)} of the {len(ids)} runs this verdict was computed from are missing from the store "
                f"(e.g. {missing[0]}); the verdict is older than the store"
            )
        extra = e.stored_complete - (len(ids) - len(missing))
        if extra > 0:
            e.notes.append(
                f"{extra} further complete run(s) stored (other scales or overrides) are not part of this verdict"
            )
        for ref in e.verdict.get("figures") or []:
            p = Path(ref)
            e.figures.append(_read_figure(p if p.is_absolute() else folder / p, p.stem))
        broken = [f for f in e.figures if not f.ok]
        for f in broken:
            e.notes.append(f"figure {f.path.name}: {f.problem}")
    else:
        ids = [r.run_id for r in all_runs if r.complete and r.run_id not in problems]

    configs, envs = [], []
    for rid in ids:
        r = by_id.get(rid)
        path = r.path if r is not None else folder / rid
        problem = problems.get(rid)
        complete = bool(r and r.complete) and problem is None
        rf = RunFiles(run_id=rid, path=path, complete=complete, exists=path.is_dir(), problem=problem)
        if rf.exists:
            rf.files = [path / f for f in (CONFIG, ENV, METRICS, RESULT) if (path / f).is_file()]
            cfg, _ = _safe_json(path / CONFIG)
            if isinstance(cfg, dict):
                configs.append(cfg)
                rf.params = cfg
                rf.seed = cfg.get("seed")
            env, _ = _safe_json(path / ENV) if (path / ENV).is_file() else ({}, None)
            if isinstance(env, dict):
                envs.append(env)
        e.runs.append(rf)
    e.varying = _varying(configs)
    for rf in e.runs:
        flat = flatten(rf.params) if rf.params else {}
        rf.params = {k: flat.get(k) for k in e.varying}
    e.env, e.env_time = _summarise_env(envs)
    return e


def _audit_available() -> bool:
    """Whether this normlab has the ``normlab.audit`` module (the audit section is skipped otherwise)."""
    try:
        return importlib.util.find_spec("normlab.audit") is not None
    except (ImportError, ValueError):
        return False


def _audit(root: Path) -> list[tuple[Path, Any]] | None:
    """Stored audit results: ``<root>/audit/*.json``, each the JSON of ``AuditReport.to_json()``
    (``normlab audit MODEL --json > runs/audit/<model>.json``); None when ``normlab.audit`` does not exist."""
    if not _audit_available():
        return None
    folder = root / AUDIT_FOLDER
    found = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data, problem = _safe_json(p)
        found.append((p, data if problem is None else {"error": problem}))
    return found


def collect(root: str | os.PathLike = "runs", *, experiments: Sequence[str] | None = None) -> ReportData:
    """Read the run store at ``root``: one :class:`Entry` per registered experiment (claims first), per stored verdict.

    ``experiments`` restricts the report to those names or claim ids. Raises
    :class:`ReportError` when ``root`` is not a folder or a name is unknown.
    """
    root = Path(root)
    if not root.exists():
        raise ReportError(f"run store {str(root)!r} does not exist (run an experiment first, or pass --root)")
    if not root.is_dir():
        raise ReportError(f"run store {str(root)!r} is not a folder")
    store = RunStore(root)
    if not (store.looks_like_store() or any((root / AUDIT_FOLDER).glob("*.json"))):
        raise ReportError(
            f"{str(root)!r} is not a run store (no <experiment>/<run id>/config.json, verdict.json or audit/*.json "
            "in it), so no report is written there; pass --root the folder `normlab run` writes to (default: runs)"
        )
    registered, problem = _registry()
    by_name = {e.name: e for e in registered}
    stored = [n for n in store.experiments() if n != AUDIT_FOLDER]

    names: list[str] = []
    for exp in registered:  # claims in claim order; examples only when something is stored for them
        if exp.claim is not None or exp.name in stored:
            names.append(exp.name)
    other: list[tuple[str, int, int]] = []
    for n in stored:
        if n in by_name:
            continue
        runs = list(store.runs(n, complete_only=False))
        if (root / n / "verdict.json").is_file() or any(r.complete and r.problem() is not None for r in runs):
            names.append(n)  # a section of its own: a verdict, or corrupt runs to list
        elif runs:
            done = sum(1 for r in runs if r.complete)
            other.append((n, done, len(runs) - done))

    if experiments is not None:
        wanted: list[str] = []
        for ref in experiments:
            hit = next((n for n in names if n == ref), None)
            if hit is None:
                hit = next((e.name for e in registered if e.claim and e.claim.lower() == str(ref).lower()), None)
            if hit is None:
                hit = ref if ref in by_name else None
            if hit is None:
                raise ReportError(f"unknown experiment {ref!r}; known: {', '.join(names) or '(none)'}")
            if hit not in wanted:
                wanted.append(hit)
        names = [n for n in names if n in wanted] + [n for n in wanted if n not in names]
        other = []

    entries = [_entry(store, n, by_name.get(n)) for n in names]
    try:
        from normlab import __version__ as version
    except Exception:  # pragma: no cover - partial installs
        version = None
    return ReportData(
        root=root,
        generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        entries=entries,
        other=other,
        audit=_audit(root) if experiments is None else None,
        registry_problem=problem,
        normlab_version=version,
    )


# --------------------------------------------------------------------------- writing


def build_report(
    root: str | os.PathLike = "runs",
    out: str | os.PathLike | None = None,
    *,
    experiments: Sequence[str] | None = None,
) -> Path:
    """Write the report of the run store at ``root``: one self-contained HTML page and a Markdown summary.

    ``out`` is the HTML file (default ``<root>/report.html``; a folder means
    ``<folder>/report.html``); the Markdown summary goes next to it with the
    suffix ``.md``. Figures are embedded in the page as base64 PNGs and links
    to run files are relative to the page's folder, so the page can be mailed
    and also browsed in place. Returns the HTML file's path.
    """
    from normlab.lab.report._html import render_html
    from normlab.lab.report._markdown import render_markdown

    data = collect(root, experiments=experiments)
    out = Path(root) / "report.html" if out is None else Path(out)
    if out.is_dir():
        out = out / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"--out {str(out)!r} must end in .html (the Markdown summary is written next to it)")
    html_path = atomic_write(out, render_html(data, out.parent))
    atomic_write(out.with_suffix(".md"), render_markdown(data, out.parent, html_path.name))
    return html_path


def report_main(argv: Sequence[str] | None = None) -> int:
    """``normlab report [--root runs] [--out PATH] [--only NAME ...]``: write the report, print its path.

    Returns 0, or 2 with a one-line message on standard error when the store
    is missing or a name is unknown.
    """
    p = argparse.ArgumentParser(
        prog="normlab report",
        description="Build one self-contained HTML page (and report.md) from the run store; never trains.",
    )
    p.add_argument("--root", default="runs", help="run store folder (default: runs)")
    p.add_argument("--out", default=None, help="HTML file to write (default: <root>/report.html)")
    p.add_argument(
        "--only", nargs="+", default=None, metavar="NAME", help="only these experiments (names or claim ids)"
    )
    try:
        args = p.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed by argparse)
        return int(exc.code or 0)
    try:
        path = build_report(args.root, args.out, experiments=args.only)
    except ReportError as e:
        print(f"normlab report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out in a folder that cannot be written
        print(f"normlab report: error: cannot write the report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0
