"""``skipinit-depth`` (C11): without normalisation a deep residual net trains only if its branches start small.

The pre-activation ResNet (``build_model("resnet")``: stem conv, ``depth``
residual blocks of two 3x3 convs in three stages, global average pool,
linear classifier; narrow: ``base_width`` channels in the first stage) is
trained at several depths (``depth`` = number of residual blocks) in six
variants, all with the same optimiser, learning rate and budget:

* ``batchnorm`` -- BatchNorm, plain branches (alpha = 1);
* ``none`` -- no normalisation, alpha = 1: ``out = x + branch(x)``;
* ``none-merge`` -- no normalisation, alpha = 1, each merge scaled by
  1/sqrt(2) (``merge_scale=True``): the forward signal keeps its variance;
* ``skipinit-0`` -- SkipInit: no normalisation, a learnable scalar alpha on
  every branch initialised at 0 (``residual_scale=0``);
* ``skipinit-sqrt`` -- SkipInit with alpha initialised at 1/sqrt(depth);
* ``fixup`` -- Fixup (``fixup=True``): zero-initialised last conv of every
  branch and classifier, scaled He init, scalar biases and multipliers.

Per run: final test accuracy and eval-mode accuracy on the whole training
set after the last epoch, divergence (a non-finite step loss, or one above
``divergence_loss`` nats, ends the run; its accuracies are those of the
model as it is then), and the per-step training loss.

Verdict rule, at the deepest depth ``D = max(depths)``, on final test
accuracy over seeds (:func:`~normlab.lab.experiments.framework.combine` of the parts;
a part whose variant is not in ``variants`` is left out):

1. *alpha = 1 without a norm fails at depth*: the per-seed differences
   ``batchnorm − none`` (paired by seed) with ``threshold(..., fail_margin,
   "greater")``: holds when their whole mean ± std interval lies above
   ``fail_margin`` (no norm trails BN by more than that), does not hold when
   it lies wholly below (no norm trains nearly as well as BN, or better),
   inconclusive otherwise;
2. *merge scaling alone is not enough*: the same for ``none-merge``;
3. *SkipInit (alpha = 0) ≈ BN*: the per-seed differences ``skipinit-0 −
   batchnorm`` (paired by seed) are tested with ``threshold(..., −match_tol,
   "greater")``: holds when their whole mean ± std interval lies above
   ``−match_tol`` (SkipInit trails BN by less than ``match_tol``, or beats
   it), does not hold when it lies wholly below, inconclusive otherwise;
4. *SkipInit (alpha = 1/sqrt(d)) ≈ BN*: the same for ``skipinit-sqrt``.

Fixup's accuracies are reported in the summary and the numbers but are not
part of the claim's verdict (the claim is about SkipInit).

Command: ``normlab run skipinit-depth`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU, one thread per run (a 100-block net takes
~0.08-0.13 s per step here, dominated by the per-op overhead of tiny
convolutions; BN costs ~1.5-2x no norm): smoke ~10 s; quick (digits, depths
4 and 100, 6 variants x 3 seeds = 36 runs of 3 epochs at batch 32 = 132
steps each) 4.1 min measured (user CPU 2.6 min; load average 2.5-4 from
other jobs); full (CIFAR-10, WRN-16-2 / WRN-100-2 / WRN-1000-2, 200 epochs)
is for a GPU, days there, not run here. Add the
intermediate depth with ``--set depths=4,16,100`` (runs already stored are
reused): about 1.2x the quick time. A first quick run with depths 4, 16 and
100 took 11.7 min while other jobs kept the machine's load average near 9,
hence the smaller default grid.

Expected (De & Smith 2020, Tables 1-2, n-2 Wide-ResNets of 16 to 1000 layers
on CIFAR-10, batch 64): SkipInit (alpha = 0 or 1/sqrt(d)) reaches BN's test
accuracy at every depth; alpha = 1 without normalisation fails to train at
depth, and so does dividing each merge by sqrt(2). A pilot at seed 0 (depth
100, batch 32, 4 epochs) trained every variant except ``none`` and
``none-merge`` at lr 0.02 and 0.05; with batch 64 and only 66 steps,
SkipInit alpha = 0 at lr 0.05 had not yet left chance: its slow start (only
the alphas get a gradient at first) makes the result sensitive to the
training budget. A check at depth 100 with ``--set epochs=8`` (352 steps,
3 seeds) gave BN 0.93 ± 0.02, SkipInit alpha = 0 0.91 ± 0.02 and alpha =
1/sqrt(d) 0.65 ± 0.47 (seed 1 blew up early at lr 0.05 and stayed at chance,
as in the 3-epoch runs).
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
    fmt_mean_std,
    group,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
    threshold,
)

__all__ = ["SkipInitDepthConfig", "EXPERIMENT", "VARIANTS", "variant_options", "accuracy"]

# variant -> (norm, human label)
VARIANTS: dict[str, tuple[str, str]] = {
    "batchnorm": ("batchnorm", "BN, α=1"),
    "none": ("none", "no norm, α=1"),
    "none-merge": ("none", "no norm, α=1, merge ×1/√2"),
    "skipinit-0": ("none", "SkipInit α=0"),
    "skipinit-sqrt": ("none", "SkipInit α=1/√d"),
    "fixup": ("none", "Fixup"),
}


@dataclass(frozen=True)
class SkipInitDepthConfig:
    """C11 skipinit-depth; the module docstring gives the command, runtimes, verdict rule and expected result."""

    seeds: int = 3  # seeds per (variant, depth)
    depths: tuple[int, ...] = (4, 100)  # residual blocks (two convs each); the verdict uses the largest
    variants: tuple[str, ...] = tuple(VARIANTS)  # which of VARIANTS to train ("batchnorm" is required)
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names()); images (C, H, W) or signals (C, L)
    n_train: int | None = None  # training examples (None = the whole training set)
    base_width: int = 4  # channels of the first stage (doubling per stage)
    width: float = 1.0  # width multiplier k of WRN-n-k
    stages: int = 3  # stages (each after the first halves the spatial size)
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam"
    lr: float = 0.05  # peak learning rate, the same for every variant (per unit gradient)
    schedule: str = "constant"  # learning-rate shape: "constant" | "cosine" | "step" (TrainConfig.schedule)
    augment: str | None = None  # batch augmentation ("flip+crop" for CIFAR); None = off
    epochs: int = 3  # passes over the training set
    batch_size: int = 32  # examples per optimizer step
    divergence_loss: float = 1e4  # a step loss above this (nats), or a non-finite one, counts as diverged
    fail_margin: float = 0.1  # accuracy gap (fraction) below BN that counts as "fails" (parts 1-2)
    match_tol: float = 0.05  # accuracy (fraction) by which SkipInit may trail BN and still count as "≈ BN" (parts 3-4)
    threads: int = 1  # torch threads per run
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)


def variant_options(variant: str, depth: int) -> tuple[str, dict[str, Any]]:
    """``(norm, resnet options)`` of a variant at ``depth`` residual blocks."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    norm = VARIANTS[variant][0]
    opts: dict[str, Any] = {
        "batchnorm": {},
        "none": {},
        "none-merge": {"merge_scale": True},
        "skipinit-0": {"residual_scale": 0.0},
        "skipinit-sqrt": {"residual_scale": 1.0 / math.sqrt(depth)},
        "fixup": {"fixup": True},
    }[variant]
    return norm, opts


