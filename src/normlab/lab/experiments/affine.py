"""``affine`` (C16): the learned scale γ and shift β of a norm layer are "icing on the cake", not essential.

Pre-registration
----------------
**Claim** (S0, end of "BN appears"; our words): what makes BN work is the
standardisation itself (subtract the mean, divide by the standard deviation);
the learned per-channel scale γ and shift β that the standard design adds
afterwards are, in the author's words, icing on the cake — not essential. We
read it as an equivalence: removing γ and β changes neither how well the
network ends up nor how fast it trains by an amount that matters.

**Arms.** Each network is trained with the norm's affine parameters on (the
default) and off (``affine=False`` / ``elementwise_affine=False``), paired by seed
(same seed: the same draw of every other weight — γ and β start at 1 and 0
and use no random numbers — and the same batch order):

* the CNN (three conv blocks of 8/16/32 channels) with BN before the
  activation (conv → BN → ReLU, common practice; here β sets each ReLU's
  threshold, which the next layer cannot undo), MNIST-1D, 8 epochs of SGD
  (momentum 0.9, lr 0.05, batch 64);
* the tiny pre-norm Transformer (2 blocks, width 32, 4 heads) with LayerNorm on
  synthetic variable-length sequences (2,000 training, 1,000 test), 4 epochs
  of Adam (lr 1e-3, batch 32);
* (reported) the same CNN with BN before the conv (norm → conv → ReLU, S0's own
  placement), where γ and β are exactly absorbable by the following conv — the
  control for "the network can represent the same functions".

*Speed* is the mean training loss over all scheduled steps (capped at the
chance loss ln K, steps after a divergence counted as ln K); *accuracy* is the
test accuracy after the last epoch.

Deciding parts (all "equivalent", paired by seed):

* ``cnn-accuracy``: test accuracy, BN CNN affine on vs off, δ = 0.02;
* ``cnn-speed``: speed, BN CNN affine on vs off, log scale, δ = ×1.1;
* ``transformer-accuracy``: test accuracy, LN Transformer affine on vs off, δ = 0.02;
* ``transformer-speed``: speed, LN Transformer affine on vs off, log scale, δ = ×1.1.

Why these δ: practical thresholds for "icing". Two points of test accuracy on
these 10-/4-class tasks is the smallest difference for which a practitioner
would keep a layer's parameters; a 10 % difference in the mean training loss
over the same steps is the smallest speed difference worth one. An effect
inside both is "not essential"; outside either, γ/β matter there.

Reported parts (shown, never deciding): ``before-linear-accuracy`` and
``before-linear-speed`` (the same for BN before the conv, δ 0.02 and ×1.1: the
case in which the affine is redundant by construction).

**Does not hold** if any deciding part's interval lies wholly outside its
margin: removing γ/β costs (or gains) at least two points of accuracy or 10 %
of speed on one of the networks — the finding then names where it breaks.
**Inconclusive** where the seeds cannot put the interval inside the margin.

**Budget**: seeds in rounds of 3 up to 12 (quick), 6 runs per seed; see *Runtime*.

Runtime
-------
Command: ``normlab run affine`` (``--scale smoke|quick|full``). Quick on this
2-core CPU, one thread per run: measured 150 s of CPU (user + system,
``/usr/bin/time``) for the full budget of 12 seeds (72 runs), which the first
quick run used. Full (CIFAR-10, a wider CNN, longer training) is for a GPU.
"""

from __future__ import annotations

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
from normlab.lab.experiments.placement import speed_metrics
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["AffineConfig", "EXPERIMENT", "NETWORKS", "affine_spread"]

NETWORKS = ("cnn", "transformer", "cnn-before-linear")  # deciding, deciding, reported


@dataclass(frozen=True)
class AffineConfig:
    """C16 affine; see the module docstring for the pre-registration, the command and the runtimes."""

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per grid point
    threads: int = 1  # torch threads per run (not part of the run id)
    cnn_dataset: str = "mnist1d"  # dataset of the CNNs (normlab.lab.data.dataset_names())
    cnn_n_train: int | None = None  # training examples of the CNNs (None = all)
    channels: tuple[int, ...] = (8, 16, 32)  # conv channels per block
    cnn_epochs: int = 8  # passes over the training set (CNNs)
    cnn_lr: float = 0.05  # SGD learning rate (momentum 0.9) of the CNNs
    cnn_batch: int = 64  # examples per step (CNNs)
    n_sequences: int = 2000  # training sequences of the Transformer (synthetic-sequences; 1,000 test)
    d_model: int = 32  # Transformer width (features)
    depth: int = 2  # Transformer blocks
    heads: int = 4  # attention heads
    tf_epochs: int = 4  # passes over the training set (Transformer)
    tf_lr: float = 1e-3  # Adam learning rate (Transformer)
    tf_batch: int = 32  # sequences per step (Transformer)
    accuracy_margin: float = 0.02  # δ of the accuracy parts (fraction of the test set)
    speed_margin: float = 1.1  # δ of the speed parts (a ratio of mean training losses)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)


