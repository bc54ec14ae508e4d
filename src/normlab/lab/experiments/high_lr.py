"""``high-lr`` (C1): with BatchNorm a network trains at learning rates where the same network without it fails.

Pre-registration
----------------
**Claim** (S1, section 1 "BN's implicit control of the gradient"; our words):
BN stabilises a network so that it trains at learning rates far above the
usual ones without diverging. The source trains a small CNN on CIFAR-10 with
and without BN using **Adam at learning rate 0.1 for 8 epochs** and shows
the BN network's loss falling smoothly; it explains that BN re-standardises
each layer's input however large the weight updates make it. S0 (the
Lipschitz argument, for gradient descent) and S3 say the same in general: BN
allows a larger learning rate. Papers: Ioffe & Szegedy 2015; Santurkar et
al. 2018; Bjorck et al. 2018.

**Design.** The small CNN (three conv 3x3 -> norm -> ReLU -> maxpool blocks
with 32/64/128 channels, then a linear classifier) on scikit-learn's digits,
with BatchNorm and with no norm, 8 epochs at batch 64, a constant learning
rate, over a grid for each optimizer: Adam at 0.01, 0.03, 0.1, 0.3, 1 (the
source's optimizer; 0.1 is its setting) and SGD with momentum 0.9 at 0.03,
0.1, 0.3, 1, 3 (the optimizer of S0's argument). A run **fails** when it
diverges (a non-finite step loss or one above 10^4 nats; the run ends cleanly
and is recorded) or stalls (final test accuracy below 0.5, chance being 0.1:
a network whose ReLUs died after a blow-up sits at chance without a
non-finite loss); otherwise it is **stable**. Per optimizer, norm and seed the
**largest stable learning rate** is the largest grid value at which that
seed's run is stable (a seed stable nowhere gets one grid step below the
grid; a BN value at the top of the grid is a lower bound, so the comparison
is conservative).

**Deciding parts** (paired by seed: the same seed gives the same
initialisation draw and batch order with and without BN):

* ``source-setting`` — metric: final test accuracy at Adam, lr 0.1 (the
  source's setting); arm A BN, arm B no norm; direction A greater; difference
  scale. A run that diverged counts at chance, 0.1 (``missing``). δ = 0.1
  accuracy: the source contrasts a network that trains with one that fails
  (about 0.8 apart here); ten points is a practical threshold far below that
  contrast and far above the seed-to-seed noise of a trained run (1-2 points).
  Student's t on the paired differences, not a bootstrap: with 3-12 seeds a
  bootstrap interval has few distinct resamples and is too narrow, while a
  failed seed widens the t interval, as it should.
* ``stable-lr-adam`` — metric: largest stable learning rate with Adam; BN vs
  no norm; direction greater; **log scale** (the effect is the ratio BN / none).
  δ = ×3: just under one step of the half-decade grid (×√10 ≈ 3.16), the
  resolution of the measurement: a one-step difference counts, less cannot be
  measured.
* ``stable-lr-sgd`` — the same with SGD (momentum 0.9). δ = ×3, same reason.

**Reported part**: ``none-fails-at-source`` — the rate at which the network
without a norm fails at Adam lr 0.1, against 0.5 (method "proportion", δ
0.25): the source's picture of the unnormalised run, reported because the
deciding ``source-setting`` already holds its effect on accuracy.

**Does not hold** if BN is not more accurate than no norm at the source's
setting (interval below 0, or inside ±0.1), or if BN's largest stable
learning rate is not larger for either optimizer (interval below ×1, or
inside ×1/3 … ×3).

**Seeds**: rounds of 3 up to 12 (quick); smoke 2. Measured cost at quick scale
(``/usr/bin/time``, one thread, shared 2-core machine): 176 s of CPU for 6
seeds (120 runs), about 29 s per seed, so about 5.9 CPU-minutes at 12 seeds.

Design notes
------------
Every per-batch training loss is stored; the figure shows the loss curves of
every seed at every grid point (x = diverged) and the final accuracy against
the learning rate per optimizer.

Command: ``normlab run high-lr`` (``--scale smoke|quick|full``). Runtime (one
thread per run; diverged runs end early): smoke ~10 s of CPU; quick 29 s of
CPU per seed (20 runs), 176 s for the 6 seeds at which the first quick run
decided; full (CIFAR-10, 8 + 7 learning rates, up to 6 seeds) is for a GPU,
not run here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.lab.experiments.framework import (
    Experiment,
    Judgement,
    Part,
    Run,
    group,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
)

__all__ = ["HighLRConfig", "EXPERIMENT", "CHANCE", "SOURCE", "largest_stable_lr", "is_stable"]

CHANCE = 0.1  # the accuracy a diverged run counts at (10 classes)
SOURCE = ("adam", 0.1)  # the source's optimizer and learning rate


@dataclass(frozen=True)
class HighLRConfig:
    """C1 high-lr; see the module docstring for the design, the command and the runtimes."""

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per grid point
    threads: int = 1  # torch threads per run (not part of the run id)
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    channels: tuple[int, ...] = (32, 64, 128)  # conv channels per block of the CNN
    norms: tuple[str, ...] = ("batchnorm", "none")  # the claimed winner, then the baseline
    adam_lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # Adam learning rates (per unit gradient); () = no Adam
    sgd_lrs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)  # SGD learning rates (momentum 0.9); () = no SGD
    epochs: int = 8  # passes over the training set
    batch_size: int = 64  # examples per optimizer step
    stable_acc: float = 0.5  # final test accuracy (fraction) a run must reach to count as trained (chance is 0.1)
    divergence_loss: float = 1e4  # a step loss above this (nats), or a non-finite one, counts as diverged
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)


def _optimizers(cfg: HighLRConfig) -> list[tuple[str, tuple[float, ...]]]:
    return [(opt, tuple(lrs)) for opt, lrs in (("adam", cfg.adam_lrs), ("sgd", cfg.sgd_lrs)) if lrs]


def _grid(cfg: HighLRConfig):
    for opt, lrs in _optimizers(cfg):
        for lr in lrs:
            for norm in cfg.norms:
                yield {
                    "dataset": cfg.dataset,
                    "n_train": cfg.n_train,
                    "model": "cnn",
                    "model_kwargs": {"channels": list(cfg.channels)},
                    "norm": norm,
                    "optimizer": opt,
                    "lr": lr,
                    "momentum": 0.9,
                    "epochs": cfg.epochs,
                    "batch_size": cfg.batch_size,
                    "divergence_loss": cfg.divergence_loss,
                }


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import train

    return train(run.train_config(), progress=run.progress).to_metrics()


# --------------------------------------------------------------------------- per-seed values


def is_stable(row: dict[str, Any], stable_acc: float) -> bool:
    """Whether a run trained: it did not diverge and its final test accuracy reached ``stable_acc``."""
    acc = row.get("final_test_acc")
    return (not row.get("diverged")) and isinstance(acc, (int, float)) and math.isfinite(acc) and acc >= stable_acc


def _below_grid(lrs: list[float]) -> float:
    """One grid step below the smallest learning rate (the value of a seed that is stable nowhere)."""
    lrs = sorted(lrs)
    return lrs[0] * lrs[0] / lrs[1] if len(lrs) > 1 else lrs[0] / 10


def largest_stable_lr(rows: list[dict[str, Any]], stable_acc: float) -> dict[tuple[str, str, int], float]:
    """``{(optimizer, norm, seed): largest stable lr}`` from the rows (see the module docstring)."""
    grids = {opt: sorted({r["lr"] for r in rs}) for (opt,), rs in group(rows, "optimizer").items()}
    out: dict[tuple[str, str, int], float] = {}
    for (opt, norm, seed), rs in group(rows, "optimizer", "norm", "seed").items():
        stable = [r["lr"] for r in rs if is_stable(r, stable_acc)]
        out[(opt, norm, int(seed))] = max(stable) if stable else _below_grid(grids[opt])
    return out


def _measure(rows: list[dict[str, Any]], cfg: HighLRConfig) -> list[dict[str, Any]]:
    """Per seed: the largest stable lr per optimizer and norm; accuracy and failure at the source's setting."""
    out: list[dict[str, Any]] = [
        {"seed": seed, "what": "stable-lr", "optimizer": opt, "norm": norm, "lr_max": lr}
        for (opt, norm, seed), lr in largest_stable_lr(rows, cfg.stable_acc).items()
    ]
    for r in rows:
        if (r["optimizer"], r["lr"]) == SOURCE:
            acc = r.get("final_test_acc")
            out.append(
                {
                    "seed": int(r["seed"]),
                    "what": "source",
                    "norm": r["norm"],
                    "acc": None if r.get("diverged") else acc,  # a diverged run counts as declared (missing=)
                    "failed": float(not is_stable(r, cfg.stable_acc)),
                }
            )
    return out


