"""C9 ``residual-variance``: BN in a residual net shrinks each branch relative to a skip path that grows like i.

Pre-registration
----------------
**Claim** (S4, the passage on why deep normalised residual networks are
trainable; De & Smith 2020, "Batch Normalization Biases Residual Blocks
Towards the Identity Function in Deep Networks", §3 and Fig. 4): at
initialisation, with BN on every residual branch, each normalised branch
outputs a variance of about 1, so the skip path's variance before block ``i``
grows about linearly, ``Var(skip_i) ≈ c·i``; the branch is therefore scaled
down by about ``1/sqrt(i)`` relative to the skip path. In the deep *linear*
ResNet (Fig. 4a) the skip variance is almost exactly ``i`` and each branch
ends at about 1; in the ReLU ResNet (Fig. 4b) it still grows in proportion to
``i``, with a coefficient a little below 1. CLAIMS.md: ``Var(skip_i) ≈ c·i``
with ``c ≤ 1``, branch ≈ 1.

Per run (one network at initialisation, one seed) the experiment measures the
average channel variance of every block's input (the skip path) and of its
branch output, fits ``Var(skip_i) = c·i + b`` by least squares over the
blocks (``c``, metric ``c``) and averages the branch variance over the blocks
(metric ``branch_mean``). Every part below is a one-sample comparison of the
per-seed values with the paper's number (no pairing, Student's t over seeds).

Deciding parts:

* ``c-linear`` — deep linear BN ResNet (``activation=identity``,
  ``variant=batchnorm``): ``c`` ≈ 1 ("equivalent" to the bound 1), margin
  δ = 0.1. Why: the **paper's number** — Fig. 4(a) shows the skip variance
  "almost equal" to the depth ``i``; we read "almost" as within 10 %.
* ``branch-linear`` — the same networks: ``branch_mean`` ≈ 1, δ = 0.1. Why:
  the **paper's number** — Fig. 4(a): the variance at the end of each branch
  is about 1; within 10 % as for ``c``.
* ``c-relu`` — ReLU BN ResNet: ``c`` less than 1 (direction "less" against the
  bound 1), δ = 0.05. Why: the paper gives no effect size ("a coefficient a
  little below 1"), so δ is the **measurement's precision**: a slope fitted
  over 100 blocks of one random network is not known better than about ±0.05
  (the per-block variance added by a random 16-channel conv fluctuates by
  ~10 %), so a ``c`` within 0.05 of 1 is not told apart from 1.

Reported parts (shown, never deciding — the claim is about BN; these are its
contrast and its ReLU companion):

* ``branch-relu`` — ReLU BN ResNet: ``branch_mean`` ≈ 1, δ = 0.1 (as
  ``branch-linear``). Reported because Fig. 4(b) does not state it: after a
  ReLU the conv output's channel means carry part of the second moment, so
  the *variance* at the branch end is expected below 1.
* ``doubling-none`` — deep linear ResNet **without** normalisation (α = 1):
  the per-block growth factor ``growth`` of ``Var(skip_i)`` (``2^s``, ``s``
  the slope of ``log2 Var(skip_i)`` against ``i``) ≈ 2, log scale, margin
  ×1.1. Why: each variance-preserving branch adds the variance of its input,
  so the variance doubles per block (S4's contrast); ×1.1 is the precision
  of the fit.
* ``doubling-none-relu`` — the same for the ReLU ResNet without
  normalisation.

**Does not hold** if in the linear BN ResNet ``c`` or the branch variance is
shown to lie 0.1 or more away from 1, or if in the ReLU BN ResNet ``c`` is
shown to be above 1 (or within 0.05 of it).

**Seeds and budget** (quick): 3 seeds per round, at most 12 (each seed: one
network per activation and variant, 8 networks of 100 blocks). Measured on
the 2-core CPU, one thread per run (``/usr/bin/time``, user + system): the
full budget of 12 seeds costs 59 s of CPU (the first quick run needed all 12:
``c-linear`` decided at the last look).

Design
------
For each activation in ``activations`` (``"identity"``: the deep linear ResNet;
``"relu"``) and each variant in ``variants`` (``"batchnorm"``; ``"none"``:
no norm, branch multiplier α = 1; ``"skipinit-0"`` and ``"skipinit-sqrt"``:
no norm, SkipInit α = 0 and ``1/sqrt(depth)``, drawn for comparison with C11
and in no part) and seed, a
pre-activation ResNet (``build_model("resnet", ...)``: ``depth`` residual
blocks in one stage so that the skip path is the identity throughout,
``width`` channels, convs He-initialised with the activation's gain) is built
in float64 (so that ``2^depth`` does not overflow) exactly as
:func:`normlab.lab.train.train` would build it for that seed, and
:func:`normlab.lab.probes.residual_stats` records per block ``i`` the average
channel variance of the block input and of the branch output on one batch of
``batch_size`` training signals (:func:`normlab.lab.train.load_data`, a
seeded draw). BN runs in ``mode="train"``: at initialisation its running
statistics are 0 and 1, so in eval mode it would be the identity; the claim
is about batch statistics.

Why MNIST-1D and not digits: the premise "each normalised branch adds a
variance of 1" holds for a conv only away from its zero padding. On 8×8
digits 28 of 64 positions touch the border and a 3×3 conv there loses about
16 % of its output variance on average, a property of tiny images, not of BN;
on MNIST-1D (length 40, kernel 3) 2 of 40 positions lose one of three taps
(1.7 %). ``full`` uses CIFAR-10 (32×32, ~4 %).

Command: ``normlab run residual-variance`` (quick). ``full``: 500 blocks on
CIFAR-10 images, 5 seeds per round (the CIFAR-10 batches must be in
``data_dir``; minutes on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab.experiments.framework import (
    Experiment,
    Part,
    Run,
    fmt_mean_std,
    pyplot,
    register_experiment,
    save_figure,
)
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["ResidualVarianceConfig", "EXPERIMENT", "VARIANTS", "fit_skip_growth", "probe_blocks"]

# variant -> (norm, residual_scale rule); "sqrt" means 1/sqrt(depth)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "batchnorm": ("batchnorm", None),
    "none": ("none", None),
    "skipinit-0": ("none", "0"),
    "skipinit-sqrt": ("none", "sqrt"),
}


@dataclass(frozen=True)
class ResidualVarianceConfig:
    """C9's configuration; see the module docstring for the procedure and the parts."""

    seeds: int = 3  # seeds per round (initialisation, and which signals form the batch)
    max_seeds: int = 12  # seed budget per (activation, variant)
    threads: int = 1  # torch threads per run (not part of the run id)
    dataset: str = "mnist1d"  # signals fed to the network (offline dataset name; see the docstring for why)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale); not part of the run id
    depth: int = 100  # residual blocks (two convs each), all in one stage
    width: int = 16  # channels of every block
    batch_size: int = 128  # examples in the probe batch (x 40 positions per channel on MNIST-1D)
    activations: tuple[str, ...] = ("identity", "relu")  # "identity" = deep linear ResNet
    variants: tuple[str, ...] = ("batchnorm", "none", "skipinit-0", "skipinit-sqrt")  # see VARIANTS