def _network(cfg: AffineConfig, network: str, affine: bool) -> dict[str, Any]:
    if network == "transformer":
        return {
            "dataset": "synthetic-sequences",
            "n_train": cfg.n_sequences,
            "model": "transformer",
            "model_kwargs": {"d_model": cfg.d_model, "depth": cfg.depth, "heads": cfg.heads},
            "norm": "layernorm",
            "norm_kwargs": {"elementwise_affine": affine},  # LayerNorm over each token's features
            "optimizer": "adam",
            "lr": cfg.tf_lr,
            "epochs": cfg.tf_epochs,
            "batch_size": cfg.tf_batch,
        }
    return {
        "dataset": cfg.cnn_dataset,
        "n_train": cfg.cnn_n_train,
        "model": "cnn",
        "model_kwargs": {
            "channels": list(cfg.channels),
            "norm_position": "before_linear" if network == "cnn-before-linear" else "pre_act",
        },
        "norm": "batchnorm",
        "norm_kwargs": {"affine": affine},
        "optimizer": "sgd",
        "lr": cfg.cnn_lr,
        "momentum": 0.9,
        "epochs": cfg.cnn_epochs,
        "batch_size": cfg.cnn_batch,
    }


def _grid(cfg: AffineConfig):
    for network in NETWORKS:
        for affine in (True, False):
            yield {"network": network, "affine": affine, **_network(cfg, network, affine)}


def affine_spread(model) -> dict[str, float | None]:
    """How far the learned affine parameters moved: mean |γ − 1| and mean |β| over every norm layer (None if none)."""
    import torch

    gammas, betas = [], []
    for m in model.modules():
        if getattr(m, "affine", getattr(m, "elementwise_affine", False)) and getattr(m, "weight", None) is not None:
            gammas.append((m.weight.detach() - 1).abs().flatten())
            if getattr(m, "bias", None) is not None:
                betas.append(m.bias.detach().abs().flatten())
    if not gammas:
        return {"gamma_dev": None, "beta_abs": None}
    return {
        "gamma_dev": torch.cat(gammas).mean().item(),
        "beta_abs": torch.cat(betas).mean().item() if betas else None,
    }


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import load_data, train

    config = run.train_config()
    result = train(config, progress=run.progress)
    return {**result.to_metrics(), **speed_metrics(result, load_data(config)), **affine_spread(result.model)}


# --------------------------------------------------------------------------- parts


def _parts(cfg: AffineConfig) -> list[Part]:
    on = lambda n: {"network": n, "affine": True}  # noqa: E731
    off = lambda n: {"network": n, "affine": False}  # noqa: E731
    acc_why = "practical: two points of test accuracy, the smallest difference for which one keeps a layer's parameters"
    speed_why = "practical: 10 % of the mean training loss over the same steps, the smallest speed difference worth it"
    a, r = cfg.accuracy_margin, cfg.speed_margin
    names = {"cnn": "BN CNN (before the activation)", "transformer": "LN Transformer",
             "cnn-before-linear": "BN CNN (BN before the conv)"}  # fmt: skip
    out = []
    for network, prefix, decides in (("cnn", "cnn", True), ("transformer", "transformer", True),
                                     ("cnn-before-linear", "before-linear", False)):  # fmt: skip
        out += [
            Part(f"{prefix}-accuracy", f"{names[network]}: test accuracy with γ/β ≈ without", "final_test_acc",
                 on(network), off(network), direction="equivalent", margin=a, why=acc_why, decides=decides,
                 unit="accuracy", label_a="affine", label_b="no affine"),
            Part(f"{prefix}-speed", f"{names[network]}: mean training loss with γ/β ≈ without", "capped_mean_loss",
                 on(network), off(network), direction="equivalent", margin=r, why=speed_why, log=True,
                 decides=decides, unit="mean training loss (nats)", label_a="affine", label_b="no affine"),
        ]  # fmt: skip
    return out


# --------------------------------------------------------------------------- explanation and figure