# --------------------------------------------------------------------------- parts


def _parts(cfg: HighLRConfig) -> list[Part]:
    first, base = cfg.norms[0], cfg.norms[-1]
    parts = []
    if SOURCE[1] in cfg.adam_lrs:
        parts.append(
            Part(
                name="source-setting",
                says=f"at the source's setting (Adam, lr {SOURCE[1]:g}, {cfg.epochs} epochs) {first} reaches a "
                f"higher test accuracy than {base}",
                metric="acc",
                a={"what": "source", "norm": first},
                b={"what": "source", "norm": base},
                direction="greater",
                margin=0.1,
                why="trains vs fails is ~0.8 apart; ten points is far below that and far above seed noise (1-2 points)",
                missing=CHANCE,
                unit="accuracy",
                label_a=f"{first}, Adam lr {SOURCE[1]:g}",
                label_b=f"{base}, Adam lr {SOURCE[1]:g}",
            )
        )
    for opt, _ in _optimizers(cfg):
        name = {"adam": "Adam", "sgd": "SGD (momentum 0.9)"}[opt]
        parts.append(
            Part(
                name=f"stable-lr-{opt}",
                says=f"{name}: the largest stable learning rate is larger with {first} than with {base}",
                metric="lr_max",
                a={"what": "stable-lr", "optimizer": opt, "norm": first},
                b={"what": "stable-lr", "optimizer": opt, "norm": base},
                direction="greater",
                margin=3.0,
                why="just under one step of the half-decade grid (x3.16): the resolution of the measurement",
                log=True,
                unit="learning rate",
                label_a=f"{first}, {name}",
                label_b=f"{base}, {name}",
            )
        )
    if SOURCE[1] in cfg.adam_lrs:
        parts.append(
            Part(
                name="none-fails-at-source",
                says=f"{base} fails (diverges or stalls) at Adam lr {SOURCE[1]:g} in most seeds",
                metric="failed",
                a={"what": "source", "norm": base},
                bound=0.5,
                direction="greater",
                margin=0.25,
                why="failing in three seeds of four or more is 'fails'; around half is a coin toss",
                decides=False,
                method="proportion",
                unit="failure rate",
                label_a=f"{base} failures",
            )
        )
    return parts


