"""The experiment framework: verdict helpers on synthetic values, the registry, run → store → analyse → plot."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from normlab.lab.config import ConfigError
from normlab.lab.experiments import framework as base
from normlab.lab.experiments.framework import (
    Experiment,
    Run,
    Verdict,
    combine,
    compare,
    fmt_mean_std,
    get_experiment,
    mean_std,
    register_experiment,
    run_experiment,
    threshold,
)
from normlab.registry import RegistryError

# --------------------------------------------------------------------------- verdict helpers


def test_mean_std_matches_numpy():
    xs = [0.91, 0.93, 0.88, 0.95]
    m, s, n = mean_std(xs)
    assert n == 4 and m == pytest.approx(np.mean(xs), abs=1e-15) and s == pytest.approx(np.std(xs, ddof=1), abs=1e-15)
    assert mean_std([2.0]) == (2.0, 0.0, 1)
    assert fmt_mean_std([1.0, 3.0]) == "2 ± 1.41 (n=2)"


def test_compare_holds_when_separated_in_the_claimed_direction():
    v = compare([0.90, 0.92, 0.91], [0.80, 0.82, 0.81], "greater", name_a="bn", name_b="none", metric="acc")
    assert v.status == "holds"
    assert v.numbers["bn"]["mean"] == pytest.approx(0.91) and v.numbers["none"]["n"] == 3
    assert v.numbers["bn"]["std"] == pytest.approx(np.std([0.90, 0.92, 0.91], ddof=1))
    assert v.numbers["difference"] == pytest.approx(0.10)
    assert "bn 0.91 ± 0.01 (n=3)" in v.summary and "\n" not in v.summary
    assert compare([1.0, 1.1], [2.0, 2.1], "less").status == "holds"


def test_compare_does_not_hold_when_separated_the_other_way():
    assert compare([0.80, 0.82, 0.81], [0.90, 0.92, 0.91], "greater").status == "does not hold"
    assert compare([3.0, 3.1], [1.0, 1.1], "less").status == "does not hold"


def test_compare_is_inconclusive_when_intervals_overlap_or_too_few_seeds_or_within_margin():
    # means differ (0.86 vs 0.85) but mean ± std intervals overlap
    assert compare([0.80, 0.92], [0.84, 0.86], "greater").status == "inconclusive"
    # touching intervals count as overlapping: [1, 1] and [1, 1] with zero spread
    assert compare([1.0, 1.0], [1.0, 1.0], "greater").status == "inconclusive"
    # one seed: no spread, no verdict
    assert compare([0.99], [0.10], "greater").status == "inconclusive"
    assert compare([0.99], [0.10], "greater", min_seeds=1).status == "holds"
    # separated, but by less than the margin that matters
    v = compare([0.901, 0.9011], [0.900, 0.9001], "greater", margin=0.01)
    assert v.status == "inconclusive" and "margin" in v.summary


def test_compare_interval_width_k():
    a, b = [1.0, 1.2], [0.7, 0.9]  # means 1.1 and 0.8, std 0.1414 each: gap 0.3
    assert compare(a, b, k=1).status == "holds"  # 1.1 - 0.141 > 0.8 + 0.141
    assert compare(a, b, k=2).status == "inconclusive"  # 1.1 - 0.283 < 0.8 + 0.283


def test_compare_rejects_non_finite_and_empty_values():
    with pytest.raises(ValueError, match="non-finite"):
        compare([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="no values"):
        compare([], [1.0])
    with pytest.raises(ValueError, match="direction"):
        compare([1.0], [2.0], "bigger")


def test_threshold_reaches_all_three_statuses():
    assert threshold([0.95, 0.97, 0.96], 0.9, "greater").status == "holds"
    assert threshold([0.85, 0.87, 0.86], 0.9, "greater").status == "does not hold"
    assert threshold([0.85, 0.95], 0.9, "greater").status == "inconclusive"
    assert threshold([0.5, 0.6], 1.0, "less").status == "holds"
    assert threshold([0.5], 1.0, "less").status == "inconclusive"


def test_combine_parts():
    h, n, i = Verdict("holds", "a"), Verdict("does not hold", "b"), Verdict("inconclusive", "c")
    assert combine([h, h]).status == "holds"
    assert combine([h, i]).status == "inconclusive"
    assert combine([h, i, n]).status == "does not hold"
    v = combine({"deep": h, "shallow": i})
    assert v.numbers["deep"]["status"] == "holds" and "deep: a" in v.summary


def test_verdict_rejects_unknown_status_and_multi_line_summary():
    with pytest.raises(ValueError, match="holds"):
        Verdict("maybe", "x")
    with pytest.raises(ValueError, match="one line"):
        Verdict("holds", "x\ny")


# --------------------------------------------------------------------------- registry and run_experiment


@dataclass(frozen=True)
class ToyConfig:
    seeds: int = 2  # seeds per grid point
    gap: float = 1.0  # true difference between the arms
    noise: float = 0.1  # per-seed noise


CALLS: list[tuple] = []


def _toy_grid(cfg):
    return [{"arm": "a", "mu": cfg.gap, "noise": cfg.noise}, {"arm": "b", "mu": 0.0, "noise": cfg.noise}]


def _toy_run(run: Run):
    CALLS.append((run["arm"], run.seed))
    rng = np.random.default_rng(run.seed)
    return {"value": float(run["mu"] + run["noise"] * rng.standard_normal()), "curve": [1.0, 0.5]}


def _toy_analyse(rows):
    return compare(base.values(rows, "value", arm="a"), base.values(rows, "value", arm="b"), name_a="a", name_b="b")


def _toy_plot(rows, out_dir):
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
        scales={"smoke": ToyConfig(), "quick": ToyConfig(seeds=3), "full": ToyConfig(seeds=5)},
        grid=_toy_grid,
        run_one=_toy_run,
        analyse=_toy_analyse,
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

    kw = dict(name="x", claim=None, title="t", grid=_toy_grid, run_one=_toy_run, analyse=_toy_analyse)
    with pytest.raises(TypeError, match="frozen"):
        Experiment(config=Mutable, scales={s: Mutable() for s in base.SCALES}, **kw)
    with pytest.raises(ValueError, match="scales must be exactly"):
        Experiment(config=ToyConfig, scales={"quick": ToyConfig()}, **kw)
    with pytest.raises(ValueError, match="claim id"):
        Experiment(config=ToyConfig, scales={s: ToyConfig() for s in base.SCALES}, **{**kw, "claim": "claim1"})


def test_run_experiment_stores_analyses_plots_and_resumes(toy, tmp_path):
    res = run_experiment("test-toy", scale="smoke", root=tmp_path, progress=False)
    assert res.verdict.status == "holds"  # gap 1.0 >> noise 0.1
    assert sorted(CALLS) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)] and len(res.ran) == 4
    assert [r["arm"] for r in res.rows] == ["a", "a", "b", "b"] and res.rows[0]["curve"] == [1.0, 0.5]
    v = json.loads(res.verdict_path.read_text())
    assert v["status"] == "holds" and v["scale"] == "smoke" and v["claim"] == "C999" and v["seeds"] == 2
    assert v["figures"] == ["figures/toy.png"] and len(v["runs"]) == 4
    assert v["command"] == "normlab run test-toy --scale smoke"
    img = base.pyplot().imread(res.folder / v["figures"][0])
    assert img.ndim == 3 and img.shape[0] > 10

    CALLS.clear()
    again = run_experiment("test-toy", scale="smoke", root=tmp_path, progress=False)
    assert CALLS == [] and again.ran == [] and len(again.skipped) == 4
    assert again.verdict == res.verdict

    more = run_experiment("test-toy", scale="smoke", seeds=3, root=tmp_path, progress=False)
    assert sorted(CALLS) == [("a", 2), ("b", 2)] and len(more.skipped) == 4  # only the new seed ran


def test_overrides_reach_the_config_and_can_flip_the_verdict(toy, tmp_path):
    res = run_experiment("test-toy", scale="smoke", overrides=["gap=-1.0"], root=tmp_path, progress=False)
    assert res.config.gap == -1.0 and res.verdict.status == "does not hold"
    res = run_experiment("test-toy", scale="smoke", overrides=["gap=0", "noise=1"], root=tmp_path, progress=False)
    assert res.verdict.status == "inconclusive"
    with pytest.raises(ConfigError, match="valid keys: seeds, gap, noise"):
        run_experiment("test-toy", scale="smoke", overrides=["gapp=1"], root=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="scale 'huge' is not one of: smoke, quick, full"):
        run_experiment("test-toy", scale="huge", root=tmp_path, progress=False)


def test_analyse_stored_never_runs(toy, tmp_path):
    first = run_experiment("test-toy", scale="smoke", root=tmp_path, progress=False)
    CALLS.clear()
    verdict, rows, figures = base.analyse_stored("test-toy", "smoke", root=tmp_path)
    assert CALLS == [] and verdict == first.verdict and figures and figures[0].is_file()
    with pytest.raises(FileNotFoundError, match="normlab run test-toy --scale quick"):
        base.analyse_stored("test-toy", "quick", root=tmp_path)


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


def test_run_passes_the_configs_data_dir_to_the_dataset_and_load_data_is_what_train_loads(tmp_path):
    from dataclasses import dataclass as dc

    from normlab.lab.config import TrainConfig
    from normlab.lab.train import load_data

    @dc(frozen=True)
    class Cfg:
        seeds: int = 1
        data_dir: str | None = None

    params = {"dataset": "digits", "n_train": 200, "data_kwargs": {"n_test": 50}}
    tc = base.Run("x", "smoke", params, 0, "cpu", Cfg(data_dir=str(tmp_path)), False).train_config()
    assert tc.data_kwargs == {"n_test": 50, "data_dir": str(tmp_path)}  # the run's own kwargs are kept
    tc = base.Run("x", "smoke", params, 0, "cpu", Cfg(), False).train_config()
    assert tc.data_kwargs == {"n_test": 50}
    ds = load_data(TrainConfig(dataset="digits", n_train=200))
    assert ds.x_train.shape[0] == 200