def _check(cfg: SkipInitDepthConfig) -> None:
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"variants {bad} unknown; known: {', '.join(VARIANTS)}")
    if "batchnorm" not in cfg.variants:
        raise ValueError("variants must include 'batchnorm' (the reference every part compares with)")
    if not cfg.depths or min(cfg.depths) < cfg.stages:
        raise ValueError(f"depths must be non-empty and each >= stages={cfg.stages}, got {cfg.depths}")


def _grid(cfg: SkipInitDepthConfig):
    _check(cfg)
    for depth in cfg.depths:
        for variant in cfg.variants:
            norm, opts = variant_options(variant, depth)
            yield {
                "variant": variant,
                "depth": depth,
                "dataset": cfg.dataset,
                "n_train": cfg.n_train,
                "model": "resnet",
                "model_kwargs": {
                    "depth": depth,
                    "base_width": cfg.base_width,
                    "width": cfg.width,
                    "stages": cfg.stages,
                    **opts,
                },
                "norm": norm,
                "optimizer": cfg.optimizer,
                "lr": cfg.lr,
                "schedule": cfg.schedule,
                "augment": cfg.augment,
                "momentum": 0.9,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "eval_train": True,
                "divergence_loss": cfg.divergence_loss,
                "threads": cfg.threads,
            }


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import train

    result = train(run.train_config(), progress=run.progress)
    metrics = result.to_metrics()
    metrics["num_classes"] = int(result.model.head.out_features)
    return metrics


