"""``saturation`` (C14): BN keeps sigmoid/tanh units in their responsive range, so gradients do not vanish with depth.

Pre-registration
----------------
**Claim** (our words). Normalising the pre-activations keeps saturating
activations (sigmoid, tanh) away from their flat regions, so that fewer units
saturate and the gradient does not vanish as it flows down a deep stack.
**Source**: S2 (the list of what normalisation does, item 2: inputs brought
into a small range make it less likely that the activation sits in its
saturated region, which reduces vanishing gradients; and its section on
saturating non-linearities: a layer whose activation input lies in the flat
region multiplies its weight gradient by a near-zero derivative, and the
deeper the net the smaller the gradient gets); S3 (among the problems of
internal covariate shift: shifting lower-layer inputs push upper layers into
saturation and learning stops early; BN keeps gradients effective). Both
summarise Ioffe & Szegedy 2015, §1.

**Arms**: a 10-hidden-layer MLP (64 units, Glorot init) on digits, with
BatchNorm (``norm=batchnorm``) and without (``norm=none``), for each
activation (sigmoid, tanh). Same seed = same initial weights and batch order
in both arms, so every part is **paired by seed**.

**Deciding parts** (four; each activation has both):

* ``sigmoid-saturation`` and ``tanh-saturation`` -- metric ``saturated``:
  the fraction of pre-activations in the flat region (``phi'(z)/phi'(0) <
  0.05``), averaged over layers and over the probe points (step 1 and the end
  of every epoch). Arm A no norm, arm B BN, direction "greater" (more
  saturated units without BN), linear scale, **δ = 0.01** (one unit in a
  hundred). Why: a practical threshold -- saturation of under 1 % of the
  units closes under 1 % of a layer's gradient paths and cannot be what makes
  a gradient vanish; a difference that small is "no practical difference in
  saturation".
* ``sigmoid-grad-spread`` and ``tanh-grad-spread`` -- metric ``grad_spread``:
  decades between the largest and the smallest layer-gradient norm
  (``log10 max_l |g_l| - log10 min_l |g_l|`` over the 11 Linear layers),
  averaged over the probe points. Arm A BN, arm B no norm, direction "less"
  (steadier gradients across depth with BN), linear scale in decades,
  **δ = 0.5 decades** (a factor √10 ≈ 3). Why: a practical threshold -- with
  one learning rate for every layer, a layer whose gradient is 3x smaller
  learns 3x slower, which matters; a smaller change of the spread is within
  what a choice of learning rate absorbs. A run whose gradient norms are
  never finite (diverged) counts as 10 decades (``missing=10``): more spread
  than any finite run shows.

**Reported parts** (shown, never deciding): ``sigmoid-accuracy`` and
``tanh-accuracy`` -- final test accuracy, BN minus no norm, "greater",
δ = 0.02 (two test digits in a hundred), a diverged run counting as chance
(0.1). They say whether BN helps the task at all here; the claim is about
the mechanism (saturation, gradient flow), not the accuracy.

**Does not hold** if any deciding part does not hold: BN does not lower
saturation by at least 1 % of the units (or raises it), or BN does not narrow
the gradient spread by at least half a decade (or widens it), in either
network. The claim links the two: where gradients vanish without any
saturation (or saturate without vanishing), the verdict's sentence says so.

**Budget** (quick): seeds in rounds of 3, at most 12 (2 activations x 2
norms = 4 runs per seed). Measured runtime: see Design.

Design
------
Deep MLPs (``build_model("mlp")``: ``depth`` hidden layers of ``width``
units, Linear -> norm -> activation, Glorot/Xavier init, the classical
choice for saturating activations) with sigmoid and with tanh, each with
BatchNorm and without any norm, are trained with SGD + momentum 0.9. At step
1 (right after the first update) and after every epoch, two probes look at a
fixed batch of ``probe_examples`` training examples in train mode (BN uses
the batch's statistics, as in training; the probes leave the model as found):

* :func:`normlab.lab.probes.saturation`: per activation layer, the fraction of
  pre-activations ``z`` in the flat region, ``phi'(z) / phi'(0) <
  threshold`` (``threshold = 0.05``: ``|z| > 4.36`` for sigmoid, ``|z| >
  2.18`` for tanh), and the mean relative derivative;
* :func:`normlab.lab.probes.gradient_norms`: ``|grad L|_2`` of each Linear
  layer's weight and bias (the hidden layers and the classifier).

From the stored curves, per run (:func:`measure`): ``saturated`` (the
saturated fraction averaged over layers and checkpoints), ``grad_spread``
(decades, averaged over checkpoints) and ``grad_drift`` (reported in the
numbers only: per layer, the std over checkpoints of ``log10 |g_l|``,
averaged over layers -- how much the norms move in time).

Command: ``normlab run saturation`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU, one thread per run: smoke ~5 s; quick (digits,
10 hidden layers of 64, 8 epochs, 4 runs per seed, 9 probe points each):
decided at the first look (3 seeds) in 16 s of CPU (user + system, measured
with ``/usr/bin/time`` on the shared machine, start-up and figures included),
about 3.5 s per seed, so under 1 min at the full budget of 12 seeds; full
(CIFAR-10 flattened, 20 hidden layers of 256, 30 epochs) is for a GPU.

Expected (Ioffe & Szegedy 2015, §1 and Fig. 1; Glorot & Bengio 2010 for the
saturation of deep sigmoid nets): with BN fewer units saturate and the
gradient norms stay of the same order across layers. A pilot (seed 0, before
this pre-registration) found the no-BN sigmoid net's gradients vanishing by
about five decades across 11 layers with *no* saturated unit at all (its
pre-activations sit in the linear region; the derivative's maximum of 1/4
per layer is enough), while the no-BN tanh net saturated progressively
during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.lab.experiments.framework import (
    Experiment,
    Part,
    Run,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
)
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["SaturationConfig", "EXPERIMENT", "saturated_mean", "grad_spread", "grad_drift", "measure"]

SPREAD_DIVERGED = 10.0  # decades counted for a run whose gradient norms are never finite (a diverged run)
CHANCE = 0.1  # test accuracy counted for a diverged run (10 classes of digits)


@dataclass(frozen=True)
class SaturationConfig:
    """C14 saturation; the module docstring has the pre-registration, the command and the runtimes."""

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per (activation, norm)
    threads: int = 1  # torch threads per run (not part of the run id)
    activations: tuple[str, ...] = ("sigmoid", "tanh")  # saturating activations compared
    norms: tuple[str, ...] = ("batchnorm", "none")  # the first is the normalised net, the last the baseline
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    depth: int = 10  # hidden layers of the MLP
    width: int = 64  # units per hidden layer
    init: str = "xavier"  # weight init of the MLP: "xavier" (Glorot normal), "kaiming" or "torch"
    lr: float = 0.1  # SGD learning rate (momentum 0.9), constant (per unit gradient)
    epochs: int = 8  # passes over the training set
    batch_size: int = 64  # examples per optimizer step
    threshold: float = 0.05  # a unit is saturated when phi'(z) / phi'(0) is below this (dimensionless)
    probe_examples: int = 512  # training examples in the fixed probe batch
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)


def _grid(cfg: SaturationConfig):
    if len(cfg.norms) != 2:
        raise ValueError(f"saturation: norms must name two arms (normalised, baseline), got {cfg.norms}")
    for act in cfg.activations:
        for norm in cfg.norms:
            yield {
                "activation": act,
                "dataset": cfg.dataset,
                "n_train": cfg.n_train,
                "model": "mlp",
                "model_kwargs": {"depth": cfg.depth, "width": cfg.width, "activation": act, "init": cfg.init},
                "norm": norm,
                "optimizer": "sgd",
                "lr": cfg.lr,
                "momentum": 0.9,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "threshold": cfg.threshold,
                "probe_examples": cfg.probe_examples,
            }


def _run_one(run: Run) -> dict[str, Any]:
    import torch.nn.functional as F

    from normlab.lab.probes import gradient_norms, saturation
    from normlab.lab.train import load_data, train

    tc = run.train_config()
    ds = load_data(tc)  # the same data train() loads
    n = min(int(run["probe_examples"]), ds.x_train.shape[0])
    batch = (ds.x_train[:n], ds.y_train[:n])

    rec: dict[str, list] = {"probe_steps": [], "saturated": [], "mean_derivative": [], "grad_norm": []}
    names: dict[str, list[str]] = {}

    def probe(state) -> None:
        if not (state.event == "epoch" or (state.event == "step" and state.step == 1)):
            return
        sat = saturation(state.model, [batch], mode="train", threshold=float(run["threshold"]))
        grads = gradient_norms(state.model, F.cross_entropy, batch, mode="train")
        names.setdefault("act_layers", list(sat))
        names.setdefault("grad_layers", list(grads))
        rec["probe_steps"].append(state.step)
        rec["saturated"].append([s.fraction for s in sat.values()])
        rec["mean_derivative"].append([s.mean_derivative for s in sat.values()])
        rec["grad_norm"].append([float(g) for g in grads.values()])

    result = train(tc, progress=run.progress, callback=probe)
    return {**result.to_metrics(), **rec, **names}


# --------------------------------------------------------------------------- analysis


def saturated_mean(row: dict[str, Any]) -> float:
    """Saturated fraction averaged over activation layers and probe points (NaN checkpoints skipped)."""
    vals = [f for per in row["saturated"] for f in per if math.isfinite(f)]
    return sum(vals) / len(vals) if vals else math.nan


def _log_norms(per: list[float]) -> list[float] | None:
    """log10 of a checkpoint's layer gradient norms; None if any is non-finite (a diverged model)."""
    if not per or not all(math.isfinite(g) for g in per):
        return None
    return [math.log10(max(g, 1e-30)) for g in per]


