"""``batch-size`` (C2): BN depends on its batch statistics: tiny batches hurt it, moderate ones regularise best.

Pre-registration
----------------
**Claim** (S1, section 2 "the influence of the mini-batch on BN"; our words): BN
normalises each example with the mean and variance of the batch it happens to
be in. With a very small batch those statistics are set by a few random
examples and jitter wildly, the learning signal drowns in that noise and the
network learns badly ("bad interference"); with a moderate batch (the source
names 32 and 64, and calls 32–128 the usual sweet spot) the jitter is a mild
perturbation that regularises ("good regularisation"), while a large batch
gives precise statistics but may settle in sharper minima that generalise
worse. The source's own run of this crashed unfinished. The paper behind the
first half is Wu & He 2018 (GroupNorm): ResNet-50 on ImageNet, top-1 error at
2 images per GPU BN 34.7 % vs GN 24.1 %, at 32 per GPU BN 23.6 % vs GN 24.1 %:
BN loses about 11 points from batch 32 to 2, GroupNorm none.

**How starved is BN here?** Each BN statistic (one channel's mean or variance)
averages ``batch x H x W`` values in a conv net and ``batch`` values after a
linear layer. In the GroupNorm paper at 2 images per GPU (224 x 224 inputs)
that is 2·112² = 25,088 values at the stem, 6,272 / 1,568 / 392 in stages
2–4 and 2·7² = 98 in the last stage — always many values, but from only 2
independent images. Our two architectures at batch 2 on the 8 x 8 digits:

* ``cnn`` (three conv 3x3 -> norm -> ReLU -> maxpool blocks, 8/16/32 channels):
  2·8² = 128, 2·4² = 32 and 2·2² = 8 values — fewer than the paper's at every
  depth, from the same 2 images;
* ``mlp`` (three linear -> norm -> ReLU layers of 64 units): 2 values per
  statistic in every layer — the most starved a BN layer can be (with 2 values
  each normalised feature is ±1), as after global pooling or on 1x1 maps.

The conv net is the paper's regime (spatial BN, few images); the MLP is the
extreme the claim's mechanism predicts to be worst. Both are judged.

**Design.** Scikit-learn's digits (1,437 training, 360 test images). Every
batch size gets the same number of **epochs** (every example seen equally
often) and a learning rate **proportional to the batch size** (SGD, momentum
0.9, ``lr = 0.05 · batch / 32``, cosine decay to 0: the linear scaling rule of
Goyal et al. 2017, which the GroupNorm paper uses for its batch sweep). The
tiny-batch comparison trains 3 epochs (batch 2: 2,157 steps; batch 32: 132).
The moderate-vs-large comparison trains the CNN 20 epochs at batch 32
(880 steps) and 256 (100 steps, lr 0.4), long enough for both to fit the
training set, so a difference in test accuracy is one of generalisation, not
of an unfinished optimisation. Test accuracy is measured in eval mode (running
statistics). A run that diverged counts at chance accuracy, 0.1.

**Deciding parts** (metrics per seed; arms paired by seed: the same seed gives
the same initialisation draw and batch order in both arms; difference scale):

* ``bn-loses-more-cnn`` — metric: the drop, test accuracy at batch 32 minus at
  batch 2 (same seed). Arm A BN, arm B GroupNorm (4 groups), CNN. Direction:
  A greater. δ = 0.02 accuracy: a fifth of the GroupNorm paper's difference
  of drops (BN +11.1 points of error, GN ±0), below which "tiny batches hurt
  BN and not GN" would not be worth saying.
* ``bn-loses-more-mlp`` — the same in the MLP. δ = 0.02, same reason.
* ``moderate-beats-large`` — metric: BN's test accuracy at batch 32 minus at
  batch 256 (CNN, 20 epochs, same seed), against 0. Direction: greater.
  δ = 0.01 accuracy (3.6 of the 360 test digits): a practical threshold, the
  smallest generalisation difference one would pick a batch size for;
  large-batch losses in Keskar et al. 2017 range from a few tenths of a point
  (MNIST) to several points (CIFAR).

**Reported parts** (shown, never deciding): ``bn-drop-cnn`` and ``bn-drop-mlp``
(BN's own drop against 0, δ 0.02: the first half of the claim without the
comparison), ``gn-drop-cnn`` and ``gn-drop-mlp`` (GroupNorm's drop ≈ 0,
equivalence within ±0.02: the paper's "GN is flat"). They are reported only
because the deciding comparison already contains them: BN's drop minus GN's
is what separates BN's dependence on batch statistics from what every norm
shares (fewer, smaller steps at batch 2).

**Does not hold** if BN's drop is not larger than GroupNorm's in either
architecture (its interval below 0, or inside ±0.02), or if batch 32 does not
generalise better than batch 256 (interval below 0, or inside ±0.01).

**Seeds**: rounds of 3 seeds up to 12 (quick); smoke 2. Measured cost at quick
scale (``/usr/bin/time``, one thread, on the shared 2-core machine): 295 s of
CPU for 9 seeds (90 runs), about 33 s per seed, so about 6.6 CPU-minutes at the
full 12 seeds.

**What was seen before the runs.** The design above was fixed after pilot runs
on seed 100 (outside the judged seeds 0–11) that measured the cost and checked
that every arm trains. For that one seed they already showed BN's accuracy
barely moving from batch 32 to 2 in the CNN (0.983 → 0.986) and collapsing in
the MLP (0.975 → 0.376), and BN at batch 32 and 256 equal (0.992 both).
Judging both architectures follows from the count of values per statistic
above, not from those numbers, but a reader should know they were seen.

Design notes
------------
C13 ``small-batch-fixes`` uses the same grid points where it needs BN or
GroupNorm (same parameters, hence the same run ids); each experiment stores
its runs in its own folder, so the points are trained once per experiment.
Every BN run is also evaluated with *precise* statistics (running statistics
replaced by the training set's population statistics,
:func:`normlab.running_stats.recalibrate`), a metric C13 judges. The figure
shows each seed's accuracy at both batch sizes, per architecture and norm.

Command: ``normlab run batch-size`` (``--scale smoke|quick|full``). Runtime
(one thread per run): smoke ~10 s of CPU; quick 33 s of CPU per seed (10 runs:
the batch-2 runs of 2,157 steps cost most), 295 s for the 9 seeds at which the
first quick run decided; full (CIFAR-10, a pre-activation ResNet and the MLP,
batches 2 / 32 / 1024) is for a GPU, not run here.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.lab.config import ConfigError, TrainConfig
from normlab.lab.experiments.framework import (
    Experiment,
    Judgement,
    Part,
    Run,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
)

__all__ = [
    "BatchSizeConfig",
    "EXPERIMENT",
    "CHANCE",
    "train_size",
    "point",
    "tiny_points",
    "large_points",
    "run_point",
    "accuracy",
    "by_seed",
    "stat_counts",
    "norm_kwargs",
]

CHANCE = 0.1  # the accuracy a diverged run counts at (10 classes)
ARCHS = {"cnn": {"channels": [8, 16, 32]}, "mlp": {"width": 64, "depth": 3}}  # the quick architectures' keywords


@dataclass(frozen=True)
class BatchSizeConfig:
    """Accuracy vs batch size for a set of norms (C2 ``batch-size`` and C13 ``small-batch-fixes``).

    See the module docstrings for the design, the command and the runtimes.
    """

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per grid point
    threads: int = 1  # torch threads per run (not part of the run id)
    dataset: str = "digits"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    model_kwargs: dict = field(default_factory=lambda: copy.deepcopy(ARCHS))  # build_model keywords per architecture
    tiny_archs: tuple[str, ...] = ("cnn", "mlp")  # architectures of the tiny-batch comparison
    tiny_norms: tuple[str, ...] = ("batchnorm", "groupnorm")  # norms of the tiny-batch comparison
    tiny_batch: int = 2  # the "tiny" batch size (examples)
    reference_batch: int = 32  # the "moderate" batch size (examples); lr is scaled relative to it
    tiny_epochs: int = 3  # epochs of the tiny-batch comparison (at both batch sizes)
    large_arch: str = "cnn"  # architecture of the moderate-vs-large comparison
    large_norms: tuple[str, ...] = ("batchnorm",)  # norms trained at the large batch
    large_batch: int = 256  # the "large" batch size (examples)
    large_epochs: int = 20  # epochs of the moderate-vs-large comparison (at both batch sizes)
    lr: float = 0.05  # SGD learning rate at reference_batch; at batch b it is lr * b / reference_batch
    momentum: float = 0.9  # SGD momentum
    schedule: str = "cosine"  # learning-rate schedule ("constant" | "cosine" | "step")
    group_norm_groups: int = 4  # GroupNorm groups per layer
    ghost_virtual_batch: int = 32  # Ghost BN virtual batch size (examples); a batch no larger than it is plain BN
    renorm_r_warmup: tuple[float, ...] = (0.05, 0.4)  # Batch Renorm r_max ramp (start, end), fractions of the run
    renorm_d_warmup: tuple[float, ...] = (0.05, 0.25)  # Batch Renorm d_max ramp (start, end), fractions of the run
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)

    def __post_init__(self) -> None:
        for arch in (*self.tiny_archs, self.large_arch):
            if arch not in self.model_kwargs:
                raise ConfigError(
                    f"architecture {arch!r} has no entry in model_kwargs (have {sorted(self.model_kwargs)})"
                )
        if not self.tiny_batch < self.reference_batch < self.large_batch:
            raise ConfigError(
                f"need tiny_batch < reference_batch < large_batch, got {self.tiny_batch}, {self.reference_batch}, "
                f"{self.large_batch}"
            )


# --------------------------------------------------------------------------- grid and runs


def _data_config(cfg: BatchSizeConfig) -> TrainConfig:
    kw = {"data_kwargs": {"data_dir": cfg.data_dir}} if cfg.data_dir else {}
    return TrainConfig(dataset=cfg.dataset, n_train=cfg.n_train, **kw)


@functools.lru_cache(maxsize=8)
def _train_size(dataset: str, n_train: int | None, data_dir: str | None) -> int:
    from normlab.lab.train import load_data

    kw = {"data_kwargs": {"data_dir": data_dir}} if data_dir else {}
    return int(load_data(TrainConfig(dataset=dataset, n_train=n_train, **kw)).x_train.shape[0])


def train_size(cfg: BatchSizeConfig) -> int:
    """Training examples of the experiment's dataset (as :func:`normlab.lab.train.load_data` loads it)."""
    return _train_size(cfg.dataset, cfg.n_train, cfg.data_dir)


