"""C9 ``residual-variance``: BN in a residual net shrinks each branch relative to a skip path that grows like i.

The claim (CLAIMS.md C9; De & Smith 2020, "Batch Normalization Biases
Residual Blocks Towards the Identity Function in Deep Networks", §3, Figs.
2 and 4): at initialisation, in a deep residual network with BN on every
branch, the variance of the skip path at block ``i`` grows about linearly,
``Var(skip_i) ~ c i`` with ``c <= 1``, because each normalised branch adds a
variance of about 1; so the branch is downweighted by ``~ 1/sqrt(i)`` relative
to the skip path. Without normalisation (``alpha = 1``) each branch preserves
its input's variance and the variance doubles per block, ``~ 2^i``; SkipInit
(a scalar ``alpha`` on each branch initialised at 0 or ``1/sqrt(d)``) keeps it
bounded.

What runs
---------
For each activation in ``activations`` (``"identity"``: a deep *linear*
ResNet; ``"relu"``: the usual ReLU ResNet), each variant in ``variants``
(``"batchnorm"``; ``"none"`` with ``alpha = 1``; ``"skipinit-0"`` and
``"skipinit-sqrt"``: no norm, SkipInit ``alpha = 0`` and ``1/sqrt(depth)``)
and seed, a pre-activation ResNet (``build_model("resnet", ...)``, ``depth``
residual blocks in one stage so the skip path is the identity throughout,
``width`` channels, He-initialised convs) is built, in float64 so that
``2^depth`` does not overflow, and
:func:`normlab.lab.probes.residual_stats` records, per block ``i``, the average
channel variance of the block input (the skip path) and of the branch output
(before ``alpha``) on one batch of ``batch_size`` training images. BN runs in
``mode="train"``: at initialisation BN's running statistics are 0 and 1, so
in eval mode it would be the identity; the claim is about batch statistics.

The verdict (rule)
------------------
Per run: the least-squares line ``Var(skip_i) = c i + b`` (slope ``c``, R²)
and the per-block growth factor ``g = 2^s`` with ``s`` the slope of
``log2 Var(skip_i)`` against ``i``. Over seeds (mean ± 1 std,
:func:`~normlab.lab.experiments.framework.threshold`), for each activation:

* BN: ``c < 1`` (the claim's ``c <= 1``), ``R² > r2_min`` (0.98: the growth is
  linear), and the branch variance within a factor 2 of 1 at every block
  (``max_i |log2 Var(branch_i)| < 1``);
* none (``alpha = 1``): ``g > growth_min`` (1.5: exponential, doubling-like
  growth; linear growth would give ``g -> 1``).

**holds** if every part holds, **does not hold** if any does not, else
inconclusive (:func:`~normlab.lab.experiments.framework.combine`). SkipInit is measured
and drawn but not part of the verdict (the claim says nothing about it
beyond "bounded"); its total growth ``Var(skip_d) / Var(skip_1)`` is reported.

Command: ``normlab run residual-variance`` (quick). Measured runtime on the
2-core CPU, one thread: smoke ~4 s, quick 38 s (24 models of 100 blocks).
``full``: 500 blocks, 3-channel 32x32 CIFAR-10 images, width 16, 5 seeds
(estimated: minutes on a GPU, about an hour on this CPU). Expected (De & Smith Fig. 2):
BN linear ResNet ``Var(skip_i) ~ i`` with branch ~ 1; ReLU ResNet the same with
``c`` a little below 1 (the branch's channel means take part of the second
moment); without norm ``~ 2^i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab.experiments.framework import (
    Experiment,
    Run,
    Verdict,
    combine,
    fmt_mean_std,
    pyplot,
    register_experiment,
    save_figure,
    threshold,
)

__all__ = ["ResidualVarianceConfig", "EXPERIMENT", "VARIANTS", "fit_skip_growth"]

# variant -> (norm, residual_scale rule); "sqrt" means 1/sqrt(depth)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "batchnorm": ("batchnorm", None),
    "none": ("none", None),
    "skipinit-0": ("none", "0"),
    "skipinit-sqrt": ("none", "sqrt"),
}


@dataclass(frozen=True)
class ResidualVarianceConfig:
    """C9's configuration; see the module docstring for the procedure and the verdict rule."""

    seeds: int = 3  # seeds per (activation, variant): initialisation (and which images form the batch)
    dataset: str = "digits"  # images fed to the network (offline dataset name)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale); None for the built-in datasets
    depth: int = 100  # residual blocks (two convs each), all in one stage
    width: int = 16  # channels of every block
    batch_size: int = 128  # images in the probe batch (x 8 x 8 positions per channel on digits)
    activations: tuple[str, ...] = ("identity", "relu")  # "identity" = deep linear ResNet
    variants: tuple[str, ...] = ("batchnorm", "none", "skipinit-0", "skipinit-sqrt")  # see VARIANTS
    r2_min: float = 0.98  # BN: smallest R² of the linear fit Var(skip_i) = c i + b that counts as linear growth
    growth_min: float = 1.5  # none: smallest per-block growth factor that counts as exponential
    threads: int = 1  # torch threads per run (not part of the run id)


