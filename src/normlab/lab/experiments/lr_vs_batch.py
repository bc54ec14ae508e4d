"""``lr-vs-batch`` (C12): BN's larger stable learning rates pay off mainly at large batch sizes.

Pre-registration
----------------
**Claim** (S4, the summary of De & Smith 2020, "Batch normalization biases
residual blocks towards the identity function"; our words): BN improves the
loss landscape and raises the largest stable learning rate, but that is
useful only for training with large batches. In their Figs. 5–6 (a 16-4
Wide-ResNet on CIFAR-10, 200 epochs, batch sizes 64 … 4096) the optimal
learning rate of the BN network keeps growing with the batch size while that
of the unnormalised (SkipInit) network stops growing at a smaller batch, and
BN's test accuracy is higher only at large batches; on ImageNet (Table 3)
SkipInit matches BN at batch 256 but not at very large batches.

**Design.** A small pre-activation ResNet (2 residual blocks in 2 stages,
8 base channels) on scikit-learn's digits, in two variants: ``batchnorm``
(BN in every branch, α = 1) and ``skipinit`` (no norm, a learnable scalar α on
each branch initialised at 0: De & Smith's SkipInit). SGD with momentum 0.9
and a cosine schedule for **10 epochs at every batch size** (as in the paper:
a larger batch means fewer steps) at batch sizes 32, 128, 512 and peak
learning rates 2^-7 … 2^3 (a factor 4 apart). Per variant, seed and batch
size, the **best learning rate** is the geometric mean of the grid learning
rates whose test accuracy is within 0.01 of that seed's best at that batch
size (a small plateau keeps a few test images from moving the optimum a whole
grid step), and the **best accuracy** is that maximum. A run that diverged
counts at chance accuracy, 0.1 (it can be the best only if every learning
rate failed).

**Deciding parts** (per-seed values; paired by seed — the same seed gives the
same initialisation draw and batch order in both variants; difference scale):

* ``lr-grows-faster`` — metric: the slope of log2(best lr) against
  log2(batch size) over 32 … 512 (least squares; 1 = the linear scaling
  rule, 0 = no growth). Arm A BN, arm B SkipInit; direction A greater.
  δ = 0.25: over the 16-fold batch range a slope difference of 0.25 moves the
  optimal learning rate at the largest batch by a factor 2, half a step of the
  grid (factor 4) — a smaller difference is below what the grid resolves.
* ``advantage-grows`` — metric: BN's best accuracy minus SkipInit's at batch
  512, minus the same at batch 32 (same seed). Against 0; direction greater.
  δ = 0.02 accuracy: a practical threshold — twice the seed-to-seed spread of
  a best accuracy on digits (about one point), and an advantage one would
  choose a normaliser for.

**Reported parts**: ``matches-at-small`` (BN's best accuracy minus
SkipInit's at batch 32 ≈ 0, equivalence within ±0.02: the paper's "SkipInit
matches BN at ordinary batch sizes", reported because ``advantage-grows``
already holds the comparison across batch sizes), ``bn-lr-grows`` (BN's own
slope against 0, δ 0.25: whether BN's optimum follows the batch at all).

**Does not hold** if BN's optimal learning rate does not grow faster with the
batch than SkipInit's (interval below 0, or inside ±0.25), or if BN's
accuracy advantage does not grow from batch 32 to 512 (interval below 0, or
inside ±0.02).

**Seeds**: rounds of 3 up to 12 (quick); smoke 2. Measured cost at quick scale
(``/usr/bin/time``, one thread, shared 2-core machine): 466 s of CPU for 12
seeds (432 runs), about 39 s per seed.

Design notes
------------
A best learning rate at the top of the grid is censored (the slope is then a
lower bound); the finding says when that happened. The figure shows accuracy
against learning rate per batch size, the best learning rate and the best
accuracy against the batch size.

Command: ``normlab run lr-vs-batch`` (``--scale smoke|quick|full``). Runtime
(one thread per run): smoke ~8 s of CPU; quick 39 s of CPU per seed (36
runs), 466 s at the full 12 seeds; full (CIFAR-10, WRN-16-4, 200 epochs,
batch 64 … 4096, 12 learning rates, three variants) is for a GPU and takes
days there, not run here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.lab.experiments.framework import (
    Experiment,
    Judgement,
    Part,
    Run,
    group,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
)

__all__ = ["LRvsBatchConfig", "EXPERIMENT", "VARIANTS", "CHANCE", "best_lr_table", "slopes"]

CHANCE = 0.1  # the accuracy a diverged run counts at (10 classes)

# variant -> (norm name, residual_scale of the ResNet's branches: None = plain α = 1)
VARIANTS: dict[str, tuple[str, float | None]] = {
    "batchnorm": ("batchnorm", None),
    "skipinit": ("none", 0.0),
    "none": ("none", None),
}


@dataclass(frozen=True)
class LRvsBatchConfig:
    """C12 lr-vs-batch; see the module docstring for the design, the command and the runtimes."""

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per grid point
    threads: int = 1  # torch threads per run (not part of the run id)
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
                }


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import train

    return train(run.train_config(), progress=run.progress).to_metrics()


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import train

    return train(run.train_config(), progress=run.progress).to_metrics()


# --------------------------------------------------------------------------- per-seed values


def _acc(row: dict[str, Any]) -> float:
    """Final test accuracy; a diverged run, or a non-finite accuracy, counts at chance (:data:`CHANCE`)."""
    a = row.get("final_test_acc")
    if row.get("diverged") or not isinstance(a, (int, float)) or not math.isfinite(a):
        return CHANCE
    return float(a)


def best_lr_table(rows: list[dict[str, Any]], plateau: float) -> dict[tuple[str, int, int], dict[str, float]]:
    """``{(variant, seed, batch_size): {"lr": best lr, "acc": best accuracy, "top": 1.0 if at the grid top}}``."""
    out = {}
    for (variant, seed, bs), rs in group(rows, "variant", "seed", "batch_size").items():
        best = max(_acc(r) for r in rs)
        near = [r["lr"] for r in rs if _acc(r) >= best - plateau - 1e-12]
        top = max(r["lr"] for r in rs)
        out[(variant, int(seed), bs)] = {
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
    """``{(variant, seed): slope of log2(best lr) vs log2(batch size)}`` (least squares over the batch sizes)."""
    by: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for (variant, seed, bs), v in table.items():
        by.setdefault((variant, seed), []).append((bs, v["lr"]))
    out = {}
    for key, pts in by.items():
        if len({bs for bs, _ in pts}) < 2:
            continue
        out[key] = _slope([math.log2(bs) for bs, _ in pts], [math.log2(lr) for _, lr in pts])
    return out


def _measure(rows: list[dict[str, Any]], cfg: LRvsBatchConfig) -> list[dict[str, Any]]:
    """Per seed: each variant's slope; the claimed variant's accuracy advantage at each batch size and its growth."""
    table = best_lr_table(rows, cfg.plateau)
    out: list[dict[str, Any]] = [
        {"seed": seed, "what": "slope", "variant": variant, "slope": x} for (variant, seed), x in slopes(table).items()
    ]
    small, large = min(cfg.batch_sizes), max(cfg.batch_sizes)
    seeds = sorted({s for (_, s, _) in table})
    for s in seeds:
        adv = {}
        for bs in cfg.batch_sizes:
            a, b = table.get((cfg.claimed, s, bs)), table.get((cfg.baseline, s, bs))
            if a is not None and b is not None:
                adv[bs] = a["acc"] - b["acc"]
                out.append({"seed": s, "what": "advantage", "batch_size": bs, "advantage": adv[bs]})
        if small in adv and large in adv:
            out.append({"seed": s, "what": "growth", "growth": adv[large] - adv[small]})
    return out


# --------------------------------------------------------------------------- parts


def _parts(cfg: LRvsBatchConfig) -> list[Part]:
    a, b = cfg.claimed, cfg.baseline
    small, large = min(cfg.batch_sizes), max(cfg.batch_sizes)
    why_slope = "over the 16-fold batch range 0.25 moves the optimal lr at the largest batch 2x, half a grid step"
    why_acc = "twice the seed-to-seed spread of a best accuracy on digits (~1 point); an edge worth choosing a norm for"
    return [
        Part(
            name="lr-grows-faster",
            says=f"{a}'s optimal learning rate grows faster with the batch size than {b}'s",
            metric="slope",
            a={"what": "slope", "variant": a},
            b={"what": "slope", "variant": b},
            direction="greater",
            margin=0.25,
            why=why_slope,
            unit="slope of log2 lr vs log2 batch",
            label_a=f"{a} slope",
            label_b=f"{b} slope",
        ),
        Part(
            name="advantage-grows",
            says=f"{a}'s best-accuracy advantage over {b} is larger at batch {large} than at batch {small}",
            metric="growth",
            a={"what": "growth"},
            bound=0.0,
            direction="greater",
            margin=0.02,
            why=why_acc,
            unit="accuracy",
            label_a=f"advantage at {large} − at {small}",
        ),
        Part(
            name="matches-at-small",
            says=f"at batch {small} {b} reaches about the best accuracy of {a}",
            metric="advantage",
            a={"what": "advantage", "batch_size": small},
            bound=0.0,
            direction="equivalent",
            margin=0.02,
            why=why_acc,
            decides=False,
            unit="accuracy",
            label_a=f"{a} − {b} at {small}",
        ),
        Part(
            name="bn-lr-grows",
            says=f"{a}'s optimal learning rate grows with the batch size",
            metric="slope",
            a={"what": "slope", "variant": a},
            bound=0.0,
            direction="greater",
            margin=0.25,
            why=why_slope,
            decides=False,
            unit="slope of log2 lr vs log2 batch",
            label_a=f"{a} slope",
        ),
    ]


# --------------------------------------------------------------------------- explanation


def _explain(rows: list[dict[str, Any]], cfg: LRvsBatchConfig, judgement: Judgement) -> tuple[str, dict[str, Any]]:
    n = judgement.seeds
    use = [r for r in rows if int(r["seed"]) < n]
    table = best_lr_table(use, cfg.plateau)
    sizes = sorted(cfg.batch_sizes)
    numbers: dict[str, Any] = {"seeds": n, "best_lr": {}, "best_acc": {}, "at_grid_top": {}, "diverged": {}}
    texts = []
    for variant in (cfg.claimed, cfg.baseline):
        parts = []
        for bs in sizes:
            cells = [t for (v, s, b), t in table.items() if v == variant and b == bs]
            if not cells:
                continue
            geo = 2 ** mean_std([math.log2(t["lr"]) for t in cells])[0]
            acc = mean_std([t["acc"] for t in cells])[0]
            tops = int(sum(t["top"] for t in cells))
            key = f"{variant}/{bs}"
            numbers["best_lr"][key], numbers["best_acc"][key], numbers["at_grid_top"][key] = geo, acc, tops
            numbers["diverged"][key] = sum(
                bool(r.get("diverged")) for r in use if r["variant"] == variant and r["batch_size"] == bs
            )
            mark = f", {tops} at the grid top" if tops else ""
            parts.append(f"{bs}: lr {geo:.3g}{mark}, acc {acc:.3f}")
        texts.append(f"{variant} [" + "; ".join(parts) + "]")
    diverged = sum(numbers["diverged"].values())
    steps = {bs: max((int(r["steps"]) for r in use if r["batch_size"] == bs and r.get("steps") is not None), default=0)
             for bs in sizes}  # fmt: skip
    numbers["steps_per_run"] = {str(bs): k for bs, k in steps.items()}
    sentence = (
        "Best learning rate (geometric mean over seeds) and best test accuracy per batch size: "
        + " vs ".join(texts)
        + f". {diverged} of {len(use)} runs diverged (counted at chance accuracy). Optimizer steps per run, "
        + f"{cfg.epochs} epochs: "
        + ", ".join(f"batch {bs}: {k}" for bs, k in steps.items())
        + "."
    )
    return sentence, numbers


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
        title="BN's larger stable learning rates pay off mainly at large batch sizes; SkipInit matches it at small",
        config=LRvsBatchConfig,
        scales={
            "smoke": LRvsBatchConfig(
                seeds=2,
                max_seeds=2,
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
                max_seeds=3,
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
        parts=_parts,
        measure=_measure,
        explain=_explain,
        plot=_plot,
        description=__doc__ or "",
    )
)