def norm_kwargs(norm: str, cfg: BatchSizeConfig, steps: int) -> dict[str, Any]:
    """The keywords each norm layer gets (only where the layer's default would not fit this run of ``steps``)."""
    if norm == "groupnorm":
        return {"num_groups": cfg.group_norm_groups}
    if norm == "ghostbatchnorm":
        return {"virtual_batch_size": cfg.ghost_virtual_batch}
    if norm == "batchrenorm":  # the paper's ramps (5k-40k / 5k-25k of a much longer run) scaled to this run
        return {
            "r_max_warmup": [round(f * steps) for f in cfg.renorm_r_warmup],
            "d_max_warmup": [round(f * steps) for f in cfg.renorm_d_warmup],
        }
    return {}


def point(cfg: BatchSizeConfig, arch: str, norm: str, batch: int, epochs: int) -> dict[str, Any]:
    """One training run: ``arch`` with ``norm`` at ``batch`` for ``epochs``, lr scaled linearly with the batch."""
    n = train_size(cfg)
    if batch > n:
        raise ConfigError(f"batch size {batch} is larger than the training set ({n} examples)")
    steps = epochs * (n // batch)  # drop_last: full batches only
    return {
        "dataset": cfg.dataset,
        "n_train": cfg.n_train,
        "model": arch,
        "model_kwargs": dict(cfg.model_kwargs[arch]),
        "norm": norm,
        "norm_kwargs": norm_kwargs(norm, cfg, steps),
        "optimizer": "sgd",
        "lr": cfg.lr * batch / cfg.reference_batch,
        "momentum": cfg.momentum,
        "schedule": cfg.schedule,
        "batch_size": batch,
        "epochs": epochs,
    }


def tiny_points(cfg: BatchSizeConfig, archs: Iterable[str], norms: Iterable[str], batches: Iterable[int]):
    """The tiny-batch comparison's runs (``tiny_epochs`` each)."""
    return [point(cfg, a, n, b, cfg.tiny_epochs) for a in archs for n in norms for b in batches]


def large_points(cfg: BatchSizeConfig, norms: Iterable[str], batches: Iterable[int]):
    """The moderate-vs-large comparison's runs (``large_arch``, ``large_epochs`` each)."""
    return [point(cfg, cfg.large_arch, n, b, cfg.large_epochs) for n in norms for b in batches]


def unique(points: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``points`` without repeats (a point asked for twice is one run)."""
    from normlab.lab.store import canonical_json

    seen, out = set(), []
    for p in points:
        key = canonical_json(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _grid(cfg: BatchSizeConfig):
    batches = (cfg.tiny_batch, cfg.reference_batch)
    return unique(
        tiny_points(cfg, cfg.tiny_archs, cfg.tiny_norms, batches)
        + large_points(cfg, cfg.large_norms, (cfg.reference_batch, cfg.large_batch))
    )


def run_point(run: Run) -> dict[str, Any]:
    """Train one point; add eval-mode accuracy on the training set and, for BN-family models, precise-BN metrics."""
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
    metrics["train_eval_loss"], metrics["train_eval_acc"] = evaluate(model, xtr, ytr)
    if batchnorm_modules(model):
        precise = copy.deepcopy(model)
        recalibrate(precise, [xtr], 1)  # one batch holding the whole training set: the population statistics
        metrics["precise_test_loss"], metrics["precise_test_acc"] = evaluate(precise, xte, yte)
    return metrics


# --------------------------------------------------------------------------- per-seed values


def accuracy(row: dict[str, Any], key: str = "final_test_acc") -> float:
    """A run's accuracy ``key``; a diverged run, or a non-finite value, counts at chance (:data:`CHANCE`)."""
    v = row.get(key)
    if row.get("diverged") or not isinstance(v, (int, float)) or not math.isfinite(v):
        return CHANCE
    return float(v)


def by_seed(rows: Sequence[dict[str, Any]], key: str = "final_test_acc", **where: Any) -> dict[int, float]:
    """``{seed: accuracy key}`` over the rows whose entries equal ``where`` (one run per seed)."""
    out: dict[int, float] = {}
    for r in rows:
        if all(r.get(k) == v for k, v in where.items()):
            seed = int(r["seed"])
            if seed in out:
                raise ValueError(f"two runs of seed {seed} match {where}")
            out[seed] = accuracy(r, key)
    return out


def _measure(rows: list[dict[str, Any]], cfg: BatchSizeConfig) -> list[dict[str, Any]]:
    """Per seed: each (architecture, norm)'s drop from the reference to the tiny batch; BN's moderate-vs-large gain."""
    out = []
    for arch in cfg.tiny_archs:
        for norm in cfg.tiny_norms:
            sel = {"model": arch, "norm": norm, "epochs": cfg.tiny_epochs}
            ref = by_seed(rows, **sel, batch_size=cfg.reference_batch)
            tiny = by_seed(rows, **sel, batch_size=cfg.tiny_batch)
            for s in sorted(set(ref) & set(tiny)):
                out.append(
                    {"seed": s, "setting": "tiny", "arch": arch, "norm": norm,
                     "acc_ref": ref[s], "acc_tiny": tiny[s], "drop": ref[s] - tiny[s]}
                )  # fmt: skip
    for norm in cfg.large_norms:
        sel = {"model": cfg.large_arch, "norm": norm, "epochs": cfg.large_epochs}
        ref = by_seed(rows, **sel, batch_size=cfg.reference_batch)
        large = by_seed(rows, **sel, batch_size=cfg.large_batch)
        for s in sorted(set(ref) & set(large)):
            out.append(
                {"seed": s, "setting": "large", "arch": cfg.large_arch, "norm": norm,
                 "acc_ref": ref[s], "acc_large": large[s], "gain": ref[s] - large[s]}
            )  # fmt: skip
    return out


# --------------------------------------------------------------------------- parts

MARGIN_TINY = 0.02
WHY_TINY = "a fifth of the GroupNorm paper's difference of drops from batch 32 to 2 (BN +11.1 error points, GN ±0)"
MARGIN_LARGE = 0.01
WHY_LARGE = (
    "one accuracy point (3.6 of 360 test digits): the smallest generalisation difference one would pick a batch "
    "size for (large-batch losses in Keskar et al. 2017: tenths of a point to several points)"
)


def _parts(cfg: BatchSizeConfig) -> list[Part]:
    tiny, ref, large = cfg.tiny_batch, cfg.reference_batch, cfg.large_batch
    parts = []
    for arch in cfg.tiny_archs:
        sel = {"setting": "tiny", "arch": arch}
        parts.append(
            Part(
                name=f"bn-loses-more-{arch}",
                says=f"{arch}: from batch {ref} to {tiny} BN's test accuracy drops more than GroupNorm's",
                metric="drop",
                a={**sel, "norm": "batchnorm"},
                b={**sel, "norm": "groupnorm"},
                direction="greater",
                margin=MARGIN_TINY,
                why=WHY_TINY,
                unit="accuracy",
                label_a=f"BN drop ({arch})",
                label_b=f"GN drop ({arch})",
            )
        )
    parts.append(
        Part(
            name="moderate-beats-large",
            says=f"{cfg.large_arch}, equal epochs: BN's test accuracy at batch {ref} exceeds that at batch {large}",
            metric="gain",
            a={"setting": "large", "arch": cfg.large_arch, "norm": "batchnorm"},
            bound=0.0,
            direction="greater",
            margin=MARGIN_LARGE,
            why=WHY_LARGE,
            unit="accuracy",
            label_a=f"BN acc at {ref} − at {large}",
        )
    )
    for arch in cfg.tiny_archs:
        sel = {"setting": "tiny", "arch": arch}
        parts.append(
            Part(
                name=f"bn-drop-{arch}",
                says=f"{arch}: BN's test accuracy drops from batch {ref} to {tiny}",
                metric="drop",
                a={**sel, "norm": "batchnorm"},
                bound=0.0,
                direction="greater",
                margin=MARGIN_TINY,
                why=WHY_TINY,
                decides=False,
                unit="accuracy",
                label_a=f"BN drop ({arch})",
            )
        )
        parts.append(
            Part(
                name=f"gn-drop-{arch}",
                says=f"{arch}: GroupNorm's test accuracy is the same at batch {tiny} as at {ref}",
                metric="drop",
                a={**sel, "norm": "groupnorm"},
                bound=0.0,
                direction="equivalent",
                margin=MARGIN_TINY,
                why=WHY_TINY,
                decides=False,
                unit="accuracy",
                label_a=f"GN drop ({arch})",
            )
        )
    return parts


# --------------------------------------------------------------------------- explanation


def stat_counts(arch: str, cfg: BatchSizeConfig, batch: int | None = None) -> list[int]:
    """Values each BN statistic (one channel's mean or variance) averages, per BN layer, at ``batch`` (default tiny).

    Measured by running the architecture once on a batch of that size and counting ``numel / channels``
    at each BN layer's input.
    """
    import torch

    from normlab.lab.models import build_model
    from normlab.lab.train import load_data
    from normlab.running_stats import batchnorm_modules

    batch = cfg.tiny_batch if batch is None else batch
    ds = load_data(_data_config(cfg))
    model = build_model(
        arch, in_shape=tuple(ds.input_shape), num_classes=ds.num_classes, norm_layer="batchnorm",
        **cfg.model_kwargs[arch],
    )  # fmt: skip
    counts: list[int] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, inp: counts.append(inp[0].numel() // inp[0].shape[1]))
        for m in batchnorm_modules(model)
    ]
    try:
        with torch.no_grad():
            model.train()(ds.x_train[:batch].float())
    finally:
        for h in hooks:
            h.remove()
    return counts


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return mean_std(xs)[0] if xs else math.nan


def _explain(rows: list[dict[str, Any]], cfg: BatchSizeConfig, judgement: Judgement) -> tuple[str, dict[str, Any]]:
    per_seed = _measure(rows, cfg)
    n = judgement.seeds
    use = [r for r in per_seed if r["seed"] < n]
    counts = {arch: stat_counts(arch, cfg) for arch in cfg.tiny_archs}
    texts, numbers = [], {"values_per_bn_statistic_at_tiny_batch": counts, "seeds": n}
    for arch in cfg.tiny_archs:
        accs = {}
        for norm in cfg.tiny_norms:
            rs = [r for r in use if r["setting"] == "tiny" and r["arch"] == arch and r["norm"] == norm]
            accs[norm] = (_mean(r["acc_ref"] for r in rs), _mean(r["acc_tiny"] for r in rs))
        numbers[f"mean_test_acc_{arch}"] = {k: {"ref": a, "tiny": b} for k, (a, b) in accs.items()}
        shown = ", ".join(f"{k} {a:.3f}→{b:.3f}" for k, (a, b) in accs.items())
        texts.append(f"{arch} (each BN statistic averages {'/'.join(map(str, counts[arch]))} values): {shown}")
        bn_drop = accs.get("batchnorm", (math.nan, math.nan))
        gn_drop = accs.get("groupnorm", (math.nan, math.nan))
        bn_drop, gn_drop = bn_drop[0] - bn_drop[1], gn_drop[0] - gn_drop[1]
        if abs(bn_drop) < MARGIN_TINY and gn_drop < 0:  # a "larger drop" that is GroupNorm's gain, not BN's loss
            texts[-1] += (
                f" — BN's own accuracy does not drop here ({-bn_drop:+.3f}); its drop exceeds GroupNorm's only "
                f"because GroupNorm gains {-gn_drop:.3f} at batch {cfg.tiny_batch}"
            )
    rs = [r for r in use if r["setting"] == "large" and r["norm"] == "batchnorm"]
    fits = by_seed(
        [r for r in rows if int(r["seed"]) < n], "train_eval_acc", model=cfg.large_arch, norm="batchnorm",
        epochs=cfg.large_epochs, batch_size=cfg.large_batch,
    )  # fmt: skip
    numbers["bn_large"] = {
        "acc_ref": _mean(r["acc_ref"] for r in rs),
        "acc_large": _mean(r["acc_large"] for r in rs),
        "train_acc_large": _mean(fits.values()),
    }
    large = numbers["bn_large"]
    sentence = (
        f"Mean test accuracy from batch {cfg.reference_batch} to {cfg.tiny_batch} ({cfg.tiny_epochs} epochs each, "
        f"lr ∝ batch): " + "; ".join(texts) + f". BN {cfg.large_arch} at batch {cfg.reference_batch} vs "
        f"{cfg.large_batch} ({cfg.large_epochs} epochs): {large['acc_ref']:.3f} vs {large['acc_large']:.3f} "
        f"(training accuracy at {cfg.large_batch}: {large['train_acc_large']:.3f})."
    )
    return sentence, numbers


# --------------------------------------------------------------------------- figure

_COLOUR = {"batchnorm": "C0", "groupnorm": "C1", "layernorm": "C2", "none": "C7", "batchrenorm": "C3",
           "ghostbatchnorm": "C4", "precise": "C5"}  # fmt: skip


def paired_panel(ax, per_norm: dict[str, tuple[dict[int, float], dict[int, float]]], xlabels: tuple[str, str]):
    """One line per seed from the left to the right value, per variant, and the mean in bold."""
    for i, (name, (left, right)) in enumerate(per_norm.items()):
        c = _COLOUR.get(name, f"C{i}")
        seeds = sorted(set(left) & set(right))
        dx = 0.06 * (i - (len(per_norm) - 1) / 2)
        for s in seeds:
            ax.plot([dx, 1 + dx], [left[s], right[s]], color=c, lw=0.7, alpha=0.45)
        if seeds:
            ax.plot([dx, 1 + dx], [_mean(left[s] for s in seeds), _mean(right[s] for s in seeds)], color=c, lw=2.4,
                    marker="o", label=f"{name} (n={len(seeds)})")  # fmt: skip
    ax.set_xticks([0, 1], xlabels)
    ax.set_xlim(-0.4, 1.4)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: BatchSizeConfig) -> list[Path]:
    plt = pyplot()
    panels = len(cfg.tiny_archs) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4), squeeze=False)
    tiny, ref, large = cfg.tiny_batch, cfg.reference_batch, cfg.large_batch
    for ax, arch in zip(axes[0], cfg.tiny_archs):
        per = {}
        for norm in cfg.tiny_norms:
            sel = {"model": arch, "norm": norm, "epochs": cfg.tiny_epochs}
            per[norm] = (by_seed(rows, **sel, batch_size=ref), by_seed(rows, **sel, batch_size=tiny))
        paired_panel(ax, per, (f"batch {ref}", f"batch {tiny}"))
        counts = "/".join(map(str, stat_counts(arch, cfg)))
        ax.set(ylabel="test accuracy (eval mode)", title=f"{arch}, {cfg.tiny_epochs} epochs\n"
               f"values per BN statistic at batch {tiny}: {counts}")  # fmt: skip
    ax = axes[0, -1]
    per = {}
    for norm in cfg.large_norms:
        sel = {"model": cfg.large_arch, "norm": norm, "epochs": cfg.large_epochs}
        per[norm] = (by_seed(rows, **sel, batch_size=ref), by_seed(rows, **sel, batch_size=large))
    paired_panel(ax, per, (f"batch {ref}", f"batch {large}"))
    ax.set(ylabel="test accuracy (eval mode)", title=f"{cfg.large_arch}, {cfg.large_epochs} epochs: moderate vs large")
    fig.suptitle(f"C2 batch-size on {cfg.dataset}: equal epochs, SGD lr = {cfg.lr:g}·batch/{ref} (thin: one seed)")
    fig.tight_layout()
    return [save_figure(fig, out_dir, "batch-size")]