# --------------------------------------------------------------------------- explanation


def _explain(rows: list[dict[str, Any]], cfg: HighLRConfig, judgement: Judgement) -> tuple[str, dict[str, Any]]:
    n = judgement.seeds
    use = [r for r in rows if int(r["seed"]) < n]
    best = largest_stable_lr(use, cfg.stable_acc)
    texts, numbers = [], {"seeds": n, "largest_stable_lr": {}}
    for opt, lrs in _optimizers(cfg):
        shown = []
        for norm in cfg.norms:
            vals = [v for (o, nm, _), v in best.items() if o == opt and nm == norm]
            if not vals:
                continue
            geo = 10 ** mean_std([math.log10(v) for v in vals])[0]
            censored = "≥" if all(v == max(lrs) for v in vals) else ""
            numbers["largest_stable_lr"][f"{opt}/{norm}"] = {"geometric_mean": geo, "per_seed": vals}
            shown.append(f"{norm} {censored}{geo:.3g}")
        label = {"adam": "Adam", "sgd": "SGD"}[opt]
        texts.append(f"{label}: " + " vs ".join(shown))
    sentence = "Largest stable learning rate (geometric mean over seeds): " + "; ".join(texts) + "."
    at = [r for r in use if (r["optimizer"], r["lr"]) == SOURCE]
    if at:
        parts = []
        for norm in cfg.norms:
            rs = [r for r in at if r["norm"] == norm]
            accs = [CHANCE if r.get("diverged") else r["final_test_acc"] for r in rs]
            fails = sum(not is_stable(r, cfg.stable_acc) for r in rs)
            diverged = sum(bool(r.get("diverged")) for r in rs)
            numbers[f"source_{norm}"] = {"test_acc": accs, "failed": fails, "diverged": diverged}
            parts.append(
                f"{norm} test accuracy {mean_std(accs)[0]:.3f} ({fails}/{len(rs)} failed, {diverged} diverged)"
            )
        sentence += f" At the source's Adam lr {SOURCE[1]:g}: " + "; ".join(parts) + "."
    return sentence, numbers