def grad_spread(row: dict[str, Any]) -> float:
    """Decades between the largest and the smallest layer gradient norm, averaged over probe points."""
    spreads = [max(lg) - min(lg) for lg in map(_log_norms, row["grad_norm"]) if lg is not None]
    return sum(spreads) / len(spreads) if spreads else math.nan


def grad_drift(row: dict[str, Any]) -> float:
    """Std over probe points of log10 |g_l|, averaged over layers (0 with fewer than two probe points)."""
    logs = [lg for lg in map(_log_norms, row["grad_norm"]) if lg is not None]
    if len(logs) < 2:
        return 0.0
    per_layer = [mean_std(col)[1] for col in zip(*logs)]
    return sum(per_layer) / len(per_layer)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def measure(rows: list[dict[str, Any]], cfg: SaturationConfig) -> list[dict[str, Any]]:
    """One row per run: its activation, norm and seed with ``saturated``, ``grad_spread``, ``grad_drift``, ``test_acc``.

    Non-finite values become None (the parts count them as declared: a diverged run's accuracy as chance, its
    spread as :data:`SPREAD_DIVERGED` decades); a diverged run's test accuracy is None whatever it evaluated to.
    """
    out = []
    for r in rows:
        acc = r.get("final_test_acc")
        ok = isinstance(acc, (int, float)) and math.isfinite(acc) and not r.get("diverged")
        out.append(
            {
                "activation": r["activation"],
                "norm": r["norm"],
                "seed": int(r["seed"]),
                "saturated": _finite_or_none(saturated_mean(r)),
                "grad_spread": _finite_or_none(grad_spread(r)),
                "grad_drift": _finite_or_none(grad_drift(r)),
                "test_acc": float(acc) if ok else None,
                "diverged": bool(r.get("diverged")),
            }
        )
    return out


