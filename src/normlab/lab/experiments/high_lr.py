"""``high-lr`` (C1): with BatchNorm a network trains at learning rates where the same network without it fails.

The small CNN (``build_model("cnn")``: three conv 3x3 -> norm -> ReLU ->
maxpool blocks, then a linear classifier) is trained with BatchNorm and
without any norm, with Adam (the source's setting: Adam, lr 0.1, 8 epochs)
and with SGD + momentum 0.9, over a learning-rate grid, a constant learning
rate and ``seeds`` seeds per point. Every per-batch training loss is stored.

A run **fails** at its learning rate when it *diverges* (a non-finite step
loss, or one above ``divergence_loss`` nats: recorded by the training loop as
a result, the run ends cleanly) or *stalls* (final test accuracy below
``stable_acc``; a network whose ReLUs died after a blow-up sits at chance,
0.1 here, without ever producing a non-finite loss). Otherwise it is
**stable**. Per optimizer, norm and seed, the *largest stable learning rate*
is the largest grid value at which that seed's run is stable (a seed stable
nowhere is given one grid step below the smallest value).

Verdict rule (per optimizer, then :func:`~normlab.lab.experiments.framework.combine`):
``compare`` of log10(largest stable lr) over seeds, BN vs none, direction
"greater" (intervals mean ± 1 std; overlap -> inconclusive). The claim holds
when it holds for both optimizers, does not hold when either shows the
opposite, and is inconclusive otherwise. A BN value equal to the top of the
grid is censored (BN may be stable beyond it); the summary marks it with
"≥". The summary also gives the test accuracy of both at the source's
setting (Adam, lr 0.1) when it is in the grid.

Command: ``normlab run high-lr`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU (one thread per run), measured: smoke ~5 s of CPU;
quick (digits, 8 epochs, 2 optimizers x 5 learning rates x 2 norms x 3 seeds =
60 runs; diverged runs end early) 1 min 21 s wall, 55 s of CPU (about 3 min
when the machine is shared with 3–4 other jobs); full (CIFAR-10, 5 seeds,
8 + 7 learning rates = 150 runs of 8 epochs) is for a GPU, not run here.
Expected (the source's own run; Ioffe & Szegedy 2015; Santurkar et al. 2018):
BN trains at Adam lr 0.1 where no-BN fails; the largest stable learning rate
is higher with BN for both optimizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    values,
)

__all__ = ["HighLRConfig", "EXPERIMENT", "largest_stable_lr", "is_stable"]


@dataclass(frozen=True)
class HighLRConfig:
    """C1 high-lr; see the module docstring for the command, runtimes and the expected result."""

    seeds: int = 3  # seeds per grid point
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    channels: tuple[int, ...] = (32, 64, 128)  # conv channels per block of the CNN
    norms: tuple[str, ...] = ("batchnorm", "none")  # the first is the claimed winner, the last the baseline
    adam_lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # Adam learning rates (per unit gradient); () = no Adam
    sgd_lrs: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)  # SGD learning rates (momentum 0.9); () = no SGD
    epochs: int = 8  # passes over the training set
    batch_size: int = 64  # examples per optimizer step
    stable_acc: float = 0.5  # final test accuracy (fraction) a run must reach to count as trained (chance is 0.1)
    divergence_loss: float = 1e4  # a step loss above this (nats), or a non-finite one, counts as diverged
    threads: int = 1  # torch threads per run (runs are small; one thread each is most efficient)
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
                    "threads": cfg.threads,
                }


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import train

    result = train(run.train_config(), progress=run.progress)
    return result.to_metrics()


# --------------------------------------------------------------------------- analysis


def is_stable(row: dict[str, Any], stable_acc: float) -> bool:
    """Whether a run trained: it did not diverge and its final test accuracy reached ``stable_acc``."""
    acc = row.get("final_test_acc")
    return (not row.get("diverged")) and acc is not None and math.isfinite(acc) and acc >= stable_acc


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
        out[(opt, norm, seed)] = max(stable) if stable else _below_grid(grids[opt])
    return out


def _fmt_lr(logs: list[float], top: float) -> str:
    m, s, n = mean_std(logs)
    geo = 10**m
    mark = "≥" if all(abs(x - math.log10(top)) < 1e-9 for x in logs) else ""
    return f"{mark}{geo:.3g} (log10 {m:.2f} ± {s:.2f}, n={n})"


def _analyse(rows: list[dict[str, Any]], cfg: HighLRConfig) -> Verdict:
    first, base = cfg.norms[0], cfg.norms[-1]
    best = largest_stable_lr(rows, cfg.stable_acc)
    parts: dict[str, Verdict] = {}
    texts = []
    for (opt,), rs in group(rows, "optimizer").items():
        top = max(r["lr"] for r in rs)
        a = [math.log10(v) for (o, nm, _), v in best.items() if o == opt and nm == first]
        b = [math.log10(v) for (o, nm, _), v in best.items() if o == opt and nm == base]
        v = compare(a, b, "greater", name_a=first, name_b=base, metric=f"{opt} log10 largest stable lr")
        parts[opt] = v
        texts.append(f"{opt}: {first} {_fmt_lr(a, top)} vs {base} {_fmt_lr(b, top)} -> {v.status}")
    if not parts:
        raise ValueError("high-lr: no rows to analyse")
    verdict = combine(parts)
    numbers = dict(verdict.numbers)
    numbers["largest_stable_lr"] = {f"{o}/{nm}/seed{s}": v for (o, nm, s), v in best.items()}
    numbers["stable_acc"] = cfg.stable_acc
    source = ""
    at = {"optimizer": "adam", "lr": 0.1}
    a_acc, b_acc = values(rows, "final_test_acc", norm=first, **at), values(rows, "final_test_acc", norm=base, **at)
    if a_acc and b_acc:
        at_base = [r for r in rows if r.get("norm") == base and all(r.get(k) == x for k, x in at.items())]
        fails = sum(not is_stable(r, cfg.stable_acc) for r in at_base)
        source = (
            f"; at the source's Adam lr 0.1 test acc {first} {fmt_mean_std(a_acc)} vs {base} {fmt_mean_std(b_acc)}"
            f" ({fails}/{len(b_acc)} {base} runs failed)"
        )
        numbers["adam_lr0.1_test_acc"] = {first: a_acc, base: b_acc}
    summary = (
        f"largest stable lr (no divergence, test acc ≥ {cfg.stable_acc:g}), geometric mean over seeds: "
        + "; ".join(texts)
        + source
    )
    return Verdict(verdict.status, summary, numbers)


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
                seeds=2, n_train=256, channels=(8, 16), adam_lrs=(0.01, 10.0), sgd_lrs=(0.1,), epochs=1, batch_size=32
            ),
            "quick": HighLRConfig(),
            "full": HighLRConfig(
                seeds=5,
                dataset="cifar10",
                adam_lrs=(0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                sgd_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
                batch_size=128,
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
