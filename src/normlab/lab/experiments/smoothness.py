"""C4 ``smoothness``: does BatchNorm make the loss landscape smoother (Santurkar et al. 2018)?

The claim (CLAIMS.md C4): BN lowers the Lipschitz constant of the gradient, so
a larger step is safe. Santurkar, Tsipras, Ilyas & Madry 2018 ("How Does Batch
Normalization Help Optimization?", §3.1, Fig. 4) measure it along the
gradient: at a point ``w`` of the training trajectory, with ``g`` the gradient
on a batch, they step to ``w - eta g`` for a range of ``eta`` and record the
loss (its range is the "loss landscape" band), the gradient change
``|grad L(w) - grad L(w - eta g)|`` ("gradient predictiveness") and the
effective beta-smoothness ``max_eta |grad L(w) - grad L(w - eta g)| / |eta g|``;
all are smaller with BN in their VGG and deep linear networks. PyHessian (Yao
et al. 2020) measures the top Hessian eigenvalue instead and reports that
in shallow networks BN can *raise* it; the claim is therefore tested on the
deeper network, the shallow one is reported beside it.

What runs
---------
For each depth in ``depths`` (hidden layers of an MLP of ``width`` units,
He-initialised; at full scale conv blocks of a VGG-like CNN) and each norm in ``norms`` (BatchNorm, none) and seed, the
network is trained with SGD + momentum at one learning rate ``lr`` for
``steps`` steps on digits. At the optimizer steps in ``probe_steps`` (step
``s`` = after ``s`` updates; ``train(..., callback=...)``) it is probed on one
fixed batch of ``probe_batch`` training examples, the same for every network:

* :func:`normlab.lab.probes.gradient_landscape` over ``etas`` (loss range, gradient
  change, beta per eta and ``beta_eff``, the max over eta);
* :func:`normlab.lab.probes.hessian_eigenvalues`, the top eigenvalue by power
  iteration on Hessian-vector products.

Both probes run in ``mode="train"``: for BN that is the function SGD
optimises (batch statistics, whose dependence on the weights is part of the
gradient and the Hessian); without norm the mode changes nothing. Note (from
the probe's engineer) that on a quadratic ``1/2 w^T A w`` the effective beta
equals ``|A g| / |g|``, between the Rayleigh quotient ``g^T A g / g^T g`` and
``lambda_max``; beta and ``lambda_max`` are two views of the same curvature.

Why He initialisation and lr = 0.02: with PyTorch's default Linear
initialisation a 10-layer ReLU MLP without BN starts with a vanishing signal
and sits on the loss plateau (2.30 nats) for hundreds of steps, where the
landscape is trivially flat (pilot: beta_eff ~ 0.15, lambda_max ~ 0.16 vs
~ 10-40 for BN): that compares a dead network with a live one. He
initialisation makes the unnormalised network trainable. ``lr = 0.02`` is the
largest of {0.01, 0.02, 0.05} at which the 10-layer network *without* BN did
not diverge in a pilot (at 0.05 it diverges: that is C1's claim). Both choices
were fixed before the verdict was computed and apply to both norms alike.

The verdict (rule)
------------------
Per run, each quantity is summarised by its geometric mean over the probe
points (mean of ``log10``; non-finite values, e.g. after a divergence, are
left out and counted). Power iteration returns the eigenvalue of largest
magnitude with its sign; its magnitude is used (the Lipschitz constant of the
gradient is the largest ``|eigenvalue|``). For the **deepest** network,
:func:`~normlab.lab.experiments.framework.compare` (mean ± 1 std over seeds, direction
"less") is applied to BN vs none for ``beta_eff`` and for ``lambda_max``; the
claim **holds** if both are smaller with BN, **does not hold** if either is
larger, else inconclusive (:func:`~normlab.lab.experiments.framework.combine`). The
shallower depths are compared the same way and reported in the summary and
numbers, without deciding the verdict (PyHessian: shallow nets can differ).

Command: ``normlab run smoothness`` (quick). Measured runtime on the 2-core
CPU with one thread per run: smoke ~8 s, quick 38 s (12 runs; 64 s when the
machine was shared, load ~9). ``full`` is the paper's setting for a GPU (VGG-11-like CNN on
CIFAR-10 with and without BN, lr 0.1, probed every few hundred steps;
estimated ~1 GPU-hour; the CIFAR-10 batches must be in ``data_dir``), not run here.
Expected (Santurkar et al. Fig. 4): loss range,
gradient change and beta_eff smaller with BN throughout training.
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
    compare,
    fmt_mean_std,
    pyplot,
    register_experiment,
    save_figure,
)

__all__ = ["SmoothnessConfig", "EXPERIMENT", "summarise_run"]


@dataclass(frozen=True)
class SmoothnessConfig:
    """C4's configuration; see the module docstring for the procedure and the verdict rule."""

    seeds: int = 3  # seeds per (depth, norm): initialisation and batch order
    dataset: str = "digits"  # training data (offline dataset name)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale); None for the built-in datasets
    model: str = "mlp"  # "mlp" (depth = hidden layers) or "cnn" (depth = conv blocks, VGG-like widths)
    depths: tuple[int, ...] = (2, 10)  # hidden layers / conv blocks; the last (deepest) decides the verdict
    width: int = 64  # hidden units per layer (mlp) or channels of the first conv block (cnn, doubling to 8x)
    init: str = "kaiming"  # weight initialisation ("kaiming" = He normal; see the docstring for why)
    norms: tuple[str, ...] = ("batchnorm", "none")  # claimed-smoother norm first, the baseline second
    optimizer: str = "sgd"  # update rule of training
    lr: float = 0.02  # learning rate (per unit gradient), the same for every network
    momentum: float = 0.9  # SGD momentum coefficient
    batch_size: int = 64  # training examples per step
    steps: int = 400  # optimizer steps of training (digits: 22 steps per epoch)
    probe_steps: tuple[int, ...] = (1, 10, 30, 100, 200, 400)  # optimizer steps after which to probe
    probe_batch: int = 256  # training examples in the fixed probe batch
    etas: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)  # step sizes along -g (lr/2 ... lr/(1-momentum))
    hessian_iters: int = 50  # maximum Hessian-vector products of the power iteration
    hessian_tol: float = 1e-3  # relative change of the eigenvalue estimate that stops the iteration
    threads: int = 1  # torch threads per run (not part of the run id)


