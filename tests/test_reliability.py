"""Reliability and safety of the lab (issue 17): each test reproduces an attack or a fault and asserts the safe outcome.

Nothing runs code from a data file (CIFAR pickles), nothing a user pastes from
the store runs code (the reproduce command, report.md), bad input ends in one
line with exit status 2 (never a traceback or a signal), a corrupt run is set
aside and redone instead of blocking the store, and the local DDP launcher names
a dead worker and leaves no orphans.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from normlab.lab.cli import main
from normlab.lab.config import ConfigError, TrainConfig, parse_overrides
from normlab.lab.executors import sweep
from normlab.lab.store import QUARANTINE, CorruptRunError, RunStore, read_json, run_id

CPUS = os.cpu_count() or 1
TINY = ["dataset=digits", "model=mlp", "model_kwargs.width=8", "epochs=1", "device=cpu", "threads=1"]


def _cli(argv, capsys) -> tuple[int, str, str]:
    """``normlab argv`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, must: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert must in lines[0], lines[0]


def _subprocess(args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "normlab", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


# --------------------------------------------------------------------------- CIFAR: restricted unpickling

CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _write_cifar10(folder: Path, rng: np.random.Generator, *, protocol: int = 2, n: int = 20) -> dict:
    """CIFAR-10 in the standard layout and format (bytes keys, uint8 rows, label lists); returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        arrays[name] = (data, labels)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"num_cases_per_batch": n, b"label_names": CLASSES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return arrays


class _Touch:
    """A pickle payload: unpickling it calls ``os.system("touch <path>")``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.path))}",))


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: _Touch(marker),  # the whole file is the payload
        # a valid meta dict with the payload inside: with plain pickle.load training would go on normally
        lambda marker: {b"label_names": CLASSES, b"num_vis": 3072, b"num_cases_per_batch": _Touch(marker)},
    ],
)
def test_a_malicious_cifar_pickle_creates_nothing_and_is_refused_with_one_clear_error(tmp_path, payload):
    from normlab.lab.data import load_dataset

    folder = tmp_path / "data" / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(0))
    marker = tmp_path / "pwned"
    (folder / "batches.meta").write_bytes(pickle.dumps(payload(marker), protocol=2))
    # the attack is real: an ordinary pickle.load of this file runs the command
    pickle.loads((folder / "batches.meta").read_bytes())
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", data_dir=tmp_path / "data")
    assert not marker.exists()
    msg = str(info.value)
    assert "\n" not in msg and str(folder / "batches.meta") in msg
    assert "refusing to load" in msg and "system" in msg and "nothing in it was run" in msg


def test_an_object_array_in_a_cifar_pickle_is_refused(tmp_path):
    from normlab.lab.data import load_dataset

    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(0))
    bad = {b"data": np.array([b"a", 1, "c"], dtype=object), b"labels": [0, 1, 2]}  # only allowed items
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match="refusing to load .*data_batch_3.*array of Python objects"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_format_cifar_files_still_load_and_a_checksum_mismatch_is_said(tmp_path, protocol):
    from normlab.lab.data import read_cifar

    arrays = _write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(protocol), protocol=protocol)
    with pytest.warns(RuntimeWarning, match=r"not the published ones \(MD5 differs for batches.meta, data_batch_1"):
        xtr, ytr, xte, yte, names = read_cifar("cifar10", tmp_path)
    expect = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert xtr.dtype == np.uint8 and np.array_equal(xtr, expect)
    assert ytr.tolist() == sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert (
        np.array_equal(xte, arrays["test_batch"][0].reshape(-1, 3, 32, 32)) and yte.tolist() == arrays["test_batch"][1]
    )
    assert names == [c.decode() for c in CLASSES]


def test_files_with_the_published_checksums_load_without_a_warning(tmp_path, monkeypatch, recwarn):
    from normlab.lab.data import _cifar, read_cifar

    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(1))
    published = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setitem(_cifar.CIFAR_SPECS["cifar10"], "file_md5", published)
    read_cifar("cifar10", tmp_path)
    assert not [w for w in recwarn if "published" in str(w.message)]


# --------------------------------------------------------------------------- the stored reproduce command


def test_the_reproduce_command_is_shell_quoted_and_a_shell_gives_back_the_arguments(tmp_path):
    from normlab.lab.experiments.framework import _command

    overrides = ["data_dir=$(touch pwned)", "norms=batchnorm, none", "note=`touch pwned2`; rm -rf x | y > z"]
    cmd = _command("smoke-example", "smoke", 2, overrides)
    want = ["normlab", "run", "smoke-example", "--scale", "smoke", "--seeds", "2"]
    for o in overrides:
        want += ["--set", o]
    assert shlex.split(cmd) == want
    # a real shell, with `normlab` replaced by printf: the words come back unchanged and nothing runs
    printed = subprocess.run(
        ["bash", "-c", "printf '%s\\n' " + cmd.split(" ", 1)[1]], cwd=tmp_path, capture_output=True, text=True
    )
    assert printed.returncode == 0 and printed.stdout.splitlines() == want[1:]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- report.md escapes experiment strings


@dataclass(frozen=True)
class _EvilConfig:
    seeds: int = 2  # seeds per grid point
    note: str = "plain"  # free text carried into the command


EVIL_TITLE = "<script>alert('title')</script> *bold* [link](javascript:alert(1))"
EVIL_SUMMARY = "a | b `code` <img src=x onerror=alert(1)> ![i](http://x/y.png) [c](javascript:alert(2)) \\"


@pytest.fixture
def evil_store(tmp_path):
    from normlab.lab.experiments import framework as base

    exp = base.Experiment(
        name="evil-strings", claim="C989", title=EVIL_TITLE, config=_EvilConfig,
        scales={s: _EvilConfig() for s in base.SCALES},
        grid=lambda cfg: [{"arm": "<b>x</b>"}], run_one=lambda run: {"v": 1.0},
        analyse=lambda rows: base.Verdict("holds", EVIL_SUMMARY, {"<i>k</i>": {"mean": 1.0, "std": 0.0, "n": 2}}),
    )  # fmt: skip
    base.register_experiment(exp)
    try:
        overrides = ["note=`x` <script>y</script> | z"]
        base.run_experiment("evil-strings", "smoke", overrides=overrides, root=tmp_path, progress=False)
        yield tmp_path
    finally:
        base.EXPERIMENTS.unregister("evil-strings")


def _as_commonmark_text(md: str) -> str:
    """What CommonMark shows for ``md`` when it holds no markup: backslash escapes and entities resolved."""
    return html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", md))


def test_report_md_shows_html_and_markdown_from_experiments_as_text(evil_store):
    from normlab.lab.report import build_report

    md = build_report(evil_store).with_suffix(".md").read_text(encoding="utf-8")
    # outside code spans (whose content every renderer shows literally) no "<" at all: no HTML tag can be made
    code_span = r"(?<![`\\])(`+)(?!`)(.*?)(?<!`)\1(?!`)"
    assert "<" not in re.sub(code_span, "", md)
    # every link or image left is the report's own, to a relative path (a javascript: or http: target needs an
    # unescaped "[" from the experiment's strings)
    targets = re.findall(r"(?<!\\)\[(?:[^\]\\]|\\.)*\]\(([^)]*)\)", md)
    assert targets and all(":" not in t and not t.startswith("/") for t in targets), targets
    # the strings are still there, escaped: read back by CommonMark's rules they are the text the experiment gave
    section = next(s for s in md.split("\n## ") if s.startswith("C989 evil-strings: holds")).splitlines()
    verdict = next(l for l in section if l.startswith("- **Verdict:** ")).removeprefix("- **Verdict:** ")
    assert _as_commonmark_text(verdict) == f"holds — {EVIL_SUMMARY}"
    assert _as_commonmark_text(section[2][1:-1]) == EVIL_TITLE  # the title, in *emphasis*
    # the command is a code span no backtick can end, and it pastes back to the same words
    line = next(l for l in section if l.startswith("- **Reproduce:** "))
    span = line.removeprefix("- **Reproduce:** ")
    fence = span[: len(span) - len(span.lstrip("`"))]
    assert len(fence) >= 2 and span.endswith(fence) and fence not in span[len(fence) : -len(fence)]
    assert shlex.split(span[len(fence) : -len(fence)].strip())[-1] == "note=`x` <script>y</script> | z"


