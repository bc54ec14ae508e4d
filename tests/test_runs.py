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


# --------------------------------------------------------------------------- run data (issue 18)


def _train_like_run(config: dict) -> dict:
    """Metrics shaped like RunResult.to_metrics(): scalars, step_loss and per-epoch records (one diverged step)."""
    epochs = [
        {"epoch": e, "steps": 3 * (e + 1), "lr": config["lr"] / (e + 1), "train_loss": 1.0 / (e + 1), "test_acc": 0.5}
        for e in range(config["epochs"])
    ]
    return {
        "final_test_acc": 0.5 + config["seed"],
        "diverged": config["seed"] == 1,
        "min_step_loss": None,
        "step_loss": [1.0, 0.5, float("inf")] if config["seed"] == 1 else [1.0, 0.5, 0.25],
        "per_epoch": epochs,
    }


def test_load_curves_gives_long_format_rows_per_run_and_point(tmp_path):
    configs = [
        {"lr": 0.1, "epochs": 2, "norm": n, "model_kwargs": {"width": 4}, "seed": s} for n in "ab" for s in (0, 1)
    ]
    sweep(tmp_path, "exp", configs, _train_like_run)

    rows = runs.load_curves(tmp_path, "exp")
    assert len(rows) == sum(c["epochs"] for c in configs)  # one row per run and epoch
    for c in configs:
        mine = [r for r in rows if r["run_id"] == run_id(c)]
        assert [r["epoch"] for r in mine] == list(range(c["epochs"]))
        for r, want in zip(mine, _train_like_run(c)["per_epoch"]):
            assert r["norm"] == c["norm"] and r["model_kwargs.width"] == 4 and r["epochs"] == c["epochs"]
            assert r["lr"] == c["lr"] and r["per_epoch.lr"] == want["lr"]  # the epoch's lr does not hide the config's
            assert r["train_loss"] == want["train_loss"] and r["steps"] == want["steps"]

    steps = runs.load_curves(tmp_path, "exp", "step_loss")
    assert len(steps) == 3 * len(configs) and {r["step"] for r in steps} == {0, 1, 2}
    diverged = [r["step_loss"] for r in steps if r["seed"] == 1 and r["step"] == 2]
    assert diverged == [math.inf, math.inf]  # non-finite values come back as floats

    with pytest.raises(KeyError, match="no stored run has a curve 'nope'; curves stored: per_epoch, step_loss"):
        runs.load_curves(tmp_path, "exp", "nope")


def test_load_curves_frame_matches_pandas_own_reshaping_of_load_table(tmp_path):
    pd = pytest.importorskip("pandas")
    configs = [{"lr": lr, "epochs": 3, "seed": 0} for lr in (0.1, 0.2)]
    sweep(tmp_path, "exp", configs, _train_like_run)
    frame = runs.load_curves(tmp_path, "exp", as_frame=True)
    # the independent route: the wide table with curves in cells, exploded and normalised by pandas itself
    wide = load_table(tmp_path, "exp", with_metrics=True, as_frame=True).explode("per_epoch", ignore_index=True)
    records = pd.json_normalize(wide["per_epoch"].tolist()).add_prefix("per_epoch.")
    long = pd.concat([wide[["run_id", "lr"]], records], axis=1)
    got = frame[["run_id", "lr", "epoch", "per_epoch.lr", "train_loss"]].reset_index(drop=True)
    want = long[["run_id", "lr", "per_epoch.epoch", "per_epoch.lr", "per_epoch.train_loss"]]
    want.columns = got.columns
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_per_epoch_records_do_not_collide_with_the_epochs_config_field(tmp_path, capsys):
    from normlab.lab.cli import main

    argv = ["train", "--root", str(tmp_path), "--no-progress", "--set", "dataset=digits", "model=mlp"]
    assert main([*argv, "model_kwargs.width=8", "epochs=2", "device=cpu", "threads=1"]) == 0
    (row,) = load_table(tmp_path, "train", with_metrics=True)
    assert row["epochs"] == 2  # the config's count
    assert [e["epoch"] for e in row["per_epoch"]] == [0, 1]  # the records, under their own name
    assert not any(k.startswith("result.") for k in row)