def _grid(cfg: ResidualVarianceConfig):
    for v in cfg.variants:
        if v not in VARIANTS:
            raise ValueError(f"variant {v!r} is not one of: {', '.join(VARIANTS)}")
    for act in cfg.activations:
        for v in cfg.variants:
            norm, rule = VARIANTS[v]
            scale = None if rule is None else (0.0 if rule == "0" else 1.0 / math.sqrt(cfg.depth))
            yield {
                "dataset": cfg.dataset,
                "data_kwargs": {} if cfg.data_dir is None else {"data_dir": cfg.data_dir},
                "model": "resnet",
                "activation": act,
                "variant": v,
                "norm": norm,
                "residual_scale": scale,
                "depth": cfg.depth,
                "width": cfg.width,
                "batch_size": cfg.batch_size,
                "mode": "train",
                "dtype": "float64",
            }


def fit_skip_growth(skip_var) -> dict[str, float]:
    """Linear fit ``Var(skip_i) = c i + b`` (i = 1..d) with its R², and the per-block growth factor ``2^s``
    from the fit of ``log2 Var(skip_i)``; non-finite or non-positive values are left out."""
    v = np.asarray(skip_var, dtype=np.float64)
    i = np.arange(1, v.size + 1, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0)
    out = {
        "slope": float("nan"),
        "intercept": float("nan"),
        "r2": float("nan"),
        "growth": float("nan"),
        "log2_slope": float("nan"),
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
        slope=float(c),
        intercept=float(b),
        r2=float(1 - resid @ resid / tot) if tot > 0 else float("nan"),
        log2_slope=float(s),
        growth=float(2.0**s),
        total_growth=float(v[ok][-1] / v[ok][0]),
    )
    return out


def _run_one(run: Run) -> dict[str, Any]:
    import torch

    from normlab.lab.data import load_dataset
    from normlab.lab.models import build_model
    from normlab.lab.probes import blocks_as_arrays, residual_stats

    cfg = run.config if isinstance(run.config, ResidualVarianceConfig) else ResidualVarianceConfig()
    ds = load_dataset(run["dataset"], seed=0, **run.get("data_kwargs", {}))
    gen = torch.Generator().manual_seed(10_000 + run.seed)
    idx = torch.randperm(ds.x_train.shape[0], generator=gen)[: run["batch_size"]]
    dtype = getattr(torch, run["dtype"])
    x = ds.x_train[idx].to(dtype)  # (N, C, H, W)
    old = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(run.seed)
        model = build_model(
            "resnet",
            in_shape=tuple(ds.input_shape),
            num_classes=ds.num_classes,
            norm_layer=run["norm"],
            depth=run["depth"],
            width=1,
            base_width=run["width"],
            stages=1,
            activation=run["activation"],
            residual_scale=run["residual_scale"],
        ).to(dtype)
        stats = residual_stats(model, [x], mode=run["mode"])
    finally:
        torch.set_num_threads(old)
    a = blocks_as_arrays(stats)
    skip = a["skip_variance"].tolist()
    fit = fit_skip_growth(skip)
    branch = np.asarray(a["branch_variance"], dtype=np.float64)
    with np.errstate(divide="ignore"):
        lb = np.abs(np.log2(branch))
    return {
        "skip_variance": skip,
        "branch_variance": branch.tolist(),
        "output_variance": a["output_variance"].tolist(),
        "output_sq_mean": a["output_sq_mean"].tolist(),
        **{f"fit_{k}": v for k, v in fit.items()},
        "branch_mean": float(np.mean(branch)),
        "branch_max_abs_log2": float(np.max(lb)) if np.all(np.isfinite(lb)) else float("inf"),
        "skip_first": skip[0],
        "skip_last": skip[-1],
    }


def _vals(rows, key, **where) -> list[float]:
    return [float(r[key]) for r in rows if all(r.get(k) == v for k, v in where.items())]


