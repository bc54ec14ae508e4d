"""Plugins: a norm, a model, a dataset and an experiment from an outside module, run from the command line.

Everything runs in subprocesses (the plugins register globally; the test process stays clean).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN = '''
"""An outside module: one of each kind of thing normlab registers."""
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import normlab
from normlab.lab.data import Raw, register_dataset
from normlab.lab.experiments import Experiment, Part, Run, register_experiment
from normlab.lab.models import register_model


class ScaleNorm(nn.Module):
    """x / ||x|| * g over the feature axis (Nguyen & Salazar 2019)."""

    def __init__(self, num_features, *, feature_dim=1, eps=1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(float(num_features) ** 0.5))
        self.feature_dim, self.eps = feature_dim, eps

    def forward(self, x):
        return self.g * x / x.norm(dim=self.feature_dim, keepdim=True).clamp_min(self.eps)


normlab.register_norm("scalenorm", ScaleNorm)


@register_dataset("blobs")
def blobs(*, seed, data_dir=None, n=400, dim=8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, dim)) + 1.5 * (2 * y[:, None] - 1)
    return Raw(x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4 :], y[n * 3 // 4 :], num_classes=2, kind="vector")


@register_model("tiny")
def tiny(*, in_shape, num_classes, norm_layer="batchnorm", width=16):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(int(np.prod(in_shape)), width), normlab.make_norm(norm_layer, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )


@dataclass(frozen=True)
class BlobsConfig:
    seeds: int = 2  # seeds per round
    max_seeds: int = 2  # seed budget
    threads: int = 1  # torch threads per run
    lr: float = 0.1  # SGD learning rate (per unit gradient)
    epochs: int = 2  # passes over the training set


def _run_one(run: Run):
    from normlab.lab.train import train

    result = train(run.train_config())
    return {**result.to_metrics(), "scalenorm_layers": sum(isinstance(m, ScaleNorm) for m in result.model.modules())}


register_experiment(Experiment(
    name="blobs-scalenorm", claim=None, title="ScaleNorm separates two blobs", config=BlobsConfig,
    scales={"smoke": BlobsConfig(epochs=1), "quick": BlobsConfig(), "full": BlobsConfig(seeds=5)},
    grid=lambda cfg: [{"dataset": "blobs", "model": "tiny", "norm": "scalenorm", "lr": cfg.lr, "epochs": cfg.epochs,
                       "batch_size": 32}],
    run_one=_run_one,
    parts=lambda cfg: [Part("learns", "test accuracy above chance", "final_test_acc", {"norm": "scalenorm"},
                            bound=0.5, margin=0.05, why="five points above chance")],
))
'''

_DRIVER = """
import contextlib, io, json, sys
from normlab.lab.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NORMLAB_IMPORT", "NORMLAB_PROGRESS")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _drive(commands: list[list[str]], cwd, **env) -> list[dict]:
    """Run ``normlab`` commands one after another in one fresh process (each through ``main``)."""
    p = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(commands)],
        capture_output=True, text=True, cwd=cwd, env=_env(**env), timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_option_registers_a_norm_model_dataset_and_experiment_that_the_cli_runs(tmp_path):
    (tmp_path / "nl_outside_plugin.py").write_text(PLUGIN)
    imp = ["--import", "nl_outside_plugin"]
    listed, help_, ran, trained = _drive(
        [
            [*imp, "list"],
            [*imp, "run", "blobs-scalenorm", "--help"],
            [*imp, "run", "blobs-scalenorm", "--scale", "smoke", "--root", "runs", "--device", "cpu"],
            [*imp, "train", "--set", "dataset=blobs", "model=tiny", "norm=scalenorm", "epochs=1", "--root", "runs"],
        ],
        cwd=tmp_path,
    )  # fmt: skip
    assert listed["code"] == 0
    lines = {l.split(":")[0]: l for l in listed["out"].splitlines() if ":" in l}
    assert "scalenorm" in lines["norms"] and "tiny" in lines["models"] and "blobs" in lines["datasets"]
    assert "blobs-scalenorm" in listed["out"]

    assert help_["code"] == 0 and "  lr: float = 0.1" in help_["out"]
    assert "SGD learning rate (per unit gradient)" in help_["out"] and "  epochs: int = 2   [smoke 1]" in help_["out"]

    assert ran["code"] == 0, ran["err"]
    assert "blobs-scalenorm [smoke, 2 seeds," in ran["out"] and "2 run now, 0 found stored" in ran["out"]
    verdict = json.loads((tmp_path / "runs" / "blobs-scalenorm" / "verdict.json").read_text())
    for rid in verdict["runs"]:
        run = tmp_path / "runs" / "blobs-scalenorm" / rid
        config = json.loads((run / "config.json").read_text())
        assert (config["dataset"], config["model"], config["norm"]) == ("blobs", "tiny", "scalenorm")
        assert json.loads((run / "result.json").read_text())["scalenorm_layers"] == 1  # the plugin's own layer

    assert trained["code"] == 0 and trained["out"].startswith("finished: 4 steps"), trained["err"]  # 300 // 64


