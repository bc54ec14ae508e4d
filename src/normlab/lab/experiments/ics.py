"""``ics`` (C15): does BN work by reducing internal covariate shift? Santurkar et al. (2018)'s two tests.

A deep ReLU MLP (``build_model("mlp")``: ``depth`` hidden layers of ``width``
units, Linear -> norm -> ReLU, He init) is trained with SGD + momentum 0.9 in
these *arms*: no norm, BatchNorm, and *noisy BN* (``"noisybatchnorm"``,
:class:`normlab.layers.noisy.NoisyBatchNorm`) at each noise strength ``k``
in ``noise_strengths``. Noisy BN standardises like BN, then per step and per
channel draws a shift ``mu_c ~ U(0, 2 k m)`` and a scale ``sigma_c ~ U(0, 2 k
s)`` (``m = noise_mean``, ``s = noise_std``) and gives every element
multiplicative and additive Gaussian noise of that scale plus the shift:
deliberate, time-varying, non-zero-mean, non-unit-variance distributional
shift after every BN layer (its output has mean ``k m`` and variance
``1 + (8/3) k^2 s^2 + (1/3) k^2 m^2``; eval mode is plain BN).

1. **Training curves** of every arm: per-step loss, per-epoch accuracy on the
   batches as trained (train mode: noisy BN with its noise) and on the test
   set (eval mode).
2. **ICS in the gradient sense** (:func:`normlab.lab.probes.internal_covariate_shift`),
   at step 1 and after every epoch, on a fixed batch of ``probe_examples``
   training examples in train mode, with the run's own optimizer (momentum
   state included): for each Linear layer, ``G`` = its gradient, ``G'`` = its
   gradient after every preceding layer (BN scale/shift included) has taken
   the optimizer's next step on the same batch; ``|G − G'|``, ``|G − G'| /
   |G|`` and ``cos(G, G')``. The first layer (nothing precedes it, ``G' = G``)
   is left out of the averages.
3. **Distributional shift** (reported, not judged), the classical sense of
   ICS: at the same probe points, how far each Linear layer's input moves in
   one optimizer step on the same fixed batch
   (:func:`normlab.lab.probes.input_moments`, :func:`normlab.lab.probes.distribution_shift`):
   the RMS over features of the change of the input mean in units of its
   standard deviation, and of the change of log variance. For noisy BN it
   includes the redrawn noise -- the check that the injected shift is large.

Verdict rule (:func:`~normlab.lab.experiments.framework.combine` of two parts):

* *noisy BN trains about as well as BN*, judged at the strongest noise in
  ``noise_strengths`` (the layer's default, ``k = 1``, in every scale): the
  per-seed differences (paired by seed) of the final epoch's training
  accuracy as trained (train mode, the noise on) ``noisy BN − BN`` with
  ``threshold(..., −match_tol, "greater")``: holds when the whole mean ± std
  interval lies above ``−match_tol``, does not hold when it lies wholly
  below, else inconclusive. Test accuracies and the weaker noise levels are
  reported, not judged;
* *ICS is not lower with BN*: per run, ``cos(G, G')`` averaged over layers
  (all but the first) and probe points; the per-seed differences ``BN −
  none`` with ``threshold(..., ics_tol, "less")``: holds when the whole
  interval lies below ``ics_tol`` (BN's gradients keep their direction no
  better than without BN, up to ``ics_tol``), does not hold when it lies
  wholly above (BN clearly reduces ICS: the classical explanation), else
  inconclusive.

The summary also gives no-norm's accuracy (whether BN helps here at all) and
the mean relative ``|G − G'| / |G|`` of each arm.

Command: ``normlab run ics`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU, one thread per run: smoke ~5 s; quick (digits,
8 hidden layers of 64, 8 epochs, 5 arms x 3 seeds = 15 runs, 9 ICS probes of
9 gradients each per run) ~20 s measured (17 s wall, 15 s user CPU); full (CIFAR-10 flattened, 25
hidden layers like Santurkar's deep linear network but with ReLU, 30 epochs,
5 seeds) is for a GPU.

Expected (Santurkar et al. 2018, Fig. 2 and Fig. 5; VGG on CIFAR-10 and a
25-layer deep linear network): noisy BN trains about as well as BN, and
both better than no BN; with BN, ``|G − G'|`` is as large or larger and
``cos(G, G')`` as small or smaller as without: BN does not reduce ICS in
this sense. (The paper's exact noise distribution is not reproduced; the
strength grid shows how the result depends on it.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.lab.experiments.framework import (
    Experiment,
    Run,
    Verdict,
    combine,
    fmt_mean_std,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
    threshold,
)

__all__ = ["ICSConfig", "EXPERIMENT", "ics_mean", "shift_mean", "arm"]

_LABELS = {"none": "no norm", "batchnorm": "BN", "noisybatchnorm": "noisy BN"}


@dataclass(frozen=True)
class ICSConfig:
    """C15 ics; see the module docstring for the command, runtimes, the verdict rule and the expected result."""

    seeds: int = 3  # seeds per arm
    norms: tuple[str, ...] = ("none", "batchnorm", "noisybatchnorm")  # must include "none" and "batchnorm"
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    depth: int = 8  # hidden layers of the MLP
    width: int = 64  # units per hidden layer
    lr: float = 0.05  # SGD learning rate (momentum 0.9), constant (per unit gradient)
    epochs: int = 8  # passes over the training set
    batch_size: int = 64  # examples per optimizer step
    noise_mean: float = 0.5  # noisy BN: m, the shift's scale (per-step shift per channel ~ U(0, 2 k m))
    noise_std: float = 0.5  # noisy BN: s, the noise std's scale (per-step std per channel ~ U(0, 2 k s))
    noise_strengths: tuple[float, ...] = (0.25, 0.5, 1.0)  # noisy BN: k values, one arm each; verdict at the largest
    probe_examples: int = 256  # training examples in the fixed ICS probe batch
    match_tol: float = 0.02  # training accuracy (fraction) by which noisy BN may trail BN and count as "about as well"
    ics_tol: float = 0.05  # cos(G, G') by which BN may exceed no norm and still count as "not lower ICS"
    threads: int = 1  # torch threads per run
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)


def arm(row: dict[str, Any]) -> str:
    """The arm of a run: its norm, with the noise strength for noisy BN (``"noisybatchnorm k=1"``)."""
    k = row.get("noise_strength")
    return row["norm"] if k is None else f"{row['norm']} k={k:g}"


def _label(a: str) -> str:
    norm, _, k = a.partition(" ")
    return _LABELS.get(norm, norm) + (f" {k}" if k else "")


def _grid(cfg: ICSConfig):
    missing = {"none", "batchnorm"} - set(cfg.norms)
    if missing:
        raise ValueError(f"ics: norms must include {sorted(missing)} (the two sides of the ICS comparison)")
    if "noisybatchnorm" in cfg.norms and not cfg.noise_strengths:
        raise ValueError("ics: noise_strengths is empty; give at least one k for noisy BN")
    for norm in cfg.norms:
        for k in cfg.noise_strengths if norm == "noisybatchnorm" else (None,):
            yield {
                "dataset": cfg.dataset,
                "n_train": cfg.n_train,
                "model": "mlp",
                "model_kwargs": {"depth": cfg.depth, "width": cfg.width, "activation": "relu", "init": "kaiming"},
                "norm": norm,
                "noise_strength": k,
                "norm_kwargs": {}
                if k is None
                else {"noise_mean": cfg.noise_mean, "noise_std": cfg.noise_std, "strength": k},
                "optimizer": "sgd",
                "lr": cfg.lr,
                "momentum": 0.9,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "probe_examples": cfg.probe_examples,
                "threads": cfg.threads,
            }


def _run_one(run: Run) -> dict[str, Any]:
    import torch.nn.functional as F

    from normlab.lab.probes import distribution_shift, input_moments, internal_covariate_shift
    from normlab.lab.train import load_data, train

    tc = run.train_config()
    ds = load_data(tc)  # the same data train() loads
    n = min(int(run["probe_examples"]), ds.x_train.shape[0])
    batch = (ds.x_train[:n], ds.y_train[:n])

    rec: dict[str, list] = {
        "probe_steps": [],
        "ics_l2": [],
        "ics_relative": [],
        "ics_cosine": [],
        "ics_preceding": [],
        "shift_steps": [],
        "shift_mean": [],
        "shift_log_var": [],
    }
    names: dict[str, list[str]] = {}
    pending: dict[str, Any] = {}  # layer-input moments at a probe point, compared one step later

    def probe(state) -> None:
        if state.event == "step" and "moments" in pending and state.step == pending["step"] + 1:
            # distributional shift: how far each Linear layer's input moved in one optimizer step (same batch)
            shift = distribution_shift(pending.pop("moments"), input_moments(state.model, [batch], mode="train"))
            names.setdefault("shift_layers", list(shift))
            rec["shift_steps"].append(pending["step"])
            rec["shift_mean"].append([v["std_mean_shift"] for v in shift.values()])
            rec["shift_log_var"].append([v["log_var_shift"] for v in shift.values()])
        if not (state.event == "epoch" or (state.event == "step" and state.step == 1)):
            return
        layers = internal_covariate_shift(state.model, F.cross_entropy, batch, optimizer=state.optimizer, mode="train")
        names.setdefault("ics_layers", [x.name for x in layers])
        rec["probe_steps"].append(state.step)
        rec["ics_l2"].append([x.l2 for x in layers])
        rec["ics_relative"].append([x.relative for x in layers])
        rec["ics_cosine"].append([x.cosine for x in layers])
        rec["ics_preceding"].append([x.preceding for x in layers])
        pending.update(step=state.step, moments=input_moments(state.model, [batch], mode="train"))

    result = train(tc, progress=run.progress, callback=probe)
    return {**result.to_metrics(), **rec, **names}


# --------------------------------------------------------------------------- analysis


def ics_mean(row: dict[str, Any], key: str = "ics_cosine") -> float:
    """``key`` ("ics_cosine", "ics_l2" or "ics_relative") averaged over layers with a preceding layer and probe points.

    Layers nothing precedes (``G' = G``) and non-finite values (a zero gradient, a diverged model) are skipped.
    """
    vals = [
        v
        for per, pre in zip(row[key], row["ics_preceding"])
        for v, p in zip(per, pre)
        if p > 0 and v is not None and math.isfinite(v)
    ]
    return sum(vals) / len(vals) if vals else math.nan


def shift_mean(row: dict[str, Any], key: str = "shift_mean") -> float:
    """``key`` ("shift_mean": RMS over features of the input-mean change in units of the earlier std; "shift_log_var":
    RMS of the change of log variance) averaged over Linear layers but the first (its input, the data, does not
    move) and probe points; NaN when not measured."""
    vals = [v for per in row.get(key, []) for v in per[1:] if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _per_seed(rows, a: str, fn) -> dict[int, float]:
    return {r["seed"]: fn(r) for r in rows if arm(r) == a}


def _paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    return [a[s] - b[s] for s in sorted(a) if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]


def _stat(xs) -> dict[str, float]:
    xs = [x for x in xs if math.isfinite(x)]
    return dict(zip(("mean", "std", "n"), mean_std(xs))) if xs else {"mean": math.nan, "std": math.nan, "n": 0}


def _arms(rows) -> list[str]:
    """The arms present, in order: none, BN, then noisy BN by increasing strength (then anything else)."""
    found = {arm(r): (r["norm"], r.get("noise_strength")) for r in rows}
    order = {"none": 0, "batchnorm": 1, "noisybatchnorm": 2}
    return sorted(found, key=lambda a: (order.get(found[a][0], 3), found[a][1] or 0.0, a))


def _analyse(rows: list[dict[str, Any]], cfg: ICSConfig) -> Verdict:
    arms = _arms(rows)
    for need in ("none", "batchnorm"):
        if need not in arms:
            raise ValueError(f"ics: no {need!r} runs; the verdict compares BN with no norm")
    train_acc = {a: _per_seed(rows, a, lambda r: float(r["final_train_acc"])) for a in arms}
    test_acc = {a: _per_seed(rows, a, lambda r: float(r["final_test_acc"])) for a in arms}
    cos = {a: _per_seed(rows, a, ics_mean) for a in arms}
    rel = {a: _per_seed(rows, a, lambda r: ics_mean(r, "ics_relative")) for a in arms}
    l2 = {a: _per_seed(rows, a, lambda r: ics_mean(r, "ics_l2")) for a in arms}
    dshift = {a: _per_seed(rows, a, shift_mean) for a in arms}
    dvar = {a: _per_seed(rows, a, lambda r: shift_mean(r, "shift_log_var")) for a in arms}

    parts: dict[str, Verdict] = {}
    noisy = [r for r in rows if r["norm"] == "noisybatchnorm" and r.get("noise_strength") is not None]
    if noisy:
        k = max(r["noise_strength"] for r in noisy)
        strongest = arm({"norm": "noisybatchnorm", "noise_strength": k})
        parts["noisy BN ≈ BN"] = threshold(
            _paired(train_acc[strongest], train_acc["batchnorm"]),
            -cfg.match_tol,
            "greater",
            name=f"noisy BN (k={k:g}) − BN training acc",
        )
    parts["ICS not lower with BN"] = threshold(
        _paired(cos["batchnorm"], cos["none"]), cfg.ics_tol, "less", name="BN − none cos(G, G')"
    )
    verdict = combine(parts)

    numbers = dict(verdict.numbers)
    tables = {
        "train_acc": train_acc,
        "test_acc": test_acc,
        "ics_cosine": cos,
        "ics_relative": rel,
        "ics_l2": l2,
        "input_mean_shift": dshift,
        "input_log_var_shift": dvar,
    }
    for key, table in tables.items():
        numbers[key] = {a: _stat(table[a].values()) for a in arms}

    def ms(xs) -> str:
        xs = [x for x in xs if math.isfinite(x)]
        return fmt_mean_std(xs, 2) if xs else "n/a"

    text = [
        "training acc (as trained) " + ", ".join(f"{_label(a)} {ms(train_acc[a].values())}" for a in arms),
        "test acc " + ", ".join(f"{_label(a)} {ms(test_acc[a].values())}" for a in arms),
        "cos(G,G') " + ", ".join(f"{_label(a)} {ms(cos[a].values())}" for a in arms),
        "|G−G'|/|G| " + ", ".join(f"{_label(a)} {ms(rel[a].values())}" for a in arms),
        "layer-input mean shift per step (std units) "
        + ", ".join(f"{_label(a)} {ms(dshift[a].values())}" for a in arms),
        "; ".join(f"{k}: {v.status}" for k, v in parts.items()),
    ]
    return Verdict(verdict.status, " | ".join(text), numbers)


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: ICSConfig) -> list[Path]:
    import numpy as np

    plt = pyplot()
    arms = _arms(rows)
    fig, axes = plt.subplots(2, 3, figsize=(19, 9))
    (ax_loss, ax_acc, ax_dm), (ax_cos, ax_rel, ax_dv) = axes
    for i, a in enumerate(arms):
        colour, label = f"C{i}", _label(a)
        rs = [r for r in rows if arm(r) == a]
        for k, r in enumerate(rs):
            loss = np.array([v if math.isfinite(v) else np.nan for v in r["step_loss"]], dtype=float)
            w = max(1, min(20, len(loss) // 10))
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid") if len(loss) >= w else loss
            ax_loss.plot(
                np.arange(len(smooth)) + w - 1, smooth, color=colour, lw=0.9, alpha=0.7, label=label if k == 0 else None
            )
            ep = r["per_epoch"]  # the per-epoch records (metrics.json)
            x = [e["epoch"] + 1 for e in ep]
            ax_acc.plot(
                x,
                [e["train_acc"] for e in ep],
                color=colour,
                ls="-",
                alpha=0.7,
                label=f"{label}: training (as trained)" if k == 0 else None,
            )
            ax_acc.plot(
                x,
                [e["test_acc"] for e in ep],
                color=colour,
                ls=":",
                marker=".",
                alpha=0.7,
                label=f"{label}: test (eval mode)" if k == 0 else None,
            )
        # per-layer ICS, averaged over probe points then seeds (the first layer, with G' = G, left out)
        panels = ((ax_cos, "ics_cosine"), (ax_rel, "ics_relative"), (ax_dm, "shift_mean"), (ax_dv, "shift_log_var"))
        for ax, key in panels:
            per_run = []
            for r in rs:
                arr = np.array(r.get(key, []), dtype=float)  # (probe points, layers)
                if arr.ndim != 2 or arr.shape[1] < 2:
                    continue
                per_run.append(arr[:, 1:])  # the first layer: G' = G, and its input (the data) does not move
            if per_run:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (zero gradients) stay NaN
                    means = np.array([np.nanmean(m, axis=0) for m in per_run])  # (runs, layers - 1)
                    layers = np.arange(2, means.shape[1] + 2)
                    ax.errorbar(
                        layers,
                        np.nanmean(means, 0),
                        yerr=np.nanstd(means, 0),
                        color=colour,
                        marker="o",
                        capsize=3,
                        label=label,
                    )
    ax_loss.set(
        xlabel="optimizer step",
        ylabel="training loss (nats, running mean)",
        yscale="log",
        title="training curves (every seed)",
    )
    ax_acc.set(xlabel="epoch", ylabel="accuracy (fraction)", title="accuracy per epoch (every seed)")
    ax_cos.set(
        xlabel="Linear layer (2 = second, last = classifier)",
        ylabel="cos(G, G')",
        title="ICS: gradient direction kept after earlier layers step (higher = less ICS)",
    )
    ax_rel.set(
        xlabel="Linear layer (2 = second, last = classifier)",
        ylabel="|G − G'| / |G|",
        yscale="log",
        title="ICS: relative gradient change (lower = less ICS)",
    )
    ax_dm.set(
        xlabel="Linear layer (2 = second, last = classifier)",
        ylabel="RMS of Δ(input mean) / std",
        yscale="log",
        title="distributional shift: layer-input mean change per step",
    )
    ax_dv.set(
        xlabel="Linear layer (2 = second, last = classifier)",
        ylabel="RMS of Δ log(input variance)",
        yscale="log",
        title="distributional shift: layer-input variance change per step",
    )
    for ax in (ax_cos, ax_rel, ax_dm, ax_dv):
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle(
        f"C15 ics: {cfg.depth}-hidden-layer ReLU MLP on {cfg.dataset}; none / BN / noisy BN "
        f"(noise m={cfg.noise_mean:g}, s={cfg.noise_std:g}, strength k)"
    )
    fig.tight_layout()
    return [save_figure(fig, out_dir, "ics")]


EXPERIMENT = register_experiment(
    Experiment(
        name="ics",
        claim="C15",
        title="BN's benefit survives injected distributional shift, and BN does not reduce internal covariate shift",
        config=ICSConfig,
        scales={
            "smoke": ICSConfig(
                seeds=2, depth=3, width=16, epochs=1, n_train=256, probe_examples=64, noise_strengths=(0.5, 1.0)
            ),
            "quick": ICSConfig(),
            "full": ICSConfig(seeds=5, dataset="cifar10", depth=25, width=256, epochs=30, batch_size=128, lr=0.02),
        },
        grid=_grid,
        run_one=_run_one,
        analyse=_analyse,
        plot=_plot,
        description=__doc__ or "",
    )
)