def _analyse(rows: list[dict[str, Any]], cfg: ResidualVarianceConfig) -> Verdict:
    parts: dict[str, Verdict] = {}
    bits = []
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    for act in acts:
        name = "linear" if act == "identity" else act
        if any(r["variant"] == "batchnorm" and r["activation"] == act for r in rows):
            w = {"activation": act, "variant": "batchnorm"}
            parts[f"{name} BN: slope c < 1"] = threshold(_vals(rows, "fit_slope", **w), 1.0, "less", name="c")
            parts[f"{name} BN: R² > {cfg.r2_min:g}"] = threshold(
                _vals(rows, "fit_r2", **w), cfg.r2_min, "greater", name="R²"
            )
            parts[f"{name} BN: branch within 2x of 1"] = threshold(
                _vals(rows, "branch_max_abs_log2", **w), 1.0, "less", name="max_i |log2 Var(branch_i)|"
            )
            bits.append(
                f"{name} BN: Var(skip_i) ≈ c·i + b with c {fmt_mean_std(_vals(rows, 'fit_slope', **w))}, "
                f"R² {fmt_mean_std(_vals(rows, 'fit_r2', **w), 4)}, "
                f"branch {fmt_mean_std(_vals(rows, 'branch_mean', **w))}"
            )
        if any(r["variant"] == "none" and r["activation"] == act for r in rows):
            w = {"activation": act, "variant": "none"}
            g = _vals(rows, "fit_growth", **w)
            parts[f"{name} none: growth > {cfg.growth_min:g}/block"] = threshold(
                [x if math.isfinite(x) else 0.0 for x in g], cfg.growth_min, "greater", name="growth factor per block"
            )
            bits.append(
                f"{name} none (α=1): ×{fmt_mean_std(g)} per block, Var(skip_d) "
                f"{fmt_mean_std(_vals(rows, 'skip_last', **w), 2)}"
            )
        for v in ("skipinit-0", "skipinit-sqrt"):
            w = {"activation": act, "variant": v}
            if any(r["variant"] == v and r["activation"] == act for r in rows):
                bits.append(f"{name} {v}: Var(skip_d)/Var(skip_1) {fmt_mean_std(_vals(rows, 'fit_total_growth', **w))}")
    v = combine(parts)
    status_bits = ", ".join(f"{k} [{p.status}]" for k, p in parts.items())
    depth = rows[0]["depth"] if rows else cfg.depth
    summary = f"{depth} blocks at init, mean ± std over seeds: " + "; ".join(bits) + f" — parts: {status_bits}"
    return Verdict(v.status, summary, v.numbers)


_STYLE = {
    "batchnorm": ("C0", "BN"),
    "none": ("C3", "none, α=1"),
    "skipinit-0": ("C2", "SkipInit α=0"),
    "skipinit-sqrt": ("C1", "SkipInit α=1/√d"),
}


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: ResidualVarianceConfig) -> list[Path]:
    plt = pyplot()
    acts = list(dict.fromkeys(r["activation"] for r in rows))
    fig, axes = plt.subplots(2, len(acts), figsize=(5.5 * len(acts), 7.5), squeeze=False)
    for j, act in enumerate(acts):
        top, bottom = axes[0][j], axes[1][j]
        d = 0
        for v in VARIANTS:
            rs = [r for r in rows if r["activation"] == act and r["variant"] == v]
            colour, label = _STYLE[v]
            for k, r in enumerate(rs):
                i = np.arange(1, len(r["skip_variance"]) + 1)
                d = max(d, i[-1])
                top.plot(
                    i,
                    r["skip_variance"],
                    color=colour,
                    lw=1.2,
                    alpha=0.7,
                    label=f"{label}: skip Var(x_i)" if k == 0 else None,
                )
                top.plot(
                    i,
                    r["branch_variance"],
                    color=colour,
                    lw=0.8,
                    ls="--",
                    alpha=0.7,
                    label=f"{label}: branch" if k == 0 else None,
                )
                if v == "batchnorm":
                    bottom.plot(
                        i,
                        r["skip_variance"],
                        color=colour,
                        lw=1.2,
                        alpha=0.7,
                        label="BN: skip Var(x_i)" if k == 0 else None,
                    )
                    bottom.plot(
                        i,
                        r["branch_variance"],
                        color=colour,
                        ls="--",
                        lw=0.8,
                        alpha=0.7,
                        label="BN: branch" if k == 0 else None,
                    )
                    if k == 0:
                        bottom.plot(
                            i,
                            r["fit_slope"] * i + r["fit_intercept"],
                            color="k",
                            lw=0.8,
                            ls=":",
                            label=f"fit c·i + b, c = {r['fit_slope']:.2f} (seed 0)",
                        )
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
        "C9 skip-path and branch variance per residual block at initialisation (BN in train mode)", fontsize=10
    )
    fig.tight_layout()
    return [save_figure(fig, out_dir, "residual-variance")]


EXPERIMENT = register_experiment(
    Experiment(
        name="residual-variance",
        claim="C9",
        title="With BN the skip-path variance grows ~ i (branch ~ 1); without norm ~ 2^i",
        config=ResidualVarianceConfig,
        scales={
            "smoke": ResidualVarianceConfig(seeds=2, depth=8, width=4, batch_size=32),
            "quick": ResidualVarianceConfig(),
            "full": ResidualVarianceConfig(
                seeds=5, dataset="cifar10", data_dir="data/cifar10", depth=500, width=16, batch_size=128
            ),
        },
        grid=_grid,
        run_one=_run_one,
        analyse=_analyse,
        plot=_plot,
        description=__doc__ or "",
    )
)