def _grid(cfg: ResidualVarianceConfig):
    for v in cfg.variants:
        if v not in VARIANTS:
            raise ValueError(f"variant {v!r} is not one of: {', '.join(VARIANTS)}")
    for need in ("batchnorm", "none"):
        if need not in cfg.variants:
            raise ValueError(f"variants must include {need!r}: the parts compare it (got {cfg.variants})")
    for act in cfg.activations:
        for v in cfg.variants:
            norm, rule = VARIANTS[v]
            scale = None if rule is None else (0.0 if rule == "0" else 1.0 / math.sqrt(cfg.depth))
            yield {
                "dataset": cfg.dataset,
                "model": "resnet",
                "model_kwargs": {
                    "depth": cfg.depth,
                    "width": 1,
                    "base_width": cfg.width,
                    "stages": 1,
                    "activation": act,
                    "residual_scale": scale,
                },
                "norm": norm,
                "activation": act,
                "variant": v,
                "depth": cfg.depth,
                "batch_size": cfg.batch_size,
                "mode": "train",
                "dtype": "float64",
            }


def probe_blocks(run: Run) -> dict[str, np.ndarray]:
    """Build the run's ResNet at initialisation and measure every residual block on one batch.

    The model is built as :func:`normlab.lab.train.train` builds it for this
    run's seed (``torch.manual_seed(seed)``, then ``build_model`` with the
    run's ``model``, ``norm`` and ``model_kwargs``), moved to the run's device
    and ``run["dtype"]``; the batch is ``batch_size`` training examples of
    :func:`normlab.lab.train.load_data` drawn with a generator seeded from the
    seed. Returns :func:`normlab.lab.probes.blocks_as_arrays` of
    :func:`normlab.lab.probes.residual_stats` in ``run["mode"]``.
    """
    import torch

    from normlab.lab.models import build_model
    from normlab.lab.probes import blocks_as_arrays, residual_stats
    from normlab.lab.runtime import resolve_device
    from normlab.lab.train import load_data

    config = run.train_config()
    ds = load_data(config)
    device, dtype = resolve_device(config.device), getattr(torch, run["dtype"])
    gen = torch.Generator().manual_seed(10_000 + config.seed)  # the batch: its own stream, not the init's
    idx = torch.randperm(ds.x_train.shape[0], generator=gen)[: config.batch_size]
    x = ds.x_train[idx].to(device=device, dtype=dtype)  # (N, C, *spatial)
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        in_shape=tuple(ds.input_shape),
        num_classes=ds.num_classes,
        norm_layer=config.norm,
        **config.model_kwargs,
    ).to(device=device, dtype=dtype)
    return blocks_as_arrays(residual_stats(model, [x], mode=run["mode"]))


