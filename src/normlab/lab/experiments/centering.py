"""C5 ``centering``: what subtracting the mean and dividing by the std each do to a layer.

The claim (CLAIMS.md C5, after Santurkar et al. 2018 §4): (1) subtracting
the mean minimises the layer input's second-moment term ``|E[x x^T]|_1``,
which bounds the Lipschitz constant of the gradient with respect to that
layer's weights; (2) dividing by the std acts like a per-layer adaptive
learning rate, which evens out how fast the layers move.

What runs
---------
For each norm in ``norms`` and seed, an MLP (``depth`` hidden layers of
``width`` units, He-initialised, Linear -> norm -> ReLU) is trained on digits
with SGD + momentum for ``steps`` steps.

* **Update-to-weight ratios.** After every optimizer step the callback of
  :func:`normlab.lab.train.train` records, for every weight layer that feeds a
  norm (every Linear but the classifier), ``|W_t - W_{t-1}| / |W_{t-1}|``
  (Frobenius norms; from step 2 on). Each layer's typical update rate is the
  mean over steps of ``log10`` of its ratio; a run's *spread* is the standard
  deviation of these over the layers (the per-step spread, its mean over
  steps, is stored too and comes out nearly the same). "Division by the std" is isolated by
  comparing BatchNorm (centre and divide) with **mean-only BatchNorm**
  (centre only: ``y = gamma (x - E_B[x]) + beta``, the batch mean in training
  and a running mean in eval, same affine parameters, no division).
  normlab registers no such norm, so :class:`MeanOnlyBatchNorm` is defined
  here and registered as ``"meanonlybatchnorm"`` when a run needs it.
* **Second-moment term.** After training (networks without norm and with BN),
  :func:`normlab.lab.probes.layer_input_stats` (eval mode: the trained function,
  running statistics for BN) collects the input moments of every Linear layer
  over the whole training set and gives ``|E[x x^T]|_1`` (no centring) and
  ``|Cov x|_1 = |E[(x - E x)(x - E x)^T]|_1`` (centring), with the Frobenius
  and spectral norms beside them, and
  :meth:`~normlab.lab.probes.LayerInputStats.optimal_shift` searches numerically
  for the shift ``s`` minimising ``|E[(x - s)(x - s)^T]|_1``.

Note from the probe's engineer: for the Frobenius and spectral norms and the
trace, centring is provably optimal (``Cov`` is PSD, so ``E[(x-s)(x-s)^T] >=
Cov``); for the *entrywise L1* norm of the claim it is not always so — with
negatively correlated features a shift away from the mean can lower it, and
the minimiser need not be unique. The probe therefore reports the ``gap``
``|Cov|_1 - min_s |E[(x - s)(x - s)^T]|_1`` (0 when centring is optimal); the
experiment judges "the optimum is at the mean" by that gap, not by the
distance of the shift found from ``E[x]``.

The verdict (rule)
------------------
Four parts (part 1 once per network), each over seeds (mean ± 1 std, base.py helpers), combined with
:func:`~normlab.lab.experiments.framework.combine` (holds if all hold, does not hold if
any does not):

1. *centring lowers the term* in the network without BN and in the network
   with BN: per seed, the mean over layers of ``log10(|Cov|_1 / |E[x x^T]|_1)``
   is below 0 (:func:`~normlab.lab.experiments.framework.threshold`, "less");
2. *the mean is the minimiser*: per seed, the largest relative gap over the
   layers of both networks, ``gap / |Cov|_1``, is below ``gap_tolerance``
   (1 %: a shift that lowers the bound by less than that does not change the
   picture; fixed before any run);
3. *division evens out the update ratios*: the spread across layers is
   smaller with BatchNorm than with mean-only BatchNorm
   (:func:`~normlab.lab.experiments.framework.compare`, "less"). The network without
   norm is shown for reference.

Command: ``normlab run centering`` (quick). Measured runtime on the 2-core
CPU, one thread per run: smoke ~10 s, quick 50 s (9 runs; ~3 min when the
machine was shared, load ~9; most of it is the optimal-shift search). ``full``: the
same measurements on a VGG-like CNN on CIFAR-10 (conv inputs read as
channels x positions), 5 seeds, estimated ~1 GPU-hour; not run here. Expected: centring
lowers ``|E[x x^T]|_1`` sharply after ReLU (non-negative inputs with a large
mean); BN's per-layer update ratios lie closer together than mean-only BN's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab.lab.experiments.framework import (
    Experiment,
    Run,
    Verdict,
    combine,
    compare,
    fmt_mean_std,
    pyplot,
    register_experiment,
    save_figure,
    threshold,
)

__all__ = ["CenteringConfig", "MeanOnlyBatchNorm", "register_mean_only", "EXPERIMENT", "MEAN_ONLY"]

MEAN_ONLY = "meanonlybatchnorm"


class MeanOnlyBatchNorm(nn.Module):
    """Mean-only batch normalisation: ``y = gamma * (x - mean) + beta`` per feature, no division by the std.

    ``mean`` is the batch mean over every axis but ``feature_dim`` in training
    (also recorded in ``running_mean`` with PyTorch's momentum convention:
    ``running = (1 - momentum) * running + momentum * batch``) and
    ``running_mean`` in eval. ``affine=True`` keeps ``weight`` (gamma, init 1)
    and ``bias`` (beta, init 0), so it has BatchNorm's parameters and differs
    only by the missing division. Plain autograd, so twice differentiable.
    Signature as :func:`normlab.make_norm` factories: ``(num_features, *,
    feature_dim=1, **kw)``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        feature_dim: int = 1,
        momentum: float = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
        **_ignored: Any,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_features = num_features
        self.feature_dim = feature_dim
        self.momentum = momentum
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def forward(self, x: Tensor) -> Tensor:
        dim = self.feature_dim % x.dim()
        if x.shape[dim] != self.num_features:
            raise ValueError(
                f"MeanOnlyBatchNorm: expected {self.num_features} features on axis {dim}, got shape {tuple(x.shape)}"
            )
        shape = [1] * x.dim()
        shape[dim] = self.num_features
        if self.training:
            axes = [a for a in range(x.dim()) if a != dim]
            mean = x.mean(dim=axes)  # (C,)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean = self.running_mean
        y = x - mean.view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, feature_dim={self.feature_dim}"


