"""C4 ``smoothness``: does BatchNorm make the loss landscape smoother (Santurkar et al. 2018)?

Pre-registration
----------------
**Claim** (S0, its opening and the section deriving BN from the gradient's
Lipschitz constant; after Santurkar, Tsipras, Ilyas & Madry 2018, "How Does
Batch Normalization Help Optimization?", §3.1, Fig. 4): BN lowers the
Lipschitz constant ``L`` of the gradient with respect to the parameters — the
landscape is smoother — so a larger learning rate is safe (the descent
condition of S0 is ``η < 2/L``). Santurkar et al. measure it along the
gradient during training: at a point ``w`` with gradient ``g`` they step to
``w − η g`` and record the *effective β-smoothness* ``max_η |∇L(w) −
∇L(w − η g)| / |η g|``, smaller with BN throughout training. The Lipschitz
constant of the gradient is locally the largest Hessian eigenvalue magnitude
``|λ_max|``; PyHessian (Yao et al. 2020) reports that in *shallow* networks
BN can raise it. CLAIMS.md: smaller with BN, at least in deeper nets.

Per run (an MLP trained with SGD, probed at 6 points of its trajectory on one
fixed batch, in train mode) the metrics are geometric means over the probe
points: ``beta_mean`` (effective β), ``lambda_mean`` (``|λ_max|`` by power
iteration on Hessian-vector products) and ``loss_range_mean`` (the loss's
range along ``−g``); ``beta_first`` and ``lambda_first`` are the values at the first
probe (after one step). Arms: ``norm=batchnorm`` vs ``norm=none`` at the same
depth, **paired by seed** (same seed: same initialisation draw of the Linear
layers, same batch order), compared on a **log scale** (ratios BN / none).

Deciding parts (the deep network, 10 hidden layers; direction "less": BN's
value below the network without norm):

* ``beta-deep`` — ``beta_mean``, margin ×1.25.
* ``lambda-deep`` — ``lambda_mean``, margin ×1.25.

Why ×1.25: a **practical threshold** — ``β`` (or ``|λ_max|``) sets the largest
safe step, ``η < 2/β``; a 25 % larger safe step is about the smallest change
anyone tunes a learning rate by, a smaller difference would not change the
step one picks.

Reported parts (shown, never deciding):

* ``beta-shallow``, ``lambda-shallow`` — the same at 2 hidden layers, margin
  ×1.25. Reported because the claim says "at least in deeper nets" and
  PyHessian finds shallow nets can go either way.
* ``beta-deep-first``, ``lambda-deep-first`` — the deep network after its
  first step only, margin ×1.25. Reported because Santurkar et al.'s claim is
  about the whole training run (our deciding metrics average over it); the
  first probe shows whether BN is smoother from the start or only becomes so.
* ``loss-range-deep`` — the loss range along ``−g`` (Santurkar et al.'s
  "loss landscape" band), margin ×1.25; reported because it mixes smoothness
  with the gradient's size.

A run with no finite probe value (a network diverged before its first probe)
counts as ``10^4`` for ``beta_mean``/``lambda_mean``/``loss_range_mean`` (rougher than
any network probed; ``missing=``); runs are never dropped.

**Does not hold** if, in the deep network, BN's ``beta`` or ``|λ_max|`` is
shown to be higher than without BN, or shown to be within ×1.25 of it.

**Seeds and budget** (quick): 3 seeds per round, at most 12 (each seed: 4
trainings of 400 SGD steps with 6 probes). Measured on the 2-core CPU, one
thread per run (``/usr/bin/time``, user + system): the full budget of 12
seeds costs 55 s of CPU; the first quick run decided at 6 seeds (43 s).

Design
------
For each depth in ``depths`` (hidden layers of an MLP of ``width`` units,
He-initialised; at full scale conv blocks of a VGG-like CNN) and each norm in
``norms`` (BatchNorm, none) and seed, the network is trained by
:func:`normlab.lab.train.train` with SGD + momentum at one learning rate
``lr`` for ``steps`` steps on digits. At the optimizer steps in
``probe_steps`` (step ``s`` = after ``s`` updates; ``train(...,
callback=...)``) it is probed on one fixed batch, the first ``probe_batch``
training examples of :func:`normlab.lab.train.load_data` (the same for every
network):

* :func:`normlab.lab.probes.gradient_landscape` over ``etas`` (loss range,
  gradient change, β per η and ``beta_eff``, the max over η);
* :func:`normlab.lab.probes.hessian_eigenvalues`, the top eigenvalue by power
  iteration (its magnitude: power iteration returns the eigenvalue of
  largest magnitude with its sign).

Both probes run in ``mode="train"``: for BN that is the function SGD
optimises (batch statistics, whose dependence on the weights is part of the
gradient and the Hessian); without norm the mode changes nothing. On a
quadratic ``½ wᵀAw`` the effective β equals ``|A g| / |g|``, between the
Rayleigh quotient and ``λ_max``: β and ``λ_max`` are two views of the same
curvature. Probing inside the callback leaves the trajectory untouched (a test
checks it).

Why He initialisation and lr = 0.02 (fixed in an earlier design, before any
verdict): with PyTorch's default Linear initialisation a 10-layer ReLU MLP
without BN starts with a vanishing signal and sits on the loss plateau, where
the landscape is trivially flat: that compares a dead network with a live
one. ``lr = 0.02`` is the largest of {0.01, 0.02, 0.05} at which the 10-layer
network *without* BN did not diverge in a pilot (at 0.05 it diverges: C1's
claim). Both apply to both norms alike.

Command: ``normlab run smoothness`` (quick). ``full`` is the paper's setting
for a GPU (a VGG-like CNN on CIFAR-10, lr 0.1, probed every few thousand
steps; the CIFAR-10 batches must be in ``data_dir``), not run here.
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
    pyplot,
    register_experiment,
    save_figure,
)
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["SmoothnessConfig", "EXPERIMENT", "summarise_run", "MISSING"]

MISSING = 1e4  # the value a run with no finite probe counts as (beta, lambda_max, loss_range): rougher than any


@dataclass(frozen=True)
class SmoothnessConfig:
    """C4's configuration; see the module docstring for the procedure and the parts."""

    seeds: int = 3  # seeds per round (initialisation and batch order)
    max_seeds: int = 12  # seed budget per (depth, norm)
    threads: int = 1  # torch threads per run (not part of the run id)
    dataset: str = "digits"  # training data (offline dataset name)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale); not part of the run id
    model: str = "mlp"  # "mlp" (depth = hidden layers) or "cnn" (depth = conv blocks, VGG-like widths)
    depths: tuple[int, ...] = (2, 10)  # hidden layers / conv blocks; the deepest decides, the shallowest is reported
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