def _run_one(run: Run) -> dict[str, Any]:
    a = probe_blocks(run)
    return {
        "skip_variance": a["skip_variance"].tolist(),  # (depth,) average channel variance of block i's input
        "branch_variance": a["branch_variance"].tolist(),  # (depth,) of block i's branch output (before alpha)
        "output_variance": a["output_variance"].tolist(),
        "output_sq_mean": a["output_sq_mean"].tolist(),
    }


def fit_skip_growth(skip_var) -> dict[str, float]:
    """Linear fit ``Var(skip_i) = c i + b`` (i = 1..d) with its R², and the per-block growth factor ``2^s``
    from the fit of ``log2 Var(skip_i)``; non-finite or non-positive values are left out."""
    v = np.asarray(skip_var, dtype=np.float64)
    i = np.arange(1, v.size + 1, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0)
    out = {
        "c": float("nan"),
        "intercept": float("nan"),
        "r2": float("nan"),
        "growth": float("nan"),
        "total_growth": float("nan"),
        "points": int(ok.sum()),
    }
    if ok.sum() < 2:
        return out
    c, b = np.polyfit(i[ok], v[ok], 1)
    resid = v[ok] - (c * i[ok] + b)
    tot = np.sum((v[ok] - v[ok].mean()) ** 2)
    s = np.polyfit(i[ok], np.log2(v[ok]), 1)[0]
    out.update(
        c=float(c),
        intercept=float(b),
        r2=float(1 - resid @ resid / tot) if tot > 0 else float("nan"),
        growth=float(2.0**s),
        total_growth=float(v[ok][-1] / v[ok][0]),
    )
    return out


def _measure(rows: list[dict[str, Any]], cfg: ResidualVarianceConfig) -> list[dict[str, Any]]:
    """Per run: the fit of the skip variance (``c``, ``r2``, ``growth``) and the mean branch variance."""
    out = []
    for r in rows:
        branch = np.asarray(r["branch_variance"], dtype=np.float64)
        out.append({**r, **fit_skip_growth(r["skip_variance"]), "branch_mean": float(np.mean(branch))})
    return out