def register_mean_only() -> str:
    """Register :class:`MeanOnlyBatchNorm` as ``"meanonlybatchnorm"`` (idempotent); returns the name.

    Done on demand (by a run that uses it), not at import, so importing the
    experiments does not add a norm to the registry that other code sweeps.
    """
    from normlab.registry import norm_names, register_norm

    if MEAN_ONLY not in norm_names():
        register_norm(
            MEAN_ONLY,
            lambda num_features, *, feature_dim=1, **kw: MeanOnlyBatchNorm(num_features, feature_dim=feature_dim, **kw),
        )
    return MEAN_ONLY


@dataclass(frozen=True)
class CenteringConfig:
    """C5's configuration; see the module docstring for the procedure and the verdict rule."""

    seeds: int = 3  # seeds per norm: initialisation and batch order
    dataset: str = "digits"  # training data (offline dataset name)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale); None for the built-in datasets
    model: str = "mlp"  # "mlp" (depth hidden layers of width units) or "cnn" (depth conv blocks)
    depth: int = 6  # hidden layers (mlp) / conv blocks (cnn)
    width: int = 64  # hidden units (mlp) / channels of the first conv block (cnn, doubling up to 8x)
    init: str = "kaiming"  # weight initialisation (He normal)
    norms: tuple[str, ...] = ("none", "batchnorm", MEAN_ONLY)  # trained networks; the three roles are fixed
    lr: float = 0.02  # SGD learning rate (per unit gradient)
    momentum: float = 0.9  # SGD momentum coefficient
    batch_size: int = 64  # training examples per step
    steps: int = 300  # optimizer steps (digits: 22 steps per epoch)
    stats_examples: int | None = None  # training examples for the layer-input statistics (None = all)
    stats_mode: str = "eval"  # mode of the trained network while its layer inputs are recorded
    shift_restarts: int = 2  # random restarts of the optimal-shift search (besides 0 and near E[x])
    gap_tolerance: float = 0.01  # relative gap |Cov|_1 - min_s |M(s)|_1 over |Cov|_1 that counts as "not optimal"
    threads: int = 1  # torch threads per run (not part of the run id)


def _model_kwargs(cfg: CenteringConfig) -> dict[str, Any]:
    if cfg.model == "mlp":
        return {"width": cfg.width, "depth": cfg.depth, "init": cfg.init}
    if cfg.model == "cnn":
        return {"channels": [cfg.width * 2 ** min(i, 3) for i in range(cfg.depth)], "init": cfg.init}
    raise ValueError(f"model={cfg.model!r} is not one of: 'mlp', 'cnn'")


