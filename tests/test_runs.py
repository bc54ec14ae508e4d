"""The run store: atomic files, deterministic run ids, sweeps that resume after a crash or a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from normlab.lab import store as runs
from normlab.lab.executors import sweep
from normlab.lab.provenance import environment
from normlab.lab.store import RunStore, load_table, run_id, write_json_atomic

GRID = [{"lr": lr, "norm": norm, "seed": s} for lr in (0.1, 1.0) for norm in ("bn", "none") for s in (0, 1)]


def fake_run(config):
    """A deterministic 'training run': numbers computed from the config alone."""
    x = config["lr"] * (2 if config["norm"] == "bn" else 1) + config["seed"] / 10
    return {"final_acc": x, "diverged": config["lr"] > 0.5 and config["norm"] == "none", "curve": [x, x / 2, x / 4]}


def stored_numbers(root: Path, experiment: str = "exp") -> dict[str, tuple]:
    store = RunStore(root)
    return {r.run_id: (r.config(), r.metrics(), r.result()) for r in store.runs(experiment)}


# --------------------------------------------------------------------------- atomic writes


def _reject(token):
    raise AssertionError(f"non-standard JSON token {token!r}")


def test_write_json_atomic_round_trip_including_non_finite(tmp_path):
    loss = [1.0, float("nan"), float("inf"), -float("inf")]
    p = write_json_atomic(tmp_path / "a" / "m.json", {"loss": loss, "t": (1, 2)})
    strict = json.loads(p.read_text(), parse_constant=_reject)  # any strict parser reads it
    assert strict["t"] == [1, 2] and strict["loss"] == [1.0, "NaN", "Infinity", "-Infinity"]
    back = runs.read_json(p)  # and normlab reads the numbers back
    assert back["loss"][0] == 1.0 and math.isnan(back["loss"][1]) and back["loss"][2:] == [math.inf, -math.inf]
    assert [float(v) for v in strict["loss"][1:]][1:] == [math.inf, -math.inf]  # the strings are what float() reads
    assert [q.name for q in p.parent.iterdir()] == ["m.json"]  # no temp file left behind


def test_files_from_older_stores_with_bare_nan_tokens_still_read(tmp_path):
    p = tmp_path / "old.json"
    p.write_text('{"loss": [1.0, NaN, Infinity]}')
    back = runs.read_json(p)
    assert math.isnan(back["loss"][1]) and back["loss"][2] == math.inf


def test_interrupted_write_leaves_old_file_intact_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"v": 1})

    def crash(src, dst):
        raise KeyboardInterrupt  # as if the process were stopped between writing and renaming

    monkeypatch.setattr(runs.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"v": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"v": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["result.json"]


def test_unserialisable_value_raises_before_touching_the_file(tmp_path):
    path = write_json_atomic(tmp_path / "x.json", {"v": 1})
    with pytest.raises(TypeError, match="cannot store a object"):
        write_json_atomic(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}


# --------------------------------------------------------------------------- ids and the store


def test_run_id_is_deterministic_and_order_independent():
    a = {"lr": 0.1, "norm": "bn", "kw": {"w": 1, "d": 2}, "seed": 0}
    b = {"seed": 0, "kw": {"d": 2, "w": 1}, "norm": "bn", "lr": 0.1}
    assert run_id(a) == run_id(b)
    assert len(run_id(a)) == 16 and int(run_id(a), 16) >= 0
    assert run_id(a) != run_id({**a, "seed": 1})
    assert run_id(a) != run_id({**a, "lr": 0.10000001})
    # the id is a hash of the canonical JSON, computed independently here
    import hashlib

    canon = json.dumps(a, sort_keys=True, separators=(",", ":"))
    assert run_id(a) == hashlib.sha256(canon.encode()).hexdigest()[:16]


def test_save_writes_the_four_files_and_result_marks_completion(tmp_path):
    store = RunStore(tmp_path)
    cfg = {"lr": 0.1, "seed": 3}
    assert not store.is_complete("exp", cfg)
    r = store.save("exp", cfg, {"acc": 0.9, "curve": [1, 2]}, env={"device": "cpu", "seed": 3})
    assert sorted(p.name for p in r.path.iterdir()) == ["config.json", "env.json", "metrics.json", "result.json"]
    assert r.path == tmp_path / "exp" / run_id(cfg)
    assert r.config() == cfg and r.metrics() == {"acc": 0.9, "curve": [1, 2]}
    assert r.result() == {"run_id": run_id(cfg), "acc": 0.9}  # scalars only
    assert store.is_complete("exp", cfg)
    (r.path / "result.json").unlink()
    assert not store.is_complete("exp", cfg)


def test_environment_records_versions_device_seed_and_revision():
    import numpy
    import torch

    env = environment(device="cpu", seed=7, threads=1)
    assert env["torch"] == torch.__version__ and env["numpy"] == numpy.__version__
    assert env["device"] == "cpu" and env["seed"] == 7 and env["threads"] == 1
    assert {"python", "git_revision", "hostname", "time"} <= set(env)
    assert env["time"].endswith("Z")


def test_load_table_flat_rows_and_frame(tmp_path):
    store = RunStore(tmp_path)
    store.save("exp", {"lr": 0.1, "model_kwargs": {"width": 8}, "seed": 0}, {"acc": 0.5, "lr": 99, "curve": [1]})
    store.save("other", {"lr": 0.2, "seed": 0}, {"acc": 0.7})
    rows = load_table(tmp_path, "exp")
    assert len(rows) == 1
    row = rows[0]
    assert row["experiment"] == "exp" and row["model_kwargs.width"] == 8 and row["lr"] == 0.1
    assert row["result.lr"] == 99 and row["acc"] == 0.5 and "curve" not in row
    assert load_table(tmp_path, "exp", with_metrics=True)[0]["curve"] == [1]
    assert len(load_table(tmp_path)) == 2
    frame = load_table(tmp_path, as_frame=True)
    assert sorted(frame["acc"]) == [0.5, 0.7]


def test_find_by_path_id_and_prefix(tmp_path):
    store = RunStore(tmp_path)
    r = store.save("exp", {"a": 1}, {"v": 1})
    assert store.find(r.path).run_id == r.run_id
    assert store.find(f"exp/{r.run_id}").run_id == r.run_id
    assert store.find(r.run_id[:6]).path == r.path
    with pytest.raises(FileNotFoundError, match="no run"):
        store.find("zzzz")


# --------------------------------------------------------------------------- sweeps resume


def test_sweep_skips_finished_runs(tmp_path):
    calls = []
    report = sweep(tmp_path, "exp", GRID, lambda c: calls.append(c) or fake_run(c))
    assert len(calls) == len(GRID) and report.ran == [run_id(c) for c in GRID] and report.skipped == []
    report2 = sweep(tmp_path, "exp", GRID, lambda c: calls.append(c) or fake_run(c))
    assert len(calls) == len(GRID)  # nothing rerun
    assert report2.ran == [] and report2.skipped == [run_id(c) for c in GRID]


def test_sweep_interrupted_by_an_exception_resumes_to_the_uninterrupted_result(tmp_path):
    sweep(tmp_path / "clean", "exp", GRID, fake_run)

    calls = []

    def crashing(config):
        calls.append(run_id(config))
        if len(calls) == 5:
            raise RuntimeError("injected crash in the 5th run")
        return fake_run(config)

    with pytest.raises(RuntimeError, match="injected"):
        sweep(tmp_path / "resumed", "exp", GRID, crashing)
    assert len(list(RunStore(tmp_path / "resumed").runs("exp"))) == 4

    calls.clear()
    report = sweep(tmp_path / "resumed", "exp", GRID, crashing)
    assert calls == [run_id(c) for c in GRID[4:]]  # the 4 finished runs were not run again
    assert report.skipped == [run_id(c) for c in GRID[:4]]

    clean, resumed = stored_numbers(tmp_path / "clean"), stored_numbers(tmp_path / "resumed")
    assert clean == resumed and len(clean) == len(GRID)


_KILLED_SWEEP = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from normlab.lab import store as runs
    from test_runs import GRID, fake_run

    real = runs.write_json_atomic

    def slow_result(path, obj):  # the 4th run stalls after metrics.json, before result.json
        if str(path).endswith("result.json") and len(list(runs.RunStore({root!r}).runs("exp"))) == 3:
            print("STALLED", flush=True)
            time.sleep(60)
        return real(path, obj)

    runs.write_json_atomic = slow_result
    from normlab.lab.executors import sweep
    sweep({root!r}, "exp", GRID, fake_run)
    """
)


def test_sweep_killed_mid_run_resumes_and_reruns_only_the_unfinished(tmp_path):
    root = tmp_path / "killed"
    script = _KILLED_SWEEP.format(tests=str(Path(__file__).parent), root=str(root))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "STALLED", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = RunStore(root)
    partial = [r for r in store.runs("exp", complete_only=False) if not r.complete]
    assert len(list(store.runs("exp"))) == 3 and len(partial) == 1  # a half-written run folder exists
    assert not list(partial[0].path.glob("*.tmp"))

    calls = []
    sweep(root, "exp", GRID, lambda c: calls.append(run_id(c)) or fake_run(c))
    assert calls == [run_id(c) for c in GRID[3:]]  # the killed run is redone, the finished ones are not

    sweep(tmp_path / "clean", "exp", GRID, fake_run)
    assert stored_numbers(root) == stored_numbers(tmp_path / "clean")


def test_sweep_rejects_duplicate_configs(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        sweep(tmp_path, "exp", [GRID[0], dict(GRID[0])], fake_run)