def _parts(cfg: SaturationConfig) -> list[Part]:
    bn, none = cfg.norms[0], cfg.norms[-1]
    parts = []
    for act in cfg.activations:
        sel = lambda norm, act=act: {"activation": act, "norm": norm}  # noqa: E731
        parts += [
            Part(
                name=f"{act}-saturation",
                says=f"{act}: more units saturate without BN than with it",
                metric="saturated",
                a=sel(none),
                b=sel(bn),
                direction="greater",
                margin=0.01,
                why="practical threshold: under 1 % of the units saturated cannot make a layer's gradient vanish",
                unit="fraction of units",
                label_a=f"{act}, {none}",
                label_b=f"{act}, {bn}",
            ),
            Part(
                name=f"{act}-grad-spread",
                says=f"{act}: layer gradient norms span fewer decades with BN than without",
                metric="grad_spread",
                a=sel(bn),
                b=sel(none),
                direction="less",
                margin=0.5,
                why="practical threshold: a 3x (half a decade) slower layer matters; less is absorbed by the lr choice",
                missing=SPREAD_DIVERGED,
                unit="decades",
                label_a=f"{act}, {bn}",
                label_b=f"{act}, {none}",
            ),
            Part(
                name=f"{act}-accuracy",
                says=f"{act}: BN reaches a higher test accuracy than no norm (reported)",
                metric="test_acc",
                a=sel(bn),
                b=sel(none),
                direction="greater",
                margin=0.02,
                why="two test digits in a hundred: a smaller difference is not worth a sentence",
                missing=CHANCE,
                decides=False,
                unit="accuracy",
                label_a=f"{act}, {bn}",
                label_b=f"{act}, {none}",
            ),
        ]
    return parts