def _grid(cfg: CenteringConfig):
    for norm in cfg.norms:
        yield {
            "dataset": cfg.dataset,
            "data_kwargs": {} if cfg.data_dir is None else {"data_dir": cfg.data_dir},
            "model": cfg.model,
            "model_kwargs": _model_kwargs(cfg),
            "norm": norm,
            "optimizer": "sgd",
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "batch_size": cfg.batch_size,
            "epochs": 10**6,  # bounded by max_steps
            "max_steps": cfg.steps,
            "stats_examples": cfg.stats_examples,
            "stats_mode": cfg.stats_mode,
            "shift_restarts": cfg.shift_restarts,
            "layer_stats": norm in cfg.norms[:2],  # the second-moment term is judged on the none and BN nets
        }


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear/Conv layers in order; all but the last (the classifier) feed a norm."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.data import load_dataset
    from normlab.lab.probes import layer_input_stats
    from normlab.lab.train import train

    cfg = run.config if isinstance(run.config, CenteringConfig) else CenteringConfig()
    if run["norm"] == MEAN_ONLY:
        register_mean_only()
    state: dict[str, Any] = {"prev": None, "ratios": [], "names": None}

    def track(ts) -> None:
        if ts.event != "step":
            return
        layers = _weight_layers(ts.model)[:-1]
        with torch.no_grad():
            now = [m.weight.detach().clone() for _, m in layers]
            if state["prev"] is not None:
                state["ratios"].append(
                    [float((w - p).norm() / p.norm().clamp_min(1e-30)) for w, p in zip(now, state["prev"])]
                )
        state["prev"] = now
        state["names"] = [n for n, _ in layers]

    result = train(run.train_config(threads=cfg.threads), progress=run.progress, callback=track)
    model = result.model

    ratios = np.array(state["ratios"], dtype=float)  # (steps - 1, layers)
    logr = np.log10(np.where(ratios > 0, ratios, np.nan))
    spread = np.nanstd(logr, axis=1) if logr.size else np.array([])
    out = {
        "diverged": result.diverged,
        "steps": result.steps,
        "final_test_acc": result.final.get("test_acc"),
        "final_train_loss": result.final.get("train_loss"),
        "wall_time": result.wall_time,
        "ratio_layers": state["names"],
        "update_ratio": ratios.tolist(),  # (steps - 1, layers): |W_t - W_{t-1}| / |W_{t-1}|
        "ratio_spread": spread.tolist(),  # (steps - 1,): std over layers of log10 ratio
        "ratio_spread_mean": float(np.nanmean(spread)) if spread.size else float("nan"),
        "layer_log10_ratio_mean": np.nanmean(logr, axis=0).tolist() if logr.size else [],
        # the verdict's measure: std over layers of each layer's mean log10 ratio (its typical update rate)
        "ratio_layer_spread": float(np.std(np.nanmean(logr, axis=0))) if logr.size else float("nan"),
    }
    if not run["layer_stats"]:
        return out

    ds = load_dataset(run["dataset"], seed=0, **run.get("data_kwargs", {}))
    n = ds.x_train.shape[0] if run["stats_examples"] is None else min(run["stats_examples"], ds.x_train.shape[0])
    old = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        batches = [ds.x_train[i : i + 500] for i in range(0, n, 500)]
        stats = layer_input_stats(model, batches, mode=run["stats_mode"])
        layers: dict[str, list] = {
            k: []
            for k in (
                "name",
                "num_features",
                "second_moment_l1",
                "covariance_l1",
                "second_moment_fro",
                "covariance_fro",
                "second_moment_spectral",
                "covariance_spectral",
                "mean_norm",
                "shift_objective",
                "shift_gap",
                "shift_relative_gap",
                "shift_distance",
                "shift_relative_distance",
            )
        }
        for name, s in stats.items():
            opt = s.optimal_shift(restarts=run["shift_restarts"], seed=run.seed)
            cov_l1 = s.covariance_l1
            layers["name"].append(name)
            layers["num_features"].append(s.num_features)
            layers["second_moment_l1"].append(s.second_moment_l1)
            layers["covariance_l1"].append(cov_l1)
            layers["second_moment_fro"].append(s.second_moment_fro)
            layers["covariance_fro"].append(s.covariance_fro)
            layers["second_moment_spectral"].append(s.second_moment_spectral)
            layers["covariance_spectral"].append(s.covariance_spectral)
            layers["mean_norm"].append(float(s.mean.norm()))
            layers["shift_objective"].append(opt.objective)
            layers["shift_gap"].append(opt.gap)
            layers["shift_relative_gap"].append(opt.gap / cov_l1 if cov_l1 > 0 else 0.0)
            layers["shift_distance"].append(opt.distance)
            layers["shift_relative_distance"].append(opt.relative_distance)
    finally:
        torch.set_num_threads(old)

    log_l1 = [math.log10(c / m) for c, m in zip(layers["covariance_l1"], layers["second_moment_l1"]) if m > 0 and c > 0]
    return {
        **out,
        "layers": layers,
        "mean_log10_centering_ratio": float(np.mean(log_l1)) if log_l1 else float("nan"),
        "max_shift_relative_gap": max(layers["shift_relative_gap"]) if layers["shift_relative_gap"] else float("nan"),
        "fro_centering_never_worse": all(
            c <= m * (1 + 1e-9) for c, m in zip(layers["covariance_fro"], layers["second_moment_fro"])
        ),
    }


