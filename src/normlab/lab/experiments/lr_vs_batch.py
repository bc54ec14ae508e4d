"""``lr-vs-batch`` (C12): the best learning rate grows with the batch size for BN and saturates earlier without.

A small pre-activation ResNet (``build_model("resnet")``) is trained with SGD
(momentum 0.9, cosine schedule, a fixed number of epochs, so a larger batch
means fewer steps) over a grid of batch sizes x learning rates, in up to
three variants:

* ``batchnorm``: BN in every residual branch (α = 1);
* ``skipinit``: no normalisation, a learnable scalar α on each branch
  initialised at 0 (De & Smith's SkipInit, ``residual_scale=0``);
* ``none``: no normalisation, α = 1 (plain).

Per variant, seed and batch size, the **best learning rate** is the
geometric mean of the grid learning rates whose final test accuracy is
within ``plateau`` of that seed's best accuracy at that batch size (with
``plateau=0`` this is the argmax, ties averaged; a small plateau keeps a
difference of a few test images from moving the optimum a whole grid step).
The **best accuracy** is that maximum.

Verdict rule: per seed, the slope of log2(best lr) against log2(batch size)
(least squares over the batch sizes; 1 = the linear scaling rule, 0 = no
growth). ``compare`` the slopes over seeds, ``claimed`` vs ``baseline``
(default BN vs SkipInit), direction "greater", intervals mean ± 1 std:
**holds** when BN's optimal lr grows faster with the batch size, **does not
hold** when it grows slower, **inconclusive** when the intervals overlap. A
best lr at the top of the grid is censored (the slope is then a lower bound);
the summary says when that happened. The summary also reports BN's accuracy
advantage over the baseline at the smallest and the largest batch size (the
paper: SkipInit matches BN at small batch, BN wins at large batch); that part
does not enter the status.

Command: ``normlab run lr-vs-batch`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU (one thread per run), measured: smoke ~5 s of CPU;
quick (digits, ResNet of 2 blocks, 10 epochs, 3 batch sizes x 6 learning rates
x 2 variants x 3 seeds = 108 runs) 2 min 15 s wall, 77 s of CPU (close to
10 min when the machine is shared with 3–4 other jobs); full (CIFAR-10,
WRN-16-4, 200 epochs, batch 64…4096, 12 learning rates, 3 variants) is for a
GPU and takes days there, not run here.
Expected (De & Smith 2020, Figs. 5–6): the optimal lr of the BN network keeps
growing with the batch size up to large batches, while the SkipInit
network's saturates at a smaller batch size; at small batch both reach about
the same accuracy, at large batch BN is better.
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
    compare,
    fmt_mean_std,
    group,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
)

__all__ = ["LRvsBatchConfig", "EXPERIMENT", "VARIANTS", "best_lr_table", "slopes"]

# variant -> (norm name, residual_scale of the ResNet's branches: None = plain α = 1)
VARIANTS: dict[str, tuple[str, float | None]] = {
    "batchnorm": ("batchnorm", None),
    "skipinit": ("none", 0.0),
    "none": ("none", None),
}


@dataclass(frozen=True)
class LRvsBatchConfig:
    """C12 lr-vs-batch; see the module docstring for the command, runtimes and the expected result."""

    seeds: int = 3  # seeds per grid point
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    depth: int = 2  # residual blocks of the ResNet
    stages: int = 2  # stages (the spatial size halves at each new stage)
    width: float = 1.0  # channel multiplier (Wide-ResNet k)
    base_width: int = 8  # channels of the first stage before the multiplier
    variants: tuple[str, ...] = ("batchnorm", "skipinit")  # from VARIANTS
    claimed: str = "batchnorm"  # the variant whose optimal lr is claimed to grow faster
    baseline: str = "skipinit"  # the variant it is compared with
    batch_sizes: tuple[int, ...] = (32, 128, 512)  # examples per optimizer step
    lrs: tuple[float, ...] = (0.0078125, 0.03125, 0.125, 0.5, 2.0, 8.0)  # peak SGD learning rates (2^-7…2^3)
    epochs: int = 10  # passes over the training set (the same for every batch size)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0  # L2 coefficient
    schedule: str = "cosine"  # learning-rate schedule after the peak ("constant" | "cosine" | "step")
    plateau: float = 0.01  # accuracy (fraction) within which grid lrs count as optimal
    threads: int = 1  # torch threads per run
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)

    def __post_init__(self) -> None:
        unknown = [v for v in (*self.variants, self.claimed, self.baseline) if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if self.claimed not in self.variants or self.baseline not in self.variants:
            raise ValueError(
                f"claimed={self.claimed!r} and baseline={self.baseline!r} must be among variants={self.variants}"
            )
        if len(self.batch_sizes) < 2:
            raise ValueError("lr-vs-batch needs at least two batch sizes (a slope)")


def _grid(cfg: LRvsBatchConfig):
    for variant in cfg.variants:
        norm, alpha = VARIANTS[variant]
        model_kwargs: dict[str, Any] = {
            "depth": cfg.depth,
            "stages": cfg.stages,
            "width": cfg.width,
            "base_width": cfg.base_width,
        }
        if alpha is not None:
            model_kwargs["residual_scale"] = alpha
        for bs in cfg.batch_sizes:
            for lr in cfg.lrs:
                yield {
                    "variant": variant,
                    "dataset": cfg.dataset,
                    "n_train": cfg.n_train,
                    "model": "resnet",
                    "model_kwargs": model_kwargs,
                    "norm": norm,
                    "optimizer": "sgd",
                    "lr": lr,
                    "momentum": cfg.momentum,
                    "weight_decay": cfg.weight_decay,
                    "schedule": cfg.schedule,
                    "epochs": cfg.epochs,
                    "batch_size": bs,
                    "threads": cfg.threads,
                }


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import train

    return train(run.train_config(), progress=run.progress).to_metrics()


# --------------------------------------------------------------------------- analysis


def _acc(row: dict[str, Any]) -> float:
    """Final test accuracy; a run that ended with non-finite outputs counts as 0."""
    a = row.get("final_test_acc")
    return float(a) if a is not None and math.isfinite(a) else 0.0


def best_lr_table(rows: list[dict[str, Any]], plateau: float) -> dict[tuple[str, int, int], dict[str, float]]:
    """``{(variant, seed, batch_size): {"lr": best lr, "acc": best accuracy, "top": 1.0 if at the grid top}}``."""
    out = {}
    for (variant, seed, bs), rs in group(rows, "variant", "seed", "batch_size").items():
        best = max(_acc(r) for r in rs)
        near = [r["lr"] for r in rs if _acc(r) >= best - plateau - 1e-12]
        top = max(r["lr"] for r in rs)
        out[(variant, seed, bs)] = {
            "lr": 2 ** (sum(math.log2(x) for x in near) / len(near)),
            "acc": best,
            "top": float(top in near),
        }
    return out


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def slopes(table: dict[tuple[str, int, int], dict[str, float]]) -> dict[tuple[str, int], float]:
    """``{(variant, seed): slope of log2(best lr) vs log2(batch size)}``."""
    by: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for (variant, seed, bs), v in table.items():
        by.setdefault((variant, seed), []).append((bs, v["lr"]))
    out = {}
    for key, pts in by.items():
        if len({bs for bs, _ in pts}) < 2:
            continue
        out[key] = _slope([math.log2(bs) for bs, _ in pts], [math.log2(lr) for _, lr in pts])
    return out


def _analyse(rows: list[dict[str, Any]], cfg: LRvsBatchConfig) -> Verdict:
    table = best_lr_table(rows, cfg.plateau)
    sl = slopes(table)
    a = [v for (variant, _), v in sl.items() if variant == cfg.claimed]
    b = [v for (variant, _), v in sl.items() if variant == cfg.baseline]
    v = compare(
        a, b, "greater", name_a=cfg.claimed, name_b=cfg.baseline, metric="slope of log2(best lr) vs log2(batch)"
    )
    sizes = sorted({bs for (_, _, bs) in table})
    small, large = sizes[0], sizes[-1]

    def best_lrs(variant: str) -> str:
        parts = []
        for bs in sizes:
            logs = [math.log2(t["lr"]) for (vv, _, b_), t in table.items() if vv == variant and b_ == bs]
            tops = sum(t["top"] for (vv, _, b_), t in table.items() if vv == variant and b_ == bs)
            mark = f" ({int(tops)} at grid top)" if tops else ""
            parts.append(f"{bs}: {2 ** mean_std(logs)[0]:.3g}{mark}")
        return ", ".join(parts)

    def advantage(bs: int) -> list[float]:
        seeds = sorted({s for (vv, s, b_) in table if b_ == bs})
        return [
            table[(cfg.claimed, s, bs)]["acc"] - table[(cfg.baseline, s, bs)]["acc"]
            for s in seeds
            if (cfg.claimed, s, bs) in table and (cfg.baseline, s, bs) in table
        ]

    adv_small, adv_large = advantage(small), advantage(large)
    numbers = dict(v.numbers)
    numbers["best"] = {f"{vv}/seed{s}/bs{b_}": t for (vv, s, b_), t in table.items()}
    numbers["slopes"] = {f"{vv}/seed{s}": x for (vv, s), x in sl.items()}
    numbers["advantage_small_batch"] = adv_small
    numbers["advantage_large_batch"] = adv_large
    numbers["plateau"] = cfg.plateau
    slope_text = (
        f"slope of log2(best lr) vs log2(batch size) over {small}…{large}: {cfg.claimed} {fmt_mean_std(a)} vs "
        f"{cfg.baseline} {fmt_mean_std(b)} -> {v.status}"
        if a and b
        else "slopes missing"
    )
    summary = (
        f"{slope_text}; best lr (geometric mean over seeds) {cfg.claimed} [{best_lrs(cfg.claimed)}], "
        f"{cfg.baseline} [{best_lrs(cfg.baseline)}]"
    )
    if adv_small and adv_large:
        summary += (
            f"; best-acc advantage of {cfg.claimed} over {cfg.baseline}: batch {small} {fmt_mean_std(adv_small)}, "
            f"batch {large} {fmt_mean_std(adv_large)}"
        )
    return Verdict(v.status, summary, numbers)


# --------------------------------------------------------------------------- figure


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: LRvsBatchConfig) -> list[Path]:
    plt = pyplot()
    table = best_lr_table(rows, cfg.plateau)
    variants = [v for v in cfg.variants if any(r["variant"] == v for r in rows)]
    sizes = sorted({r["batch_size"] for r in rows})
    styles = {v: s for v, s in zip(VARIANTS, ("-", "--", ":"))}
    colours = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)

    for k, bs in enumerate(sizes):
        for variant in variants:
            lrs = sorted({r["lr"] for r in rows if r["variant"] == variant and r["batch_size"] == bs})
            ms, ss = [], []
            for lr in lrs:
                point = [r for r in rows if r["variant"] == variant and r["batch_size"] == bs and r["lr"] == lr]
                m, s, _ = mean_std([_acc(r) for r in point])
                ms.append(m)
                ss.append(s)
            ax0.errorbar(
                lrs,
                ms,
                yerr=ss,
                ls=styles[variant],
                marker="o",
                ms=3,
                capsize=2,
                color=f"C{k + 3}",
                label=f"{variant}, batch {bs}",
            )
    ax0.set(
        xlabel="peak learning rate",
        ylabel="final test accuracy",
        ylim=(0, 1.02),
        title="accuracy vs learning rate (mean ± std over seeds)",
    )
    ax0.set_xscale("log", base=2)
    ax0.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.15))

    for variant in variants:
        lm, ls_, am, as_ = [], [], [], []
        for bs in sizes:
            logs = [math.log2(t["lr"]) for (v, _, b), t in table.items() if v == variant and b == bs]
            accs = [t["acc"] for (v, _, b), t in table.items() if v == variant and b == bs]
            m, s, _ = mean_std(logs)
            lm.append(2**m)
            ls_.append((2**m - 2 ** (m - s), 2 ** (m + s) - 2**m))
            m, s, _ = mean_std(accs)
            am.append(m)
            as_.append(s)
        style = {"marker": "o", "capsize": 3, "color": colours[variant], "ls": styles[variant], "label": variant}
        ax1.errorbar(sizes, lm, yerr=list(zip(*ls_)), **style)
        ax2.errorbar(sizes, am, yerr=as_, **style)
    ref = [min(cfg.lrs) * 2 * bs / sizes[0] for bs in sizes]
    ax1.plot(sizes, ref, color="grey", lw=0.8, ls="-.", label="∝ batch size (linear scaling)")
    ax1.axhline(max(r["lr"] for r in rows), color="grey", lw=0.6, ls=":", label="grid top")
    ax1.set(
        xlabel="batch size (examples)",
        ylabel="best peak learning rate",
        title="optimal learning rate vs batch size (geo. mean ± std)",
    )
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log", base=2)
    ax1.legend(fontsize=7)
    ax2.set(xlabel="batch size (examples)", ylabel="best test accuracy (over lrs)", title="best accuracy vs batch size")
    ax2.set_xscale("log", base=2)
    ax2.legend(fontsize=7)
    fig.suptitle(f"C12 lr-vs-batch: {cfg.epochs} epochs at every batch size (larger batch = fewer steps)")
    return [save_figure(fig, out_dir, "lr-vs-batch")]


EXPERIMENT = register_experiment(
    Experiment(
        name="lr-vs-batch",
        claim="C12",
        title="With BatchNorm the best learning rate grows with the batch size; with SkipInit it saturates earlier",
        config=LRvsBatchConfig,
        scales={
            "smoke": LRvsBatchConfig(
                seeds=2,
                n_train=256,
                depth=1,
                stages=1,
                base_width=4,
                batch_sizes=(16, 64),
                lrs=(0.03125, 0.5),
                epochs=1,
            ),
            "quick": LRvsBatchConfig(),
            "full": LRvsBatchConfig(
                seeds=3,
                dataset="cifar10",
                depth=6,
                stages=3,
                width=4,
                base_width=16,
                variants=("batchnorm", "skipinit", "none"),
                batch_sizes=(64, 128, 256, 512, 1024, 2048, 4096),
                lrs=tuple(2.0**k for k in range(-8, 4)),
                epochs=200,
                weight_decay=5e-4,
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
