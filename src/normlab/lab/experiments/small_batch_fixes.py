"""``small-batch-fixes`` (C13): Batch Renorm, Ghost BN, GroupNorm, precise statistics each narrow BN's small-batch gap.

C2's grid (:mod:`normlab.lab.experiments.batch_size`: the small CNN on digits,
batch sizes 2 ... 512, a fixed number of Adam steps at every batch size, see
there why) with BatchNorm and its fixes:

* **Batch Renorm** (Ioffe 2017): BN's output corrected towards the running
  statistics by clipped ``r``, ``d``; the paper's warm-up ramps (r_max 1 -> 3
  over steps 5k-40k, d_max 0 -> 5 over 5k-25k of a much longer run) are
  scaled to our step budget (5-40 % and 5-25 % of ``steps``), otherwise it
  would be plain BN throughout;
* **Ghost BN** (Hoffer et al. 2017), virtual batch 32: note that a batch no
  larger than the virtual batch is normalised exactly as by BN, so at the
  tiny batch sizes Ghost BN *is* BN and cannot narrow the gap there (it acts
  at large batch sizes, where it restores the noise of batch-32 statistics);
* **GroupNorm** (Wu & He 2018), 4 groups per layer: batch-independent;
* **precise statistics** (``normlab.running_stats.recalibrate`` after training: the
  BN runs' running statistics replaced by the population statistics of the
  whole training set): a metric of the BatchNorm runs, no extra training.

The BN and GroupNorm points have exactly the same parameters as in C2, hence
the same run ids. (The run store keeps each experiment's runs in its own
folder, ``<root>/<experiment>/<run id>/``, so they are trained again here
rather than read from C2's folder; see the report on the engine.)

Verdict rule: at ``tiny_batch`` (2), each fix's test accuracy is compared with
BN's (eval mode, EMA running statistics) by
:func:`~normlab.lab.experiments.framework.compare`, direction "greater" (mean ± 1 std
over seeds, no overlap, difference above ``margin``): the fix narrows the
gap "BN at batch 32 minus the variant at batch 2" exactly when it is more
accurate than BN at batch 2. The claim holds when every fix does,
does not hold when any fix is clearly worse than BN, otherwise inconclusive
(:func:`~normlab.lab.experiments.framework.combine`). The summary gives BN's gap and
how much of it each fix closes.

Runs are stored as they finish, so an interrupted ``normlab run
small-batch-fixes`` resumes where it stopped (the source's own attempt at
this sweep crashed unfinished; this one finishes and resumes).

Command: ``normlab run small-batch-fixes`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU (one thread per run, other jobs on the machine):
smoke ~10 s; quick (6 batch sizes x 4 trained variants x 3 seeds = 72 runs)
4.1 min measured (load average 5-10 from other jobs; the BN and GroupNorm
runs repeat C2's); full (CIFAR-10, WRN-16-4, 20,000 steps) is for a GPU.
Expected: each fix is more accurate than BN at batch 2 (GroupNorm paper: GN
24.1 % vs BN 34.7 % top-1 error at batch 2; Batch Renorm paper: renorm
recovers much of BN's loss with minibatches of 4 examples; precise BN paper,
Wu & Johnson 2021: recalibrated statistics fix inaccurate EMA estimates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normlab.lab.config import ConfigError
from normlab.lab.experiments.batch_size import (
    PRECISE,
    BatchSizeConfig,
    _check_batches,
    by_seed,
    grid_points,
    plot_vs_batch,
    run_point,
)
from normlab.lab.experiments.framework import (
    Experiment,
    Run,
    Verdict,
    combine,
    compare,
    fmt_mean_std,
    mean_std,
    register_experiment,
)

__all__ = ["EXPERIMENT", "FIXES_NORMS"]

FIXES_NORMS = ("batchnorm", "batchrenorm", "ghostbatchnorm", "groupnorm")  # trained variants; precise BN comes with BN


def _analyse(rows: list[dict[str, Any]], cfg: BatchSizeConfig) -> Verdict:
    _check_batches(rows, cfg)
    tiny, ref = cfg.tiny_batch, cfg.reference_batch
    present = {r["norm"] for r in rows}
    if "batchnorm" not in present:
        raise ConfigError("small-batch-fixes compares fixes with BatchNorm; keep 'batchnorm' in norms")
    fixes = [n for n in cfg.norms if n in present and n != "batchnorm"]
    if any("precise_test_acc" in r for r in rows if r["norm"] == "batchnorm"):
        fixes.append(PRECISE)
    if not fixes:
        raise ConfigError("small-batch-fixes needs at least one fix besides 'batchnorm' in norms")
    bn_tiny = by_seed(rows, "batchnorm", tiny)
    bn_ref = mean_std(by_seed(rows, "batchnorm", ref).values())[0]
    bn_gap = bn_ref - mean_std(bn_tiny.values())[0]
    parts, notes = {}, []
    for fix in fixes:
        acc = by_seed(rows, fix, tiny)
        parts[fix] = compare(
            list(acc.values()),
            list(bn_tiny.values()),
            "greater",
            name_a=fix,
            name_b="batchnorm",
            metric=f"test accuracy at batch {tiny}",
            margin=cfg.margin,
        )
        gap = bn_ref - mean_std(acc.values())[0]
        closed = f"{(bn_gap - gap) / bn_gap:+.0%} of BN's gap closed" if bn_gap > 0 else "BN has no gap"
        notes.append(f"{fix} {fmt_mean_std(acc.values())} ({parts[fix].status}; {closed})")
    v = combine(parts)
    ghost = ""
    if "ghostbatchnorm" in fixes and tiny <= cfg.ghost_virtual_batch:
        ghost = f" | Ghost BN with virtual batch {cfg.ghost_virtual_batch} computes plain BN at batch {tiny}"
    summary = (
        f"test accuracy at batch {tiny} ({cfg.steps} steps): BN {fmt_mean_std(bn_tiny.values())}, "
        f"BN's gap from batch {ref} {bn_gap:.3g}; " + "; ".join(notes) + ghost
    )
    numbers = dict(v.numbers)
    numbers["bn_gap"] = bn_gap
    return Verdict(v.status, summary, numbers)


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: BatchSizeConfig) -> list[Path]:
    steps = rows[0]["max_steps"] if rows else cfg.steps
    title = f"C13: BN and its small-batch fixes, CNN on {cfg.dataset}, {steps} Adam steps at every batch size"
    return [plot_vs_batch(rows, out_dir, "small-batch-fixes", cfg.norms, title)]


def _grid(cfg: BatchSizeConfig):
    return grid_points(cfg)


def _run_one(run: Run) -> dict[str, Any]:
    return run_point(run)


EXPERIMENT = register_experiment(
    Experiment(
        name="small-batch-fixes",
        claim="C13",
        title="Batch Renorm, Ghost BN, GroupNorm and precise statistics each narrow BN's gap at tiny batch",
        config=BatchSizeConfig,
        scales={
            "smoke": BatchSizeConfig(
                seeds=2,
                n_train=256,
                model_kwargs={"channels": [4, 8]},
                norms=("batchnorm", "batchrenorm", "ghostbatchnorm"),
                batch_sizes=(2, 32),
                steps=8,
                ghost_virtual_batch=16,
            ),
            "quick": BatchSizeConfig(norms=FIXES_NORMS),
            "full": BatchSizeConfig(
                dataset="cifar10",
                model="resnet",
                model_kwargs={"depth": 6, "width": 4},
                norms=FIXES_NORMS,
                batch_sizes=(2, 4, 8, 16, 32, 64, 128, 256, 512),
                steps=20000,
                group_norm_groups=32,
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
