"""``saturation`` (C14): BN keeps sigmoid/tanh units in their responsive range, so gradients do not vanish with depth.

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

From the stored curves, per run:

* ``saturated``: the saturated fraction averaged over layers and checkpoints;
* ``grad spread``: ``log10(max_l |g_l| / min_l |g_l|)`` over the Linear
  layers, averaged over checkpoints (decades between the largest and smallest
  layer gradient: large when gradients vanish, or explode, along the depth);
* ``grad drift`` (reported only): per layer, the std over checkpoints of
  ``log10 |g_l|``, averaged over layers (how much the norms move in time).

Verdict rule, per activation (then :func:`~normlab.lab.experiments.framework.combine`
over the activations and the two parts): (1) ``compare(none, batchnorm,
"greater")`` on ``saturated`` -- fewer saturated units with BN; (2)
``compare(batchnorm, none, "less")`` on ``grad spread`` -- steadier gradient
norms across depth with BN. Intervals are mean ± 1 std over seeds; overlap
(e.g. both nets with no saturated units at all) is inconclusive. Final test
accuracies are reported, not judged.

Command: ``normlab run saturation`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU, one thread per run: smoke ~5 s; quick (digits,
10 hidden layers of 64, 8 epochs, 2 activations x 2 norms x 3 seeds = 12
runs, 9 probe points each) ~20 s measured (19 s wall, 12 s user CPU); full (CIFAR-10 flattened, 20 hidden
layers of 256, 30 epochs, 5 seeds) is for a GPU, tens of minutes there.

Expected (Ioffe & Szegedy 2015, §1 and Fig. 1; Glorot & Bengio 2010 for the
saturation of deep sigmoid nets): with BN fewer units saturate and the
gradient norms stay of the same order across layers and through training;
without BN deep sigmoid/tanh stacks saturate and their early layers' gradients
vanish. A pilot (seed 0) found the no-BN sigmoid net's gradients vanishing by
about five decades across 11 layers with *no* saturated unit at all (its
pre-activations sit in the linear region; the derivative's maximum of 1/4 per
layer is enough), while the no-BN tanh net saturated progressively during
training.
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
)

__all__ = ["SaturationConfig", "EXPERIMENT", "saturated_mean", "grad_spread", "grad_drift"]


@dataclass(frozen=True)
class SaturationConfig:
    """C14 saturation; see the module docstring for the command, runtimes, the verdict rule and the expected result."""

    seeds: int = 3  # seeds per (activation, norm)
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
    threads: int = 1  # torch threads per run
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)


def _grid(cfg: SaturationConfig):
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
                "threads": cfg.threads,
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


def _by(rows, act: str, norm: str, fn) -> list[float]:
    out = [fn(r) for r in rows if r["activation"] == act and r["norm"] == norm]
    return [v for v in out if math.isfinite(v)]


def _analyse(rows: list[dict[str, Any]], cfg: SaturationConfig) -> Verdict:
    norm_bn, norm_none = cfg.norms[0], cfg.norms[-1]
    acts = [a for a in cfg.activations if any(r["activation"] == a for r in rows)]
    parts: dict[str, Verdict] = {}
    numbers: dict[str, Any] = {}
    text = []
    for act in acts:
        sat = {n: _by(rows, act, n, saturated_mean) for n in (norm_bn, norm_none)}
        spr = {n: _by(rows, act, n, grad_spread) for n in (norm_bn, norm_none)}
        parts[f"{act} saturated"] = compare(
            sat[norm_none],
            sat[norm_bn],
            "greater",
            name_a=norm_none,
            name_b=norm_bn,
            metric=f"{act} saturated fraction",
        )
        parts[f"{act} grad spread"] = compare(
            spr[norm_bn],
            spr[norm_none],
            "less",
            name_a=norm_bn,
            name_b=norm_none,
            metric=f"{act} grad spread (decades)",
        )
        acc = {n: _by(rows, act, n, lambda r: float(r["final_test_acc"])) for n in (norm_bn, norm_none)}
        drift = {n: _by(rows, act, n, grad_drift) for n in (norm_bn, norm_none)}
        numbers[act] = {
            "test_acc": {n: dict(zip(("mean", "std", "n"), mean_std(v))) for n, v in acc.items() if v},
            "grad_drift": {n: dict(zip(("mean", "std", "n"), mean_std(v))) for n, v in drift.items() if v},
        }
        text.append(
            f"{act}: saturated {norm_bn} {fmt_mean_std(sat[norm_bn], 2)} vs "
            f"{norm_none} {fmt_mean_std(sat[norm_none], 2)} "
            f"[{parts[f'{act} saturated'].status}], grad spread {norm_bn} {fmt_mean_std(spr[norm_bn], 2)} vs "
            f"{norm_none} {fmt_mean_std(spr[norm_none], 2)} decades [{parts[f'{act} grad spread'].status}], "
            f"grad drift in time {norm_bn} {fmt_mean_std(drift[norm_bn], 2) if drift[norm_bn] else 'n/a'} vs "
            f"{norm_none} {fmt_mean_std(drift[norm_none], 2) if drift[norm_none] else 'n/a'} decades (not judged), "
            f"test acc {norm_bn} {fmt_mean_std(acc[norm_bn], 2)} vs {norm_none} {fmt_mean_std(acc[norm_none], 2)}"
        )
    verdict = combine(parts)
    return Verdict(verdict.status, " | ".join(text), {**verdict.numbers, **numbers})


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
            "smoke": SaturationConfig(seeds=2, depth=4, width=16, epochs=1, n_train=256, probe_examples=64),
            "quick": SaturationConfig(),
            "full": SaturationConfig(
                seeds=5, dataset="cifar10", depth=20, width=256, epochs=30, batch_size=128, lr=0.05
            ),
        },
        grid=_grid,
        run_one=_run_one,
        analyse=_analyse,
        plot=_plot,
        description=__doc__ or "",
    )
)
