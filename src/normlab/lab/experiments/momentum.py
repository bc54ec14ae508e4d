"""``momentum`` (C7): BN's running statistics are an EMA, slow or fast; the smaller the batch, the slower it should be.

Pre-registration
----------------
**Claim** (S3, §2–§3 on the moving average; our words): BatchNorm stores an
exponential moving average of the batch statistics for use at test time. With
PyTorch's momentum ``m`` (the weight of the new batch; S3 quotes TF/Keras's
decay 0.99 = PyTorch's 0.01) a smaller ``m`` moves towards the true statistics
more slowly but fluctuates less; if training is too short, a slow EMA has not
arrived and the eval-time statistics are wrong. S3 adds: when the batch is small,
each batch's statistics are far from the true ones, so each EMA update should be
small — the smaller the batch, the smaller the momentum. CLAIMS adds (Wu &
Johnson 2021, "Rethinking batch in BatchNorm", on precise BN): statistics
recomputed after training ("precise") avoid the EMA's errors and are never worse.

**Arms.** The small CNN with BN (channels 8/16/32) trained on digits for 300 Adam
steps at batch 4, 16 and 64, seeds paired (same seed: same initialisation and
batch order for every momentum — the running statistics never enter a
training-mode forward, so one training run serves every momentum: it stores each
step's batch statistics and one EMA per momentum of the grid 0.001 … 0.5 is fed
from them, exactly what a BN layer with that momentum would hold). The
*distance* D of stored statistics from the population statistics of the current
network (whole training set): RMS over channels of the mean error in population
standard deviations and of the log variance ratio, combined (0 = exact). The
*jitter*: the same distance between the EMA at consecutive probes (every 5 steps).
Accuracies are fractions of the 359 test digits. ``m_slow`` = 0.001, ``m_fast`` =
0.5, ``m_ref`` = 0.1 (PyTorch's default), ``B`` = 64 (the reference batch).

Deciding parts (all paired by seed):

* ``converges-slower``: mean D over the first 50 steps, ``m_slow`` vs ``m_fast`` at
  batch B, "greater", log scale, δ = ×1.5.
* ``fluctuates-less``: mean jitter over the second half of training, ``m_slow`` vs
  ``m_fast`` at batch B, "less", log scale, δ = ×1.5.
* ``slow-ema-wrong-at-end``: D at the last step, ``m_slow`` vs ``m_ref`` at batch
  B, "greater", log scale, δ = ×1.5. Why ×1.5 for these three: a practical
  threshold — the grid's time constants 1/m span ×500; a factor under 1.5 in the
  statistics' error is not what "slower", "steadier" or "wrong" mean here.
* ``precise-repairs-slow``: test accuracy with precise statistics minus with the
  ``m_slow`` EMA, batch B, against 0, "greater", δ = 0.01 — one point of test
  accuracy (about 4 test digits), below which a repair is not worth a pass
  over the data.
* ``precise-not-worse``: precise minus EMA test accuracy at ``m_ref``, batch B (the
  batch at which the EMA is best placed to win), against the bound −0.01,
  "greater", δ = 0.01. With the engine's rule this is a non-inferiority test:
  it holds when the interval lies above −0.01 and reaches 0 (precise is not
  shown worse by a point, nor shown worse at all); it does not hold when precise
  is shown worse (the interval below 0). δ = one point of accuracy, as above.
* ``best-momentum-shifts``: the *best momentum* of a seed at a batch size — the
  grid momentum whose EMA gives the highest test accuracy (ties broken by the
  lower test loss) — at batch 4 vs batch 64, "less", log scale, δ = ×1.5: half
  a step of the grid (its steps are ×2–×2.5), the finest shift an argmax on it
  resolves; the balance of EMA noise (∝ m/B) against lag (∝ 1/m) puts the
  best momentum at m* ∝ B^(1/3), ×2.5 for this 16× batch ratio.

Reported parts (shown, never deciding: they qualify the deciding ones):
``best-momentum-shifts-by-distance`` (the momentum with the smallest D at the
end, batch 4 vs 64, log, δ ×1.5: the mechanism behind the accuracy);
``best-momentum-shifts-middle`` (batch 16 vs 64, log, δ ×1.5);
``precise-not-worse-small-batch`` (as ``precise-not-worse`` at batch 4);
``precise-vs-best-ema`` (precise minus the best EMA of the grid at batch B,
against −0.01: biased towards the EMA, which is picked on the test set itself —
hence reported only); ``train-mode-loses-small-batch`` (precise eval-mode accuracy
minus train-mode accuracy on test batches of 4, δ 0.01: what batch statistics
of 4 samples cost at test time).

**Does not hold** if any deciding part does not hold: e.g. the slow EMA is not
farther early on, or not steadier late; the slow EMA ends no farther than the
default's; precise statistics are shown worse than the EMA at the default; or
the best momentum at batch 4 is not smaller than at batch 64 (or shown within
×1.5 of it).

**Budget**: seeds in rounds of 3 up to 12 (quick); 3 runs per seed (one per
batch size). Measured at quick scale: see *Runtime* below.

Design notes
------------
The network trains with BN momentum 1: its stored statistics are then each
step's batch statistics (a training-mode forward never reads them), and a
callback blends them into one EMA per momentum with
:func:`normlab.functional.update_running_stats` — the layers' own update. The
steps are the same at every batch size, so the EMAs' time constants are too and
only the noise of the batch statistics differs (4 × 2 × 2 = 16 values per
channel in the last BN at batch 4, 256 at batch 64). Population statistics
come from :func:`normlab.running_stats.recalibrate` with one batch holding the
whole training set, on a copy of the model. Test accuracy is measured in eval
mode with each EMA, with the precise statistics, and in train mode (batch
statistics of test batches of the training batch size).

Runtime
-------
Command: ``normlab run momentum`` (``--scale smoke|quick|full``). Quick (digits,
300 steps, 3 batch sizes, 9 momenta, up to 12 seeds = 36 runs) on this 2-core
CPU, one thread per run: measured 113 s of CPU (user + system, ``/usr/bin/time``)
for the full budget of 12 seeds, which the first quick run used. Smoke: seconds.
Full (CIFAR-10, a ResNet, 5,000 steps) is for a GPU.
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
    Part,
    Run,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
)
from normlab.lab.experiments.verdicts import Judgement

__all__ = [
    "MomentumConfig",
    "EXPERIMENT",
    "EmaBank",
    "precise_copy",
    "running_stats",
    "population_stats",
    "stat_distance",
    "dist_early",
    "jitter_late",
    "best_momentum",
    "train_mode_accuracy",
]


@dataclass(frozen=True)
class MomentumConfig:
    """C7 momentum; see the module docstring for the pre-registration, the command and the runtimes."""

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per grid point
    threads: int = 1  # torch threads per run (not part of the run id)
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    model: str = "cnn"  # model name (normlab.lab.models.model_names())
    model_kwargs: dict = field(default_factory=lambda: {"channels": [8, 16, 32]})  # keywords for build_model
    momenta: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # EMA weights of a new batch
    reference_momentum: float = 0.1  # PyTorch's default (m_ref of the parts)
    batch_sizes: tuple[int, ...] = (4, 16, 64)  # examples per optimizer step; the best-momentum part uses the extremes
    reference_batch: int = 64  # the batch size (examples) at which the EMA parts are judged (B)
    steps: int = 300  # optimizer steps per run, the same at every batch size (so are the EMAs' time constants)
    lr: float = 1e-3  # Adam learning rate (constant)
    probe_every: int = 5  # optimizer steps between two measurements of the statistics
    early_steps: int = 50  # converges-slower averages the distance over the first this many steps
    accuracy_margin: float = 0.01  # δ of the accuracy parts (fraction of the test set)
    ratio_margin: float = 1.5  # δ of the distance and best-momentum parts (a ratio)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)

    def __post_init__(self) -> None:
        if len(self.momenta) < 3 or sorted(self.momenta) != list(self.momenta):
            raise ConfigError(f"momenta must be at least three increasing values, got {self.momenta}")
        if self.reference_momentum not in self.momenta[1:-1]:
            raise ConfigError(f"reference_momentum={self.reference_momentum} must be an inner value of {self.momenta}")
        if self.reference_batch not in self.batch_sizes or len(self.batch_sizes) < 2:
            raise ConfigError(f"reference_batch={self.reference_batch} must be one of batch_sizes {self.batch_sizes}")


def _grid(cfg: MomentumConfig):
    for bs in cfg.batch_sizes:
        yield {
            "dataset": cfg.dataset,
            "n_train": cfg.n_train,
            "model": cfg.model,
            "model_kwargs": dict(cfg.model_kwargs),
            "norm": "batchnorm",
            "norm_kwargs": {"momentum": 1.0},  # the stored statistics are each step's batch statistics
            "momenta": list(cfg.momenta),  # one EMA per momentum, fed from them
            "optimizer": "adam",
            "lr": cfg.lr,
            "batch_size": bs,
            "max_steps": cfg.steps,
            "epochs": cfg.steps,  # an upper bound; max_steps ends the run
            "probe_every": cfg.probe_every,
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


class EmaBank:
    """One EMA of a model's BN statistics per momentum, fed with batch statistics as a BN layer feeds its own.

    Starts where a BN layer starts (mean 0, variance 1). :meth:`update` takes per-layer (mean, unbiased
    variance) of one batch and blends them in with :func:`normlab.functional.update_running_stats`;
    :meth:`stats` gives one momentum's statistics; :meth:`load_into` writes them into a model's BN buffers.
    """

    def __init__(self, model, momenta) -> None:
        from normlab.running_stats import batchnorm_modules

        self.momenta = [float(m) for m in momenta]
        layers = batchnorm_modules(model)
        self._ema = {
            m: [(l.running_mean.detach().clone().zero_(), l.running_var.detach().clone().fill_(1.0)) for l in layers]
            for m in self.momenta
        }

    def update(self, batch: list[tuple[Any, Any]]) -> None:
        from normlab.functional import update_running_stats

        for m, layers in self._ema.items():
            for (rm, rv), (mean, var) in zip(layers, batch):
                update_running_stats(rm, rv, mean, var, 2, m, unbiased=False)  # var is already unbiased

    def stats(self, momentum: float) -> list[tuple[Any, Any]]:
        return [(a.clone(), b.clone()) for a, b in self._ema[float(momentum)]]

    def load_into(self, model, momentum: float):
        """A copy of ``model`` whose BN buffers hold this momentum's EMA."""
        from normlab.running_stats import batchnorm_modules

        out = copy.deepcopy(model)
        for layer, (mean, var) in zip(batchnorm_modules(out), self._ema[float(momentum)]):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        return out


