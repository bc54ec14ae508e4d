"""The experiment framework: the registry, seeds in rounds, run → store → judge → plot, recheck, the suite."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from normlab.lab.config import ConfigError
from normlab.lab.experiments import framework as base
from normlab.lab.experiments.framework import (
    Experiment,
    Part,
    Run,
    fmt_mean_std,
    get_experiment,
    mean_std,
    register_experiment,
    run_experiment,
)
from normlab.registry import RegistryError


def test_mean_std_matches_numpy():
    xs = [0.91, 0.93, 0.88, 0.95]
    m, s, n = mean_std(xs)
    assert n == 4 and m == pytest.approx(np.mean(xs), abs=1e-15) and s == pytest.approx(np.std(xs, ddof=1), abs=1e-15)
    assert mean_std([2.0]) == (2.0, 0.0, 1)
    assert fmt_mean_std([1.0, 3.0]) == "2 ± 1.41 (n=2)"


# --------------------------------------------------------------------------- registry and run_experiment


@dataclass(frozen=True)
class ToyConfig:
    seeds: int = 2  # seeds per round
    max_seeds: int = 2  # seed budget
    threads: int = 1  # torch threads per run
    gap: float = 1.0  # true difference between the arms
    noise: float = 0.1  # per-seed noise


CALLS: list[tuple] = []


def _toy_grid(cfg):
    return [{"arm": "a", "mu": cfg.gap, "noise": cfg.noise}, {"arm": "b", "mu": 0.0, "noise": cfg.noise}]


def _toy_run(run: Run):
    CALLS.append((run["arm"], run.seed))
    rng = np.random.default_rng([run.seed, 0 if run["arm"] == "a" else 1])  # arms draw independent noise
    return {"value": float(run["mu"] + run["noise"] * rng.standard_normal()), "curve": [1.0, 0.5]}


def _toy_parts(cfg):
    return [
        Part("a-above-b", "arm a's value is above arm b's", "value", {"arm": "a"}, {"arm": "b"},
             direction="greater", margin=0.2, why="test margin"),
        Part("a-near-mu", "arm a is near its mean (reported)", "value", {"arm": "a"}, bound=cfg.gap,
             direction="equivalent", margin=0.5, why="test margin", decides=False),
    ]  # fmt: skip


def _toy_plot(rows, out_dir, cfg):
    plt = base.pyplot()
    fig, ax = plt.subplots()
    ax.plot([r["value"] for r in rows])
    return [base.save_figure(fig, out_dir, "toy")]


@pytest.fixture
def toy():
    exp = Experiment(
        name="test-toy",
        claim="C999",
        title="toy",
        config=ToyConfig,
        scales={
            "smoke": ToyConfig(),
            "quick": ToyConfig(seeds=3, max_seeds=9),
            "full": ToyConfig(seeds=5, max_seeds=5),
        },
        grid=_toy_grid,
        run_one=_toy_run,
        parts=_toy_parts,
        plot=_toy_plot,
    )
    register_experiment(exp)
    CALLS.clear()
    yield exp
    base.EXPERIMENTS.unregister(exp.name)


def test_register_raises_on_duplicates(toy):
    with pytest.raises(KeyError, match="already registered"):
        register_experiment(toy)
    import dataclasses

    with pytest.raises(KeyError, match="'c999' is already registered"):
        register_experiment(dataclasses.replace(toy, name="test-toy-2"))
    assert get_experiment("test-toy") is toy and get_experiment("c999") is toy
    with pytest.raises(RegistryError, match="known experiments: .*test-toy"):
        get_experiment("no-such-experiment")


def test_experiment_definition_is_checked():
    @dataclass
    class Mutable:
        seeds: int = 1
        max_seeds: int = 1
        threads: int = 1

    @dataclass(frozen=True)
    class NoBudget:
        seeds: int = 1

    kw = dict(name="x", claim=None, title="t", grid=_toy_grid, run_one=_toy_run, parts=_toy_parts)
    with pytest.raises(TypeError, match="needs a `max_seeds: int` field"):
        Experiment(config=NoBudget, scales={s: NoBudget() for s in base.SCALES}, **kw)
    with pytest.raises(TypeError, match="frozen"):
        Experiment(config=Mutable, scales={s: Mutable() for s in base.SCALES}, **kw)
    with pytest.raises(ValueError, match="scales must be exactly"):
        Experiment(config=ToyConfig, scales={"quick": ToyConfig()}, **kw)
    with pytest.raises(ValueError, match="claim id"):
        Experiment(config=ToyConfig, scales={s: ToyConfig() for s in base.SCALES}, **{**kw, "claim": "claim1"})


def test_run_train_config_maps_params_seed_and_device():
    run = Run("x", "smoke", {"lr": 0.3, "norm": "none", "width": 5, "betas": [0.8, 0.9]}, seed=4, device="cpu")
    cfg = run.train_config(epochs=2)
    assert (cfg.lr, cfg.norm, cfg.seed, cfg.device, cfg.epochs, cfg.betas) == (0.3, "none", 4, "cpu", 2, (0.8, 0.9))
    assert run["width"] == 5


def test_example_experiment_is_registered_but_not_a_claim():
    names = base.experiment_names()
    assert "smoke-example" in names
    assert "smoke-example" not in base.experiment_names(include_examples=False)


def test_runs_made_by_other_source_code_are_flagged_not_silently_reused(toy, tmp_path):
    from normlab.lab.provenance import source_hash

    res = run_experiment("test-toy", scale="smoke", root=tmp_path, progress=False)
    assert json.loads(res.verdict_path.read_text())["stale_runs"] == 0
    env_file = res.folder / res.rows[0]["run_id"] / "env.json"
    env = json.loads(env_file.read_text())
    assert env["source_hash"] == source_hash()
    env["source_hash"] = "0123456789ab"  # as if an older normlab had made this run
    env_file.write_text(json.dumps(env))
    with pytest.warns(RuntimeWarning, match="1 of 4 stored runs were made by other normlab source code"):
        res = run_experiment("test-toy", scale="smoke", root=tmp_path, progress=False)
    assert json.loads(res.verdict_path.read_text())["stale_runs"] == 1


def test_the_source_hash_covers_the_kernel_bodies_and_nothing_else(tmp_path):
    """The C kernels' bodies live in csrc/*.inc and the C++ operators in csrc/*.cpp: changing one must change the
    hash stored with every run."""
    import hashlib
    from pathlib import Path

    import normlab
    from normlab.lab.provenance import source_hash, tree_hash

    pkg = Path(normlab.__file__).resolve().parent
    assert (pkg / "csrc" / "norm_kernels.inc").is_file()
    sources = [("a.py", "x = 1\n"), ("csrc/k.c", "int f;\n"), ("csrc/k.inc", "T g;\n"), ("csrc/o.cpp", "int o;\n")]
    for name, text in [*sources, ("notes.txt", "x\n")]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = tree_hash(tmp_path)
    expected = hashlib.sha256()  # an independent computation over the four source files, sorted by path
    for name in ["a.py", "csrc/k.c", "csrc/k.inc", "csrc/o.cpp"]:
        expected.update(name.encode())
        expected.update((tmp_path / name).read_bytes())
    assert before == expected.hexdigest()[:12]
    (tmp_path / "notes.txt").write_text("changed\n")
    assert tree_hash(tmp_path) == before  # not a source file
    (tmp_path / "csrc" / "k.inc").write_text("T h;\n")
    assert tree_hash(tmp_path) != before
    changed = tree_hash(tmp_path)
    (tmp_path / "csrc" / "o.cpp").write_text("int p;\n")
    assert tree_hash(tmp_path) != changed
    assert source_hash() == tree_hash(pkg)


def test_run_passes_the_configs_data_dir_to_the_dataset_and_load_data_is_what_train_loads(tmp_path):
    from dataclasses import dataclass as dc

    from normlab.lab.config import TrainConfig
    from normlab.lab.train import load_data

    @dc(frozen=True)
    class Cfg:
        seeds: int = 1
        max_seeds: int = 1
        threads: int = 1
        data_dir: str | None = None

    params = {"dataset": "digits", "n_train": 200, "data_kwargs": {"n_test": 50}}
    tc = base.Run("x", "smoke", params, 0, "cpu", Cfg(data_dir=str(tmp_path)), False).train_config()
    assert tc.data_kwargs == {"n_test": 50, "data_dir": str(tmp_path)}  # the run's own kwargs are kept
    tc = base.Run("x", "smoke", params, 0, "cpu", Cfg(), False).train_config()
    assert tc.data_kwargs == {"n_test": 50}
    ds = load_data(TrainConfig(dataset="digits", n_train=200))
    assert ds.x_train.shape[0] == 200


def test_run_experiment_stores_judges_plots_and_resumes(toy, tmp_path):
    res = run_experiment("test-toy", scale="smoke", root=tmp_path, progress=False)
    assert res.verdict.status == "holds" and not res.verdict.meaningful  # gap 1.0 >> noise 0.1, but smoke scale
    assert res.verdict.summary.startswith("[smoke scale checks the plumbing only")
    assert sorted(CALLS) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)] and len(res.ran) == 4
    assert [r["arm"] for r in res.rows] == ["a", "a", "b", "b"] and res.rows[0]["curve"] == [1.0, 0.5]
    v = json.loads(res.verdict_path.read_text())
    assert v["status"] == "holds" and v["scale"] == "smoke" and v["claim"] == "C999" and v["seeds"] == 2
    assert v["meaningful"] is False and v["rule_version"] == 1 and v["looks"] == [2] and v["seeds_used"] == [0, 1]
    assert [p["name"] for p in v["parts"]] == ["a-above-b", "a-near-mu"] and v["parts"][1]["decides"] is False
    assert v["figures"] == ["figures/toy.png", "figures/parts.png"] and len(v["runs"]) == 4
    assert v["command"] == "normlab run test-toy --scale smoke"
    assert v["machine"]["threads_per_run"] == 1 and v["parts_digest"]
    for f in v["figures"]:
        img = base.pyplot().imread(res.folder / f)
        assert img.ndim == 3 and img.shape[0] > 10

    CALLS.clear()
    again = run_experiment("test-toy", scale="smoke", root=tmp_path, progress=False)
    assert CALLS == [] and again.ran == [] and len(again.skipped) == 4
    assert again.verdict.status == res.verdict.status and again.verdict.summary == res.verdict.summary

    more = run_experiment("test-toy", scale="smoke", seeds=3, root=tmp_path, progress=False)
    assert sorted(CALLS) == [("a", 2), ("b", 2)] and len(more.skipped) == 4  # only the new seed ran


def test_seeds_run_in_rounds_and_stop_once_every_deciding_part_is_decided(toy, tmp_path):
    # a large effect: decided at the first look (3 seeds) of the plan 3, 6, 9
    res = run_experiment("test-toy", scale="quick", root=tmp_path, progress=False)
    j = res.verdict.judgement
    assert j.plan.looks == (3, 6, 9) and j.seeds == 3 and j.look == 1 and j.stopped_early
    assert sorted(CALLS) == [(arm, s) for arm in "ab" for s in range(3)]
    # no effect and large noise: never decided, so every round runs up to the budget
    CALLS.clear()
    res = run_experiment("test-toy", scale="quick", overrides=["gap=0", "noise=1"], root=tmp_path, progress=False)
    assert res.verdict.status == "inconclusive" and res.verdict.judgement.seeds == 9
    assert len(CALLS) == 18 and not res.verdict.judgement.stopped_early
    # a larger budget reuses the stored runs and only adds seeds
    CALLS.clear()
    res = run_experiment("test-toy", scale="quick", overrides=["gap=0", "noise=1", "max_seeds=12"],
                         root=tmp_path, progress=False)  # fmt: skip
    assert sorted(CALLS) == [(arm, s) for arm in "ab" for s in range(9, 12)]
    assert res.verdict.judgement.plan.looks == (3, 6, 9, 12) and res.verdict.judgement.seeds == 12


def test_overrides_reach_the_config_and_can_flip_the_verdict(toy, tmp_path):
    res = run_experiment("test-toy", scale="quick", overrides=["gap=-1.0"], root=tmp_path, progress=False)
    assert res.config.gap == -1.0 and res.verdict.status == "does not hold"
    with pytest.raises(ConfigError, match="valid keys: seeds, max_seeds, threads, gap, noise"):
        run_experiment("test-toy", scale="smoke", overrides=["gapp=1"], root=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="scale 'huge' is not one of: smoke, quick, full"):
        run_experiment("test-toy", scale="huge", root=tmp_path, progress=False)


def test_analyse_stored_never_runs_and_gives_the_stored_verdict(toy, tmp_path):
    first = run_experiment("test-toy", scale="quick", overrides=["gap=0.3", "noise=0.3"], root=tmp_path,
                           progress=False)  # fmt: skip
    CALLS.clear()
    again = base.analyse_stored("test-toy", root=tmp_path)
    assert CALLS == [] and again.summary == first.verdict.summary


def test_recheck_reruns_the_stored_seeds_with_another_thread_count(toy, tmp_path):
    first = run_experiment("test-toy", scale="quick", root=tmp_path, progress=False)
    CALLS.clear()
    out = base.recheck_experiment("test-toy", tmp_path, progress=False)
    assert out["threads"] == 2 and out["threads_before"] == 1 and out["seeds"] == first.verdict.judgement.seeds
    assert sorted(CALLS) == [(arm, s) for arm in "ab" for s in range(3)]  # from scratch, in a separate store
    assert (tmp_path / ".recheck" / "test-toy").is_dir()
    assert out["same_claim"] and out["same_parts"] and out["parts"]["a-above-b"] == ["holds", "holds"]
    assert json.loads(first.verdict_path.read_text())["recheck"]["same_parts"] is True


@pytest.mark.parametrize("cpus, threads, workers", [(2, 1, 2), (2, 2, 1), (8, 2, 4), (2, 4, 1), (1, None, 1)])
def test_a_local_pool_divides_the_cpus_by_the_runs_threads(toy, tmp_path, monkeypatch, cpus, threads, workers):
    """Two 2-thread runs on 2 cores fight over them (each is several times slower): the pool gets cpus // threads."""
    seen = []

    def fake_sweep(store, experiment, configs, run_fn, **where):
        seen.append((where["executor"], where["workers"]))
        raise RuntimeError("stop here")

    monkeypatch.setattr(base.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(base, "sweep", fake_sweep)
    overrides = {} if threads is None else {"threads": threads}
    with pytest.raises(RuntimeError, match="stop here"):
        run_experiment("test-toy", "quick", None, overrides, root=tmp_path, progress=False, executor="local")
    with pytest.raises(RuntimeError, match="stop here"):  # an explicit count is kept
        run_experiment("test-toy", "quick", None, overrides, root=tmp_path, progress=False, executor="local", workers=3)
    assert seen == [("local", workers), ("local", 3)]


def test_every_registered_experiment_declares_deciding_parts_with_margins_and_a_preregistration():
    for name in base.experiment_names():
        exp = get_experiment(name)
        for scale in base.SCALES:
            parts = exp.declared_parts(exp.config_for(scale))
            assert any(p.decides for p in parts), name
            for p in parts:
                assert p.margin > 0 and p.why.strip(), (name, p.name)
        assert exp.preregistration, f"{name}: the module docstring has no Pre-registration section"
        for p in exp.declared_parts(exp.config_for("quick")):
            assert p.name in exp.preregistration, f"{name}: part {p.name!r} is not in the pre-registration"


def test_run_all_runs_every_claim_and_writes_the_suite(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(base, "experiment_names", lambda include_examples=True: ["test-toy"])
    seen = []
    suite = base.run_all("quick", tmp_path, progress=False, executor="sequential", on_result=seen.append)
    assert [r.experiment for r in seen] == ["test-toy"]
    assert suite["counts"] == {"holds": 1, "does not hold": 0, "inconclusive": 0}
    stored = json.loads((tmp_path / "suite.json").read_text())
    assert stored["claims"][0]["status"] == "holds" and stored["wall_time"] > 0


def test_run_all_with_recheck_reports_each_recheck_and_the_cli_prints_it(toy, tmp_path, monkeypatch, capsys):
    from normlab.lab.cli import main

    monkeypatch.setattr(base, "experiment_names", lambda include_examples=True: ["test-toy"])
    seen = []
    suite = base.run_all(
        "quick", tmp_path / "a", progress=False, executor="sequential", recheck=True,
        on_recheck=lambda name, out: seen.append((name, out["same_parts"], out["threads"])),
    )  # fmt: skip
    assert seen == [("test-toy", True, 2)] and suite["claims"][0]["recheck_same"] is True
    assert suite["recheck_wall_time"] >= 0
    monkeypatch.setattr("normlab.lab.report.build_report", lambda root: "report.html")
    args = ["run", "--all", "--recheck", "--root", str(tmp_path / "b"), "--executor", "sequential", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test-toy: rerun from scratch with 2 thread(s) instead of 1, 3 seeds: the same decisions" in out