def _model_kwargs(cfg: SmoothnessConfig, depth: int) -> dict[str, Any]:
    if cfg.model == "mlp":
        return {"width": cfg.width, "depth": depth, "init": cfg.init}
    if cfg.model == "cnn":  # VGG-like: channels double per block up to 8x, 2x2 max-pool after each block
        return {"channels": [cfg.width * 2 ** min(i, 3) for i in range(depth)], "init": cfg.init}
    raise ValueError(f"model={cfg.model!r} is not one of: 'mlp', 'cnn'")


def _grid(cfg: SmoothnessConfig):
    if not cfg.norms or len(cfg.norms) < 2:
        raise ValueError("norms must name at least two norms: the claimed-smoother one first, then the baseline")
    probe = sorted({int(s) for s in cfg.probe_steps if 1 <= s <= cfg.steps})
    if not probe:
        raise ValueError(f"probe_steps {cfg.probe_steps} has no step in 1..steps={cfg.steps}")
    for depth in cfg.depths:
        for norm in cfg.norms:
            yield {
                "dataset": cfg.dataset,
                "data_kwargs": {} if cfg.data_dir is None else {"data_dir": cfg.data_dir},
                "model": cfg.model,
                "model_kwargs": _model_kwargs(cfg, depth),
                "depth": depth,
                "norm": norm,
                "optimizer": cfg.optimizer,
                "lr": cfg.lr,
                "momentum": cfg.momentum,
                "batch_size": cfg.batch_size,
                "epochs": 10**6,  # bounded by max_steps
                "max_steps": cfg.steps,
                "probe_steps": probe,
                "probe_batch": cfg.probe_batch,
                "etas": list(cfg.etas),
                "hessian_mode": "train",
                "hessian_iters": cfg.hessian_iters,
                "hessian_tol": cfg.hessian_tol,
            }


def _probe_batch(run: Run):
    """The first ``probe_batch`` training examples of the dataset as ``train`` loads it (same data seed)."""
    from normlab.lab.data import load_dataset

    ds = load_dataset(run["dataset"], seed=0, **run.get("data_kwargs", {}))
    n = min(int(run["probe_batch"]), ds.x_train.shape[0])
    return ds.x_train[:n], ds.y_train[:n]


