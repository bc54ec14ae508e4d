"""``placement`` (C6): where should BN go — before the conv, between conv and activation, or after the activation?

The smoothness analysis says: normalise a layer's *input* (BN before the
linear/conv); common practice puts BN after the conv and before the
activation. The same CNN (``build_model("cnn")``) is trained with BN at each
of the positions of :func:`normlab.lab.models.layer_block`:

* ``before_linear``: norm -> conv -> act (the analysis's recommendation);
* ``pre_act``: conv -> norm -> act (the common practice);
* ``post_act``: conv -> act -> norm;

and, as a reference drawn in the figure but not part of the verdict, without
any norm. SGD with momentum 0.9 at a moderate and at a high learning rate
(the high one probes stability), ``seeds`` seeds each.

**Speed** is measured by the mean training loss over all scheduled steps, each
step's loss capped at the chance loss ln(K) (K classes; a single blow-up
counts as "knows nothing", not as a huge number), and steps after a
divergence counted as ln(K). Lower = trains faster and more stably. Final
test accuracy is reported beside it.

There is no fixed expectation; the verdict tests the analysis's
recommendation. Rule, per learning rate: the competitor is the other
placement with the lowest mean of the speed metric; ``compare`` before_linear
with it, direction "less" (intervals mean ± 1 std). **holds** when
before_linear trains faster than every other placement beyond the spread;
**does not hold** when another placement trains faster beyond the spread;
**inconclusive** when the intervals overlap. The learning rates are combined
with :func:`~normlab.lab.experiments.framework.combine` (holds only if it holds at
every learning rate). The summary names the fastest placement at each
learning rate with its numbers, whatever the status.

Command: ``normlab run placement`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU (one thread per run), measured: smoke ~5 s of CPU;
quick (MNIST-1D, CNN 16-32-64, 8 epochs, 4 settings x 2 learning rates x 3
seeds = 24 runs) 57 s wall, 37 s of CPU; full (CIFAR-10, CNN 64-128-256, 30
epochs, 4 learning rates, 5 seeds) is for a GPU.
Expected: no fixed expectation. Ioffe & Szegedy put BN before the
nonlinearity; practitioners report after-activation works as well or better;
the Lipschitz analysis prescribes before the linear layer.
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
    group,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
    values,
)

__all__ = ["PlacementConfig", "EXPERIMENT", "capped_mean_loss"]

RECOMMENDED = "before_linear"  # the analysis's recommendation: normalise the layer's input
REFERENCE = "no norm"  # the grid label of the run without normalisation


@dataclass(frozen=True)
class PlacementConfig:
    """C6 placement; see the module docstring for the command, runtimes and the expected result."""

    seeds: int = 3  # seeds per grid point
    dataset: str = "mnist1d"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    channels: tuple[int, ...] = (16, 32, 64)  # conv channels per block of the CNN
    norm: str = "batchnorm"  # the norm being placed
    positions: tuple[str, ...] = ("before_linear", "pre_act", "post_act")  # where it goes (models.NORM_POSITIONS)
    reference: bool = True  # also train without any norm (drawn, not part of the verdict)
    lrs: tuple[float, ...] = (0.05, 0.5)  # SGD learning rates (momentum 0.9): moderate, high
    epochs: int = 8  # passes over the training set
    batch_size: int = 64  # examples per optimizer step
    threads: int = 1  # torch threads per run
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)

    def __post_init__(self) -> None:
        if RECOMMENDED not in self.positions or len(self.positions) < 2:
            raise ValueError(f"positions must include {RECOMMENDED!r} and at least one other, got {self.positions}")


def _grid(cfg: PlacementConfig):
    settings = [(p, cfg.norm) for p in cfg.positions] + ([(REFERENCE, "none")] if cfg.reference else [])
    for lr in cfg.lrs:
        for placement, norm in settings:
            yield {
                "placement": placement,
                "dataset": cfg.dataset,
                "n_train": cfg.n_train,
                "model": "cnn",
                "model_kwargs": {
                    "channels": list(cfg.channels),
                    "norm_position": placement if placement != REFERENCE else "pre_act",
                },
                "norm": norm,
                "optimizer": "sgd",
                "lr": lr,
                "momentum": 0.9,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "threads": cfg.threads,
            }


def capped_mean_loss(step_loss: list[float], total_steps: int, cap: float) -> float:
    """Mean over ``total_steps`` scheduled steps of min(loss, cap); non-finite or missing steps count as ``cap``."""
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    vals = [min(x, cap) if x is not None and math.isfinite(x) else cap for x in step_loss[:total_steps]]
    vals += [cap] * (total_steps - len(vals))
    return sum(vals) / total_steps


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import load_data, train

    config = run.train_config()
    result = train(config, progress=run.progress)
    metrics = result.to_metrics()
    ds = load_data(config)
    n = len(ds.y_train)
    steps_per_epoch = n // config.batch_size if config.drop_last else math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    cap = math.log(ds.num_classes)
    metrics.update(
        scheduled_steps=total, chance_loss=cap, capped_mean_loss=capped_mean_loss(result.step_loss, total, cap)
    )
    return metrics


# --------------------------------------------------------------------------- analysis


def _analyse(rows: list[dict[str, Any]], cfg: PlacementConfig) -> Verdict:
    parts: dict[str, Verdict] = {}
    texts = []
    numbers: dict[str, Any] = {}
    for (lr,), rs in group(rows, "lr").items():
        placed = [p for p in cfg.positions if any(r["placement"] == p for r in rs)]
        loss = {p: values(rs, "capped_mean_loss", placement=p) for p in placed}
        acc = {p: values(rs, "final_test_acc", placement=p) for p in placed}
        others = [p for p in placed if p != RECOMMENDED]
        rival = min(others, key=lambda p: mean_std(loss[p])[0])
        v = compare(
            loss[RECOMMENDED], loss[rival], "less", name_a=RECOMMENDED, name_b=rival, metric="capped mean train loss"
        )
        parts[f"lr={lr:g}"] = v
        fastest = min(placed, key=lambda p: mean_std(loss[p])[0])
        desc = ", ".join(f"{p} {fmt_mean_std(loss[p])}" for p in placed)
        accs = ", ".join(f"{p} {mean_std(acc[p])[0]:.3f}" for p in placed)
        ref = values(rs, "capped_mean_loss", placement=REFERENCE)
        ref_text = f"; no norm {fmt_mean_std(ref)}" if ref else ""
        texts.append(
            f"lr {lr:g}: fastest {fastest}; mean train loss (nats, capped at ln K) {desc}{ref_text}; "
            f"test acc {accs} -> {v.status}"
        )
        numbers[f"lr={lr:g}"] = {
            "status": v.status,
            "rival": rival,
            "fastest": fastest,
            "capped_mean_loss": loss,
            "final_test_acc": acc,
            "reference_capped_mean_loss": ref,
        }
    if not parts:
        raise ValueError("placement: no rows to analyse")
    verdict = combine(parts)
    summary = f"{RECOMMENDED} vs the best other placement: " + " | ".join(texts)
    return Verdict(verdict.status, summary, numbers)


# --------------------------------------------------------------------------- figure


def _smooth(xs: list[float], k: int) -> list[float]:
    """Trailing moving average over ``k`` steps (for readable per-step curves)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: PlacementConfig) -> list[Path]:
    plt = pyplot()
    by_lr = group(rows, "lr")
    fig, axes = plt.subplots(2, len(by_lr), figsize=(5.5 * len(by_lr), 7.5), squeeze=False, constrained_layout=True)
    order = list(cfg.positions) + [REFERENCE]
    colours = {p: f"C{i}" for i, p in enumerate(order)}
    for j, ((lr,), rs) in enumerate(by_lr.items()):
        ax = axes[0, j]
        for (placement,), prs in group(rs, "placement").items():
            for k, r in enumerate(prs):
                cap = r.get("chance_loss", math.log(10))
                loss = [min(x, cap) if x is not None and math.isfinite(x) else cap for x in r["step_loss"]]
                ax.plot(
                    _smooth(loss, 10),
                    lw=0.8,
                    alpha=0.8,
                    color=colours.get(placement),
                    ls="--" if placement == REFERENCE else "-",
                    label=placement if k == 0 else None,
                )
                if r.get("diverged") and r.get("diverged_step") is not None:
                    ax.plot(
                        [r["diverged_step"]],
                        [1.0],
                        marker="x",
                        ms=8,
                        mew=2,
                        color=colours.get(placement),
                        transform=ax.get_xaxis_transform(),
                        clip_on=False,
                    )
        ax.set(
            yscale="log",
            xlabel="optimizer step",
            ylabel="training loss (nats, 10-step mean, capped at ln K)",
            title=f"SGD lr={lr:g}: training loss, every seed (x = diverged)",
        )
        ax.legend(fontsize=8)
        ax = axes[1, j]
        names = [p for p in order if any(r["placement"] == p for r in rs)]
        for i, p in enumerate(names):
            ls = values(rs, "capped_mean_loss", placement=p)
            acc = values(rs, "final_test_acc", placement=p)
            ax.scatter([i] * len(ls), ls, color=colours[p], alpha=0.8)
            m, s, _ = mean_std(ls)
            ax.errorbar([i], [m], yerr=[s], color=colours[p], marker="_", ms=20, capsize=6)
            ax.annotate(f"acc {mean_std(acc)[0]:.3f}", (i, m), textcoords="offset points", xytext=(10, 0), fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set(
            ylabel="mean training loss over the run (nats, capped)",
            title="speed: lower is faster (mean ± std, per seed)",
        )
    fig.suptitle(f"C6 placement: {cfg.norm} before the conv / after it (pre-activation) / after the activation")
    return [save_figure(fig, out_dir, "placement")]


EXPERIMENT = register_experiment(
    Experiment(
        name="placement",
        claim="C6",
        title="BatchNorm before the conv, between conv and activation, or after the activation",
        config=PlacementConfig,
        scales={
            "smoke": PlacementConfig(
                seeds=2, dataset="digits", n_train=256, channels=(4, 8), lrs=(0.05,), epochs=1, batch_size=32
            ),
            "quick": PlacementConfig(),
            "full": PlacementConfig(
                seeds=5,
                dataset="cifar10",
                channels=(64, 128, 256),
                lrs=(0.01, 0.05, 0.2, 0.8),
                epochs=30,
                batch_size=128,
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