def _mean(rows: list[dict[str, Any]], metric: str, **where: Any) -> float:
    xs = [r[metric] for r in rows if all(r.get(k) == v for k, v in where.items()) and r[metric] is not None]
    return mean_std(xs)[0] if xs else math.nan


def _explain(rows: list[dict[str, Any]], cfg: SaturationConfig, judgement: Judgement) -> tuple[str, dict[str, Any]]:
    """The finding per activation: whether vanishing gradients and saturation go together, with the numbers."""
    seeds = judgement.seeds
    per = [r for r in measure(rows, cfg) if r["seed"] < seeds]
    bn, none = cfg.norms[0], cfg.norms[-1]
    numbers: dict[str, Any] = {}
    sentences = []
    for act in cfg.activations:
        m = {
            norm: {k: _mean(per, k, activation=act, norm=norm) for k in ("saturated", "grad_spread", "grad_drift")}
            | {"test_acc": _mean(per, "test_acc", activation=act, norm=norm)}
            for norm in (bn, none)
        }
        numbers[act] = m
        few_saturated = m[none]["saturated"] < 0.01
        vanishes = m[none]["grad_spread"] - m[bn]["grad_spread"] >= 0.5
        text = (
            f"{act}: without BN {m[none]['saturated']:.2g} of the units saturate (with BN {m[bn]['saturated']:.2g}), "
            f"layer gradients span {m[none]['grad_spread']:.2f} decades (with BN {m[bn]['grad_spread']:.2f}) "
            f"and test accuracy is {m[none]['test_acc']:.2f} (with BN {m[bn]['test_acc']:.2f})"
        )
        if few_saturated and vanishes:
            text += (
                " -- the gradient vanishes without saturation: pre-activations stay in the sigmoid's linear "
                "range, and its slope of at most 1/4 per layer is enough to shrink the gradient layer by layer"
                if act == "sigmoid"
                else " -- the gradient vanishes without saturation"
            )
        elif not few_saturated and not vanishes:
            text += " -- units saturate without BN, yet the gradient does not vanish across the depth"
        sentences.append(text)
    return "; ".join(sentences) + ".", numbers


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: SaturationConfig) -> list[Path]:
    import numpy as np

    plt = pyplot()
    acts = [a for a in cfg.activations if any(r["activation"] == a for r in rows)]
    norms = [cfg.norms[0], cfg.norms[-1]]
    fig, axes = plt.subplots(len(acts), 3, figsize=(15, 3.8 * len(acts)), squeeze=False)
    for i, act in enumerate(acts):
        ax_sat, ax_time, ax_layer = axes[i]
        for j, norm in enumerate(norms):
            rs = [r for r in rows if r["activation"] == act and r["norm"] == norm]
            if not rs:
                continue
            colour = f"C{j}"
            for k, r in enumerate(rs):
                steps = r["probe_steps"]
                ax_sat.plot(
                    steps,
                    [np.mean(p) for p in r["saturated"]],
                    color=colour,
                    marker=".",
                    alpha=0.7,
                    label=norm if k == 0 else None,
                )
                g = np.array(r["grad_norm"], dtype=float)  # (checkpoints, layers)
                if g.size:
                    ax_time.plot(
                        steps,
                        g[:, 0],
                        color=colour,
                        ls="-",
                        alpha=0.7,
                        label=f"{norm}: first layer" if k == 0 else None,
                    )
                    ax_time.plot(
                        steps,
                        g[:, -2] if g.shape[1] > 1 else g[:, -1],
                        color=colour,
                        ls="--",
                        alpha=0.7,
                        label=f"{norm}: last hidden layer" if k == 0 else None,
                    )
            # per-layer gradient norm at the last probe point, mean over seeds
            last = np.array([r["grad_norm"][-1] for r in rs if r["grad_norm"]], dtype=float)
            if last.size:
                layers = np.arange(1, last.shape[1] + 1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    lg = np.log10(np.maximum(last, 1e-30))
                ax_layer.errorbar(layers, 10 ** lg.mean(0), yerr=None, color=colour, marker="o", label=f"{norm} (end)")
                first = np.array([r["grad_norm"][0] for r in rs if r["grad_norm"]], dtype=float)
                geo_first = 10 ** np.log10(np.maximum(first, 1e-30)).mean(0)
                ax_layer.plot(layers, geo_first, color=colour, ls=":", marker="x", label=f"{norm} (step 1)")
        ax_sat.set(xlabel="optimizer step", ylabel="saturated fraction (all layers)", title=f"{act}: saturated units")
        ax_time.set(
            xlabel="optimizer step", ylabel="|grad| of layer (L2)", yscale="log", title=f"{act}: gradient norms in time"
        )
        ax_layer.set(
            xlabel="Linear layer (1 = first, last = classifier)",
            ylabel="|grad| (L2, geometric mean over seeds)",
            yscale="log",
            title=f"{act}: gradient norm per layer",
        )
        for ax in (ax_sat, ax_time, ax_layer):
            ax.legend(fontsize=7)
    fig.suptitle(
        f"C14 saturation: {cfg.depth}-hidden-layer MLPs on {cfg.dataset}, with and without BN "
        f"(saturated: φ'(z)/φ'(0) < {cfg.threshold:g})"
    )
    fig.tight_layout()
    return [save_figure(fig, out_dir, "saturation")]


EXPERIMENT = register_experiment(
    Experiment(
        name="saturation",
        claim="C14",
        title="BN keeps sigmoid/tanh units out of saturation so gradients do not vanish in deep stacks",
        config=SaturationConfig,
        scales={
            "smoke": SaturationConfig(
                seeds=2, max_seeds=2, depth=4, width=16, epochs=1, n_train=256, probe_examples=64
            ),
            "quick": SaturationConfig(),
            "full": SaturationConfig(
                seeds=5, max_seeds=20, dataset="cifar10", depth=20, width=256, epochs=30, batch_size=128, lr=0.05
            ),
        },
        grid=_grid,
        run_one=_run_one,
        parts=_parts,
        measure=measure,
        explain=_explain,
        plot=_plot,
        description=__doc__ or "",
    )
)