# --------------------------------------------------------------------------- figure


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: HighLRConfig) -> list[Path]:
    plt = pyplot()
    by_opt = group(rows, "optimizer")
    n_lr = max(len({r["lr"] for r in rs}) for rs in by_opt.values())
    fig, axes = plt.subplots(
        len(by_opt), n_lr + 1, figsize=(2.6 * (n_lr + 1), 2.7 * len(by_opt)), squeeze=False, constrained_layout=True
    )
    colours = {norm: f"C{i}" for i, norm in enumerate(cfg.norms)}
    for i, ((opt,), rs) in enumerate(by_opt.items()):
        lrs = sorted({r["lr"] for r in rs})
        for j, lr in enumerate(lrs):
            ax = axes[i, j]
            failed: list[str] = []
            for (norm,), nrs in group([r for r in rs if r["lr"] == lr], "norm").items():
                n_failed = 0
                for k, r in enumerate(nrs):
                    loss = [x if x is not None and math.isfinite(x) else float("nan") for x in r["step_loss"]]
                    ax.plot(loss, lw=0.7, alpha=0.75, color=colours.get(norm), label=norm if k == 0 else None)
                    if r.get("diverged") and r.get("diverged_step") is not None:
                        ax.plot(
                            [r["diverged_step"]],
                            [1.0],
                            marker="x",
                            ms=9,
                            mew=2,
                            color=colours.get(norm),
                            transform=ax.get_xaxis_transform(),
                            clip_on=False,
                        )
                    n_failed += not is_stable(r, cfg.stable_acc)
                failed.append(f"{norm} {n_failed}/{len(nrs)}")
            ax.set_yscale("log")
            ax.set_title(f"{opt}, lr={lr:g}\nfailed: {', '.join(failed)}", fontsize=8)
            ax.set_xlabel("optimizer step (batch)", fontsize=8)
            if j == 0:
                ax.set_ylabel("training loss (nats)")
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="upper right")
        for j in range(len(lrs), n_lr):
            axes[i, j].axis("off")
        ax = axes[i, n_lr]
        for (norm,), nrs in group(rs, "norm").items():
            xs, ms, ss = [], [], []
            for lr in lrs:
                accs = [r["final_test_acc"] for r in nrs if r["lr"] == lr]
                if accs:
                    m, s, _ = mean_std(accs)
                    xs.append(lr)
                    ms.append(m)
                    ss.append(s)
            ax.errorbar(xs, ms, yerr=ss, marker="o", ms=4, capsize=3, color=colours.get(norm), label=norm)
        ax.axhline(cfg.stable_acc, ls="--", lw=0.8, color="grey", label=f"stable ≥ {cfg.stable_acc:g}")
        ax.set(xscale="log", ylim=(0, 1.02), xlabel="learning rate", ylabel="final test accuracy")
        ax.set_title(f"{opt}: accuracy vs lr (mean ± std)", fontsize=8)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("C1 high-lr: per-batch loss with / without BatchNorm (x = diverged), final accuracy vs learning rate")
    return [save_figure(fig, out_dir, "high-lr")]


EXPERIMENT = register_experiment(
    Experiment(
        name="high-lr",
        claim="C1",
        title="BatchNorm trains at learning rates where the same CNN without it diverges or stalls",
        config=HighLRConfig,
        scales={
            "smoke": HighLRConfig(
                seeds=2,
                max_seeds=2,
                n_train=256,
                channels=(8, 16),
                adam_lrs=(0.01, 0.1, 10.0),
                sgd_lrs=(0.1,),
                epochs=1,
                batch_size=32,
            ),
            "quick": HighLRConfig(),
            "full": HighLRConfig(
                seeds=3,
                max_seeds=6,
                dataset="cifar10",
                adam_lrs=(0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                sgd_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
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