EXPERIMENT = register_experiment(
    Experiment(
        name="batch-size",
        claim="C2",
        title="BatchNorm is hurt by tiny batches (GroupNorm is not) and generalises best at moderate batch sizes",
        config=BatchSizeConfig,
        scales={
            "smoke": BatchSizeConfig(
                seeds=2,
                max_seeds=2,
                n_train=128,
                model_kwargs={"cnn": {"channels": [4, 8]}, "mlp": {"width": 16, "depth": 2}},
                tiny_epochs=1,
                large_batch=64,
                large_epochs=2,
                group_norm_groups=2,
            ),
            "quick": BatchSizeConfig(),
            "full": BatchSizeConfig(
                seeds=3,
                max_seeds=6,
                dataset="cifar10",
                model_kwargs={"resnet": {"depth": 6, "width": 4}, "mlp": {"width": 512, "depth": 3}},
                tiny_archs=("resnet", "mlp"),
                large_arch="resnet",
                large_batch=1024,
                tiny_epochs=30,
                large_epochs=90,
                lr=0.1,
                group_norm_groups=32,
                threads=4,
            ),
        },
        grid=_grid,
        run_one=run_point,
        parts=_parts,
        measure=_measure,
        explain=_explain,
        plot=_plot,
        description=__doc__ or "",
    )
)