# --------------------------------------------------------------------------- report refuses a folder that is no store


def test_report_refuses_a_folder_that_is_not_a_run_store(tmp_path, capsys):
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    (home / "documents" / "config.json").write_text("{}")  # a config.json, but not in a run folder
    code, _, err = _cli(["report", "--root", str(home)], capsys)
    _one_line_error(code, err, "is not a run store")
    assert sorted(p.name for p in home.iterdir()) == ["documents", "notes.txt"]  # nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = _cli(["report", "--root", str(empty)], capsys)
    assert code == 0 and (empty / "report.html").is_file(), err  # an empty store is a store


# --------------------------------------------------------------------------- bad input: one line, exit 2

LONG_ID = "a" * 5000


@pytest.mark.parametrize(
    "argv, must",
    [
        (["train", "--set", *TINY, "seed=-1"], "seed must be in [0, 2**63 - 1], got -1"),
        (["train", "--set", *TINY, "seed=99999999999999999999999"], "seed must be in [0, 2**63 - 1]"),
        (["train", "--set", *TINY, "data_seed=1e30"], "data_seed must be in [0, 2**63 - 1]"),
        (["train", "--set", *TINY, "lr=1e300"], "lr must be a finite number in [0, 3.40282e+38], got 1e+300"),
        (["train", "--set", *TINY, "lr=nan"], "lr must be a finite number"),
        (["train", "--set", *TINY, "warmup_epochs=inf"], "warmup_epochs must be a finite number in [0, 1e+06]"),
        (["train", "--set", *TINY, "epochs=1e30"], "epochs must be in [1, 1000000]"),
        (["train", "--set", *TINY, "lr_milestones=nan", "schedule=step"], "lr_milestones must be a finite number"),
        (["train", "--set", *TINY, "lr_decay=1e300", "schedule=step"], "lr_decay must be a finite number in (0, 1]"),
        (["train", "--set", *TINY, "weight_decay=inf"], "weight_decay must be a finite number"),
        (["train", "--set", *TINY, "batch_size=1e30"], "batch_size=1000000000000000019884624838656 is too large"),
        (["train", "--set", *TINY, "threads=100000"], f"threads=100000 must be between 1 and {CPUS}"),
        (["train", "--name", "../escape", "--set", *TINY], "experiment name '../escape' must be a folder name"),
        (["train", "--root", "/proc/nope", "--set", *TINY], "cannot create the run store '/proc/nope'"),
        (["train", "--root", "/etc/passwd", "--set", *TINY], "run store '/etc/passwd' is not a folder"),
        (
            ["train", "--set", *TINY, "drop_last=false", "n_train=65", "batch_size=64"],
            "drop_last=false with 65 training examples and batch_size=64 gives batches of 1 example",
        ),
        (["run", "smoke-example", "--set", "norms="], "norms= is empty; give at least one value"),
        (["run", "smoke-example", "--set", "norms=none,none"], "duplicate run ids"),
        (["run", "smoke-example", "--executor", "local", "--workers", "100000"], "workers=100000 must be between 1"),
        (["show", LONG_ID], "(5000 characters)"),
    ],
)
def test_bad_cli_input_exits_2_with_one_line(argv, must, tmp_path, capsys, monkeypatch):
    if "--root" not in argv and argv[0] in ("train", "run", "show"):
        argv = [*argv, "--root", str(tmp_path / "runs")]
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(argv, capsys)
    _one_line_error(code, err, must)
    assert not (tmp_path / "escape").exists() and not Path("/proc/nope").exists()