def test_a_store_written_before_the_rename_reads_its_epochs_as_per_epoch(tmp_path):
    stored = RunStore(tmp_path).save("exp", {"epochs": 1, "seed": 0}, {"steps": 2, "epochs": [{"epoch": 0}]})
    assert stored.metrics()["per_epoch"] == [{"epoch": 0}] and "epochs" not in stored.metrics()
    assert runs.load_curves(tmp_path, "exp")[0]["epoch"] == 0


def test_run_files_get_the_permissions_of_a_new_file_0644_under_umask_022(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        stored = RunStore(tmp_path).save("exp", {"a": 1}, {"v": 1.0}, env={"seed": 0})
    finally:
        os.umask(old)
    from normlab import _io

    want = 0o666 & ~_io._UMASK  # atomic_write uses the umask the process started with
    for p in stored.path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    if _io._UMASK == 0o022:
        assert want == 0o644


def test_env_records_the_device_used_not_auto():
    import torch

    used = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device="auto", seed=0)
    assert env["device"] == used and env["device_requested"] == "auto"
    assert "device_requested" not in environment(device="cpu")


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    """A store written by the command line: smoke-example at smoke scale (device auto) and a diverging run."""
    import contextlib
    import io

    from normlab.lab.cli import main

    root = tmp_path_factory.mktemp("cli-store") / "runs"
    tiny = ["dataset=digits", "model=mlp", "model_kwargs.width=8", "epochs=1", "device=cpu", "threads=1"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "train",
                    "--root",
                    str(root),
                    "--no-progress",
                    "--set",
                    *tiny,
                    "norm=none",
                    "lr=1e20",
                    "divergence_loss=inf",
                ]
            )
            == 0
        )
        assert main(["run", "smoke-example", "--scale", "smoke", "--root", str(root), "--no-progress"]) == 0
    return root


def test_every_stored_file_is_strict_json_and_reads_back_non_finite_numbers(cli_store):
    files = sorted(cli_store.rglob("*.json"))
    assert len(files) >= 5 * 4 + 1  # five runs of four files, and a verdict
    for p in files:
        json.loads(p.read_text(encoding="utf-8"), parse_constant=_reject)
        assert p.stat().st_mode & 0o044 == 0o044  # readable by group and others (umask 022)
    (diverged,) = load_table(cli_store, "train", with_metrics=True)
    assert diverged["diverged"] is True
    assert not math.isfinite(diverged["step_loss"][diverged["diverged_step"]])  # a float again, not a string
    assert isinstance(diverged["final_train_loss"], float)
    import torch

    used = "cuda" if torch.cuda.is_available() else "cpu"
    for r in RunStore(cli_store).runs("smoke-example"):  # run with the default device, auto
        assert r.env()["device"] == used and r.env()["device_requested"] == "auto"


def _readme_python_block(heading: str) -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    return text.split(f"\n{heading}\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_run_data_example_runs_on_a_real_store(cli_store, monkeypatch, capsys):
    monkeypatch.chdir(cli_store.parent)  # the example reads "runs"
    ns: dict = {}
    exec(compile(_readme_python_block("### Run data"), "README.md (Run data)", "exec"), ns)
    assert capsys.readouterr().out.strip()
    # what it built, checked against the run files read with the json module alone
    results = [json.loads(p.read_text()) for p in (cli_store / "smoke-example").glob("*/result.json")]
    configs = [json.loads(p.read_text()) for p in (cli_store / "smoke-example").glob("*/config.json")]
    assert len(results) == 4 and len(ns["runs"]) == 4
    assert sorted(ns["runs"]["final_test_acc"]) == sorted(r["final_test_acc"] for r in results)
    assert len(ns["curves"]) == sum(r["epochs_run"] for r in results)
    assert len(ns["steps"]) == sum(r["steps"] for r in results)
    assert set(ns["curves"]["norm"]) == {c["norm"] for c in configs}