def _parts(cfg: ResidualVarianceConfig) -> list[Part]:
    lin_bn = {"activation": "identity", "variant": "batchnorm"}
    relu_bn = {"activation": "relu", "variant": "batchnorm"}
    paper_a = "De & Smith Fig. 4(a): 'almost equal' to the paper's value; we read 'almost' as within 10 %"
    return [
        Part("c-linear", "deep linear BN ResNet: Var(skip_i) ≈ c·i with c ≈ 1", "c", lin_bn, bound=1.0,
             direction="equivalent", margin=0.1, why=paper_a, unit="variance per block", label_a="linear BN"),
        Part("branch-linear", "deep linear BN ResNet: each branch ends at variance ≈ 1", "branch_mean", lin_bn,
             bound=1.0, direction="equivalent", margin=0.1, why=paper_a, unit="variance", label_a="linear BN"),
        Part("c-relu", "ReLU BN ResNet: Var(skip_i) ≈ c·i with c below 1", "c", relu_bn, bound=1.0,
             direction="less", margin=0.05,
             why="no effect size in the paper ('a little below 1'): the precision of a slope fitted over 100 blocks",
             unit="variance per block", label_a="ReLU BN"),
        Part("branch-relu", "ReLU BN ResNet: each branch ends at variance ≈ 1", "branch_mean", relu_bn, bound=1.0,
             direction="equivalent", margin=0.1, why=paper_a + " (not stated for ReLU: reported)", decides=False,
             unit="variance", label_a="ReLU BN"),
        Part("doubling-none", "deep linear ResNet without norm: the skip variance doubles per block", "growth",
             {"activation": "identity", "variant": "none"}, bound=2.0, direction="equivalent", margin=1.1, log=True,
             why="variance-preserving branches double the variance per block; ×1.1 is the fit's precision",
             decides=False, unit="factor per block", label_a="linear, no norm"),
        Part("doubling-none-relu", "ReLU ResNet without norm: the skip variance doubles per block", "growth",
             {"activation": "relu", "variant": "none"}, bound=2.0, direction="equivalent", margin=1.1, log=True,
             why="as doubling-none; after a ReLU the channel means take part of the second moment", decides=False,
             unit="factor per block", label_a="ReLU, no norm"),
    ]  # fmt: skip


def _explain(rows: list[dict[str, Any]], cfg: ResidualVarianceConfig, judgement: Judgement):
    per = _measure(rows, cfg)
    used = {int(r["seed"]) for r in per if int(r["seed"]) < judgement.seeds}

    def vals(key, act, variant):
        return [r[key] for r in per if r["activation"] == act and r["variant"] == variant and r["seed"] in used]

    numbers: dict[str, Any] = {}
    bits = []
    for act, name in (("identity", "linear"), ("relu", "ReLU")):
        c, br = vals("c", act, "batchnorm"), vals("branch_mean", act, "batchnorm")
        g = vals("growth", act, "none")
        if not (c and br and g):
            continue
        c_mean, d = float(np.mean(c)), per[0]["depth"]
        numbers[f"{name}_bn_c"], numbers[f"{name}_bn_branch"] = c_mean, float(np.mean(br))
        numbers[f"{name}_bn_r2"] = float(np.mean(vals("r2", act, "batchnorm")))
        numbers[f"{name}_none_growth"] = float(np.mean(g))
        numbers[f"{name}_none_last_skip"] = float(np.mean(vals("total_growth", act, "none")))
        # branch i relative to the skip path: sqrt(branch / skip_i) ~ 1/sqrt(c i) with BN
        bits.append(
            f"{name} ResNet with BN: skip variance ≈ {c_mean:.2f}·i (R² {numbers[f'{name}_bn_r2']:.4f}), branch "
            f"{fmt_mean_std(br, 3)}, so block {d}'s branch is {1 / math.sqrt(max(c_mean * d, 1e-12)):.3f} of its "
            f"skip path in standard deviation; without norm ×{np.mean(g):.2f} per block "
            f"(Var grows {numbers[f'{name}_none_last_skip']:.2g}-fold over {d} blocks)"
        )
    return "; ".join(bits), numbers


