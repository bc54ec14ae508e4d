"""``momentum`` (C7): BatchNorm's running statistics are an EMA, slow or fast; precise statistics avoid its errors.

The small CNN with BatchNorm (three conv -> BN -> ReLU -> maxpool blocks,
channels 8/16/32) is trained on digits for a short, fixed number of Adam
steps (``steps``) at batch 32, once per running-statistics momentum (PyTorch
meaning: ``running = (1 - m) * running + m * batch``; the time constant is
about ``1 / m`` steps), ``seeds`` seeds each. The runs differ *only* in the
momentum; the network's weights follow the same trajectory for every
momentum of one seed, because the running statistics never enter a
training-mode forward pass.

Every ``probe_every`` steps a callback of :func:`normlab.lab.train.train`
compares each BN layer's running statistics with the **true population
statistics** of the current network: those of the whole training set,
measured by :func:`normlab.running_stats.recalibrate` with one batch holding all of
it (on a copy of the model, so training is untouched). With, per channel,
``e_mean = (running_mean - mu) / sigma`` and ``e_var = ln(running_var /
sigma^2)`` (``sigma^2`` the population variance), the **distance** is
``D = sqrt(mean(e_mean^2) + mean(e_var^2))`` over all channels of all BN
layers (0 = exact), and the **jitter** between consecutive probes is the same
formula applied to the change of the running statistics (``Delta
running_mean / sigma`` and ``Delta ln running_var``). After training the test
accuracy is measured three ways: eval mode with the EMA statistics, eval mode
with precise (recalibrated) statistics, and train mode (batch statistics of
test batches of the training batch size).

Verdict rule (:func:`~normlab.lab.experiments.framework.compare` and
:func:`~normlab.lab.experiments.framework.threshold`, mean ± 1 std over seeds, then
:func:`~normlab.lab.experiments.framework.combine`), with the smallest momentum
``m_slow`` and the largest ``m_fast`` of the grid:

1. *converges slower*: mean D over the first ``early_steps`` steps is larger
   for ``m_slow`` than for ``m_fast``;
2. *fluctuates less*: mean jitter over the second half of training is smaller
   for ``m_slow`` than for ``m_fast`` (the jitter counts every change of the
   running statistics, batch noise and catch-up drift alike: a momentum still
   converging at the end, e.g. 0.01 after 300 steps, changes more than 0.03;
   the extremes of the grid are compared for that reason);
3. *too few steps with a slow EMA leave the eval statistics wrong*: D at the
   end of training is larger for ``m_slow`` than for the PyTorch default
   ``reference_momentum`` (0.1);
4. *precise statistics are never worse than the EMA*: for every momentum,
   the per-seed difference (precise − EMA test accuracy) lies above
   ``-margin`` (whole interval mean − std above it).

The claim holds when all four hold; the summary gives the numbers and the
train-mode vs eval-mode accuracy gap (reported, not judged).

Command: ``normlab run momentum`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU (one thread per run, other jobs on the machine):
smoke ~10 s; quick (digits, 300 steps, 5 momenta x 3 seeds = 15 runs)
~1 min measured (65 s); full (CIFAR-10, WRN-16-4, 5,000 steps at batch 128) is
for a GPU, not run here.
Expected (PyTorch/Keras conventions; Wu & Johnson 2021, "Rethinking batch
in BatchNorm", on EMA vs precise BN): smaller momentum converges slower but
fluctuates less; after too few steps a slow EMA still carries its initial
(0, 1) and early statistics, and eval accuracy suffers; precise statistics
are never worse than the EMA.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.lab.config import ConfigError
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
    threshold,
    values,
)

__all__ = [
    "MomentumConfig",
    "EXPERIMENT",
    "precise_copy",
    "running_stats",
    "population_stats",
    "stat_distance",
    "dist_early",
    "jitter_late",
]

MOMENTUM = "norm_kwargs.momentum"  # the row key of a run's BN momentum (its norm_kwargs, flattened)


@dataclass(frozen=True)
class MomentumConfig:
    """C7 momentum; see the module docstring for the command, runtimes and the expected result."""

    seeds: int = 3  # seeds per momentum
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    model: str = "cnn"  # model name (normlab.lab.models.model_names())
    model_kwargs: dict = field(default_factory=lambda: {"channels": [8, 16, 32]})  # keywords for build_model
    momenta: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)  # BN momenta, PyTorch meaning (weight of the new batch)
    reference_momentum: float = 0.1  # PyTorch's default, the reference of verdict part 3
    steps: int = 300  # optimizer steps per run (deliberately short: the slowest EMA has time constant ~1/m steps)
    batch_size: int = 32  # examples per optimizer step
    lr: float = 1e-3  # Adam learning rate (constant)
    probe_every: int = 5  # optimizer steps between two measurements of the running statistics
    early_steps: int = 50  # verdict part 1 averages the distance over the first this many steps
    margin: float = 0.01  # verdict part 4: precise may be below EMA by at most this accuracy (fraction)
    threads: int = 1  # torch threads per run
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)


def _grid(cfg: MomentumConfig):
    if cfg.reference_momentum not in cfg.momenta:
        raise ConfigError(f"reference_momentum={cfg.reference_momentum} must be one of momenta {cfg.momenta}")
    if len(cfg.momenta) < 2:
        raise ConfigError("momentum needs at least two momenta to compare")
    for m in cfg.momenta:
        yield {
            "dataset": cfg.dataset,
            "n_train": cfg.n_train,
            "model": cfg.model,
            "model_kwargs": dict(cfg.model_kwargs),
            "norm": "batchnorm",
            "norm_kwargs": {"momentum": m},
            "optimizer": "adam",
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "max_steps": cfg.steps,
            "epochs": cfg.steps,  # an upper bound; max_steps ends the run
            "probe_every": cfg.probe_every,
            "threads": cfg.threads,
        }


# --------------------------------------------------------------------------- measurements


def precise_copy(model, x):
    """A copy of ``model`` whose BN running statistics are the population statistics of ``x`` (``model`` untouched).

    :func:`normlab.running_stats.recalibrate` with one batch holding all of ``x``: each BN layer gets the mean and
    unbiased variance of its input over ``x``, the layers before it normalised with their batch (= population)
    statistics too.
    """
    from normlab.running_stats import recalibrate

    probe = copy.deepcopy(model)
    recalibrate(probe, [x], 1)
    return probe


def running_stats(model) -> list[tuple[Any, Any]]:
    """Per BN layer of ``model``: copies of (running_mean, running_var)."""
    from normlab.running_stats import batchnorm_modules

    return [(m.running_mean.detach().clone(), m.running_var.detach().clone()) for m in batchnorm_modules(model)]


def population_stats(model, x) -> list[tuple[Any, Any]]:
    """Per BN layer: (mean, unbiased variance) of its input over all of ``x`` (see :func:`precise_copy`)."""
    return running_stats(precise_copy(model, x))


def stat_distance(a: list[tuple[Any, Any]], b: list[tuple[Any, Any]], pop: list[tuple[Any, Any]], eps: float = 1e-5):
    """``(D, D_mean, D_var)`` between the statistics ``a`` and ``b`` (per layer: mean, variance), in units of ``pop``.

    ``D_mean`` is the RMS over channels of ``(mean_a - mean_b) / sigma`` and ``D_var`` that of
    ``ln(var_a / var_b)`` (``sigma^2`` = ``pop``'s variance); ``D = sqrt(D_mean^2 + D_var^2)``.
    """
    import torch

    em = torch.cat([(ma - mb) / torch.sqrt(vp + eps) for (ma, _), (mb, _), (_, vp) in zip(a, b, pop)])
    ev = torch.cat([torch.log((va + eps) / (vb + eps)) for (_, va), (_, vb) in zip(a, b)])
    d_mean = em.double().pow(2).mean().sqrt().item()
    d_var = ev.double().pow(2).mean().sqrt().item()
    return math.hypot(d_mean, d_var), d_mean, d_var


def _train_mode_accuracy(model, x, y, batch_size: int) -> float:
    """Accuracy with batch statistics (train mode) over batches of ``batch_size``, on a copy (no buffer changes)."""
    import torch

    probe = copy.deepcopy(model).train()
    correct = seen = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            if xb.shape[0] < 2:  # one example has no batch statistics
                continue
            correct += (probe(xb).argmax(-1) == y[i : i + batch_size]).sum().item()
            seen += xb.shape[0]
    return correct / max(seen, 1)


def _run_one(run: Run) -> dict[str, Any]:
    import torch

    from normlab.lab.runtime import resolve_device
    from normlab.lab.train import evaluate, load_data, train

    tc = run.train_config()
    ds = load_data(tc)
    device = resolve_device(tc.device)
    xtr, xte, yte = ds.x_train.to(device), ds.x_test.to(device), ds.y_test.to(device)
    every = int(run["probe_every"])
    probe: dict[str, list] = {"probe_step": [], "dist": [], "dist_mean": [], "dist_var": [], "jitter": []}
    prev: list = []

    def callback(state) -> None:
        nonlocal prev
        if state.event != "step" or not (state.step % every == 0 or state.step in (1, tc.max_steps)):
            return
        ema = running_stats(state.model)
        pop = population_stats(state.model, xtr)
        d, d_mean, d_var = stat_distance(ema, pop, pop)
        probe["probe_step"].append(state.step)
        probe["dist"].append(d)
        probe["dist_mean"].append(d_mean)
        probe["dist_var"].append(d_var)
        probe["jitter"].append(stat_distance(ema, prev, pop)[0] if prev else None)
        prev = ema

    result = train(tc, progress=run.progress, callback=callback)
    model = result.model
    old = torch.get_num_threads()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        precise_loss, precise_acc = evaluate(precise_copy(model, xtr), xte, yte)
        train_mode_acc = _train_mode_accuracy(model, xte, yte, tc.batch_size)
    finally:
        torch.set_num_threads(old)
    metrics = result.to_metrics()
    metrics.update(probe)
    metrics.update(
        {
            "dist_end": probe["dist"][-1] if probe["dist"] else None,  # at the last step
            "ema_test_acc": metrics["final_test_acc"],
            "precise_test_acc": precise_acc,
            "precise_test_loss": precise_loss,
            "train_mode_test_acc": train_mode_acc,
        }
    )
    return metrics


def dist_early(row: dict[str, Any], early_steps: int) -> float:
    """Mean distance D over the probes at steps <= ``early_steps``."""
    xs = [d for s, d in zip(row["probe_step"], row["dist"]) if s <= early_steps]
    if not xs:
        raise ConfigError(f"no probe at step <= early_steps={early_steps}; raise early_steps or lower probe_every")
    return sum(xs) / len(xs)


def jitter_late(row: dict[str, Any]) -> float:
    """Mean jitter over the probes in the second half of training."""
    last = row["probe_step"][-1]
    xs = [j for s, j in zip(row["probe_step"], row["jitter"]) if j is not None and s > last / 2]
    if not xs:
        raise ConfigError("no jitter measured in the second half of training; lower probe_every")
    return sum(xs) / len(xs)


# --------------------------------------------------------------------------- analysis


def _momenta(rows: list[dict[str, Any]]) -> list[float]:
    return sorted({r[MOMENTUM] for r in rows})


def _analyse(rows: list[dict[str, Any]], cfg: MomentumConfig) -> Verdict:
    ms = _momenta(rows)
    if len(ms) < 2:
        raise ConfigError("momentum needs runs at two momenta or more")
    slow, fast = ms[0], ms[-1]
    ref = cfg.reference_momentum if cfg.reference_momentum in ms else fast

    def v(metric: str, m: float) -> list[float]:
        if metric == "dist_early":
            return [dist_early(r, cfg.early_steps) for r in rows if r[MOMENTUM] == m]
        if metric == "jitter_late":
            return [jitter_late(r) for r in rows if r[MOMENTUM] == m]
        return values(rows, metric, **{MOMENTUM: m})

    def cmp(metric: str, a: float, b: float, direction: str, text: str) -> Verdict:
        return compare(v(metric, a), v(metric, b), direction, name_a=f"m={a:g}", name_b=f"m={b:g}", metric=text)

    parts = {
        "converges slower": cmp("dist_early", slow, fast, "greater", f"distance, first {cfg.early_steps} steps"),
        "fluctuates less": cmp("jitter_late", slow, fast, "less", f"jitter per {cfg.probe_every} steps, 2nd half"),
        "slow EMA wrong at the end": cmp("dist_end", slow, ref, "greater", f"distance at step {cfg.steps}"),
    }
    never_worse = {}
    for m in ms:
        diffs = [p - e for p, e in zip(v("precise_test_acc", m), v("ema_test_acc", m))]
        never_worse[f"m={m:g}"] = threshold(diffs, -cfg.margin, "greater", name=f"precise - EMA accuracy, m={m:g}")
    parts["precise never worse"] = combine(never_worse)
    verdict = combine(parts)

    def f(metric: str, m: float) -> str:
        return fmt_mean_std(v(metric, m))

    accs = "; ".join(
        f"m={m:g}: EMA {f('ema_test_acc', m)}, precise {f('precise_test_acc', m)}, "
        f"train mode {f('train_mode_test_acc', m)}"
        for m in dict.fromkeys((slow, ref, fast))
    )
    head = "; ".join(f"{k}: {p.status}" for k, p in parts.items())
    summary = (
        f"{head} | early distance m={slow:g} {f('dist_early', slow)} vs m={fast:g} {f('dist_early', fast)}; "
        f"late jitter {f('jitter_late', slow)} vs {f('jitter_late', fast)}; "
        f"end distance m={slow:g} {f('dist_end', slow)} vs m={ref:g} {f('dist_end', ref)} | test accuracy {accs}"
    )
    numbers = dict(verdict.numbers)
    numbers["accuracy"] = {
        f"{m:g}": {k: mean_std(v(k, m))[:2] for k in ("ema_test_acc", "precise_test_acc", "train_mode_test_acc")}
        for m in ms
    }
    return Verdict(verdict.status, summary, numbers)


# --------------------------------------------------------------------------- figure


def _mean_curve(rs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    steps = rs[0]["probe_step"]
    out_m, out_s, out_t = [], [], []
    for i, t in enumerate(steps):
        xs = [r[key][i] for r in rs if i < len(r[key]) and r[key][i] is not None]
        if xs:
            m, s, _ = mean_std(xs)
            out_t.append(t)
            out_m.append(m)
            out_s.append(s)
    return out_t, out_m, out_s


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: MomentumConfig) -> list[Path]:
    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.3))
    ms = _momenta(rows)
    cmap = plt.get_cmap("viridis")
    for i, ((m,), rs) in enumerate(sorted(group(rows, MOMENTUM).items())):
        colour = cmap(i / max(1, len(ms) - 1))
        for ax, key in ((ax1, "dist"), (ax2, "jitter")):
            t, mean, sd = _mean_curve(rs, key)
            ax.plot(t, mean, color=colour, label=f"momentum {m:g}")
            lo, hi = [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)]
            ax.fill_between(t, lo, hi, color=colour, alpha=0.2)
    ax1.set(
        xlabel="optimizer step",
        ylabel="distance D (population-std units, log scale)",
        yscale="log",
        title="running statistics vs population statistics",
    )
    ax2.set(
        xlabel="optimizer step",
        ylabel=f"change per {cfg.probe_every} steps (population-std units, log)",
        yscale="log",
        title="fluctuation of the running statistics",
    )
    ax1.legend(fontsize=8)
    for key, label, marker in (
        ("ema_test_acc", "eval mode, EMA statistics", "o"),
        ("precise_test_acc", "eval mode, precise statistics", "s"),
        ("train_mode_test_acc", "train mode (batch statistics)", "^"),
    ):
        stats = [mean_std(values(rows, key, **{MOMENTUM: m}))[:2] for m in ms]
        ax3.errorbar(ms, [a for a, _ in stats], yerr=[b for _, b in stats], marker=marker, capsize=3, label=label)
    ax3.set(
        xscale="log",
        xlabel="BN momentum (PyTorch meaning, log scale)",
        ylabel="test accuracy (fraction)",
        title=f"test accuracy after {cfg.steps} steps",
    )
    ax3.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle(
        f"C7: BN running statistics by momentum, CNN on {cfg.dataset}, batch {cfg.batch_size} "
        f"(mean ± std over {n_seeds} seeds)"
    )
    return [save_figure(fig, out_dir, "momentum")]


EXPERIMENT = register_experiment(
    Experiment(
        name="momentum",
        claim="C7",
        title="Smaller BN momentum converges slower but fluctuates less; precise statistics never lose to the EMA",
        config=MomentumConfig,
        scales={
            "smoke": MomentumConfig(
                seeds=2,
                n_train=256,
                model_kwargs={"channels": [4, 8]},
                momenta=(0.01, 0.1, 0.5),
                steps=20,
                probe_every=2,
                early_steps=6,
            ),
            "quick": MomentumConfig(),
            "full": MomentumConfig(
                dataset="cifar10",
                model="resnet",
                model_kwargs={"depth": 6, "width": 4},
                momenta=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
                steps=5000,
                batch_size=128,
                probe_every=50,
                early_steps=500,
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