# --------------------------------------------------------------------------- analysis


def accuracy(row: dict[str, Any], metric: str = "final_test_acc") -> float:
    """A run's accuracy (fraction); a missing or non-finite one (a run that never evaluated) counts as chance."""
    acc = row.get(metric)
    if acc is None or not math.isfinite(acc):
        return 1.0 / row.get("num_classes", 10)
    return float(acc)


def _accs(rows, variant: str, depth: int, metric: str = "final_test_acc") -> dict[int, float]:
    """``{seed: accuracy}`` of one variant at one depth."""
    return {r["seed"]: accuracy(r, metric) for r in rows if r["variant"] == variant and r["depth"] == depth}


def _analyse(rows: list[dict[str, Any]], cfg: SkipInitDepthConfig) -> Verdict:
    depth = max(r["depth"] for r in rows)
    present = {r["variant"] for r in rows if r["depth"] == depth}
    if "batchnorm" not in present:
        raise ValueError("skipinit-depth: no batchnorm runs at the deepest depth; the verdict compares with BN")
    bn = _accs(rows, "batchnorm", depth)
    parts: dict[str, Verdict] = {}
    for variant, what in (("none", "α=1 fails"), ("none-merge", "merge ×1/√2 fails")):
        if variant in present:
            acc = _accs(rows, variant, depth)
            parts[what] = threshold(
                [bn[s] - acc[s] for s in sorted(acc) if s in bn],
                cfg.fail_margin,
                "greater",
                name=f"BN − {VARIANTS[variant][1]} test acc at depth {depth}",
            )
    for variant in ("skipinit-0", "skipinit-sqrt"):
        if variant in present:
            acc = _accs(rows, variant, depth)
            parts[f"{VARIANTS[variant][1]} ≈ BN"] = threshold(
                [acc[s] - bn[s] for s in sorted(acc) if s in bn],
                -cfg.match_tol,
                "greater",
                name=f"{VARIANTS[variant][1]} − BN test acc at depth {depth}",
            )
    if not parts:
        raise ValueError("skipinit-depth: no variant to compare with BN at the deepest depth")
    verdict = combine(parts)

    accs = {v: list(_accs(rows, v, depth).values()) for v in VARIANTS if v in present}
    numbers = dict(verdict.numbers)
    numbers["depth"] = depth
    numbers["test_acc"] = {v: dict(zip(("mean", "std", "n"), mean_std(a))) for v, a in accs.items()}
    numbers["diverged"] = {
        v: sum(bool(r.get("diverged")) for r in rows if r["variant"] == v and r["depth"] == depth) for v in accs
    }
    listing = ", ".join(f"{VARIANTS[v][1]} {fmt_mean_std(a, 2)}" for v, a in accs.items())
    statuses = "; ".join(f"{k}: {v.status}" for k, v in parts.items())
    summary = f"test accuracy at depth {depth} blocks: {listing} | {statuses}"
    return Verdict(verdict.status, summary, numbers)


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: SkipInitDepthConfig) -> list[Path]:
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    chance = 1.0 / (rows[0].get("num_classes", 10) if rows else 10)
    for ax, metric, title in (
        (axes[0], "final_test_acc", "test accuracy vs depth"),
        (axes[1], "final_train_eval_acc", "training-set accuracy (eval mode) vs depth"),
    ):
        for i, variant in enumerate(VARIANTS):
            by_depth = group([r for r in rows if r["variant"] == variant], "depth")
            if not by_depth:
                continue
            ds = sorted(d for (d,) in by_depth)
            stats = [mean_std(accuracy(r, metric) for r in by_depth[(d,)]) for d in ds]
            ax.errorbar(
                ds,
                [m for m, _, _ in stats],
                yerr=[s for _, s, _ in stats],
                marker="o",
                capsize=3,
                color=f"C{i}",
                label=VARIANTS[variant][1],
            )
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
        ax.set(
            xscale="log", xlabel="depth (residual blocks)", ylabel="accuracy (fraction)", title=title, ylim=(0, 1.02)
        )
        ds_all = sorted({r["depth"] for r in rows})
        ax.set_xticks(ds_all, [str(d) for d in ds_all])
        ax.minorticks_off()
    axes[0].legend(fontsize=8)

    depth = max(r["depth"] for r in rows)
    ax = axes[2]
    for i, variant in enumerate(VARIANTS):
        rs = [r for r in rows if r["variant"] == variant and r["depth"] == depth]
        for j, r in enumerate(rs):
            loss = np.array([v if math.isfinite(v) else np.nan for v in r["step_loss"]], dtype=float)
            w = max(1, min(10, len(loss) // 10))  # running mean over w steps, for readability
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid") if len(loss) >= w else loss
            ax.plot(
                np.arange(len(smooth)) + w - 1,
                smooth,
                color=f"C{i}",
                lw=0.8,
                alpha=0.7,
                label=VARIANTS[variant][1] if j == 0 else None,
            )
            if r.get("diverged") and r.get("diverged_step") is not None:
                at = r["step_loss"][r["diverged_step"]] if r["diverged_step"] < len(r["step_loss"]) else math.inf
                y = min(at, 999.0) if math.isfinite(at) else 999.0
                ax.scatter([r["diverged_step"]], [y], marker="x", color=f"C{i}")
    ax.set(
        yscale="log",
        xlabel="optimizer step",
        ylabel="training loss (nats)",
        title=f"training loss at depth {depth}, every seed (x = diverged)",
        ylim=(0.05, 1e3),
    )
    ax.set_ylabel("training loss (nats, running mean over 10 steps)")
    fig.tight_layout()
    data = rows[0].get("dataset", "?")
    fig.suptitle(f"C11 skipinit-depth: pre-act ResNet on {data}, no norm vs BN vs SkipInit vs Fixup", y=1.03)
    return [save_figure(fig, out_dir, "skipinit-depth")]


_DATA_FULL = "cifar10"
EXPERIMENT = register_experiment(
    Experiment(
        name="skipinit-depth",
        claim="C11",
        title="Without normalisation a deep ResNet trains only with SkipInit's small branch scalar; "
        "merge scaling is not enough",
        config=SkipInitDepthConfig,
        scales={
            "smoke": SkipInitDepthConfig(seeds=2, depths=(3, 6), n_train=160, epochs=1, batch_size=32, base_width=2),
            "quick": SkipInitDepthConfig(),
            "full": SkipInitDepthConfig(
                seeds=3,
                depths=(6, 48, 498),  # WRN-16-2, WRN-100-2, WRN-1000-2 (n = 2 depth + 4 layers)
                dataset=_DATA_FULL,
                base_width=16,
                width=2.0,
                lr=0.1,
                schedule="step",
                augment="flip+crop",
                epochs=200,
                batch_size=64,
            ),
        },
        grid=_grid,
        run_one=_run_one,
        analyse=_analyse,
        plot=_plot,
        description=__doc__ or "",
    )
)