_STYLE = {
    "batchnorm": ("C0", "BN"),
    "none": ("C3", "none, α=1"),
    "skipinit-0": ("C2", "SkipInit α=0"),
    "skipinit-sqrt": ("C1", "SkipInit α=1/√d"),
}


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: ResidualVarianceConfig) -> list[Path]:
    plt = pyplot()
    per = _measure(rows, cfg)
    acts = list(dict.fromkeys(r["activation"] for r in per))
    fig, axes = plt.subplots(2, len(acts), figsize=(5.5 * len(acts), 7.5), squeeze=False)
    for j, act in enumerate(acts):
        top, bottom = axes[0][j], axes[1][j]
        d = 0
        for v in VARIANTS:
            rs = [r for r in per if r["activation"] == act and r["variant"] == v]
            colour, label = _STYLE[v]
            for k, r in enumerate(rs):
                i = np.arange(1, len(r["skip_variance"]) + 1)
                d = max(d, int(i[-1]))
                first = k == 0
                top.plot(i, r["skip_variance"], color=colour, lw=1.2, alpha=0.6,
                         label=f"{label}: skip Var(x_i)" if first else None)  # fmt: skip
                top.plot(i, r["branch_variance"], color=colour, lw=0.8, ls="--", alpha=0.6,
                         label=f"{label}: branch" if first else None)  # fmt: skip
                if v != "batchnorm":
                    continue
                bottom.plot(i, r["skip_variance"], color=colour, lw=1.0, alpha=0.5,
                            label="BN: skip Var(x_i), every seed" if first else None)  # fmt: skip
                bottom.plot(i, r["branch_variance"], color=colour, ls="--", lw=0.8, alpha=0.5,
                            label="BN: branch" if first else None)  # fmt: skip
            if v == "batchnorm" and rs:
                c = float(np.mean([r["c"] for r in rs]))
                b = float(np.mean([r["intercept"] for r in rs]))
                i = np.arange(1, d + 1)
                bottom.plot(i, c * i + b, color="k", lw=0.9, ls=":", label=f"fit c·i + b, mean c = {c:.3f}")
        if d:
            i = np.arange(1, d + 1)
            top.plot(i, 2.0**i, color="grey", lw=0.8, ls=":", label="2^i")
            top.plot(i, i, color="k", lw=0.8, ls=":", label="i")
            bottom.plot(i, i, color="grey", lw=0.8, ls="-.", label="i (c = 1)")
        name = "deep linear ResNet" if act == "identity" else ("ReLU ResNet" if act == "relu" else f"{act} ResNet")
        top.set(yscale="log", xlabel="block i", ylabel="average channel variance", title=f"{name}, {d} blocks, at init")
        bottom.set(xlabel="block i", ylabel="average channel variance (linear scale)", title=f"{name}: BN only")
        top.legend(fontsize=7, ncol=2)
        bottom.legend(fontsize=7)
    fig.suptitle(
        f"C9 skip-path and branch variance per residual block at initialisation ({cfg.dataset}, BN in train mode)",
        fontsize=10,
    )
    fig.tight_layout()
    return [save_figure(fig, out_dir, "residual-variance")]


EXPERIMENT = register_experiment(
    Experiment(
        name="residual-variance",
        claim="C9",
        title="With BN the skip-path variance grows ~ c·i (c ≤ 1) and each branch stays ~ 1; without norm ~ 2^i",
        config=ResidualVarianceConfig,
        scales={
            "smoke": ResidualVarianceConfig(seeds=2, max_seeds=2, depth=8, width=4, batch_size=32),
            "quick": ResidualVarianceConfig(),
            "full": ResidualVarianceConfig(
                seeds=5, max_seeds=20, dataset="cifar10", data_dir="data/cifar10", depth=500, width=16
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
