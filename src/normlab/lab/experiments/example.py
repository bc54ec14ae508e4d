"""``smoke-example``: the framework's own example, not a claim (it is kept out of the claims list).

Pre-registration
----------------
Not a claim from the sources: an example that exercises the whole path (train
→ store → judge → verdict → figures) in tests and as the ``normlab demo``
fallback. One deciding part, ``bn-not-worse``: an MLP on scikit-learn's digits
reaches a test accuracy with BatchNorm at least as high as without it (arm A
``norm=batchnorm``, arm B ``norm=none``, paired by seed, direction "greater",
δ = 0.01 accuracy — one test digit in a hundred, below which a difference is
not worth a sentence). Does not hold if BN's accuracy is lower, or if the
difference is shown to be within ±0.01.

Design
------
An MLP on digits with BatchNorm and without, trained briefly with plain SGD.
Command: ``normlab run smoke-example --scale smoke``. Runtime on a 2-core CPU:
smoke ~2 s, quick ~10 s per round of 3 seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.lab.experiments.framework import (
    Experiment,
    Part,
    Run,
    group,
    pyplot,
    register_experiment,
    save_figure,
)

__all__ = ["ExampleConfig", "EXPERIMENT"]


@dataclass(frozen=True)
class ExampleConfig:
    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 6  # seed budget per grid point
    threads: int = 1  # torch threads per run (not part of the run id)
    epochs: int = 3  # passes over the training set
    lr: float = 0.05  # SGD learning rate
    batch_size: int = 64  # examples per step
    width: int = 64  # hidden units of the MLP
    n_train: int | None = None  # training examples (None = all 1437)
    norms: tuple[str, ...] = ("batchnorm", "none")  # the norms compared; the first is the claimed winner


def _grid(cfg: ExampleConfig):
    for norm in cfg.norms:
        yield {
            "dataset": "digits",
            "model": "mlp",
            "model_kwargs": {"width": cfg.width},
            "norm": norm,
            "optimizer": "sgd",
            "lr": cfg.lr,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "n_train": cfg.n_train,
        }


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import train

    result = train(run.train_config(), progress=run.progress)
    return result.to_metrics()


def _parts(cfg: ExampleConfig) -> list[Part]:
    first, second = cfg.norms[0], cfg.norms[-1]
    return [
        Part(
            name="bn-not-worse",
            says=f"test accuracy with {first} is at least that with {second}",
            metric="final_test_acc",
            a={"norm": first},
            b={"norm": second},
            direction="greater",
            margin=0.01,
            why="one test digit in a hundred: a smaller difference is not worth a sentence",
            unit="accuracy",
            label_a=first,
            label_b=second,
        )
    ]


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: ExampleConfig) -> list[Path]:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for colour, ((norm,), rs) in enumerate(group(rows, "norm").items()):
        for i, r in enumerate(rs):
            ax1.plot(r["step_loss"], lw=0.8, alpha=0.7, color=f"C{colour}", label=norm if i == 0 else None)
        accs = [r["final_test_acc"] for r in rs]
        ax2.scatter([norm] * len(accs), accs, color=f"C{colour}", alpha=0.7)
    ax1.set(xlabel="optimizer step", ylabel="training loss (nats)", yscale="log", title="per-step loss, every seed")
    ax1.legend()
    ax2.set(ylabel="test accuracy", title="final test accuracy per seed")
    return [save_figure(fig, out_dir, "smoke-example")]


EXPERIMENT = register_experiment(
    Experiment(
        name="smoke-example",
        claim=None,
        title="Example: MLP on digits with and without BatchNorm (framework smoke test, not a claim)",
        config=ExampleConfig,
        scales={
            "smoke": ExampleConfig(seeds=2, max_seeds=2, epochs=1, n_train=600, width=32),
            "quick": ExampleConfig(),
            "full": ExampleConfig(seeds=5, max_seeds=20, epochs=20, width=256),
        },
        grid=_grid,
        run_one=_run_one,
        parts=_parts,
        plot=_plot,
        description=__doc__ or "",
    )
)
