"""``batch-size`` (C2): BatchNorm depends on the quality of mini-batch statistics; tiny batches hurt it.

The small CNN (``build_model("cnn")``: three conv 3x3 -> norm -> ReLU ->
maxpool blocks, channels 8/16/32 at quick scale, then a linear classifier) is
trained on scikit-learn's digits at every batch size of the grid (2 ... 512)
with BatchNorm, GroupNorm, LayerNorm (``GroupNorm(1, C)`` on conv features)
and no norm, ``seeds`` seeds each. Every BatchNorm run is also evaluated with
*precise* statistics (``normlab.running_stats.recalibrate`` after training: the
running statistics replaced by the population statistics of the whole
training set, measured in one pass), so the figure shows "BN, recalibrated"
without extra training. Batch Renorm and Ghost BN are trained by the sibling
experiment ``small-batch-fixes`` (C13) on the very same grid.

Fair budget: **a fixed number of optimizer steps** (``steps``) at every
batch size, with Adam at one constant learning rate. Why: with the 1,438
digits a fixed number of epochs leaves batch 512 with 2 steps per epoch
(untrained unless it runs hundreds of epochs, which then costs batch 2
hundreds of thousands of steps), while equal steps give every batch size the
same number of updates in bounded time; Adam's normalised step lets one
learning rate work from batch 2 to 512 (SGD + momentum at a learning rate
that suits batch 32, 0.05, stayed at chance accuracy at batch 2 for every norm
in a trial). The price: a tiny batch sees fewer examples (batch 2:
``2 * steps`` examples), so *every* norm loses accuracy at
tiny batch here. The verdict therefore never compares accuracies across batch
sizes of one norm on their own; it compares how much each norm loses,
which removes what all norms share (the smaller sample).

Verdict rule: for each norm and seed, the *drop* is test accuracy at
``reference_batch`` (32, the GroupNorm paper's normal batch per GPU) minus test
accuracy at ``tiny_batch`` (2) for the same seed. The claim "BN degrades at
tiny batch while batch-independent norms do not" holds when BN's drop is
larger than GroupNorm's **and** than LayerNorm's, each by
:func:`~normlab.lab.experiments.framework.compare` (mean ± 1 std over seeds, no
overlap, difference above ``margin``); it does not hold when either is
clearly the other way; otherwise inconclusive
(:func:`~normlab.lab.experiments.framework.combine`). The summary also quotes the
accuracies at the tiny batch (the GroupNorm paper's headline comparison) and
BN's best batch size (information only: with a fixed step budget, larger
batches see more data, so "moderate batches regularise best" is not judged).

The source's own run of this sweep crashed unfinished; this one finishes: a
2-sample batch is valid for every norm here (BN normalises over 2 x H x W
positions per channel), and the sweep stores every run as
it finishes (``<root>/batch-size/<run id>/``), so an interrupted
``normlab run batch-size`` resumes where it stopped and skips finished runs
(verified by interrupting the quick sweep and re-running it).

Command: ``normlab run batch-size`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU (one thread per run, other jobs on the machine):
smoke ~10 s; quick (digits, 200 steps, 6 batch sizes x 4 norms x 3 seeds = 72
runs) 4.3 min measured (load average 5-10 from other jobs; expect
less on a quiet machine); full (CIFAR-10, WRN-16-4, 20,000 steps, 9 batch
sizes, 3 seeds) is for a GPU, not run here.
Expected (Wu & He 2018, GroupNorm, ResNet-50 on ImageNet): at batch 2 per GPU
top-1 error BN 34.7 % vs GN 24.1 %; at batch 32 BN 23.6 % vs GN 24.1 %: BN
loses ~11 points from batch 32 to 2, GN under 1.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
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
)

__all__ = [
    "BatchSizeConfig",
    "EXPERIMENT",
    "PRECISE",
    "grid_points",
    "run_point",
    "accuracy",
    "drops",
    "plot_vs_batch",
]

PRECISE = "batchnorm+precise"  # the variant "BN evaluated with recalibrated (precise) statistics": a metric of BN runs


@dataclass(frozen=True)
class BatchSizeConfig:
    """Accuracy and loss vs batch size for a set of norms (C2 ``batch-size`` and C13 ``small-batch-fixes``).

    See the module docstrings for the command, runtimes and the expected results.
    """

    seeds: int = 3  # seeds per grid point
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    model: str = "cnn"  # model name (normlab.lab.models.model_names())
    model_kwargs: dict = field(default_factory=lambda: {"channels": [8, 16, 32]})  # keywords for build_model
    norms: tuple[str, ...] = ("batchnorm", "groupnorm", "layernorm", "none")  # registered norm names trained
    batch_sizes: tuple[int, ...] = (2, 4, 8, 32, 128, 512)  # examples per optimizer step
    steps: int = 200  # optimizer steps per run, the same at every batch size
    optimizer: str = "adam"  # "adam" | "sgd" (momentum 0.9)
    lr: float = 1e-3  # constant learning rate (per unit gradient) at every batch size
    group_norm_groups: int = 4  # GroupNorm groups per layer (channels 8/16/32 -> 2/4/8 channels per group)
    ghost_virtual_batch: int = 32  # Ghost BN virtual batch size (examples); a batch no larger than it is plain BN
    renorm_r_warmup: tuple[float, ...] = (0.05, 0.4)  # Batch Renorm r_max ramp (start, end), fractions of `steps`
    renorm_d_warmup: tuple[float, ...] = (0.05, 0.25)  # Batch Renorm d_max ramp (start, end), fractions of `steps`
    tiny_batch: int = 2  # the "tiny" batch size of the verdict (examples)
    reference_batch: int = 32  # the "normal" batch size of the verdict (examples)
    margin: float = 0.01  # smallest accuracy difference (fraction) that counts
    threads: int = 1  # torch threads per run (runs are small; one thread each is most efficient)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)


# --------------------------------------------------------------------------- grid and runs


@functools.lru_cache(maxsize=8)
def _train_size(dataset: str, n_train: int | None, data_dir: str | None) -> int:
    if n_train is not None:
        return n_train
    from normlab.lab.data import load_dataset

    kw = {"data_dir": data_dir} if data_dir else {}
    return int(load_dataset(dataset, **kw).x_train.shape[0])


def norm_kwargs(norm: str, cfg: BatchSizeConfig) -> dict[str, Any]:
    """The keywords each norm layer gets (only where the layer's default would not fit this budget)."""
    if norm == "groupnorm":
        return {"num_groups": cfg.group_norm_groups}
    if norm == "ghostbatchnorm":
        return {"virtual_batch_size": cfg.ghost_virtual_batch}
    if norm == "batchrenorm":  # the paper's ramps (5k-40k / 5k-25k steps) scaled to our step budget
        r = [round(f * cfg.steps) for f in cfg.renorm_r_warmup]
        d = [round(f * cfg.steps) for f in cfg.renorm_d_warmup]
        return {"r_max_warmup": r, "d_max_warmup": d}
    return {}


def grid_points(cfg: BatchSizeConfig, norms: Sequence[str] | None = None):
    """One training run per (norm, batch size); equal norms give equal params in C2 and C13."""
    n = _train_size(cfg.dataset, cfg.n_train, cfg.data_dir)
    for norm in cfg.norms if norms is None else norms:
        for b in cfg.batch_sizes:
            if b > n:
                raise ConfigError(
                    f"batch size {b} is larger than the training set ({n} examples); drop it from batch_sizes"
                )
            yield {
                "dataset": cfg.dataset,
                "n_train": cfg.n_train,
                "model": cfg.model,
                "model_kwargs": dict(cfg.model_kwargs),
                "norm": norm,
                "norm_kwargs": norm_kwargs(norm, cfg),
                "optimizer": cfg.optimizer,
                "lr": cfg.lr,
                "momentum": 0.9,
                "batch_size": b,
                "max_steps": cfg.steps,
                "epochs": math.ceil(cfg.steps / (n // b)),  # enough epochs for `steps` steps; max_steps ends the run
                "threads": cfg.threads,
            }


def run_point(run: Run) -> dict[str, Any]:
    """Train one (norm, batch size) point; add eval-mode train metrics, the final train loss and precise-BN metrics."""
    import torch

    from normlab.lab.train import evaluate, load_data, train
    from normlab.running_stats import batchnorm_modules, recalibrate

    tc = run.train_config()
    result = train(tc, progress=run.progress)
    metrics = result.to_metrics()
    model = result.model
    ds = load_data(tc)
    device = next(model.parameters()).device
    xtr, ytr = ds.x_train.to(device), ds.y_train.to(device)
    xte, yte = ds.x_test.to(device), ds.y_test.to(device)
    tail = max(1, len(result.step_loss) // 10)
    metrics["train_loss_end"] = sum(result.step_loss[-tail:]) / tail  # train mode, mean of the last 10% of steps
    old = torch.get_num_threads()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        metrics["train_eval_loss"], metrics["train_eval_acc"] = evaluate(model, xtr, ytr)
        if batchnorm_modules(model):
            precise = copy.deepcopy(model)
            recalibrate(precise, [xtr], 1)  # one batch holding the whole training set: the population statistics
            metrics["precise_test_loss"], metrics["precise_test_acc"] = evaluate(precise, xte, yte)
            metrics["precise_train_eval_loss"], metrics["precise_train_eval_acc"] = evaluate(precise, xtr, ytr)
    finally:
        torch.set_num_threads(old)
    return metrics


# --------------------------------------------------------------------------- analysis


def accuracy(row: dict[str, Any], variant: str) -> float:
    """Test accuracy of a row as ``variant``: eval mode with EMA statistics, or precise statistics for ``PRECISE``."""
    return row["precise_test_acc"] if variant == PRECISE else row["final_test_acc"]


def _train_loss(row: dict[str, Any], variant: str) -> float:
    return row["precise_train_eval_loss"] if variant == PRECISE else row["train_eval_loss"]


def _norm_of(variant: str) -> str:
    return "batchnorm" if variant == PRECISE else variant


def by_seed(rows: list[dict[str, Any]], variant: str, batch_size: int) -> dict[int, float]:
    """``{seed: test accuracy}`` of ``variant`` at ``batch_size``."""
    norm = _norm_of(variant)
    return {r["seed"]: accuracy(r, variant) for r in rows if r["norm"] == norm and r["batch_size"] == batch_size}


def drops(rows: list[dict[str, Any]], variant: str, reference: int, tiny: int) -> list[float]:
    """Per seed: accuracy at ``reference`` minus accuracy at ``tiny`` batch (seeds present at both)."""
    ref, small = by_seed(rows, variant, reference), by_seed(rows, variant, tiny)
    return [ref[s] - small[s] for s in sorted(ref) if s in small]


def variants(rows: list[dict[str, Any]], norms: Sequence[str]) -> list[str]:
    """The norms in ``norms`` order, with ``PRECISE`` right after "batchnorm" when its runs carry precise metrics."""
    out = []
    for n in norms:
        out.append(n)
        if n == "batchnorm" and any(r["norm"] == "batchnorm" and "precise_test_acc" in r for r in rows):
            out.append(PRECISE)
    return out


def _check_batches(rows: list[dict[str, Any]], cfg: BatchSizeConfig) -> None:
    have = {r["batch_size"] for r in rows}
    for b in (cfg.tiny_batch, cfg.reference_batch):
        if b not in have:
            raise ConfigError(f"the verdict needs batch size {b}; add it to batch_sizes (have {sorted(have)})")


def _analyse(rows: list[dict[str, Any]], cfg: BatchSizeConfig) -> Verdict:
    _check_batches(rows, cfg)
    tiny, ref = cfg.tiny_batch, cfg.reference_batch
    present = {r["norm"] for r in rows}
    if "batchnorm" not in present:
        raise ConfigError("batch-size compares BatchNorm with batch-independent norms; keep 'batchnorm' in norms")
    bn = drops(rows, "batchnorm", ref, tiny)
    parts = {}
    for other in ("groupnorm", "layernorm"):
        if other in present:
            parts[other] = compare(
                bn,
                drops(rows, other, ref, tiny),
                "greater",
                name_a="batchnorm",
                name_b=other,
                metric=f"accuracy drop from batch {ref} to {tiny}",
                margin=cfg.margin,
            )
    if not parts:
        raise ConfigError("batch-size needs a batch-independent norm ('groupnorm' or 'layernorm') in norms")
    v = combine(parts)
    shown = [n for n in cfg.norms if n in present]
    at_tiny = "; ".join(f"{n} {fmt_mean_std(by_seed(rows, n, tiny).values())}" for n in variants(rows, shown))
    drop_text = ", ".join(f"{n} {fmt_mean_std(drops(rows, n, ref, tiny))}" for n in shown)
    bn_means = {b: mean_std(by_seed(rows, "batchnorm", b).values())[0] for b in sorted({r["batch_size"] for r in rows})}
    best = max(bn_means, key=bn_means.get)
    verdict_word = {
        "holds": "BN's accuracy drops more than the batch-independent norms', as claimed",
        "does not hold": "BN's accuracy does not drop more than the batch-independent norms'",
        "inconclusive": "no clear difference between the drops",
    }[v.status]
    summary = (
        f"test accuracy drop from batch {ref} to {tiny} (fixed {cfg.steps} steps): {drop_text}; {verdict_word} "
        f"[{'; '.join(f'vs {k}: {p.status}' for k, p in parts.items())}] | accuracy at batch {tiny}: {at_tiny} | "
        f"BN's best batch size {best} (info only)"
    )
    numbers = dict(v.numbers)
    numbers["accuracy_at_tiny"] = {n: mean_std(by_seed(rows, n, tiny).values())[:2] for n in variants(rows, shown)}
    numbers["bn_mean_accuracy_by_batch"] = {str(b): m for b, m in bn_means.items()}
    return Verdict(v.status, summary, numbers)


# --------------------------------------------------------------------------- figure

_STYLE = {
    "batchnorm": dict(color="C0", marker="o"),
    PRECISE: dict(color="C0", marker="o", ls="--", mfc="white"),
    "groupnorm": dict(color="C1", marker="s"),
    "layernorm": dict(color="C2", marker="^"),
    "none": dict(color="C7", marker="x"),
    "batchrenorm": dict(color="C3", marker="D"),
    "ghostbatchnorm": dict(color="C4", marker="v"),
}
_LABEL = {
    "batchnorm": "BatchNorm (EMA statistics)",
    PRECISE: "BatchNorm, recalibrated (precise) statistics",
    "groupnorm": "GroupNorm",
    "layernorm": "LayerNorm",
    "none": "no norm",
    "batchrenorm": "Batch Renorm",
    "ghostbatchnorm": "Ghost BN",
}


def plot_vs_batch(rows: list[dict[str, Any]], out_dir: Path, name: str, names: Sequence[str], title: str) -> Path:
    """Test accuracy and training loss vs batch size, mean ± std over seeds, one line per variant."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in variants(rows, [n for n in names if any(r["norm"] == n for r in rows)]):
        pts = sorted(group([r for r in rows if r["norm"] == _norm_of(variant)], "batch_size").items())
        bs = [b for (b,), _ in pts]
        acc = [mean_std([accuracy(r, variant) for r in rs])[:2] for _, rs in pts]
        loss = [mean_std([_train_loss(r, variant) for r in rs])[:2] for _, rs in pts]
        style = _STYLE.get(variant, {})
        label = _LABEL.get(variant, variant)
        ax1.errorbar(bs, [m for m, _ in acc], yerr=[s for _, s in acc], capsize=3, label=label, **style)
        ax2.errorbar(bs, [m for m, _ in loss], yerr=[s for _, s in loss], capsize=3, label=label, **style)
    ax1.set(xscale="log", xlabel="batch size (examples, log scale)", ylabel="test accuracy (fraction)")
    ax1.set_title("test accuracy")
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="batch size (examples, log scale)",
        ylabel="training loss, eval mode (nats, log scale)",
        title="training loss on the whole training set",
    )
    for ax in (ax1, ax2):
        bs_all = sorted({r["batch_size"] for r in rows})
        ax.set_xticks(bs_all)
        ax.set_xticklabels([str(b) for b in bs_all])
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle(f"{title} (mean ± std over {n_seeds} seeds)")
    return save_figure(fig, out_dir, name)


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: BatchSizeConfig) -> list[Path]:
    steps = rows[0]["max_steps"] if rows else cfg.steps
    title = f"C2: CNN on {cfg.dataset}, {steps} Adam steps at every batch size"
    return [plot_vs_batch(rows, out_dir, "batch-size", cfg.norms, title)]


def _run_one(run: Run) -> dict[str, Any]:
    return run_point(run)


EXPERIMENT = register_experiment(
    Experiment(
        name="batch-size",
        claim="C2",
        title="BatchNorm degrades at tiny batch sizes; batch-independent norms (GroupNorm, LayerNorm) do not",
        config=BatchSizeConfig,
        scales={
            "smoke": BatchSizeConfig(
                seeds=2,
                n_train=256,
                model_kwargs={"channels": [4, 8]},
                norms=("batchnorm", "groupnorm"),
                batch_sizes=(2, 32),
                steps=8,
                group_norm_groups=2,
            ),
            "quick": BatchSizeConfig(),
            "full": BatchSizeConfig(
                dataset="cifar10",
                model="resnet",
                model_kwargs={"depth": 6, "width": 4},
                batch_sizes=(2, 4, 8, 16, 32, 64, 128, 256, 512),
                steps=20000,
                group_norm_groups=32,
                threads=4,
            ),
        },
        grid=grid_points,
        run_one=_run_one,
        analyse=_analyse,
        plot=_plot,
        description=__doc__ or "",
    )
)