def _run_one(run: Run) -> dict[str, Any]:
    import torch.nn.functional as F

    from normlab.lab.probes import gradient_landscape, hessian_eigenvalues
    from normlab.lab.train import train

    cfg = run.config if isinstance(run.config, SmoothnessConfig) else SmoothnessConfig()
    batch = _probe_batch(run)
    want = set(run["probe_steps"])
    mode = run["hessian_mode"]
    rec: dict[str, list] = {
        k: []
        for k in (
            "probe_step",
            "loss0",
            "grad_norm",
            "loss_range",
            "beta_eff",
            "lambda_max",
            "lambda_converged",
            "beta",
            "grad_change",
            "loss_eta",
        )
    }

    def probe(state) -> None:
        if state.event != "step" or state.step not in want:
            return
        gl = gradient_landscape(state.model, F.cross_entropy, batch, mode=mode, etas=run["etas"])
        he = hessian_eigenvalues(
            state.model,
            F.cross_entropy,
            batch,
            mode=mode,
            k=1,
            max_iter=run["hessian_iters"],
            tol=run["hessian_tol"],
            seed=run.seed,
        )
        rec["probe_step"].append(state.step)
        rec["loss0"].append(gl.loss0)
        rec["grad_norm"].append(gl.grad_norm)
        rec["loss_range"].append(gl.loss_range)
        rec["beta_eff"].append(gl.beta_eff)
        rec["lambda_max"].append(he.eigenvalues[0])
        rec["lambda_converged"].append(he.converged[0])
        rec["beta"].append(gl.beta.tolist())
        rec["grad_change"].append(gl.grad_change.tolist())
        rec["loss_eta"].append(gl.loss.tolist())

    result = train(run.train_config(threads=cfg.threads), progress=run.progress, callback=probe)
    out = {
        "diverged": result.diverged,
        "diverged_step": result.diverged_step,
        "steps": result.steps,
        "final_test_acc": result.final.get("test_acc"),
        "final_train_loss": result.final.get("train_loss"),
        "wall_time": result.wall_time,
        "probes_done": len(rec["probe_step"]),
        "step_loss": result.step_loss,
        **rec,
    }
    out.update(summarise_run(out))
    return out


def _log_mean(xs) -> tuple[float, int]:
    """Mean of log10 over the finite, positive values; and how many values were left out."""
    good = [math.log10(x) for x in xs if x is not None and math.isfinite(x) and x > 0]
    return (sum(good) / len(good) if good else float("nan")), len(xs) - len(good)


