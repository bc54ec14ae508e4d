"""Scale-out: DDP training with synchronized BN across processes, and sweeps on a process pool and on Ray.

* Two local ``gloo`` processes launched through the environment (``RANK``,
  ``WORLD_SIZE``, ... as ``torchrun`` sets them) train the same model as one
  process on the same global batch; loss curves and final weights must agree.
  Without synchronized BN they must not (so the comparison can fail).
* ``normlab train --nproc 2`` and ``torchrun ... -m normlab train`` store one
  run, written by rank 0 only.
* A sweep on a local process pool gives the sequential sweep's results; a
  worker killed mid-sweep loses nothing and repeats nothing on resume; a run
  claimed by a live worker is not started by another.
* The same sweep on a local Ray instance with 2 CPUs (skipped without Ray).
"""

from __future__ import annotations

import concurrent.futures.process
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import _scale_out_helpers as helpers
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from normlab.lab.cli import main
from normlab.lab.config import TrainConfig
from normlab.lab.executors import claim_run, sweep
from normlab.lab.store import RunStore, run_id
from normlab.lab.train import train

# batch 63 over 2 processes: slices of 31 and 32 rows (uneven on purpose)
DDP_CFG = TrainConfig(
    dataset="digits",
    model="mlp",
    model_kwargs={"width": 32},
    norm="batchnorm",
    epochs=2,
    batch_size=63,
    lr=0.1,
    device="cpu",
    threads=1,
    seed=3,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from normlab.layers.sync import SyncBatchNorm

    for sync in (True, False):
        r = train(DDP_CFG.__class__(**{**DDP_CFG.__dict__, "sync_bn": sync}), tune_malloc=False)
        n_sync = sum(isinstance(m, SyncBatchNorm) for m in r.model.modules())
        torch.save(
            {
                "step_loss": r.step_loss,
                "epochs": r.epochs,
                "state": r.model.state_dict(),
                "world": r.world_size,
                "n_sync": n_sync,
            },
            Path(out_dir) / f"rank{rank}_sync{int(sync)}.pt",
        )


def test_two_gloo_processes_with_sync_bn_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = train(DDP_CFG)
    got = {(r, s): torch.load(tmp_path / f"rank{r}_sync{s}.pt") for r in (0, 1) for s in (0, 1)}
    d = got[0, 1]
    assert d["world"] == 2 and d["n_sync"] >= 1 and got[0, 0]["n_sync"] == 0
    assert len(d["step_loss"]) == len(ref.step_loss) == 2 * (1437 // 63)
    # every process records the same (global) numbers
    untimed = lambda eps: [{k: v for k, v in e.items() if k not in ("time", "eval_time")} for e in eps]
    assert got[1, 1]["step_loss"] == d["step_loss"] and untimed(got[1, 1]["epochs"]) == untimed(d["epochs"])
    np.testing.assert_allclose(d["step_loss"], ref.step_loss, rtol=1e-5, atol=1e-5)
    for e, er in zip(d["epochs"], ref.epochs):
        for k in ("train_loss", "test_loss"):
            assert e[k] == pytest.approx(er[k], rel=1e-5, abs=1e-5), k
        assert abs(e["test_acc"] - er["test_acc"]) <= 1 / 360 and abs(e["train_acc"] - er["train_acc"]) <= 2 / 1386
    ref_state = ref.model.state_dict()
    assert d["state"].keys() == ref_state.keys()
    for k, v in ref_state.items():
        torch.testing.assert_close(d["state"][k], v, rtol=1e-4, atol=1e-5, msg=f"final {k}")
    # per-process BN statistics (sync_bn=false) are a different computation: the comparison above can fail
    gap = np.abs(np.array(got[0, 0]["step_loss"]) - np.array(ref.step_loss)).max()
    assert gap > 1e-3, gap


def _cli(args, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


TRAIN_SET = [
    "dataset=digits",
    "model=mlp",
    "model_kwargs.width=16",
    "epochs=1",
    "batch_size=64",
    "device=cpu",
    "threads=1",
    "seed=1",
]


def _check_stored_two_process_run(root: Path) -> None:
    runs = list(RunStore(root).runs("train", complete_only=False))
    assert len(runs) == 1 and runs[0].complete
    run = runs[0]
    assert run.config()["world_size"] == 2 and run.env()["world_size"] == 2 and run.result()["world_size"] == 2
    assert sorted(p.name for p in run.path.iterdir()) == ["config.json", "env.json", "metrics.json", "result.json"]
    ref = train(
        TrainConfig(
            dataset="digits",
            model="mlp",
            model_kwargs={"width": 16},
            epochs=1,
            batch_size=64,
            device="cpu",
            threads=1,
            seed=1,
        )
    )
    np.testing.assert_allclose(run.metrics()["step_loss"], ref.step_loss, rtol=1e-5, atol=1e-5)


def test_cli_train_nproc_2_trains_once_and_only_rank_0_writes(tmp_path):
    root = tmp_path / "runs"
    p = _cli(["-m", "normlab", "train", "--nproc", "2", "--root", str(root), "--no-progress", "--set", *TRAIN_SET])
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("stored:") == 1  # rank 0 prints; rank 1 is silent
    _check_stored_two_process_run(root)
    again = _cli(["-m", "normlab", "train", "--nproc", "2", "--root", str(root), "--set", *TRAIN_SET])
    assert again.returncode == 0 and "already stored" in again.stdout


def test_torchrun_over_python_m_normlab(tmp_path):
    root = tmp_path / "runs"
    p = _cli(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "normlab",
            "train",
            "--root",
            str(root),
            "--no-progress",
            "--set",
            *TRAIN_SET,
        ]
    )
    assert p.returncode == 0, p.stderr[-2000:]
    _check_stored_two_process_run(root)


# --------------------------------------------------------------------------- sweeps


GRID = [{"norm": norm, "lr": lr, "seed": 0} for norm in ("batchnorm", "none") for lr in (0.05, 0.2)]


def _results(store: RunStore, configs) -> list[dict]:
    return [store.run("s", c).metrics() for c in configs]


@pytest.fixture
def log(tmp_path, monkeypatch):
    path = tmp_path / "log.txt"
    monkeypatch.setenv("NORMLAB_TEST_LOG", str(path))
    return path


def _events(path: Path, event: str) -> Counter:
    if not path.exists():
        return Counter()
    return Counter(line.split()[1] for line in path.read_text().splitlines() if line.split()[0] == event)


@pytest.fixture(scope="module")
def sequential_results(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("seq"))
    sweep(store, "s", GRID, helpers.train_run, env_fn=helpers.fixed_env)
    return _results(store, GRID)


def test_local_pool_sweep_equals_the_sequential_sweep(tmp_path, log, sequential_results):
    store = RunStore(tmp_path / "runs")
    report = sweep(store, "s", GRID, helpers.train_run, env_fn=helpers.fixed_env, executor="local", workers=2)
    assert sorted(report.ran) == sorted(run_id(c) for c in GRID) and report.skipped == []
    assert [r.run_id for r in report.runs] == [run_id(c) for c in GRID]  # grid order, whatever finished first
    assert _results(store, GRID) == sequential_results
    assert len(set(line.split()[2] for line in log.read_text().splitlines())) == 2  # two worker processes
    assert not list(store.root.rglob(".claim"))  # claims of finished runs are removed
    again = sweep(store, "s", GRID, helpers.train_run, executor="local", workers=2)
    assert again.ran == [] and sorted(again.skipped) == sorted(report.ran)


def test_killed_worker_resume_loses_nothing_and_repeats_nothing(tmp_path, log, sequential_results):
    grid = [dict(c) for c in GRID]
    grid[1]["kill_once"] = True
    ref = dict(zip(map(run_id, GRID), sequential_results))
    store = RunStore(tmp_path / "runs")
    with pytest.raises(concurrent.futures.process.BrokenProcessPool):
        sweep(store, "s", grid, helpers.train_run, env_fn=helpers.fixed_env, executor="local", workers=2)
    killed = run_id(grid[1])
    assert not store.run("s", grid[1]).complete
    done_before = set(_events(log, "done"))
    assert killed not in done_before
    report = sweep(store, "s", grid, helpers.train_run, env_fn=helpers.fixed_env, executor="local", workers=2)
    ids = [run_id(c) for c in grid]
    assert all(store.run("s", c).complete for c in grid)  # loses nothing
    assert _events(log, "done") == Counter(ids)  # repeats nothing: every run finished exactly once
    assert sorted(report.skipped) == sorted(done_before) and sorted(report.ran) == sorted(set(ids) - done_before)
    for c in grid:  # the killed run, run again, gives the uninterrupted numbers
        want = ref[run_id({k: v for k, v in c.items() if k != "kill_once"})]
        assert store.run("s", c).metrics() == want


def test_a_run_claimed_by_a_live_worker_is_not_started_by_another(tmp_path, log):
    store = RunStore(tmp_path / "runs")
    held = [claim_run(store.run("s", GRID[0])), claim_run(store.run("s", GRID[1]))]
    assert all(held) and claim_run(store.run("s", GRID[0])) is None  # exclusive, even within one process
    box = {}
    t = threading.Thread(target=lambda: box.update(r=sweep(store, "s", GRID, helpers.train_run, poll=0.05)))
    t.start()
    deadline = time.time() + 60
    while len(_events(log, "done")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert set(_events(log, "start")) == {run_id(GRID[2]), run_id(GRID[3])}  # the claimed runs wait
    # the holder of GRID[0] finishes it; the holder of GRID[1] dies (releases without finishing)
    store.save("s", GRID[0], {"by": "the other worker"})
    held[0].release(done=True)
    held[1].release(done=False)
    t.join(120)
    report = box["r"]
    assert sorted(report.ran) == sorted(run_id(c) for c in GRID[1:]) and report.skipped == [run_id(GRID[0])]
    assert store.run("s", GRID[0]).metrics() == {"by": "the other worker"}  # never run twice
    assert _events(log, "start")[run_id(GRID[0])] == 0


def test_run_experiment_on_a_local_pool_equals_sequential(tmp_path):
    from normlab.lab.experiments import run_experiment

    seq = run_experiment("smoke-example", scale="smoke", device="cpu", root=tmp_path / "a", progress=False)
    pool = run_experiment(
        "smoke-example", scale="smoke", device="cpu", root=tmp_path / "b", progress=False, executor="local", workers=2
    )
    assert sorted(pool.ran) == sorted(seq.ran) and len(seq.ran) == 4
    key = lambda rows: {r["run_id"]: (r["final_test_acc"], r["final_test_loss"], r["step_loss"]) for r in rows}
    assert key(pool.rows) == key(seq.rows)
    assert pool.verdict.status == seq.verdict.status


def test_ray_sweep_on_a_local_2_cpu_instance_equals_sequential(tmp_path, log, sequential_results):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'normlab[dist]')")
    # the workers inherit this process's environment (NORMLAB_TEST_LOG); the helpers travel by value
    ray.cloudpickle.register_pickle_by_value(helpers)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        store = RunStore(tmp_path / "runs")
        report = sweep(store, "s", GRID, helpers.train_run, env_fn=helpers.fixed_env, executor="ray")
        assert sorted(report.ran) == sorted(run_id(c) for c in GRID)
        assert _results(store, GRID) == sequential_results
        assert _events(log, "done") == Counter(run_id(c) for c in GRID)
        again = sweep(store, "s", GRID, helpers.train_run, executor="ray")
        assert again.ran == [] and len(again.skipped) == len(GRID)
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "argv, must",
    [
        (["train", "--nproc", "0"], "--nproc: must be >= 1"),
        (["train", "--nproc", "two"], "--nproc: invalid positive int"),
        (["run", "smoke-example", "--executor", "dask"], "invalid choice: 'dask'"),
        (["run", "smoke-example", "--workers", "2"], "--workers needs --executor local"),
        (["run", "smoke-example", "--nproc", "2", "--executor", "local"], "cannot be combined"),
        (["run", "smoke-example", "--ray-address", "auto"], "--ray-address needs --executor ray"),
    ],
)
def test_bad_scale_out_options_exit_2_with_one_line(argv, must, tmp_path, capsys):
    try:
        status = main([*argv, "--root", str(tmp_path)])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and must in err and err.count("\n") == 1, err


def test_executor_ray_without_ray_exits_2_saying_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["run", "smoke-example", "--executor", "ray", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'normlab[dist]'" in err
    with pytest.raises(ImportError, match="pip install 'normlab\\[dist\\]'"):
        sweep(tmp_path, "s", GRID[:1], helpers.train_run, executor="ray")
