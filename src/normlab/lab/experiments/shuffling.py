"""``shuffling`` (C17): BN needs thoroughly shuffled data — each batch must represent the whole distribution.

Pre-registration
----------------
**Claim** (S3, §1 on train/test differences, and item 4 of BN's advantages
quoting Ioffe & Szegedy 2015; our words): BN normalises with the statistics of
the batch, which stand in for those of the whole training set; when a batch
differs too much from the whole data it cannot represent the training
distribution, so BN asks for a thoroughly shuffled training set (and a large
batch). Batch-independent norms (LayerNorm, GroupNorm) and networks without a
norm never look across the batch and should not care how batches are
composed beyond what correlated gradients cost every network. CLAIMS adds:
statistics recomputed on shuffled batches after training ("precise" BN) should
repair part of BN's eval-time loss, since part of it sits in the stored
statistics.

**Arms.** The small CNN (three conv blocks of 8/16/32 channels) on digits, 10
epochs of SGD (momentum 0.9, lr 0.01, batch 32), with BatchNorm, LayerNorm
(one group), GroupNorm (4 groups) or no norm, each trained on *shuffled*
batches (a uniform permutation per epoch) and on *class-sorted* batches (each
epoch sorted by label, random within a class, cut into batches of 32 that are
visited in random order: every batch holds one class, two where a class ends,
while the sequence of batches stays shuffled — only the batches' composition
is correlated, not their order). Test accuracy in eval mode after the last
epoch (BN with its running statistics, as deployed). The *drop* of a norm for
one seed is its test accuracy with shuffled batches minus with class-sorted
batches (same seed: the same initialisation draw). *Precise* statistics:
:func:`normlab.recalibrate` over one epoch of shuffled training batches of 32
after training, the other layers in eval mode.

Deciding parts (paired by seed), δ = 0.01 — a paper's number: Ioffe & Szegedy
credit more thorough shuffling with about 1 % of ImageNet validation accuracy,
the size of effect the source quotes:

* ``bn-loses-more-than-ln``: drop of BN vs drop of LayerNorm, "greater";
* ``bn-loses-more-than-gn``: drop of BN vs drop of GroupNorm, "greater";
* ``precise-repairs``: for BN trained on class-sorted batches, test accuracy with
  precise statistics minus with its running statistics, against 0, "greater".

Reported parts (shown, never deciding): ``bn-loses-more-than-none`` (drop of BN vs
no norm: a network without any norm is batch-independent too);
``bn-loses`` (BN's own drop against 0: is the correlation costly at all);
``precise-repair-is-partial`` (BN shuffled minus BN class-sorted with precise
statistics, against 0: what precise statistics cannot repair, i.e. what the
weights learned from single-class batches cost).

**Does not hold** if a deciding part does not hold: BN's drop is not larger
than LayerNorm's or GroupNorm's (or shown within a point of it), or precise
statistics do not repair BN's eval accuracy (no gain, or under a point).

**Budget**: seeds in rounds of 3 up to 12 (quick), 8 runs per seed; see *Runtime*.

**Design fix after the first quick run** (parts, margins and directions
unchanged): the pre-registered learning rate was 0.05. At it, class-sorted
batches left *every* network — BN, LN, GN and no norm alike — at exactly chance
(0.100 on all 12 seeds; identical training losses across norms: dead ReLUs, the
output reduced to the head's bias), so no part could measure anything but the
floor (that run gave "does not hold"). A pilot on the network *without* a norm
only (1 seed, shuffled vs class-sorted; no BN run looked at) found it trains on
class-sorted batches at lr 0.01 (0.82 vs 0.94 shuffled) but not at 0.05; the
learning rate is now 0.01 for every arm.

Runtime
-------
Command: ``normlab run shuffling`` (``--scale smoke|quick|full``). Quick on this
2-core CPU, one thread per run: measured 125 s of CPU (user + system,
``/usr/bin/time``) for the full budget of 12 seeds (96 runs), which the quick
run used (the first one, at lr 0.05, took the same). Full (CIFAR-10, a wider
CNN) is for a GPU.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.lab.experiments.framework import (
    Experiment,
    Part,
    Run,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
    values,
)
from normlab.lab.experiments.momentum import train_mode_accuracy
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["ShufflingConfig", "EXPERIMENT", "ORDERS"]

ORDERS = ("shuffled", "class-sorted")  # TrainConfig.batch_order values compared


@dataclass(frozen=True)
class ShufflingConfig:
    """C17 shuffling; see the module docstring for the pre-registration, the command and the runtimes."""

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per grid point
    threads: int = 1  # torch threads per run (not part of the run id)
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = all)
    channels: tuple[int, ...] = (8, 16, 32)  # conv channels per block of the CNN
    norms: tuple[str, ...] = ("batchnorm", "layernorm", "groupnorm", "none")  # the first is BN, the one judged
    norm_kwargs: dict = field(default_factory=lambda: {"groupnorm": {"num_groups": 4}})  # per norm: layer keywords
    lr: float = 0.01  # SGD learning rate (momentum 0.9); at 0.05 class-sorted batches kill every network
    epochs: int = 10  # passes over the training set
    batch_size: int = 32  # examples per optimizer step
    margin: float = 0.01  # δ of every part (accuracy, a fraction)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)

    def __post_init__(self) -> None:
        if tuple(self.norms[:1]) != ("batchnorm",) or not {"layernorm", "groupnorm", "none"} <= set(self.norms):
            raise ValueError(
                f"norms must start with batchnorm and include layernorm, groupnorm, none; got {self.norms}"
            )


def _grid(cfg: ShufflingConfig):
    for norm in cfg.norms:
        for order in ORDERS:
            yield {
                "dataset": cfg.dataset,
                "n_train": cfg.n_train,
                "model": "cnn",
                "model_kwargs": {"channels": list(cfg.channels)},
                "norm": norm,
                "norm_kwargs": dict(cfg.norm_kwargs.get(norm, {})),
                "optimizer": "sgd",
                "lr": cfg.lr,
                "momentum": 0.9,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "batch_order": order,
            }


def _run_one(run: Run) -> dict[str, Any]:
    import torch

    from normlab.lab.data import Batches
    from normlab.lab.train import evaluate, load_data, train
    from normlab.running_stats import batchnorm_modules, recalibrate

    tc = run.train_config()
    result = train(tc, progress=run.progress)
    metrics = result.to_metrics()
    model = result.model
    if batchnorm_modules(model):
        ds = load_data(tc)
        precise = copy.deepcopy(model)
        recalibrate(precise, Batches(ds.x_train, ds.y_train, tc.batch_size, seed=tc.seed, drop_last=True))
        metrics["precise_test_acc"] = evaluate(precise, ds.x_test, ds.y_test)[1]
        metrics["precise_gain"] = metrics["precise_test_acc"] - metrics["final_test_acc"]
        mix = torch.randperm(len(ds.y_test), generator=torch.Generator().manual_seed(tc.seed))  # mixed test batches
        metrics["train_mode_test_acc"] = train_mode_accuracy(model, ds.x_test[mix], ds.y_test[mix], tc.batch_size)
    return metrics


# --------------------------------------------------------------------------- per-seed rows and parts


def _measure(rows: list[dict[str, Any]], cfg: ShufflingConfig) -> list[dict[str, Any]]:
    """The runs themselves, plus per (seed, norm) the drop from shuffled to class-sorted batches (``kind`` rows)."""
    out = [{**r, "kind": "run"} for r in rows]
    by = {(r["seed"], r["norm"], r["batch_order"]): r for r in rows}
    for seed in sorted({r["seed"] for r in rows}):
        for norm in cfg.norms:
            shuffled, ordered = by.get((seed, norm, "shuffled")), by.get((seed, norm, "class-sorted"))
            if shuffled is None or ordered is None:
                continue
            row = {"seed": seed, "norm": norm, "kind": "drop",
                   "drop": shuffled["final_test_acc"] - ordered["final_test_acc"]}  # fmt: skip
            if "precise_test_acc" in ordered:
                row["drop_after_precise"] = shuffled["final_test_acc"] - ordered["precise_test_acc"]
            out.append(row)
    return out


def _parts(cfg: ShufflingConfig) -> list[Part]:
    drop = lambda n: {"kind": "drop", "norm": n}  # noqa: E731
    why = "a paper's number: Ioffe & Szegedy credit thorough shuffling with about 1 % of ImageNet accuracy"
    d = cfg.margin
    return [
        Part("bn-loses-more-than-ln", "class-sorted batches cost BN more test accuracy than LayerNorm", "drop",
             drop("batchnorm"), drop("layernorm"), direction="greater", margin=d, why=why, unit="accuracy",
             label_a="BN drop", label_b="LN drop"),
        Part("bn-loses-more-than-gn", "class-sorted batches cost BN more test accuracy than GroupNorm", "drop",
             drop("batchnorm"), drop("groupnorm"), direction="greater", margin=d, why=why, unit="accuracy",
             label_a="BN drop", label_b="GN drop"),
        Part("precise-repairs", "after class-sorted training, precise statistics (shuffled batches) raise BN's "
             "test accuracy over its running statistics", "precise_gain",
             {"kind": "run", "norm": "batchnorm", "batch_order": "class-sorted"}, bound=0.0, direction="greater",
             margin=d, why=why, unit="accuracy", label_a="precise − running statistics"),
        Part("bn-loses-more-than-none", "class-sorted batches cost BN more test accuracy than no norm", "drop",
             drop("batchnorm"), drop("none"), direction="greater", margin=d, why=why, decides=False,
             unit="accuracy", label_a="BN drop", label_b="no-norm drop"),
        Part("bn-loses", "class-sorted batches cost BN test accuracy", "drop", drop("batchnorm"), bound=0.0,
             direction="greater", margin=d, why=why, decides=False, unit="accuracy", label_a="BN drop"),
        Part("precise-repair-is-partial", "even with precise statistics, BN trained on class-sorted batches stays "
             "below BN trained on shuffled ones", "drop_after_precise", drop("batchnorm"), bound=0.0,
             direction="greater", margin=d, why=why, decides=False, unit="accuracy",
             label_a="shuffled − class-sorted (precise)"),
    ]  # fmt: skip


# --------------------------------------------------------------------------- explanation and figure


def _explain(rows: list[dict[str, Any]], cfg: ShufflingConfig, judgement: Judgement):
    rows = [r for r in rows if r["seed"] < judgement.seeds]

    def m(metric: str, **where: Any) -> float:
        return mean_std(values(rows, metric, **where))[0]

    acc = {n: {o: m("final_test_acc", norm=n, batch_order=o) for o in ORDERS} for n in cfg.norms}
    drops = {n: acc[n]["shuffled"] - acc[n]["class-sorted"] for n in cfg.norms}
    precise = m("precise_test_acc", norm="batchnorm", batch_order="class-sorted")
    train_mode = m("train_mode_test_acc", norm="batchnorm", batch_order="class-sorted")
    bn_drop = drops["batchnorm"]
    repaired = (precise - acc["batchnorm"]["class-sorted"]) / bn_drop if bn_drop > 0 else float("nan")
    lead = []
    if all(bn_drop < drops[n] for n in ("layernorm", "groupnorm")):
        lead.append(f"class-sorted batches cost BN *less* than LayerNorm and GroupNorm (drop {bn_drop:.3f} vs "
                    f"{drops['layernorm']:.3f} and {drops['groupnorm']:.3f})")  # fmt: skip
    elif all(bn_drop > drops[n] for n in ("layernorm", "groupnorm")):
        lead.append("class-sorted batches cost BN more than LayerNorm and GroupNorm")
    if abs(precise - acc["batchnorm"]["class-sorted"]) < cfg.margin and abs(train_mode - precise) < cfg.margin:
        lead.append(
            "BN's loss is not in its statistics: stored, precise and train-mode statistics give the same accuracy"
        )
    text = (
        "; ".join(lead)
        + (". " if lead else "")
        + (
            "test accuracy shuffled → class-sorted: "
            + ", ".join(f"{n} {acc[n]['shuffled']:.3f} → {acc[n]['class-sorted']:.3f}" for n in cfg.norms)
            + f"; BN after class-sorted training: running statistics {acc['batchnorm']['class-sorted']:.3f}, "
            f"precise {precise:.3f}"
            + (f" (repairing {100 * repaired:.0f} % of its drop)" if math.isfinite(repaired) else "")
            + f", train mode on mixed test batches {train_mode:.3f}"
        )
    )
    return text, {"test_acc": acc, "drop": drops, "bn_precise_after_sorted": precise, "bn_train_mode": train_mode}


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: ShufflingConfig) -> list[Path]:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    for i, norm in enumerate(cfg.norms):
        for j, order in enumerate(ORDERS):
            accs = values(rows, "final_test_acc", norm=norm, batch_order=order)
            x = i + 0.2 * (j - 0.5)
            ax1.scatter([x] * len(accs), accs, color=f"C{j}", alpha=0.7, label=order if i == 0 else None)
            if accs:
                mu, sd, _ = mean_std(accs)
                ax1.errorbar([x], [mu], yerr=[sd], color="k", marker="_", ms=14, capsize=4)
        if norm == "batchnorm":
            p = values(rows, "precise_test_acc", norm=norm, batch_order="class-sorted")
            ax1.scatter([i + 0.3] * len(p), p, color="C2", marker="^", alpha=0.8, label="class-sorted, precise stats")
    ax1.set_xticks(range(len(cfg.norms)), cfg.norms)
    ax1.set(ylabel="test accuracy (eval mode)", title="test accuracy by norm and batch composition")
    ax1.legend(fontsize=8)
    for i, norm in enumerate(cfg.norms):
        for order, ls in zip(ORDERS, ("-", "--")):
            rs = [r for r in rows if r["norm"] == norm and r["batch_order"] == order]
            if not rs:
                continue
            epochs = [[e["test_acc"] for e in r["per_epoch"]] for r in rs]  # the per-epoch records
            n = min(len(e) for e in epochs)
            mean = [sum(e[k] for e in epochs) / len(epochs) for k in range(n)]
            ax2.plot(range(1, n + 1), mean, color=f"C{i}", ls=ls, marker=".", label=f"{norm}, {order}")
    ax2.set(xlabel="epoch", ylabel="test accuracy (eval mode, mean over seeds)", title="test accuracy during training")
    ax2.legend(fontsize=7, ncol=2)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"C17: shuffled vs class-sorted batches (one class per batch), CNN on {cfg.dataset}, "
                 f"batch {cfg.batch_size}")  # fmt: skip
    return [save_figure(fig, out_dir, "shuffling")]


EXPERIMENT = register_experiment(
    Experiment(
        name="shuffling",
        claim="C17",
        title="BN needs shuffled batches: class-sorted batches cost BN more than batch-independent norms, "
        "and precise statistics repair part of it",
        config=ShufflingConfig,
        scales={
            "smoke": ShufflingConfig(seeds=2, max_seeds=2, n_train=320, channels=(4, 8), epochs=1),
            "quick": ShufflingConfig(),
            "full": ShufflingConfig(
                seeds=5,
                max_seeds=20,
                dataset="cifar10",
                channels=(64, 128, 256),
                epochs=30,
                batch_size=128,
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