def train_mode_accuracy(model, x, y, batch_size: int) -> float:
    """Accuracy with batch statistics (train mode) over consecutive batches of ``batch_size``, on a copy.

    The model and its buffers are untouched; a final batch of one example (no batch statistics) is skipped.
    """
    import torch

    probe = copy.deepcopy(model).train()
    correct = seen = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size]
            if xb.shape[0] < 2:
                continue
            correct += (probe(xb).argmax(-1) == y[i : i + batch_size]).sum().item()
            seen += xb.shape[0]
    return correct / max(seen, 1)


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.runtime import resolve_device
    from normlab.lab.train import evaluate, load_data, train

    tc = run.train_config()
    ds = load_data(tc)
    device = resolve_device(tc.device)
    xtr, xte, yte = ds.x_train.to(device), ds.x_test.to(device), ds.y_test.to(device)
    every = int(run["probe_every"])
    momenta = [float(m) for m in run["momenta"]]
    bank: EmaBank | None = None
    steps: list[int] = []
    dist: list[list[float]] = [[] for _ in momenta]  # per momentum, per probe
    jitter: list[list[float | None]] = [[] for _ in momenta]
    prev: list[list] | None = None

    def callback(state) -> None:
        nonlocal bank, prev
        if state.event != "step":
            return
        if bank is None:
            bank = EmaBank(state.model, momenta)
        bank.update(running_stats(state.model))  # BN momentum 1: the running statistics are this step's batch's
        if not (state.step % every == 0 or state.step in (1, tc.max_steps)):
            return
        pop = population_stats(state.model, xtr)
        now = [bank.stats(m) for m in momenta]
        steps.append(state.step)
        for i, ema in enumerate(now):
            dist[i].append(stat_distance(ema, pop, pop)[0])
            jitter[i].append(stat_distance(ema, prev[i], pop)[0] if prev is not None else None)
        prev = now

    result = train(tc, progress=run.progress, callback=callback)
    model = result.model
    precise_loss, precise_acc = evaluate(precise_copy(model, xtr), xte, yte)
    ema = [evaluate(bank.load_into(model, m), xte, yte) for m in momenta]
    return {
        "diverged": result.diverged,
        "steps": result.steps,
        "step_loss": list(result.step_loss),
        "momenta": momenta,
        "probe_step": steps,
        "dist": dist,
        "jitter": jitter,
        "ema_test_loss": [loss for loss, _ in ema],
        "ema_test_acc": [acc for _, acc in ema],
        "precise_test_loss": precise_loss,
        "precise_test_acc": precise_acc,
        "train_mode_test_acc": train_mode_accuracy(model, xte, yte, tc.batch_size),
    }