def _model_kwargs(cfg: SmoothnessConfig, depth: int) -> dict[str, Any]:
    if cfg.model == "mlp":
        return {"width": cfg.width, "depth": depth, "init": cfg.init}
    if cfg.model == "cnn":  # VGG-like: channels double per block up to 8x, 2x2 max-pool after each block
        return {"channels": [cfg.width * 2 ** min(i, 3) for i in range(depth)], "init": cfg.init}
    raise ValueError(f"model={cfg.model!r} is not one of: 'mlp', 'cnn'")


def _grid(cfg: SmoothnessConfig):
    if len(cfg.norms) != 2:
        raise ValueError(
            f"norms must name two norms: the claimed-smoother one first, then the baseline; got {cfg.norms}"
        )
    if len(set(cfg.depths)) < 2:
        raise ValueError(f"depths must hold a shallow and a deep network, got {cfg.depths}")
    probe = sorted({int(s) for s in cfg.probe_steps if 1 <= s <= cfg.steps})
    if not probe:
        raise ValueError(f"probe_steps {cfg.probe_steps} has no step in 1..steps={cfg.steps}")
    for depth in cfg.depths:
        for norm in cfg.norms:
            yield {
                "dataset": cfg.dataset,
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


_CURVES = ("probe_step", "loss0", "grad_norm", "loss_range", "beta_eff", "lambda_max", "lambda_converged", "beta",
           "grad_change", "loss_eta")  # fmt: skip


def _run_one(run: Run) -> dict[str, Any]:
    import torch.nn.functional as F

    from normlab.lab.probes import gradient_landscape, hessian_eigenvalues
    from normlab.lab.train import load_data, train

    config = run.train_config()
    ds = load_data(config)
    n = min(int(run["probe_batch"]), ds.x_train.shape[0])
    batch = (ds.x_train[:n], ds.y_train[:n])  # the same fixed batch for every network
    want = set(run["probe_steps"])
    mode = run["hessian_mode"]
    rec: dict[str, list] = {k: [] for k in _CURVES}

    def probe(state) -> None:
        if state.event != "step" or state.step not in want:
            return
        gl = gradient_landscape(state.model, F.cross_entropy, batch, mode=mode, etas=run["etas"])
        he = hessian_eigenvalues(state.model, F.cross_entropy, batch, mode=mode, k=1, max_iter=run["hessian_iters"],
                                 tol=run["hessian_tol"], seed=run.seed)  # fmt: skip
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

    result = train(config, progress=run.progress, callback=probe)
    return {
        "diverged": result.diverged,
        "diverged_step": result.diverged_step,
        "steps": result.steps,
        "final_test_acc": result.final.get("test_acc"),
        "final_train_loss": result.final.get("train_loss"),
        "probes_done": len(rec["probe_step"]),
        "step_loss": result.step_loss,
        **rec,
    }


def _log_mean(xs) -> tuple[float | None, int]:
    """Geometric mean over the finite, positive values (None if there are none); and how many were left out."""
    good = [math.log10(x) for x in xs if x is not None and math.isfinite(x) and x > 0]
    return (10 ** (sum(good) / len(good)) if good else None), len(xs) - len(good)


def _first(xs) -> float | None:
    x = xs[0] if xs else None
    return x if x is not None and math.isfinite(x) and x > 0 else None


def summarise_run(metrics: dict[str, Any]) -> dict[str, Any]:
    """A run's per-seed values: geometric means over the probe points of ``beta_eff`` (``beta_mean``),
    ``|λ_max|`` (``lambda_mean``) and the loss range (``loss_range_mean``), the values at the first probe
    (``beta_first``, ``lambda_first``), and ``dropped_<q>``: probe points left out (non-finite or zero). None
    where nothing is finite (the parts then count the run as :data:`MISSING`)."""
    lam = [abs(x) if x is not None else None for x in metrics.get("lambda_max", [])]  # the curvature is |λ|
    out: dict[str, Any] = {}
    for key, xs in (("beta_mean", metrics.get("beta_eff", [])), ("lambda_mean", lam),
                    ("loss_range_mean", metrics.get("loss_range", []))):  # fmt: skip
        out[key], out[f"dropped_{key}"] = _log_mean(xs)
    out["beta_first"], out["lambda_first"] = _first(metrics.get("beta_eff", [])), _first(lam)
    return out


def _measure(rows: list[dict[str, Any]], cfg: SmoothnessConfig) -> list[dict[str, Any]]:
    """Per run: :func:`summarise_run` (the per-seed values the parts compare)."""
    return [{**r, **summarise_run(r)} for r in rows]


def _parts(cfg: SmoothnessConfig) -> list[Part]:
    bn, none = cfg.norms
    deep, shallow = max(cfg.depths), min(cfg.depths)
    why = "practical: β sets the safe step (η < 2/β); 25 % is about the smallest change a learning rate is tuned by"

    def part(name, says, metric, depth, decides=True, extra=""):
        return Part(name, says, metric, {"depth": depth, "norm": bn}, {"depth": depth, "norm": none},
                    direction="less", margin=1.25, why=why + extra, log=True, paired=True, decides=decides,
                    missing=MISSING, unit="nats" if metric == "loss_range_mean" else "1/step",
                    label_a=f"{bn}, depth {depth}", label_b=f"{none}, depth {depth}")  # fmt: skip

    return [
        part("beta-deep", f"effective β lower with {bn} ({deep} layers, over training)", "beta_mean", deep),
        part("lambda-deep", f"|λ_max| lower with {bn} ({deep} layers, over training)", "lambda_mean", deep),
        part("beta-shallow", f"effective β lower with {bn} ({shallow} layers)", "beta_mean", shallow, False),
        part("lambda-shallow", f"|λ_max| lower with {bn} ({shallow} layers)", "lambda_mean", shallow, False),
        part("beta-deep-first", f"effective β lower with {bn} after the first step ({deep} layers)", "beta_first",
             deep, False),
        part("lambda-deep-first", f"|λ_max| lower with {bn} after the first step ({deep} layers)", "lambda_first",
             deep, False),
        part("loss-range-deep", f"loss range along −g lower with {bn} ({deep} layers)", "loss_range_mean", deep, False,
             " (here on the loss range, which also grows with the gradient's size)"),
    ]  # fmt: skip


def _geo(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    return 10 ** float(np.mean(np.log10(xs))) if xs else float("nan")


def _explain(rows: list[dict[str, Any]], cfg: SmoothnessConfig, judgement: Judgement):
    bn, none = cfg.norms
    deep = max(cfg.depths)
    per = [r for r in _measure(rows, cfg) if int(r["seed"]) < judgement.seeds]

    def at(norm, key, depth=deep):
        return _geo(r[key] for r in per if r["depth"] == depth and r["norm"] == norm)

    def curve(norm, key):  # geometric mean over seeds at each probe step, deep network
        rs = [r for r in per if r["depth"] == deep and r["norm"] == norm]
        steps = sorted({s for r in rs for s in r["probe_step"]})
        vals = {s: [abs(v) for r in rs for t, v in zip(r["probe_step"], r[key]) if t == s] for s in steps}
        return {s: _geo(v) for s, v in vals.items()}

    cb, cn = curve(bn, "beta_eff"), curve(none, "beta_eff")
    lower_from = next((s for s in sorted(cb) if all(cb[t] < cn.get(t, math.inf) for t in cb if t >= s)), None)
    diverged = [f"{r['norm']}/depth {r['depth']}/seed {r['seed']}" for r in per if r.get("diverged")]
    numbers = {
        "beta_deep": {bn: at(bn, "beta_mean"), none: at(none, "beta_mean")},
        "lambda_deep": {bn: at(bn, "lambda_mean"), none: at(none, "lambda_mean")},
        "beta_deep_per_probe": {bn: cb, none: cn},
        "lambda_deep_per_probe": {bn: curve(bn, "lambda_max"), none: curve(none, "lambda_max")},
        "bn_beta_lower_from_step": lower_from,
        "diverged": diverged,
        "hessian_mode": "train",
    }
    first = min(cb) if cb else None
    text = (
        f"deep net ({deep} layers), geometric means over seeds: β {at(bn, 'beta_mean'):.3g} with {bn} vs "
        f"{at(none, 'beta_mean'):.3g} without, |λ_max| {at(bn, 'lambda_mean'):.3g} vs {at(none, 'lambda_mean'):.3g}"
    )
    if first is not None:
        text += (
            f"; after the first step β is {cb[first]:.3g} vs {cn.get(first, float('nan')):.3g}, and BN's β stays "
            + (f"below from step {lower_from} on" if lower_from is not None else "not below at the last probe")
        )
    if diverged:
        text += f"; diverged: {', '.join(diverged)}"
    return text, numbers


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: SmoothnessConfig) -> list[Path]:
    plt = pyplot()
    depths = sorted({r["depth"] for r in rows})
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    quantities = [
        ("beta_eff", "effective β = max_η |Δ∇L| / |η g|"),
        ("lambda_max", "top Hessian eigenvalue |λ_max|"),
        ("loss_range", "loss range along −g (nats)"),
    ]
    fig, axes = plt.subplots(len(quantities), len(depths), figsize=(4.6 * len(depths), 3.0 * len(quantities)),
                             squeeze=False, sharex=True)  # fmt: skip
    for j, d in enumerate(depths):
        for i, (q, label) in enumerate(quantities):
            ax = axes[i][j]
            for c, norm in enumerate(norms):
                rs = [r for r in rows if r["depth"] == d and r["norm"] == norm]
                curves = []
                for r in rs:
                    steps = r.get("probe_step", [])
                    ys = np.array([abs(v) if (v is not None and math.isfinite(v) and v != 0) else np.nan
                                   for v in r.get(q, [])], dtype=float)  # fmt: skip
                    ax.plot(steps, ys, color=f"C{c}", lw=0.7, alpha=0.3, marker=".", ms=3)
                    curves.append(dict(zip(steps, np.log10(ys))))
                grid = sorted({s for cv in curves for s in cv})
                mean = [np.nanmean([cv.get(s, np.nan) for cv in curves]) for s in grid]
                ax.plot(grid, 10 ** np.array(mean), color=f"C{c}", lw=2, marker="o", ms=4,
                        label=f"{norm} (geo. mean of {len(rs)} seeds)")  # fmt: skip
            ax.set_yscale("log")
            ax.set_xscale("log")
            if i == 0:
                ax.set_title(f"{cfg.model.upper()}, depth {d}")
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
                max_seeds=2,
                depths=(1, 3),
                width=16,
                steps=12,
                probe_steps=(1, 12),
                probe_batch=64,
                etas=(0.02, 0.2),
                hessian_iters=8,
            ),  # fmt: skip
            "quick": SmoothnessConfig(),
            "full": SmoothnessConfig(
                seeds=5,
                max_seeds=20,
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
            ),  # fmt: skip
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
