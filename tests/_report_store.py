"""A small run store for the report's tests, written by the real framework (``run_experiment``) in its on-disk format.

Four throw-away claim experiments are registered for the duration of a test
module (claim ids C901…C904, after any real claim): one whose claim holds,
one whose claim does not hold, one inconclusive, and one never run. Their
runs take no time (numbers drawn from a seeded generator, no training) and
their figures are real matplotlib PNGs. Optionally the registered
``smoke-example`` is run at smoke scale too (a few seconds of real training).

``ALLOW_RUNNING`` is switched off by the tests that check that building the
report never runs or re-analyses anything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from normlab.lab.experiments import framework as base
from normlab.lab.experiments.framework import Experiment, Part, Run, group, pyplot, save_figure

__all__ = ["FAKES", "ALLOW_RUNNING", "FakeConfig", "registered_fakes", "make_store"]

ALLOW_RUNNING = {"run": True, "analyse": True, "plot": True}

PREREG = "Pre-registration\n----------------\nDeciding part bn-better: bn above none by more than 0.02 ({})."


@dataclass(frozen=True)
class FakeConfig:
    seeds: int = 3  # seeds per round
    max_seeds: int = 3  # seed budget
    threads: int = 1  # torch threads per run
    gap: float = 0.0  # accuracy added to the "bn" runs (fraction)
    noise: float = 0.01  # std of the per-seed noise (fraction)
    steps: int = 30  # length of the stored loss curve (steps)


# name -> (claim id, config, docstring, whether it is run by make_store)
FAKES: dict[str, tuple[str, FakeConfig, str, bool]] = {
    "report-fake-holds": (
        "C901",
        FakeConfig(gap=0.2, noise=0.01),
        "Fake claim that holds: bn beats none by a wide margin.\n\n"
        + PREREG.format("a wide margin, as in the paper: BN 34.7 vs GN 24.1")
        + "\n\nWhat was measured\n-----------------\nsynthetic test accuracies, three seeds per norm.\n",
        True,
    ),
    "report-fake-fails": (
        "C902",
        FakeConfig(gap=-0.2, noise=0.01),
        "Fake claim that does not hold: bn is worse than none.\n\n" + PREREG.format("it is worse") + "\n",
        True,
    ),
    "report-fake-unsure": (
        "C903",
        FakeConfig(gap=0.0, noise=0.05),
        "Fake claim that is inconclusive: bn and none overlap.\n\n" + PREREG.format("they overlap") + "\n",
        True,
    ),
    "report-fake-notrun": (
        "C904",
        FakeConfig(),
        "Fake claim that is registered but never run.\n\n" + PREREG.format("never run") + "\n",
        False,
    ),
}


def _grid(cfg: FakeConfig):
    for norm in ("bn", "none"):
        yield {"norm": norm, "gap": cfg.gap, "noise": cfg.noise, "steps": cfg.steps}


def _run_one(run: Run) -> dict[str, Any]:
    if not ALLOW_RUNNING["run"]:
        raise AssertionError(f"{run.experiment}: a run was started while building the report")
    rng = random.Random(f"{run.experiment}/{run['norm']}/{run.seed}")
    acc = 0.6 + (run["gap"] if run["norm"] == "bn" else 0.0) + rng.gauss(0.0, run["noise"])
    loss = [2.3 * (0.9 if run["norm"] == "bn" else 0.97) ** s + rng.uniform(0, 0.05) for s in range(run["steps"])]
    return {"final_test_acc": acc, "step_loss": loss, "steps": run["steps"]}


def _parts(cfg: FakeConfig) -> list[Part]:
    if not ALLOW_RUNNING["analyse"]:
        raise AssertionError("an analysis was run while building the report")
    return [
        Part("bn-better", "test accuracy with bn is above none", "final_test_acc", {"norm": "bn"}, {"norm": "none"},
             direction="greater", margin=0.02, why="two test examples in a hundred", label_a="bn", label_b="none"),
    ]  # fmt: skip


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: FakeConfig) -> list[Path]:
    if not ALLOW_RUNNING["plot"]:
        raise AssertionError("a figure was drawn while building the report")
    plt = pyplot()
    name = Path(out_dir).parent.name
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for colour, ((norm,), rs) in enumerate(group(rows, "norm").items()):
        for i, r in enumerate(rs):
            ax.plot(r["step_loss"], color=f"C{colour}", label=norm if i == 0 else None)
    ax.set(xlabel="step", ylabel="loss", title=f"{name}: loss per seed")
    ax.legend()
    paths = [save_figure(fig, out_dir, "loss")]
    if cfg.gap > 0:  # the one that holds draws a second figure
        fig, ax = plt.subplots(figsize=(4, 3.5))
        for colour, ((norm,), rs) in enumerate(group(rows, "norm").items()):
            ax.bar(norm, sum(r["final_test_acc"] for r in rs) / len(rs), color=f"C{colour}")
        ax.set(ylabel="test accuracy", title="mean test accuracy")
        paths.append(save_figure(fig, out_dir, "accuracy"))
    return paths


def registered_fakes(mp: pytest.MonkeyPatch) -> dict[str, Experiment]:
    """Register the fake claim experiments for as long as ``mp`` is active (undone with it)."""
    base.experiment_names()  # import the real experiment modules first
    registry = base.EXPERIMENTS
    mp.setattr(registry, "_items", dict(registry._items))  # registrations below are undone with mp
    mp.setattr(registry, "_aliases", dict(registry._aliases))
    out = {}
    for name, (claim, cfg, doc, _) in FAKES.items():
        exp = Experiment(
            name=name,
            claim=claim,
            title=doc.splitlines()[0],
            config=FakeConfig,
            scales={"smoke": cfg, "quick": cfg, "full": cfg},
            grid=_grid,
            run_one=_run_one,
            parts=_parts,
            plot=_plot,
            description=doc,
        )
        base.register_experiment(exp)
        out[name] = exp
    return out


def make_store(root: Path, *, smoke_example: bool = True) -> Path:
    """Run the fake experiments that are meant to be run (and ``smoke-example`` at smoke scale) into ``root``."""
    for name, (_, _, _, run) in FAKES.items():
        if run:
            base.run_experiment(name, scale="smoke", root=root, progress=False)
    if smoke_example:
        base.run_experiment("smoke-example", scale="smoke", root=root, progress=False, device="cpu")
    return root