def summarise_run(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-run scalars: ``log10_<q>`` = mean over probe points of log10 of beta_eff, |lambda_max|, loss_range and
    the largest gradient change; ``dropped_<q>`` counts the points left out (non-finite, or zero)."""
    out = {}
    for q in ("beta_eff", "lambda_max", "loss_range"):
        xs = metrics.get(q, [])
        if q == "lambda_max":  # the gradient's Lipschitz constant is the largest |eigenvalue|; keep its magnitude
            xs = [abs(x) if x is not None else None for x in xs]
        out[f"log10_{q}"], out[f"dropped_{q}"] = _log_mean(xs)
    gc = [max(row) if row else float("nan") for row in metrics.get("grad_change", [])]
    out["log10_max_grad_change"], out["dropped_max_grad_change"] = _log_mean(gc)
    return out


def _finite(xs) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]


def _compare_depth(rows, depth, a, b, metric) -> Verdict:
    va = _finite(r[f"log10_{metric}"] for r in rows if r["depth"] == depth and r["norm"] == a)
    vb = _finite(r[f"log10_{metric}"] for r in rows if r["depth"] == depth and r["norm"] == b)
    if not va or not vb:
        return Verdict("inconclusive", f"depth {depth} {metric}: no finite values for {a if not va else b}", {})
    return compare(va, vb, "less", name_a=a, name_b=b, metric=f"log10 {metric} (depth {depth})")


def _analyse(rows: list[dict[str, Any]], cfg: SmoothnessConfig) -> Verdict:
    a, b = cfg.norms[0], cfg.norms[1]
    depths = sorted({r["depth"] for r in rows})
    deep = depths[-1]
    parts = {}
    for d in depths:
        for metric in ("beta_eff", "lambda_max"):
            parts[(d, metric)] = _compare_depth(rows, d, a, b, metric)
    decided = combine({f"depth {deep} {m}": parts[(deep, m)] for m in ("beta_eff", "lambda_max")})

    def side(d, norm, metric):
        xs = _finite(r[f"log10_{metric}"] for r in rows if r["depth"] == d and r["norm"] == norm)
        return fmt_mean_std([10**x for x in xs], 3) if xs else "n/a"

    diverged = [f"{r['norm']}/depth {r['depth']}/seed {r['seed']}" for r in rows if r.get("diverged")]
    bits = []
    for d in reversed(depths):
        tag = "deep, decides" if d == deep else "shallow, reported"
        bits.append(
            f"depth {d} ({tag}): beta_eff {a} {side(d, a, 'beta_eff')} vs {b} {side(d, b, 'beta_eff')} "
            f"[{parts[(d, 'beta_eff')].status}], lambda_max {a} {side(d, a, 'lambda_max')} vs {b} "
            f"{side(d, b, 'lambda_max')} [{parts[(d, 'lambda_max')].status}]"
        )

    def at_step(d, norm, metric, which):  # geometric mean over seeds at the first (0) or last (-1) probe step
        xs = [abs(r[metric][which]) for r in rows if r["depth"] == d and r["norm"] == norm and r.get(metric)]
        xs = [x for x in xs if math.isfinite(x) and x > 0]
        return 10 ** (sum(math.log10(x) for x in xs) / len(xs)) if xs else float("nan")

    per_step = {
        f"depth {d} {m} {n} step {'first' if w == 0 else 'last'}": at_step(d, n, m, w)
        for d in depths
        for m in ("beta_eff", "lambda_max")
        for n in (a, b)
        for w in (0, -1)
    }
    ends = ", ".join(
        f"{m} {a}/{b} {per_step[f'depth {deep} {m} {a} step {w}']:.3g}/{per_step[f'depth {deep} {m} {b} step {w}']:.3g}"
        f" at the {w} probe"
        for m in ("beta_eff", "lambda_max")
        for w in ("first", "last")
    )
    bits.append(f"depth {deep} over time (geo. mean of seeds): {ends}")
    summary = "geometric mean over probe steps, mean ± std over seeds (the verdict compares log10): " + "; ".join(bits)
    if diverged:
        summary += f"; diverged runs: {', '.join(diverged)}"
    numbers = {
        "decided_by_depth": deep,
        "parts": {f"depth {d} {m}": {"status": v.status, **v.numbers} for (d, m), v in parts.items()},
        "loss_range": {f"depth {d} {n}": side(d, n, "loss_range") for d in depths for n in (a, b)},
        "diverged": diverged,
        "first_and_last_probe": per_step,
        "hessian_mode": "train",
    }
    return Verdict(decided.status, summary, numbers)


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: SmoothnessConfig) -> list[Path]:
    plt = pyplot()
    depths = sorted({r["depth"] for r in rows})
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    quantities = [
        ("beta_eff", "effective β = max_η |Δ∇L| / |η g|"),
        ("lambda_max", "top Hessian eigenvalue λ_max"),
        ("loss_range", "loss range along −g (nats)"),
    ]
    fig, axes = plt.subplots(
        len(quantities), len(depths), figsize=(4.6 * len(depths), 3.0 * len(quantities)), squeeze=False, sharex=True
    )
    for j, d in enumerate(depths):
        for i, (q, label) in enumerate(quantities):
            ax = axes[i][j]
            for c, norm in enumerate(norms):
                rs = [r for r in rows if r["depth"] == d and r["norm"] == norm]
                curves = []
                for k, r in enumerate(rs):
                    steps = r.get("probe_step", [])
                    ys = np.array(
                        [v if (v is not None and math.isfinite(v) and v > 0) else np.nan for v in r.get(q, [])],
                        dtype=float,
                    )
                    ax.plot(steps, ys, color=f"C{c}", lw=0.7, alpha=0.35, marker=".", ms=3)
                    curves.append(dict(zip(steps, np.log10(ys))))
                grid = sorted({s for cv in curves for s in cv})
                mean = [np.nanmean([cv.get(s, np.nan) for cv in curves]) for s in grid]
                ax.plot(
                    grid,
                    10 ** np.array(mean),
                    color=f"C{c}",
                    lw=2,
                    marker="o",
                    ms=4,
                    label=f"{norm} (geo. mean of {len(rs)} seeds)",
                )
            ax.set_yscale("log")
            ax.set_xscale("log")
            if i == 0:
                ax.set_title(f"MLP, {d} hidden layers")
            if j == 0:
                ax.set_ylabel(label)
            if i == len(quantities) - 1:
                ax.set_xlabel("optimizer step (SGD)")
            ax.grid(True, which="both", alpha=0.2)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"C4 smoothness along the gradient, probed during training ({cfg.dataset}, lr {cfg.lr:g}, "
        f"η ∈ [{min(cfg.etas):g}, {max(cfg.etas):g}], probes in train mode)",
        fontsize=10,
    )
    fig.tight_layout()
    return [save_figure(fig, out_dir, "smoothness")]


EXPERIMENT = register_experiment(
    Experiment(
        name="smoothness",
        claim="C4",
        title="BN lowers the gradient's Lipschitz constant (effective β, top Hessian eigenvalue) during training",
        config=SmoothnessConfig,
        scales={
            "smoke": SmoothnessConfig(
                seeds=2,
                depths=(1, 3),
                width=16,
                steps=12,
                probe_steps=(1, 12),
                probe_batch=64,
                etas=(0.02, 0.2),
                hessian_iters=8,
            ),
            "quick": SmoothnessConfig(),
            "full": SmoothnessConfig(
                seeds=5,
                dataset="cifar10",
                data_dir="data/cifar10",
                model="cnn",
                depths=(3, 5),
                width=64,
                lr=0.1,
                batch_size=128,
                steps=15000,
                probe_steps=(1, 100, 1000, 3000, 6000, 10000, 15000),
                probe_batch=512,
                etas=(0.05, 0.1, 0.2, 0.4),
                hessian_iters=100,
            ),
        },
        grid=_grid,
        run_one=_run_one,
        analyse=_analyse,
        plot=_plot,
        description=__doc__ or "",
    )
)