def _explain(rows: list[dict[str, Any]], cfg: AffineConfig, judgement: Judgement):
    rows = [r for r in rows if r["seed"] < judgement.seeds]
    texts, numbers = [], {}
    for network in NETWORKS:
        acc = {a: mean_std(values(rows, "final_test_acc", network=network, affine=a))[0] for a in (True, False)}
        loss = {a: mean_std(values(rows, "capped_mean_loss", network=network, affine=a))[0] for a in (True, False)}
        on = [r for r in rows if r["network"] == network and r["affine"]]
        beta = [r["beta_abs"] for r in on if r.get("beta_abs") is not None]
        gamma = [r["gamma_dev"] for r in on if r.get("gamma_dev") is not None]
        spread = f", learned mean |β| {mean_std(beta)[0]:.3f}, mean |γ−1| {mean_std(gamma)[0]:.3f}" if beta else ""
        texts.append(
            f"{network}: test accuracy {acc[True]:.3f} with γ/β vs {acc[False]:.3f} without, mean training loss "
            f"{loss[True]:.3f} vs {loss[False]:.3f}{spread}"
        )
        numbers[network] = {"test_acc": acc, "mean_loss": loss}
    broken = [r.part.name for r in judgement.parts if r.status == "does not hold"]
    if broken:
        texts.append("γ/β matter (outside the margin) for: " + ", ".join(broken))
    return "; ".join(texts), numbers


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: AffineConfig) -> list[Path]:
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(2, len(NETWORKS), figsize=(5.2 * len(NETWORKS), 8), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    for j, network in enumerate(NETWORKS):
        ax = axes[0, j]
        for k, affine in enumerate((True, False)):
            rs = [r for r in rows if r["network"] == network and r["affine"] == affine]
            if not rs:
                continue
            n = min(len(r["step_loss"]) for r in rs)
            curves = np.array([[min(x, r["chance_loss"]) if math.isfinite(x) else r["chance_loss"]
                                for x in r["step_loss"][:n]] for r in rs])  # fmt: skip
            kernel = np.ones(10) / 10
            mean = np.convolve(curves.mean(0), kernel, mode="valid")
            ax.plot(np.arange(len(mean)) + 9, mean, color=f"C{k}", label="with γ/β" if affine else "without γ/β")
        ax.set(yscale="log", xlabel="optimizer step", ylabel="training loss (nats, 10-step mean over seeds)",
               title=f"{network}: training loss")  # fmt: skip
        ax.legend(fontsize=8)
        ax = axes[1, j]
        for k, affine in enumerate((True, False)):
            accs = values(rows, "final_test_acc", network=network, affine=affine)
            ax.scatter([k] * len(accs), accs, color=f"C{k}", alpha=0.7)
            if accs:
                m, s, _ = mean_std(accs)
                ax.errorbar([k], [m], yerr=[s], color="k", marker="_", ms=20, capsize=6)
        pairs = {}
        for r in rows:
            if r["network"] == network:
                pairs.setdefault(r["seed"], {})[r["affine"]] = r["final_test_acc"]
        for p in pairs.values():
            if len(p) == 2:
                ax.plot([0, 1], [p[True], p[False]], color="grey", lw=0.6, alpha=0.6)
        ax.set_xticks([0, 1], ["with γ/β", "without γ/β"])
        ax.set(ylabel="test accuracy (lines join one seed)", title=f"{network}: test accuracy")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.suptitle("C16: norm layers with and without their learned scale γ and shift β (S0: 'icing on the cake')")
    return [save_figure(fig, out_dir, "affine")]


EXPERIMENT = register_experiment(
    Experiment(
        name="affine",
        claim="C16",
        title="A norm's learned scale and shift (γ, β) are icing on the cake: removing them changes little",
        config=AffineConfig,
        scales={
            "smoke": AffineConfig(
                seeds=2,
                max_seeds=2,
                cnn_dataset="digits",
                cnn_n_train=256,
                channels=(4, 8),
                cnn_epochs=1,
                cnn_batch=32,
                n_sequences=128,
                d_model=16,
                depth=1,
                heads=2,
                tf_epochs=1,
            ),
            "quick": AffineConfig(),
            "full": AffineConfig(
                seeds=5,
                max_seeds=20,
                cnn_dataset="cifar10",
                channels=(64, 128, 256),
                cnn_epochs=30,
                cnn_batch=128,
                n_sequences=20000,
                d_model=128,
                depth=4,
                tf_epochs=10,
                threads=4,
            ),
        },
        grid=_grid,
        run_one=_run_one,
        parts=_parts,
        explain=_explain,
        plot=_plot,
        description=__doc__ or "",
    )
)