def dist_early(steps: list[int], dist: list[float], early_steps: int) -> float:
    """Mean distance D over the probes at steps <= ``early_steps``."""
    xs = [d for s, d in zip(steps, dist) if s <= early_steps]
    if not xs:
        raise ConfigError(f"no probe at step <= early_steps={early_steps}; raise early_steps or lower probe_every")
    return sum(xs) / len(xs)


def jitter_late(steps: list[int], jitter: list[float | None]) -> float:
    """Mean jitter over the probes in the second half of training."""
    last = steps[-1]
    xs = [j for s, j in zip(steps, jitter) if j is not None and s > last / 2]
    if not xs:
        raise ConfigError("no jitter measured in the second half of training; lower probe_every")
    return sum(xs) / len(xs)


def best_momentum(momenta: list[float], acc: list[float], loss: list[float]) -> float:
    """The momentum with the highest accuracy; among equal accuracies, the one with the lowest loss."""
    return min(zip(momenta, acc, loss), key=lambda t: (-t[1], t[2]))[0]


# --------------------------------------------------------------------------- per-seed rows and parts


def _measure(rows: list[dict[str, Any]], cfg: MomentumConfig) -> list[dict[str, Any]]:
    """Per run (seed, batch size): one row per momentum (``kind="ema"``) and one summary row (``kind="best"``)."""
    out = []
    for r in rows:
        base = {"seed": r["seed"], "batch_size": r["batch_size"]}
        ms, acc, loss = r["momenta"], r["ema_test_acc"], r["ema_test_loss"]
        steps = r["probe_step"]
        for i, m in enumerate(ms):
            out.append(
                {
                    **base,
                    "kind": "ema",
                    "momentum": m,
                    "dist_early": dist_early(steps, r["dist"][i], cfg.early_steps),
                    "jitter_late": jitter_late(steps, r["jitter"][i]),
                    "dist_end": r["dist"][i][-1],
                    "ema_test_acc": acc[i],
                    "precise_minus_ema": r["precise_test_acc"] - acc[i],
                }
            )
        ends = [d[-1] for d in r["dist"]]
        out.append(
            {
                **base,
                "kind": "best",
                "best_momentum": best_momentum(ms, acc, loss),
                "best_momentum_by_distance": ms[min(range(len(ms)), key=ends.__getitem__)],
                "precise_minus_best_ema": r["precise_test_acc"] - max(acc),
                "precise_minus_train_mode": r["precise_test_acc"] - r["train_mode_test_acc"],
            }
        )
    return out