def _vals(rows, key, norm) -> list[float]:
    return [float(r[key]) for r in rows if r["norm"] == norm and r.get(key) is not None and math.isfinite(r[key])]


def _analyse(rows: list[dict[str, Any]], cfg: CenteringConfig) -> Verdict:
    none, bn, mean_only = cfg.norms[0], cfg.norms[1], cfg.norms[2]
    parts: dict[str, Verdict] = {}
    for norm in (none, bn):
        parts[f"centring lowers |E[xx^T]|_1 ({norm})"] = threshold(
            _vals(rows, "mean_log10_centering_ratio", norm),
            0.0,
            "less",
            name=f"{norm}: mean over layers of log10(|Cov|_1/|E[xx^T]|_1)",
        )
    gaps = {}
    for r in rows:
        if r["norm"] in (none, bn):
            gaps[r["seed"]] = max(gaps.get(r["seed"], 0.0), float(r["max_shift_relative_gap"]))
    gap_vals = [gaps[s] for s in sorted(gaps)]
    parts["the mean minimises |E[(x-s)(x-s)^T]|_1"] = threshold(
        gap_vals, cfg.gap_tolerance, "less", name="largest relative gap (|Cov|_1 - min_s)/|Cov|_1 over layers"
    )
    parts["division evens out update ratios"] = compare(
        _vals(rows, "ratio_layer_spread", bn),
        _vals(rows, "ratio_layer_spread", mean_only),
        "less",
        name_a=bn,
        name_b=mean_only,
        metric="std over layers of mean log10 |ΔW|/|W|",
    )
    v = combine(parts)

    def pct(norm):  # reduction of the L1 term by centring, in percent (geometric mean over layers)
        xs = _vals(rows, "mean_log10_centering_ratio", norm)
        return fmt_mean_std([100 * (1 - 10**x) for x in xs], 3) if xs else "n/a"

    fro_ok = all(r.get("fro_centering_never_worse", True) for r in rows if r["norm"] in (none, bn))
    spread = {
        n: (fmt_mean_std(_vals(rows, "ratio_layer_spread", n), 3) if _vals(rows, "ratio_layer_spread", n) else "n/a")
        for n in (bn, mean_only, none)
    }
    summary = (
        f"centring lowers |E[xx^T]|_1 by {pct(none)} % ({none}) and {pct(bn)} % ({bn}) "
        f"[{parts[f'centring lowers |E[xx^T]|_1 ({none})'].status}/"
        f"{parts[f'centring lowers |E[xx^T]|_1 ({bn})'].status}]; "
        f"best shift beats centring by at most {fmt_mean_std([100 * g for g in gap_vals], 3)} % of |Cov|_1 "
        f"(tolerance {100 * cfg.gap_tolerance:g} %) [{parts['the mean minimises |E[(x-s)(x-s)^T]|_1'].status}]; "
        f"Frobenius: centring never worse: {fro_ok}; "
        f"per-layer update ratio spread (std over layers of mean log10 |ΔW|/|W|) {bn} {spread[bn]} vs "
        f"{mean_only} {spread[mean_only]} "
        f"[{parts['division evens out update ratios'].status}] ({none}: {spread[none]})"
    )
    numbers = dict(v.numbers)
    numbers["frobenius_centering_never_worse"] = fro_ok
    return Verdict(v.status, summary, numbers)


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: CenteringConfig) -> list[Path]:
    plt = pyplot()
    none, bn, mean_only = cfg.norms[0], cfg.norms[1], cfg.norms[2]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    # (a) per layer: |E[xx^T]|_1 and |Cov|_1, first seed of each network; relative gaps as text
    ax = axes[0]
    for c, norm in enumerate((none, bn)):
        rs = [r for r in rows if r["norm"] == norm]
        for k, r in enumerate(rs):
            L = r["layers"]
            x = np.arange(len(L["name"]))
            lab = k == 0
            ax.plot(
                x,
                L["second_moment_l1"],
                color=f"C{c}",
                ls="-",
                marker="o",
                ms=3,
                alpha=0.6,
                label=f"{norm}: |E[xxᵀ]|₁ (no centring)" if lab else None,
            )
            ax.plot(
                x,
                L["covariance_l1"],
                color=f"C{c}",
                ls="--",
                marker="s",
                ms=3,
                alpha=0.6,
                label=f"{norm}: |Cov x|₁ (centred)" if lab else None,
            )
            ax.plot(
                x,
                L["shift_objective"],
                color=f"C{c}",
                ls="none",
                marker="x",
                ms=6,
                alpha=0.8,
                label=f"{norm}: min over shifts s (found)" if lab else None,
            )
    names = next((r["layers"]["name"] for r in rows if "layers" in r), [])
    ax.set_xticks(range(len(names)), [n.replace("blocks.", "").replace(".linear", "") for n in names])
    ax.set(
        yscale="log",
        xlabel="layer (input of)",
        ylabel="entrywise L1 norm of the D×D matrix",
        title="second-moment term of layer inputs (trained nets)",
    )
    ax.legend(fontsize=7)
    # (b) relative gap and relative distance of the best shift
    ax = axes[1]
    for c, norm in enumerate((none, bn)):
        for k, r in enumerate(r for r in rows if r["norm"] == norm):
            L = r["layers"]
            x = np.arange(len(L["name"])) + (c - 0.5) * 0.15
            ax.scatter(
                x,
                np.maximum(L["shift_relative_gap"], 1e-12),
                color=f"C{c}",
                marker="o",
                s=14,
                label=f"{norm}: gap / |Cov|₁" if k == 0 else None,
            )
            ax.scatter(
                x,
                np.maximum(L["shift_relative_distance"], 1e-12),
                color=f"C{c}",
                marker="^",
                s=14,
                alpha=0.5,
                label=f"{norm}: |s* − E[x]| / |E[x]|" if k == 0 else None,
            )
    ax.axhline(cfg.gap_tolerance, color="k", ls=":", lw=1, label=f"gap tolerance {cfg.gap_tolerance:g}")
    ax.set_xticks(range(len(names)), [n.replace("blocks.", "").replace(".linear", "") for n in names])
    ax.set(
        yscale="log",
        xlabel="layer (input of)",
        ylabel="relative value",
        title="is the mean the best shift? (gap ≈ 0: yes)",
    )
    ax.legend(fontsize=7)
    # (c) per-layer update ratios, averaged (in log10) over the steps of training
    ax = axes[2]
    for c, norm in enumerate((bn, mean_only, none)):
        for k, r in enumerate(r for r in rows if r["norm"] == norm):
            m = np.array(r["layer_log10_ratio_mean"], dtype=float)
            if m.size:
                ax.plot(
                    np.arange(m.size),
                    10**m,
                    color=f"C{c}",
                    marker="o",
                    ms=3,
                    lw=1,
                    alpha=0.8,
                    label=f"{norm}: spread {r['ratio_layer_spread']:.3f}" if k == 0 else None,
                )
    lnames = next((r["ratio_layers"] for r in rows if r.get("ratio_layers")), [])
    ax.set_xticks(range(len(lnames)), [n.replace("blocks.", "").replace(".linear", "") for n in lnames])
    ax.set(
        yscale="log",
        xlabel="layer (weights feeding a norm)",
        ylabel="geometric mean over steps of |ΔW|/|W|",
        title="per-layer update-to-weight ratio (spread = std of log10 over layers)",
    )
    ax.legend(fontsize=7)
    fig.suptitle(
        f"C5 centring and scaling ({cfg.dataset}, MLP {cfg.depth}×{cfg.width}, SGD lr {cfg.lr:g})", fontsize=10
    )
    fig.tight_layout()
    return [save_figure(fig, out_dir, "centering")]


EXPERIMENT = register_experiment(
    Experiment(
        name="centering",
        claim="C5",
        title="Centring minimises the input second-moment term; dividing by the std evens out per-layer updates",
        config=CenteringConfig,
        scales={
            "smoke": CenteringConfig(seeds=2, depth=3, width=16, steps=15, stats_examples=300, shift_restarts=0),
            "quick": CenteringConfig(),
            "full": CenteringConfig(
                seeds=5,
                dataset="cifar10",
                data_dir="data/cifar10",
                model="cnn",
                depth=5,
                width=64,
                lr=0.05,
                batch_size=128,
                steps=20000,
                stats_examples=10000,
            ),
        },
        grid=_grid,
        run_one=_run_one,
        analyse=_analyse,
        plot=_plot,
        description=__doc__ or "",
    )
)
