"""``regularisation`` (C3): BN's batch noise narrows the generalisation gap, less so as the batch grows.

An MLP (``build_model("mlp")``) is trained on a reduced training set, long
enough to fit it, under these conditions:

* ``none``: no norm, no dropout;
* ``batchnorm``: BN before each activation;
* ``dropout``: no norm, dropout after each activation;
* ``batchnorm+dropout``: both, dropout after the activation (it feeds the
  next layer's linear and BN);
* ``batchnorm+dropout-before-bn``: both, dropout right before each BN (the
  "variance shift" setting of Li et al. 2019: BN's statistics are collected
  on dropped-out inputs in training but not at test time).

at several batch sizes. The learning rate follows the linear scaling rule
(``lr * batch_size / lr_batch``, ``lr_scaling="linear"``), which keeps the
SGD gradient-noise scale about constant across batch sizes, so what changes
with the batch size is mainly the noise of BN's batch statistics (which
shrinks like 1/sqrt(batch size)); ``lr_scaling="constant"`` keeps one lr.

The **generalisation gap** of a run is train accuracy − test accuracy after
the last epoch, both measured in eval mode (the train accuracy on the whole
reduced training set, ``eval_train=True``).

Verdict rule: two parts combined with
:func:`~normlab.lab.experiments.framework.combine` (holds only if both hold, does not
hold if either does not):

1. *BN narrows the gap*: at the smallest batch size, ``compare`` the gap of
   ``batchnorm`` with that of ``none`` over seeds, direction "less";
2. *the effect fades with the batch size*: per seed, the narrowing
   ``gap(none) - gap(batchnorm)``; ``compare`` it at the smallest batch size
   with it at the largest, direction "greater".

Intervals are mean ± 1 std over seeds; overlap means inconclusive. The
summary also reports the dropout conditions' gaps and the test accuracy of
dropout after the activation vs right before BN (variance shift); they do not
enter the status.

Command: ``normlab run regularisation`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU (one thread per run), measured: smoke ~5 s of CPU;
quick (MNIST-1D, 1024 training examples, MLP 3x128, 30 epochs, 5 conditions x
3 batch sizes x 3 seeds = 45 runs) 64 s wall, 48 s of CPU; full (CIFAR-10
with 5,000 training examples, MLP 4x512, 100 epochs, 6 batch sizes, 5 seeds)
is for a GPU.
Expected: BN has a smaller gap than no norm (its batch noise regularises),
the difference shrinks at large batch (less noise); dropout narrows the gap
too; dropout right before BN costs test accuracy (variance shift, Li et al. 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.lab.experiments.framework import (
    Experiment,
    Run,
    Verdict,
    combine,
    compare,
    fmt_mean_std,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
    values,
)

__all__ = ["RegularisationConfig", "EXPERIMENT", "CONDITIONS"]

# condition -> (norm name, uses dropout, dropout position)
CONDITIONS: dict[str, tuple[str, bool, str]] = {
    "none": ("none", False, "after_act"),
    "batchnorm": ("batchnorm", False, "after_act"),
    "dropout": ("none", True, "after_act"),
    "batchnorm+dropout": ("batchnorm", True, "after_act"),
    "batchnorm+dropout-before-bn": ("batchnorm", True, "before_norm"),
}


@dataclass(frozen=True)
class RegularisationConfig:
    """C3 regularisation; see the module docstring for the command, runtimes and the expected result."""

    seeds: int = 3  # seeds per grid point
    dataset: str = "mnist1d"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int = 1024  # training examples (the reduced training set)
    width: int = 128  # hidden units per layer of the MLP
    depth: int = 3  # hidden layers of the MLP
    conditions: tuple[str, ...] = tuple(CONDITIONS)  # which of CONDITIONS to train ("none" and "batchnorm" are needed)
    dropout: float = 0.3  # dropout probability (fraction of units zeroed) where dropout is used
    batch_sizes: tuple[int, ...] = (16, 64, 256)  # examples per optimizer step
    lr: float = 0.05  # SGD learning rate (momentum 0.9) at batch size lr_batch
    lr_batch: int = 64  # batch size (examples) at which the learning rate is `lr`
    lr_scaling: str = "linear"  # "linear": lr * batch_size / lr_batch; "constant": lr at every batch size
    epochs: int = 30  # passes over the training set
    threads: int = 1  # torch threads per run
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)

    def __post_init__(self) -> None:
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"unknown condition(s) {unknown}; choose from {', '.join(CONDITIONS)}")
        if "none" not in self.conditions or "batchnorm" not in self.conditions:
            raise ValueError("conditions must include 'none' and 'batchnorm' (the verdict compares them)")
        if self.lr_scaling not in ("linear", "constant"):
            raise ValueError(f"lr_scaling={self.lr_scaling!r} is not one of: 'linear', 'constant'")
        if len(self.batch_sizes) < 2:
            raise ValueError("regularisation needs at least two batch sizes")


def _lr(cfg: RegularisationConfig, batch_size: int) -> float:
    return cfg.lr * batch_size / cfg.lr_batch if cfg.lr_scaling == "linear" else cfg.lr


def _grid(cfg: RegularisationConfig):
    for bs in cfg.batch_sizes:
        for condition in cfg.conditions:
            norm, uses_dropout, position = CONDITIONS[condition]
            yield {
                "condition": condition,
                "dataset": cfg.dataset,
                "n_train": cfg.n_train,
                "model": "mlp",
                "model_kwargs": {
                    "width": cfg.width,
                    "depth": cfg.depth,
                    "dropout": cfg.dropout if uses_dropout else 0.0,
                    "dropout_position": position,
                },
                "norm": norm,
                "optimizer": "sgd",
                "lr": _lr(cfg, bs),
                "momentum": 0.9,
                "epochs": cfg.epochs,
                "batch_size": bs,
                "eval_train": True,
                "threads": cfg.threads,
            }


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import train

    metrics = train(run.train_config(), progress=run.progress).to_metrics()
    train_acc, test_acc = metrics.get("final_train_eval_acc"), metrics.get("final_test_acc")
    metrics["gap"] = train_acc - test_acc if train_acc is not None and test_acc is not None else None
    return metrics


# --------------------------------------------------------------------------- analysis


def _gap(rows: list[dict[str, Any]], **where: Any) -> list[float]:
    return [g if g is not None and math.isfinite(g) else 0.0 for g in values(rows, "gap", **where)]


def narrowing(rows: list[dict[str, Any]], batch_size: int) -> list[float]:
    """Per seed (paired): gap(none) − gap(batchnorm) at ``batch_size``."""
    none = {r["seed"]: r for r in rows if r["condition"] == "none" and r["batch_size"] == batch_size}
    bn = {r["seed"]: r for r in rows if r["condition"] == "batchnorm" and r["batch_size"] == batch_size}
    return [_gap([none[s]])[0] - _gap([bn[s]])[0] for s in sorted(set(none) & set(bn))]


def _analyse(rows: list[dict[str, Any]], cfg: RegularisationConfig) -> Verdict:
    sizes = sorted({r["batch_size"] for r in rows})
    small, large = sizes[0], sizes[-1]
    narrows = compare(
        _gap(rows, condition="batchnorm", batch_size=small),
        _gap(rows, condition="none", batch_size=small),
        "less",
        name_a="batchnorm",
        name_b="none",
        metric=f"gap at batch {small}",
    )
    d_small, d_large = narrowing(rows, small), narrowing(rows, large)
    fades = compare(
        d_small, d_large, "greater", name_a=f"batch {small}", name_b=f"batch {large}", metric="gap(none) − gap(BN)"
    )
    verdict = combine({"BN narrows the gap": narrows, "the effect fades with batch size": fades})

    conditions = [c for c in cfg.conditions if any(r["condition"] == c for r in rows)]
    gaps = {bs: {c: _gap(rows, condition=c, batch_size=bs) for c in conditions} for bs in sizes}
    test = {bs: {c: values(rows, "final_test_acc", condition=c, batch_size=bs) for c in conditions} for bs in sizes}

    def at(bs: int) -> str:
        return ", ".join(f"{c} {mean_std(gaps[bs][c])[0]:.3f}" for c in conditions if gaps[bs][c])

    summary = (
        f"gap = train − test accuracy (eval mode, {cfg.n_train} training examples): at batch {small} "
        f"batchnorm {fmt_mean_std(gaps[small]['batchnorm'])} vs none {fmt_mean_std(gaps[small]['none'])} "
        f"-> {narrows.status}; narrowing gap(none) − gap(BN) at batch {small} {fmt_mean_std(d_small)} "
        f"vs batch {large} {fmt_mean_std(d_large)} -> {fades.status}; "
        f"mean gaps at batch {small}: {at(small)}; at batch {large}: {at(large)}"
    )
    if "batchnorm+dropout" in conditions and "batchnorm+dropout-before-bn" in conditions:
        after = [x for bs in sizes for x in test[bs]["batchnorm+dropout"]]
        before = [x for bs in sizes for x in test[bs]["batchnorm+dropout-before-bn"]]
        if after and before:
            summary += (
                f"; test acc (all batch sizes) dropout after act {fmt_mean_std(after)} "
                f"vs right before BN {fmt_mean_std(before)}"
            )
    numbers = dict(verdict.numbers)
    numbers["gaps"] = {f"bs{bs}": g for bs, g in gaps.items()}
    numbers["test_acc"] = {f"bs{bs}": t for bs, t in test.items()}
    numbers["lr_scaling"] = cfg.lr_scaling
    return Verdict(verdict.status, summary, numbers)


# --------------------------------------------------------------------------- figure


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: RegularisationConfig) -> list[Path]:
    plt = pyplot()
    sizes = sorted({r["batch_size"] for r in rows})
    conditions = [c for c in cfg.conditions if any(r["condition"] == c for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3), constrained_layout=True)
    panels = [
        ("gap", "generalisation gap (train − test accuracy)", "gap vs batch size"),
        ("final_test_acc", "test accuracy", "test accuracy"),
        ("final_train_eval_acc", "train accuracy (eval mode)", "train accuracy"),
    ]
    for ax, (metric, ylabel, title) in zip(axes, panels):
        for i, c in enumerate(conditions):
            ms, ss, xs = [], [], []
            for bs in sizes:
                vals = values(rows, metric, condition=c, batch_size=bs)
                vals = [v for v in vals if v is not None and math.isfinite(v)]
                if vals:
                    m, s, _ = mean_std(vals)
                    xs.append(bs)
                    ms.append(m)
                    ss.append(s)
            ax.errorbar(
                [x * (1 + 0.03 * (i - 2)) for x in xs],
                ms,
                yerr=ss,
                marker="o",
                capsize=3,
                color=f"C{i}",
                ls="--" if "dropout" in c else "-",
                label=c,
            )
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size (examples)", ylabel=ylabel, title=f"{title} (mean ± std over seeds)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    scaling = f"lr ∝ batch size ({cfg.lr:g} at {cfg.lr_batch})" if cfg.lr_scaling == "linear" else f"lr {cfg.lr:g}"
    fig.suptitle(f"C3 regularisation: MLP on {cfg.n_train} training examples, {cfg.epochs} epochs, {scaling}")
    return [save_figure(fig, out_dir, "regularisation")]


EXPERIMENT = register_experiment(
    Experiment(
        name="regularisation",
        claim="C3",
        title="BatchNorm's batch noise narrows the generalisation gap, less so at large batch; dropout differs",
        config=RegularisationConfig,
        scales={
            "smoke": RegularisationConfig(
                seeds=2,
                dataset="digits",
                n_train=256,
                width=32,
                depth=2,
                conditions=("none", "batchnorm", "dropout"),
                batch_sizes=(16, 64),
                epochs=1,
            ),
            "quick": RegularisationConfig(),
            "full": RegularisationConfig(
                seeds=5,
                dataset="cifar10",
                n_train=5000,
                width=512,
                depth=4,
                batch_sizes=(16, 32, 64, 128, 256, 512),
                lr=0.02,
                epochs=100,
                threads=4,
            ),
        },
        grid=_grid,
        run_one=_run_one,
        analyse=_analyse,
        plot=_plot,
        description=__doc__ or "",
    )
)