def _parts(cfg: MomentumConfig) -> list[Part]:
    slow, fast, ref = cfg.momenta[0], cfg.momenta[-1], cfg.reference_momentum
    big, small = cfg.reference_batch, min(cfg.batch_sizes)
    mid = sorted(cfg.batch_sizes)[len(cfg.batch_sizes) // 2]
    ema = lambda m, b=big: {"kind": "ema", "batch_size": b, "momentum": m}  # noqa: E731
    best = lambda b: {"kind": "best", "batch_size": b}  # noqa: E731
    ratio_why = "practical: time constants span ×500 over the grid; under ×1.5 is not what slower/steadier/wrong mean"
    acc_why = (
        "one point of test accuracy (~4 of 359 digits): a smaller repair or loss is not worth a pass over the data"
    )
    grid_why = "half a step of the momentum grid (×2–×2.5), the finest an argmax resolves; m* ∝ B^(1/3) predicts ×2.5"
    r, a = cfg.ratio_margin, cfg.accuracy_margin
    return [
        Part("converges-slower", f"the m={slow:g} EMA is farther from the population statistics early on than "
             f"m={fast:g} (batch {big})", "dist_early", ema(slow), ema(fast), direction="greater", margin=r,
             why=ratio_why, log=True, unit="distance D", label_a=f"m={slow:g}", label_b=f"m={fast:g}"),
        Part("fluctuates-less", f"the m={slow:g} EMA changes less between probes late in training than m={fast:g}",
             "jitter_late", ema(slow), ema(fast), direction="less", margin=r, why=ratio_why, log=True,
             unit="distance per probe", label_a=f"m={slow:g}", label_b=f"m={fast:g}"),
        Part("slow-ema-wrong-at-end", f"after {cfg.steps} steps the m={slow:g} EMA is farther from the population "
             f"statistics than m={ref:g}", "dist_end", ema(slow), ema(ref), direction="greater", margin=r,
             why=ratio_why, log=True, unit="distance D", label_a=f"m={slow:g}", label_b=f"m={ref:g}"),
        Part("precise-repairs-slow", f"precise statistics beat the m={slow:g} EMA in test accuracy (batch {big})",
             "precise_minus_ema", ema(slow), bound=0.0, direction="greater", margin=a, why=acc_why,
             unit="accuracy", label_a=f"precise − EMA m={slow:g}"),
        Part("precise-not-worse", f"precise statistics are not worse than the m={ref:g} EMA (batch {big}): "
             f"non-inferiority at −{a:g}", "precise_minus_ema", ema(ref), bound=-a, direction="greater", margin=a,
             why=acc_why, unit="accuracy", label_a=f"precise − EMA m={ref:g}"),
        Part("best-momentum-shifts", f"the best momentum for eval accuracy is smaller at batch {small} than at "
             f"batch {big}", "best_momentum", best(small), best(big), direction="less", margin=r, why=grid_why,
             log=True, unit="momentum", label_a=f"batch {small}", label_b=f"batch {big}"),
        Part("best-momentum-shifts-by-distance", f"the momentum whose EMA ends nearest the population statistics is "
             f"smaller at batch {small} than at batch {big}", "best_momentum_by_distance", best(small), best(big),
             direction="less", margin=r, why=grid_why, log=True, decides=False, unit="momentum",
             label_a=f"batch {small}", label_b=f"batch {big}"),
        Part("best-momentum-shifts-middle", f"the best momentum is smaller at batch {mid} than at batch {big}",
             "best_momentum", best(mid), best(big), direction="less", margin=r, why=grid_why, log=True,
             decides=False, unit="momentum", label_a=f"batch {mid}", label_b=f"batch {big}"),
        Part("precise-not-worse-small-batch", f"precise statistics are not worse than the m={ref:g} EMA at batch "
             f"{small}", "precise_minus_ema", ema(ref, small), bound=-a, direction="greater", margin=a, why=acc_why,
             decides=False, unit="accuracy", label_a=f"precise − EMA m={ref:g}"),
        Part("precise-vs-best-ema", f"precise statistics are not worse than the best EMA of the grid (batch {big}; "
             "the best is picked on the test set)", "precise_minus_best_ema", best(big), bound=-a,
             direction="greater", margin=a, why=acc_why, decides=False, unit="accuracy",
             label_a="precise − best EMA"),
        Part("train-mode-loses-small-batch", f"eval mode with precise statistics beats batch statistics of {small} "
             "test samples", "precise_minus_train_mode", best(small), bound=0.0, direction="greater", margin=a,
             why=acc_why, decides=False, unit="accuracy", label_a="precise − train mode"),
    ]  # fmt: skip


# --------------------------------------------------------------------------- explanation and figure


def _explain(rows: list[dict[str, Any]], cfg: MomentumConfig, judgement: Judgement) -> tuple[str, dict[str, Any]]:
    per = _measure(rows, cfg)
    n = judgement.seeds
    per = [r for r in per if r["seed"] < n]
    sizes = sorted(cfg.batch_sizes)

    def gmean(xs):
        return 10 ** (sum(math.log10(x) for x in xs) / len(xs))

    best = {b: [r["best_momentum"] for r in per if r["kind"] == "best" and r["batch_size"] == b] for b in sizes}
    by_d = {b: [r["best_momentum_by_distance"] for r in per if r["kind"] == "best" and r["batch_size"] == b]
            for b in sizes}  # fmt: skip
    slow = cfg.momenta[0]
    repair = [r["precise_minus_ema"] for r in per
              if r["kind"] == "ema" and r["batch_size"] == cfg.reference_batch and r["momentum"] == slow]  # fmt: skip
    plateau = {}
    for b in sizes:
        rs = [r for r in rows if r["batch_size"] == b and r["seed"] < n]
        accs = [[a for m, a in zip(r["momenta"], r["ema_test_acc"]) if m >= cfg.momenta[len(cfg.momenta) // 2 - 1]]
                for r in rs]  # fmt: skip
        means = [sum(col) / len(col) for col in zip(*accs)] if accs else [0.0]
        plateau[b] = max(means) - min(means)
    lo = cfg.momenta[len(cfg.momenta) // 2 - 1]
    text = (
        f"for m ≥ {lo:g} the mean EMA accuracy varies by at most {max(plateau.values()):.3f} at any batch size, so "
        "the best momentum of one seed sits on a flat plateau; "
        "best momentum for eval accuracy (geometric mean over seeds) by batch size: "
        + ", ".join(f"batch {b}: {gmean(best[b]):.3g}" for b in sizes)
        + "; nearest to the population statistics at the end: "
        + ", ".join(f"batch {b}: {gmean(by_d[b]):.3g}" for b in sizes)
        + f"; precise statistics recover {mean_std(repair)[0]:.3f} accuracy over the m={slow:g} EMA"
    )
    numbers = {"best_momentum": {str(b): best[b] for b in sizes}, "best_by_distance": {str(b): by_d[b] for b in sizes}}
    return text, numbers


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: MomentumConfig) -> list[Path]:
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax1, ax2), (ax3, ax4) = axes
    ms = list(cfg.momenta)
    cmap = plt.get_cmap("viridis")
    ref = [r for r in rows if r["batch_size"] == cfg.reference_batch]
    for i, m in enumerate(ms):
        colour = cmap(i / max(1, len(ms) - 1))
        for ax, key in ((ax1, "dist"), (ax2, "jitter")):
            if not ref:
                continue
            curves = np.array([[np.nan if v is None else v for v in r[key][i]] for r in ref], dtype=float)
            keep = ~np.isnan(curves).all(0)  # the first probe has no jitter
            ax.plot(np.array(ref[0]["probe_step"])[keep], np.nanmean(curves[:, keep], 0), color=colour,
                    label=f"m={m:g}")  # fmt: skip
    ax1.set(xlabel="optimizer step", ylabel="distance D to population statistics (log)", yscale="log",
            title=f"EMA error, batch {cfg.reference_batch} (mean over seeds)")  # fmt: skip
    ax2.set(xlabel="optimizer step", ylabel=f"change per {cfg.probe_every} steps (log)", yscale="log",
            title=f"EMA fluctuation, batch {cfg.reference_batch}")  # fmt: skip
    ax1.legend(fontsize=7, ncol=2)
    sizes = sorted({r["batch_size"] for r in rows})
    for j, b in enumerate(sizes):
        rs = [r for r in rows if r["batch_size"] == b]
        acc = np.array([r["ema_test_acc"] for r in rs])
        ax3.errorbar(ms, acc.mean(0), yerr=acc.std(0, ddof=1) if len(rs) > 1 else None, marker="o", capsize=3,
                     color=f"C{j}", label=f"EMA, batch {b}")  # fmt: skip
        ax3.axhline(float(np.mean([r["precise_test_acc"] for r in rs])), color=f"C{j}", ls="--", lw=1,
                    label=f"precise, batch {b}")  # fmt: skip
        bests = [best_momentum(r["momenta"], r["ema_test_acc"], r["ema_test_loss"]) for r in rs]
        jitter = np.linspace(-0.15, 0.15, len(bests)) if len(bests) > 1 else [0.0]
        ax4.scatter([j + d for d in jitter], bests, color=f"C{j}", alpha=0.7)
        ax4.plot([j - 0.25, j + 0.25], [10 ** np.mean(np.log10(bests))] * 2, color="k", lw=2)
    ax3.set(xscale="log", xlabel="BN momentum (PyTorch: weight of the new batch)", ylabel="test accuracy",
            title=f"eval accuracy after {cfg.steps} steps (mean ± std over seeds)")  # fmt: skip
    ax3.legend(fontsize=7)
    ax4.set_xticks(range(len(sizes)), [f"batch {b}" for b in sizes])
    ax4.set(yscale="log", ylabel="best momentum for eval accuracy (per seed; bar: geometric mean)",
            title="the best momentum per seed and batch size")  # fmt: skip
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"C7: BN running statistics as an EMA — CNN on {cfg.dataset}, {cfg.steps} Adam steps")
    fig.tight_layout()
    return [save_figure(fig, out_dir, "momentum")]


EXPERIMENT = register_experiment(
    Experiment(
        name="momentum",
        claim="C7",
        title="A smaller BN momentum converges slower but fluctuates less, and suits smaller batches; "
        "precise statistics never lose to the EMA",
        config=MomentumConfig,
        scales={
            "smoke": MomentumConfig(
                seeds=2,
                max_seeds=2,
                n_train=256,
                model_kwargs={"channels": [4, 8]},
                momenta=(0.01, 0.1, 0.5),
                batch_sizes=(4, 16),
                reference_batch=16,
                steps=20,
                probe_every=2,
                early_steps=6,
            ),
            "quick": MomentumConfig(),
            "full": MomentumConfig(
                seeds=5,
                max_seeds=20,
                dataset="cifar10",
                model="resnet",
                model_kwargs={"depth": 6, "width": 4},
                batch_sizes=(8, 32, 128),
                reference_batch=128,
                steps=5000,
                probe_every=50,
                early_steps=500,
                threads=4,
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