@pytest.mark.slow
def test_pool_workers_import_the_plugin_too(tmp_path):
    """--executor local: spawned workers find the experiment through NORMLAB_IMPORT."""
    (tmp_path / "nl_outside_plugin.py").write_text(PLUGIN)
    argv = ["--import", "nl_outside_plugin", "run", "blobs-scalenorm", "--scale", "smoke", "--executor", "local"]
    (pooled,) = _drive([[*argv, "--workers", "1", "--root", "pool", "--device", "cpu"]], cwd=tmp_path)
    assert pooled["code"] == 0, pooled["err"]
    assert "2 run now" in pooled["out"] and (tmp_path / "pool" / "blobs-scalenorm" / "verdict.json").is_file()


def _install_fake_distribution(site, name: str, module_text: str, entry: str) -> None:
    """A minimal installed distribution: its module and a dist-info folder declaring one normlab.plugins entry."""
    (site / f"{name}.py").write_text(textwrap.dedent(module_text))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[normlab.plugins]\n{name} = {entry}\n")


def test_entry_point_plugins_are_loaded_by_every_command_and_by_the_experiment_registry(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    module = """
        import normlab
        CALLS = []

        def register():
            CALLS.append(1)
            normlab.register_norm("epnorm", lambda c, feature_dim=1, **kw: normlab.LayerNorm(c))
    """
    _install_fake_distribution(site, "nl_ep_plugin", module, "nl_ep_plugin:register")
    script = """
import json, normlab
from normlab.lab.experiments import experiment_names
before = "epnorm" in normlab.norm_names()
experiment_names()  # the registry's discovery loads the entry points (Python API, pool and Ray workers)
after = "epnorm" in normlab.norm_names()
from normlab.lab.cli import main
main(["list", "norms"])  # loads them again: each entry point is called once
import nl_ep_plugin
print(json.dumps([before, after, len(nl_ep_plugin.CALLS)]))
"""
    p = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env=_env(PYTHONPATH=str(site)),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "epnorm" in p.stdout.splitlines()[0]
    assert json.loads(p.stdout.splitlines()[-1]) == [False, True, 1]


def test_a_broken_entry_point_is_one_line_naming_it(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install_fake_distribution(site, "nl_bad_plugin", "raise RuntimeError('boom')\n", "nl_bad_plugin")
    (result,) = _drive([["list"]], cwd=tmp_path, PYTHONPATH=str(site))
    assert result["code"] == 2 and result["err"].count("\n") == 1
    assert result["err"].startswith("normlab list: error: plugin 'nl_bad_plugin' (entry point 'nl_bad_plugin'")
    assert "RuntimeError: boom" in result["err"] and "fix or uninstall nl_bad_plugin" in result["err"]