def test_nproc_beyond_the_cpus_is_refused_before_any_process_starts(tmp_path, capsys, monkeypatch):
    from normlab.lab import launch

    def no_spawn(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(launch.subprocess, "Popen", no_spawn)
    code, _, err = _cli(["train", "--nproc", "100000", "--root", str(tmp_path), "--set", *TINY], capsys)
    _one_line_error(code, err, f"--nproc=100000 must be between 1 and {CPUS}")
    code, _, err = _cli(["train", "--nproc", "2", "--root", str(tmp_path), "--set", *TINY, "lr=1e300"], capsys)
    _one_line_error(code, err, "lr must be a finite number")  # checked once, before the launch


def test_the_worst_inputs_in_a_real_process_end_in_one_line_not_a_traceback_or_a_signal(tmp_path):
    for args, must in (
        (["train", "--set", *TINY, "threads=100000"], "threads=100000 must be between"),  # segfaulted before
        (["report"], "is not a run store"),
    ):
        (tmp_path / "a-file-of-mine.txt").write_text("not a run store")
        p = _subprocess([*args, "--root", str(tmp_path)], cwd=tmp_path)
        assert p.returncode == 2, (args, p.returncode, p.stderr[-2000:])
        assert len(p.stderr.strip().splitlines()) == 1 and must in p.stderr, p.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["a-file-of-mine.txt"]


# --------------------------------------------------------------------------- the typed config's ranges


@pytest.mark.parametrize(
    "item",
    [
        "epochs=1e30", "epochs=1000001", "lr_milestones=nan", "lr_milestones=10,inf", "lr_milestones=-1",
        "lr=1e300", "lr=-1", "lr=inf", "warmup_epochs=inf", "warmup_epochs=-0.5", "seed=-1", "seed=9223372036854775808",
        "data_seed=-1", "weight_decay=inf", "weight_decay=nan", "lr_decay=0", "lr_decay=1.5", "lr_decay=nan",
        "momentum=nan", "betas=nan,0.9", "divergence_loss=nan", "batch_size=1e30", "max_steps=1e30", "n_train=-3",
        "sync_every=0", "eval_batch_size=9223372036854775808",
    ],
)  # fmt: skip
def test_out_of_range_values_are_config_errors(item):
    with pytest.raises(ConfigError) as e:
        parse_overrides(TrainConfig(), [item])
    assert "\n" not in str(e.value) and item.split("=")[0] in str(e.value)


def test_the_edges_of_the_ranges_are_accepted():
    cfg = parse_overrides(
        TrainConfig(),
        ["lr=0", "seed=9223372036854775807", "epochs=1000000", "divergence_loss=inf", "lr_decay=1", "lr_milestones="],
    )
    assert cfg.seed == 2**63 - 1 and cfg.divergence_loss == math.inf and cfg.lr_milestones == ()


# --------------------------------------------------------------------------- atomic writes under concurrency


@pytest.mark.slow
def test_three_concurrent_runs_on_one_store_all_exit_0_with_one_set_of_runs(tmp_path):
    argv = [sys.executable, "-m", "normlab", "run", "smoke-example", "--scale", "smoke", "--root", "runs"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([*argv, "--device", "cpu", "--no-progress"], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    errs = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    store = RunStore(tmp_path / "runs")
    runs = list(store.runs("smoke-example", complete_only=False))
    assert len(runs) == 4 and all(r.complete and r.problem() is None for r in runs)  # 2 norms x 2 seeds, once each
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.name.endswith(".tmp")]
    verdict = read_json(tmp_path / "runs" / "smoke-example" / "verdict.json")
    assert sorted(verdict["runs"]) == sorted(r.run_id for r in runs)


# --------------------------------------------------------------------------- corrupt stores


def _fake(config):
    return {"final_acc": config["lr"] * 2 + config["seed"], "curve": [1.0, float("nan")]}


GRID = [{"lr": lr, "seed": s} for lr in (0.1, 1.0) for s in (0, 1)]

DAMAGE = {
    "truncated config.json": ("config.json", lambda p: p.write_bytes(p.read_bytes()[:7])),
    "garbage metrics.json": ("metrics.json", lambda p: p.write_bytes(b"\x00\xff garbage \x13")),
    "result.json not an object": ("result.json", lambda p: p.write_text("[1, 2]")),
    "empty env.json": ("env.json", lambda p: p.write_text("")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_corrupt_run_is_named_quarantined_never_deleted_and_run_again(tmp_path, damage):
    fname, hurt = DAMAGE[damage]
    sweep(tmp_path, "exp", GRID, _fake)
    store = RunStore(tmp_path)
    victim = store.run("exp", GRID[2])
    hurt(victim.path / fname)
    damaged = (victim.path / fname).read_bytes()

    problem = victim.problem()
    assert problem is not None and fname in problem
    reader = {"config.json": victim.config, "env.json": victim.env, "metrics.json": victim.metrics}
    with pytest.raises(CorruptRunError, match=rf"run exp/{victim.run_id} is corrupt: .*{fname}"):
        reader.get(fname, victim.result)()

    calls = []
    with pytest.warns(RuntimeWarning, match=rf"run exp/{victim.run_id} is corrupt .* moved to .*{QUARANTINE}"):
        report = sweep(tmp_path, "exp", GRID, lambda c: calls.append(c) or _fake(c))
    assert calls == [GRID[2]] and report.ran == [victim.run_id]  # only the corrupt run is redone
    assert victim.problem() is None and victim.result()["final_acc"] == _fake(GRID[2])["final_acc"]
    (kept,) = store.quarantined("exp")
    assert kept.name.startswith(victim.run_id) and (kept / fname).read_bytes() == damaged  # set aside, intact
    assert victim.run_id in (kept / "reason.txt").read_text() and fname in (kept / "reason.txt").read_text()
    assert store.experiments() == ["exp"]  # the quarantine is not an experiment


def test_show_report_run_and_train_on_a_corrupt_store(tmp_path, capsys):
    root = tmp_path / "runs"
    code, out, err = _cli(["train", "--root", str(root), "--no-progress", "--set", *TINY, "max_steps=3"], capsys)
    assert code == 0, err
    (run,) = RunStore(root).runs("train")
    (run.path / "config.json").write_text('{"dataset": "dig')  # truncated mid-write by something else

    code, _, err = _cli(["show", run.run_id, "--root", str(root)], capsys)
    _one_line_error(code, err, f"run train/{run.run_id} is corrupt: {run.path / 'config.json'} is not valid JSON")

    from normlab.lab.report import build_report

    md = build_report(root).with_suffix(".md").read_text(encoding="utf-8")
    assert "CORRUPT" in md and run.run_id in md and "0 complete" in md

    with pytest.warns(RuntimeWarning, match="is corrupt"):
        code, out, err = _cli(["train", "--root", str(root), "--no-progress", "--set", *TINY, "max_steps=3"], capsys)
    assert code == 0 and out.startswith("finished"), err  # trained again, not "already stored"
    assert run.problem() is None and len(RunStore(root).quarantined("train")) == 1


# --------------------------------------------------------------------------- distributed launcher


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie is dead (only not yet reaped)


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def _launch_two(tmp_path) -> tuple[subprocess.Popen, dict[int, int]]:
    """``normlab train --nproc 2`` on a run long enough to be killed; returns the launcher and {rank: pid}."""
    argv = ["train", "--nproc", "2", "--root", str(tmp_path), "--no-progress", "--set", *TINY, "epochs=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NORMLAB_DIST_TIMEOUT": "20"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "normlab", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    ranks: dict[int, int] = {}
    while time.monotonic() < deadline and len(ranks) < 2:
        ranks = {r: c for c in _children(launcher.pid) if (r := _rank_of(c)) is not None}
        time.sleep(0.2)
    assert len(ranks) == 2, "the launcher did not start two ranks"
    time.sleep(3)  # let them get going
    return launcher, ranks


@pytest.fixture
def cleanup_pids():
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_worker_is_named_by_the_launcher_within_60_s(tmp_path, cleanup_pids):
    launcher, ranks = _launch_two(tmp_path)
    cleanup_pids += [launcher.pid, *ranks.values()]
    killed = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=60)
    assert time.monotonic() - killed < 60
    last = err.decode().strip().splitlines()[-1]
    assert f"rank 1 (pid {ranks[1]}) was killed by signal SIGKILL" in last, err.decode()[-3000:]
    assert launcher.returncode == 128 + signal.SIGKILL
    assert not _alive(ranks[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_launcher_leaves_no_worker_alive_after_10_s(tmp_path, cleanup_pids):
    launcher, ranks = _launch_two(tmp_path)
    cleanup_pids += [launcher.pid, *ranks.values()]
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in ranks.values()):
        time.sleep(0.1)
    assert not any(_alive(p) for p in ranks.values())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stopped_worker_ends_the_run_after_the_timeout_and_is_named(tmp_path, cleanup_pids):
    launcher, ranks = _launch_two(tmp_path)  # NORMLAB_DIST_TIMEOUT=20
    cleanup_pids += [launcher.pid, *ranks.values()]
    stopped = time.monotonic()
    os.kill(ranks[1], signal.SIGSTOP)
    _, err = launcher.communicate(timeout=120)
    assert time.monotonic() - stopped < 90
    last = err.decode().strip().splitlines()[-1]
    assert f"rank 1 (pid {ranks[1]}) is stopped" in last and "rank 0" in last, err.decode()[-3000:]
    assert not any(_alive(p) for p in ranks.values())


def test_the_collective_timeout_is_proportionate_and_can_be_set(monkeypatch):
    from normlab.lab import launch

    monkeypatch.delenv("NORMLAB_DIST_TIMEOUT", raising=False)
    assert launch.timeout("gloo").total_seconds() == 120 and launch.timeout("nccl").total_seconds() == 600
    monkeypatch.setenv("NORMLAB_DIST_TIMEOUT", "7.5")
    assert launch.timeout("gloo").total_seconds() == 7.5
    for bad in ("soon", "0", "-1", "inf", "nan"):
        monkeypatch.setenv("NORMLAB_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="NORMLAB_DIST_TIMEOUT"):
            launch.timeout("gloo")


def test_run_id_of_a_config_never_depends_on_the_strict_json_encoding_of_finite_values():
    cfg = TrainConfig().to_dict()
    canon = json.dumps(cfg, sort_keys=True, separators=(",", ":"))  # what the ids of existing stores hash
    assert run_id(cfg) == hashlib.sha256(canon.encode()).hexdigest()[:16]
