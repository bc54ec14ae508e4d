"""``regularisation`` (C3): BN's batch noise regularises, less so as the batch grows, and unlike dropout.

Pre-registration
----------------
**Claim** (S1 §2–§3, S2 §1; our words): the statistics of a mini-batch are a
noisy estimate of the population's, so BN perturbs every sample by an amount
that depends on its batch companions. This continuous, statistical noise acts
as a regulariser (it narrows the generalisation gap); it fades as the batch
grows (the batch statistics approach the population's). Dropout regularises by
a different, binary noise (units removed) that does not depend on the batch.
Placing dropout right before BN makes BN collect statistics on dropped-out
inputs that the eval-time network never produces — the "variance shift" of
Li et al. 2019 ("Understanding the disharmony between dropout and batch
normalization by variance shift"), which costs test accuracy.

**Arms.** An MLP (3 hidden layers of 128) on a 1,024-example subset of
MNIST-1D, 30 epochs of SGD (momentum 0.9) with the learning rate scaled with
the batch (0.05 at batch 64: the SGD noise scale stays about constant, so what
changes with the batch is mainly the noise of BN's statistics), at batch 16 and
256, under five conditions: ``none``; ``batchnorm`` (before each activation);
``dropout`` (p = 0.3 after each activation, no norm); ``batchnorm+dropout``
(both, dropout after the activation: it reaches the next BN through a linear
layer); ``batchnorm+dropout-before-bn`` (dropout right before each BN). The
*gap* of a run is its train accuracy minus its test accuracy, both in eval
mode after the last epoch (train accuracy over the whole 1,024-example set).
All parts are paired by seed (same seed: same initialisation draw and batch
order in every condition). δ = 0.02 everywhere: a practical threshold, two
points of accuracy — the smallest gain (or loss) for which one would add (or
move) a regulariser, and about the seed-to-seed spread of one gap here.

Deciding parts:

* ``bn-narrows-gap``: gap of ``batchnorm`` vs ``none`` at batch 16, "less".
* ``bn-effect-fades``: BN's narrowing, gap(none) − gap(batchnorm) of one seed,
  at batch 16 vs at batch 256, "greater".
* ``variance-shift``: the variance shift's cost, measured directly: the test
  accuracy gained by recomputing BN's statistics with dropout switched off
  (:func:`normlab.recalibrate` over one epoch of training batches, other layers
  in eval mode) — which removes exactly the statistics' mismatch — for
  ``batchnorm+dropout-before-bn`` minus the same gain for ``batchnorm`` (the
  control: what recomputing statistics gains without any dropout), per seed,
  averaged over the two batch sizes; against 0, "greater".

Reported parts (shown, never deciding — context for the deciding ones):
``dropout-narrows-gap`` (gap of ``dropout`` vs ``none`` at batch 16, "less":
the comparator regularises too); ``dropout-effect-steady`` (dropout's narrowing
at batch 16 ≈ at batch 256, "equivalent": the batch-independence that makes its
noise different from BN's); ``bn-adds-to-dropout`` (gap of
``batchnorm+dropout`` vs ``dropout`` at batch 16, "less": different noises add
up); ``dropout-before-bn-costs`` (test accuracy of ``batchnorm+dropout`` minus
``batchnorm+dropout-before-bn`` at batch 16, "greater": the placement as a user
meets it); ``variance-shift-after-act`` (``variance-shift`` for dropout after
the activation, which reaches BN through a linear layer); and
``companions-matter-less`` (BN's sensitivity to the batch companions — the
fraction of test predictions that change when a test sample's batch
companions are redrawn, in train mode — at batch 16 vs 256, "greater", δ 0.02).

**Does not hold** if any deciding part does not hold: BN's gap is not smaller
than without BN at batch 16 (or shown within ±0.02 of it), BN's narrowing does
not shrink from batch 16 to 256, or recomputing the statistics without dropout
does not repair more for dropout-before-BN than for BN alone.

**Budget**: seeds in rounds of 3 up to 12 (quick), 10 runs per seed; see
*Runtime*.

Runtime
-------
Command: ``normlab run regularisation`` (``--scale smoke|quick|full``). Quick on
this 2-core CPU, one thread per run: measured 185 s of CPU (user + system,
``/usr/bin/time``) for the full budget of 12 seeds (120 runs; the batch-16 runs
dominate), which the first quick run used. Full (CIFAR-10 with 5,000 training
examples, a wider MLP, 100 epochs) is for a GPU.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
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
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["RegularisationConfig", "EXPERIMENT", "CONDITIONS", "companion_flip_rate"]

# condition -> (norm name, uses dropout, dropout position)
CONDITIONS: dict[str, tuple[str, bool, str]] = {
    "none": ("none", False, "after_act"),
    "batchnorm": ("batchnorm", False, "after_act"),
    "dropout": ("none", True, "after_act"),
    "batchnorm+dropout": ("batchnorm", True, "after_act"),
    "batchnorm+dropout-before-bn": ("batchnorm", True, "before_norm"),
}


@dataclass(frozen=True)
class RegularisationConfig:
    """C3 regularisation; see the module docstring for the pre-registration, the command and the runtimes."""

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per grid point
    threads: int = 1  # torch threads per run (not part of the run id)
    dataset: str = "mnist1d"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int = 1024  # training examples (the reduced training set)
    width: int = 128  # hidden units per layer of the MLP
    depth: int = 3  # hidden layers of the MLP
    conditions: tuple[str, ...] = tuple(CONDITIONS)  # which of CONDITIONS to train (all five are judged)
    dropout: float = 0.3  # dropout probability (fraction of units zeroed) where dropout is used
    batch_sizes: tuple[int, ...] = (16, 256)  # examples per optimizer step; the parts use the smallest and largest
    lr: float = 0.05  # SGD learning rate (momentum 0.9) at batch size lr_batch
    lr_batch: int = 64  # batch size (examples) at which the learning rate is `lr`
    epochs: int = 30  # passes over the training set
    probe_examples: int = 256  # test examples of the companion probe
    probe_draws: int = 8  # redraws of the batch companions in the companion probe
    margin: float = 0.02  # δ of every part (accuracy, a fraction)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)

    def __post_init__(self) -> None:
        unknown = [c for c in self.conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"unknown condition(s) {unknown}; choose from {', '.join(CONDITIONS)}")
        if set(self.conditions) != set(CONDITIONS):
            raise ValueError(f"the parts need every condition: {', '.join(CONDITIONS)}")
        if len(self.batch_sizes) < 2:
            raise ValueError("regularisation needs at least two batch sizes")


def _grid(cfg: RegularisationConfig):
    for bs in cfg.batch_sizes:
        for condition in cfg.conditions:
            norm, uses_dropout, position = CONDITIONS[condition]
            yield {
                "condition": condition,
                "dataset": cfg.dataset,
                "n_train": cfg.n_train,
                "model": "mlp",
                "model_kwargs": {
                    "width": cfg.width,
                    "depth": cfg.depth,
                    "dropout": cfg.dropout if uses_dropout else 0.0,
                    "dropout_position": position,
                },
                "norm": norm,
                "optimizer": "sgd",
                "lr": cfg.lr * bs / cfg.lr_batch,
                "momentum": 0.9,
                "epochs": cfg.epochs,
                "batch_size": bs,
                "eval_train": True,
                "probe_examples": cfg.probe_examples,
                "probe_draws": cfg.probe_draws,
            }


# --------------------------------------------------------------------------- measurements


def companion_flip_rate(model, x, pool, batch_size: int, draws: int, seed: int) -> float:
    """How often a prediction changes when its batch companions are redrawn, BN layers in train mode.

    Each of ``draws`` draws puts every sample of ``x`` in a batch of ``batch_size`` with ``batch_size // 2``
    other samples of ``x`` (a fresh permutation) and the rest drawn from ``pool`` (the training set); every
    other module stays in eval mode (no dropout). Returns the fraction of (sample, consecutive draws) whose
    predicted class differs. Works on a copy: ``model`` and its buffers are untouched.
    """
    import torch

    from normlab.running_stats import batchnorm_modules

    probe = copy.deepcopy(model).eval()
    for m in batchnorm_modules(probe):
        m.train()
        m.track_running_stats = False  # batch statistics, no buffer updates
    g = torch.Generator().manual_seed(int(seed))
    own = max(1, batch_size // 2)
    preds = []
    with torch.no_grad():
        for _ in range(draws):
            order = torch.randperm(x.shape[0], generator=g)
            out = torch.empty(x.shape[0], dtype=torch.long)
            for i in range(0, x.shape[0], own):
                idx = order[i : i + own]
                fill = pool[torch.randint(0, pool.shape[0], (batch_size - len(idx),), generator=g)]
                out[idx] = probe(torch.cat([x[idx], fill]))[: len(idx)].argmax(-1)
            preds.append(out)
    return torch.stack([(a != b).double().mean() for a, b in zip(preds, preds[1:])]).mean().item()


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.data import Batches
    from normlab.lab.train import evaluate, load_data, train
    from normlab.running_stats import batchnorm_modules, recalibrate

    tc = run.train_config()
    result = train(tc, progress=run.progress)
    metrics = result.to_metrics()
    train_acc, test_acc = metrics.get("final_train_eval_acc"), metrics.get("final_test_acc")
    metrics["gap"] = train_acc - test_acc if train_acc is not None and test_acc is not None else None
    model = result.model
    if batchnorm_modules(model):
        ds = load_data(tc)
        probe = copy.deepcopy(model)
        batches = Batches(ds.x_train, ds.y_train, tc.batch_size, seed=tc.seed, drop_last=True)
        recalibrate(probe, batches, others="eval")  # statistics of the eval-time network: dropout off
        metrics["recal_test_acc"] = evaluate(probe, ds.x_test, ds.y_test)[1]
        metrics["recal_gain"] = metrics["recal_test_acc"] - test_acc
        k = int(run["probe_examples"])
        metrics["companion_flip"] = companion_flip_rate(
            model, ds.x_test[:k], ds.x_train, tc.batch_size, int(run["probe_draws"]), tc.seed
        )
    return metrics


# --------------------------------------------------------------------------- per-seed rows and parts


def _measure(rows: list[dict[str, Any]], cfg: RegularisationConfig) -> list[dict[str, Any]]:
    """The runs themselves, plus per (seed, batch size) the narrowings and the variance shifts (``kind`` rows)."""
    out = [{**r, "kind": "run"} for r in rows]
    by = {(r["seed"], r["batch_size"], r["condition"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    sizes = sorted({r["batch_size"] for r in rows})
    for seed in seeds:
        shifts: dict[str, list[float]] = {"variance_shift": [], "variance_shift_after_act": []}
        for bs in sizes:
            run = {c: by.get((seed, bs, c)) for c in CONDITIONS}
            if not all(run.values()):
                continue
            d = {
                "seed": seed,
                "batch_size": bs,
                "kind": "per-batch",
                "narrowing_bn": run["none"]["gap"] - run["batchnorm"]["gap"],
                "narrowing_dropout": run["none"]["gap"] - run["dropout"]["gap"],
                "variance_shift": run["batchnorm+dropout-before-bn"]["recal_gain"] - run["batchnorm"]["recal_gain"],
                "variance_shift_after_act": run["batchnorm+dropout"]["recal_gain"] - run["batchnorm"]["recal_gain"],
            }
            out.append(d)
            for k in shifts:
                shifts[k].append(d[k])
        if shifts["variance_shift"] and len(shifts["variance_shift"]) == len(sizes):
            out.append({"seed": seed, "kind": "pooled", **{k: sum(v) / len(v) for k, v in shifts.items()}})
    return out


def _parts(cfg: RegularisationConfig) -> list[Part]:
    small, large = min(cfg.batch_sizes), max(cfg.batch_sizes)
    run = lambda c, b=small: {"kind": "run", "condition": c, "batch_size": b}  # noqa: E731
    per = lambda b: {"kind": "per-batch", "batch_size": b}  # noqa: E731
    pooled = {"kind": "pooled"}
    why = "practical: two points of accuracy, the smallest gain or loss for which one adds or moves a regulariser"
    d = cfg.margin
    return [
        Part("bn-narrows-gap", f"BN's generalisation gap is smaller than without a norm at batch {small}", "gap",
             run("batchnorm"), run("none"), direction="less", margin=d, why=why, unit="accuracy",
             label_a="batchnorm", label_b="none"),
        Part("bn-effect-fades", f"BN's narrowing of the gap is larger at batch {small} than at batch {large}",
             "narrowing_bn", per(small), per(large), direction="greater", margin=d, why=why, unit="accuracy",
             label_a=f"batch {small}", label_b=f"batch {large}"),
        Part("variance-shift", "recomputing BN's statistics with dropout off repairs more test accuracy for dropout "
             "right before BN than for BN alone (mean over batch sizes)", "variance_shift", pooled, bound=0.0,
             direction="greater", margin=d, why=why, unit="accuracy", label_a="gain(dropout→BN) − gain(BN)"),
        Part("dropout-narrows-gap", f"dropout's gap is smaller than without regularisation at batch {small}", "gap",
             run("dropout"), run("none"), direction="less", margin=d, why=why, decides=False, unit="accuracy",
             label_a="dropout", label_b="none"),
        Part("dropout-effect-steady", f"dropout narrows the gap as much at batch {small} as at batch {large}",
             "narrowing_dropout", per(small), per(large), direction="equivalent", margin=d, why=why, decides=False,
             unit="accuracy", label_a=f"batch {small}", label_b=f"batch {large}"),
        Part("bn-adds-to-dropout", f"BN with dropout has a smaller gap than dropout alone at batch {small}", "gap",
             run("batchnorm+dropout"), run("dropout"), direction="less", margin=d, why=why, decides=False,
             unit="accuracy", label_a="batchnorm+dropout", label_b="dropout"),
        Part("dropout-before-bn-costs", f"dropout right before BN has a lower test accuracy than dropout after the "
             f"activation at batch {small}", "final_test_acc", run("batchnorm+dropout"),
             run("batchnorm+dropout-before-bn"), direction="greater", margin=d, why=why, decides=False,
             unit="accuracy", label_a="dropout after act", label_b="dropout before BN"),
        Part("variance-shift-after-act", "the same repair for dropout after the activation (it reaches BN through a "
             "linear layer)", "variance_shift_after_act", pooled, bound=0.0, direction="greater", margin=d, why=why,
             decides=False, unit="accuracy", label_a="gain(dropout·W→BN) − gain(BN)"),
        Part("companions-matter-less", f"BN's predictions depend more on the batch companions at batch {small} than "
             f"at batch {large}", "companion_flip", run("batchnorm"), run("batchnorm", large), direction="greater",
             margin=d, why=why, decides=False, unit="fraction of predictions", label_a=f"batch {small}",
             label_b=f"batch {large}"),
    ]  # fmt: skip


# --------------------------------------------------------------------------- explanation and figure


def _explain(rows: list[dict[str, Any]], cfg: RegularisationConfig, judgement: Judgement):
    rows = [r for r in rows if r["seed"] < judgement.seeds]
    small, large = min(cfg.batch_sizes), max(cfg.batch_sizes)

    def m(metric: str, **where: Any) -> float:
        return mean_std(values(rows, metric, **where))[0]

    diverged = sorted({(r["condition"], r["batch_size"]) for r in rows if r.get("diverged")})
    text = (
        f"mean gap (train − test accuracy) at batch {small}: "
        + ", ".join(f"{c} {m('gap', condition=c, batch_size=small):.3f}" for c in CONDITIONS)
        + f"; at batch {large}: "
        + ", ".join(f"{c} {m('gap', condition=c, batch_size=large):.3f}" for c in CONDITIONS)
        + f"; recomputing BN statistics without dropout changes test accuracy by "
        f"{m('recal_gain', condition='batchnorm+dropout-before-bn', batch_size=small):+.3f} (dropout before BN) and "
        f"{m('recal_gain', condition='batchnorm', batch_size=small):+.3f} (BN alone) at batch {small}"
    )
    if diverged:
        text += "; diverged runs (their gap is ~0 because they learned nothing): " + ", ".join(
            f"{c} at batch {b}" for c, b in diverged
        )
    numbers = {
        "gap": {
            f"{c}@{b}": values(rows, "gap", condition=c, batch_size=b) for c in CONDITIONS for b in cfg.batch_sizes
        },
        "test_acc": {
            f"{c}@{b}": values(rows, "final_test_acc", condition=c, batch_size=b)
            for c in CONDITIONS
            for b in cfg.batch_sizes
        },
    }
    return text, numbers


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: RegularisationConfig) -> list[Path]:
    plt = pyplot()
    sizes = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), constrained_layout=True)
    axes = axes.flatten()
    panels = [
        ("gap", "generalisation gap (train − test accuracy)", "gap vs batch size"),
        ("final_test_acc", "test accuracy (eval mode, EMA statistics)", "test accuracy"),
        ("recal_gain", "test accuracy gained by statistics without dropout", "variance shift: recalibration gain"),
        ("companion_flip", "predictions changed by redrawn companions", "BN's sensitivity to batch companions"),
    ]
    for ax, (metric, ylabel, title) in zip(axes, panels):
        for i, c in enumerate(CONDITIONS):
            xs, ms, ss = [], [], []
            for bs in sizes:
                vals = [v for v in values([r for r in rows if metric in r], metric, condition=c, batch_size=bs)
                        if v is not None and math.isfinite(v)]  # fmt: skip
                if vals:
                    mu, sd, _ = mean_std(vals)
                    xs.append(bs * (1 + 0.04 * (i - 2)))
                    ms.append(mu)
                    ss.append(sd)
            if xs:
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, color=f"C{i}",
                            ls="--" if "dropout" in c else "-", label=c)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set(xlabel="batch size (examples)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(
        f"C3 regularisation: MLP on {cfg.n_train} {cfg.dataset} examples, {cfg.epochs} epochs, "
        f"lr ∝ batch size ({cfg.lr:g} at {cfg.lr_batch}), dropout p={cfg.dropout:g} (mean ± std over seeds)"
    )
    return [save_figure(fig, out_dir, "regularisation")]


EXPERIMENT = register_experiment(
    Experiment(
        name="regularisation",
        claim="C3",
        title="BN's batch noise narrows the generalisation gap, less at large batch, unlike dropout; "
        "dropout before BN shifts its variance",
        config=RegularisationConfig,
        scales={
            "smoke": RegularisationConfig(
                seeds=2,
                max_seeds=2,
                dataset="digits",
                n_train=256,
                width=32,
                depth=2,
                batch_sizes=(16, 64),
                epochs=1,
                probe_examples=32,
                probe_draws=2,
            ),
            "quick": RegularisationConfig(),
            "full": RegularisationConfig(
                seeds=5,
                max_seeds=20,
                dataset="cifar10",
                n_train=5000,
                width=512,
                depth=4,
                batch_sizes=(16, 64, 256),
                lr=0.02,
                epochs=100,
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
