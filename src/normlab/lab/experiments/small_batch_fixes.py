"""``small-batch-fixes`` (C13): Batch Renorm, GroupNorm and precise statistics each narrow BN's gap at tiny batch.

Pre-registration
----------------
**Claim** (S1, section 2: BN's weakness is its dependence on the quality of
mini-batch statistics; the remedies are those of the papers behind it; our
words): each of Batch Renorm (Ioffe 2017), Ghost BN (Hoffer et al. 2017),
GroupNorm (Wu & He 2018) and precise, recomputed population statistics (Wu &
Johnson 2021) repairs part of what BN loses when it trains with tiny batches.
The GroupNorm paper's reference point: at 2 images per GPU, top-1 error BN
34.7 % vs GN 24.1 % (a 10.6-point gap); Batch Renorm recovers much of BN's
loss with 4-example minibatches; precise statistics fix inaccurate running
averages.

**Setting**: C2's tiny-batch comparison (:mod:`~normlab.lab.experiments.batch_size`:
scikit-learn's digits, equal epochs, SGD with lr = 0.05 · batch / 32, 3
epochs), in the **MLP** (three linear -> norm -> ReLU layers of 64 units), where
each BN statistic at batch 2 averages exactly 2 values — the most starved
regime, the one where the claim's mechanism predicts the largest gap, so the
one where a fix has the most to repair (C2 judges whether the gap exists, in
the MLP and in a CNN). The points BN and GroupNorm share with C2 have C2's
parameters (the same run ids). Batch Renorm's warm-up ramps (r_max 1 -> 3 over
steps 5k-40k, d_max 0 -> 5 over 5k-25k of a 100k-step run in the paper) are
scaled to our run (5-40 % and 5-25 % of its steps); without that it would be
BN throughout. Precise statistics are a metric of the BN runs (no extra
training): their running statistics replaced by the whole training set's.

**Ghost BN is not judged at the tiny batch**: a batch no larger than its
virtual batch (32) is normalised exactly as by BN (the tests check it step by
step), so a part "Ghost BN narrows the gap at batch 2" would fail by
construction and test nothing. Ghost BN is a *large*-batch method; it is
reported where it acts (``ghost-at-large``).

**Deciding parts** (metric: test accuracy in eval mode at batch 2, per seed;
each fix's arm A against BN's arm B, paired by seed — the same seed gives the
same initialisation draw and batch order; difference scale; direction: A
greater). A fix narrows the gap "BN at batch 32 minus the variant at batch 2"
exactly when it is more accurate than BN at batch 2.

* ``renorm-narrows`` — Batch Renorm vs BN. δ = 0.02 accuracy: a fifth of the
  GroupNorm paper's 10.6-point BN–GN gap at batch 2, below which a fix would
  not be called a repair.
* ``groupnorm-narrows`` — GroupNorm (4 groups) vs BN. δ = 0.02, same reason.
* ``precise-narrows`` — the BN runs evaluated with precise statistics vs the
  same runs with their running (EMA) statistics. δ = 0.02, same reason.

**Reported parts**: ``bn-gap`` (BN's own drop from batch 32 to 2 in the MLP,
against 0, δ 0.02: how much there is to repair; C2 decides it), and
``ghost-at-large`` (Ghost BN with virtual batch 32 minus BN, test accuracy
at batch 256 in C2's moderate-vs-large setting: CNN, 20 epochs; δ 0.01 as in
C2's ``moderate-beats-large``: what Ghost BN is for — restoring the noise of
batch-32 statistics in large-batch training — not the claim as stated).

**Does not hold** if any deciding fix is not more accurate than BN at batch 2
(its interval below 0, or inside ±0.02).

A run that diverged counts at chance accuracy, 0.1. **Seeds**: rounds of 3 up
to 12 (quick); smoke 2. Measured cost at quick scale (``/usr/bin/time``, one
thread, shared 2-core machine): 124 s of CPU for 9 seeds (54 runs), about 14 s
per seed, so about 2.8 CPU-minutes at 12 seeds.

Design notes
------------
The run store keeps each experiment's runs in its own folder
(``<root>/<experiment>/<run id>/``), so the BN and GroupNorm points shared
with C2 are trained again here rather than read from C2's folder; sharing
them would need the framework to let two experiments name one run folder.

Command: ``normlab run small-batch-fixes`` (``--scale smoke|quick|full``).
Runtime (one thread per run): smoke ~8 s of CPU; quick 14 s of CPU per seed
(6 runs), 124 s for the 9 seeds at which the first quick run decided; full (CIFAR-10 MLP at batch 2 / 32, a ResNet at
batch 1024) is for a GPU, not run here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normlab.lab.config import ConfigError
from normlab.lab.experiments.batch_size import (
    MARGIN_LARGE,
    MARGIN_TINY,
    WHY_LARGE,
    BatchSizeConfig,
    by_seed,
    large_points,
    paired_panel,
    run_point,
    tiny_points,
    unique,
)
from normlab.lab.experiments.framework import (
    Experiment,
    Judgement,
    Part,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
)

__all__ = ["EXPERIMENT", "FIXES", "PRECISE"]

FIXES = ("batchrenorm", "groupnorm")  # trained fixes (besides BN); precise statistics come with the BN runs
PRECISE = "precise"  # the variant "BN evaluated with recalibrated (precise) statistics"
_PART = {"batchrenorm": "renorm-narrows", "groupnorm": "groupnorm-narrows", PRECISE: "precise-narrows"}
_LABEL = {"batchrenorm": "Batch Renorm", "groupnorm": "GroupNorm", PRECISE: "BN, precise statistics"}
WHY_FIX = "a fifth of the GroupNorm paper's 10.6-point BN-GN gap at batch 2 (34.7 vs 24.1 % error)"


def _arch(cfg: BatchSizeConfig) -> str:
    if len(cfg.tiny_archs) != 1:
        raise ConfigError(f"small-batch-fixes judges one architecture; set tiny_archs to one, got {cfg.tiny_archs}")
    return cfg.tiny_archs[0]


def _fixes(cfg: BatchSizeConfig) -> list[str]:
    if "batchnorm" not in cfg.tiny_norms:
        raise ConfigError("small-batch-fixes compares fixes with BatchNorm; keep 'batchnorm' in tiny_norms")
    return [n for n in cfg.tiny_norms if n != "batchnorm"] + [PRECISE]


def _grid(cfg: BatchSizeConfig):
    arch = _arch(cfg)
    return unique(
        tiny_points(cfg, [arch], cfg.tiny_norms, [cfg.tiny_batch])
        + tiny_points(cfg, [arch], ["batchnorm"], [cfg.reference_batch])
        + large_points(cfg, cfg.large_norms, [cfg.large_batch])
    )


def _measure(rows: list[dict[str, Any]], cfg: BatchSizeConfig) -> list[dict[str, Any]]:
    """Per seed: each variant's test accuracy at the tiny batch, BN's gap, each large-batch norm's accuracy."""
    arch = _arch(cfg)
    tiny = {"model": arch, "epochs": cfg.tiny_epochs, "batch_size": cfg.tiny_batch}
    out = []
    for norm in cfg.tiny_norms:
        for s, acc in by_seed(rows, **tiny, norm=norm).items():
            out.append({"seed": s, "setting": "tiny", "variant": norm, "acc": acc})
    for s, acc in by_seed(rows, "precise_test_acc", **tiny, norm="batchnorm").items():
        out.append({"seed": s, "setting": "tiny", "variant": PRECISE, "acc": acc})
    ref = by_seed(rows, model=arch, epochs=cfg.tiny_epochs, batch_size=cfg.reference_batch, norm="batchnorm")
    at_tiny = by_seed(rows, **tiny, norm="batchnorm")
    for s in sorted(set(ref) & set(at_tiny)):
        out.append({"seed": s, "setting": "gap", "variant": "batchnorm", "gap": ref[s] - at_tiny[s]})
    for norm in cfg.large_norms:
        sel = {"model": cfg.large_arch, "epochs": cfg.large_epochs, "batch_size": cfg.large_batch, "norm": norm}
        for s, acc in by_seed(rows, **sel).items():
            out.append({"seed": s, "setting": "large", "variant": norm, "acc": acc})
    return out


def _parts(cfg: BatchSizeConfig) -> list[Part]:
    arch, tiny, ref = _arch(cfg), cfg.tiny_batch, cfg.reference_batch
    bn = {"setting": "tiny", "variant": "batchnorm"}
    parts = [
        Part(
            name=_PART.get(fix, f"{fix}-narrows"),
            says=f"{arch}, batch {tiny}: {_LABEL.get(fix, fix)} reaches a higher test accuracy than BN",
            metric="acc",
            a={"setting": "tiny", "variant": fix},
            b=bn,
            direction="greater",
            margin=MARGIN_TINY,
            why=WHY_FIX,
            unit="accuracy",
            label_a=f"{_LABEL.get(fix, fix)} at {tiny}",
            label_b=f"BN at {tiny}",
        )
        for fix in _fixes(cfg)
    ]
    parts.append(
        Part(
            name="bn-gap",
            says=f"{arch}: BN's test accuracy drops from batch {ref} to {tiny} (the gap to repair)",
            metric="gap",
            a={"setting": "gap", "variant": "batchnorm"},
            bound=0.0,
            direction="greater",
            margin=MARGIN_TINY,
            why=WHY_FIX,
            decides=False,
            unit="accuracy",
            label_a=f"BN at {ref} − at {tiny}",
        )
    )
    if "ghostbatchnorm" in cfg.large_norms and "batchnorm" in cfg.large_norms:
        parts.append(
            Part(
                name="ghost-at-large",
                says=(
                    f"{cfg.large_arch}, batch {cfg.large_batch}: Ghost BN (virtual batch {cfg.ghost_virtual_batch}) "
                    "reaches a higher test accuracy than BN"
                ),
                metric="acc",
                a={"setting": "large", "variant": "ghostbatchnorm"},
                b={"setting": "large", "variant": "batchnorm"},
                direction="greater",
                margin=MARGIN_LARGE,
                why=WHY_LARGE,
                decides=False,
                unit="accuracy",
                label_a=f"Ghost BN at {cfg.large_batch}",
                label_b=f"BN at {cfg.large_batch}",
            )
        )
    return parts


def _explain(rows: list[dict[str, Any]], cfg: BatchSizeConfig, judgement: Judgement) -> tuple[str, dict[str, Any]]:
    n = judgement.seeds
    per_seed = [r for r in _measure(rows, cfg) if r["seed"] < n]

    def mean(setting: str, variant: str, key: str = "acc") -> float:
        xs = [r[key] for r in per_seed if r["setting"] == setting and r["variant"] == variant]
        return mean_std(xs)[0] if xs else float("nan")

    bn_tiny, gap = mean("tiny", "batchnorm"), mean("gap", "batchnorm", "gap")
    numbers: dict[str, Any] = {"seeds": n, "bn_at_tiny": bn_tiny, "bn_gap": gap, "closed": {}}
    texts = []
    for fix in _fixes(cfg):
        acc = mean("tiny", fix)
        closed = (acc - bn_tiny) / gap if gap > 0 else float("nan")
        numbers["closed"][fix] = closed
        share = f", {closed:.0%} of the gap" if gap > 0 else ""
        texts.append(f"{_LABEL.get(fix, fix)} {acc:.3f}{share}")
    sentence = (
        f"{_arch(cfg)} at batch {cfg.tiny_batch}: BN {bn_tiny:.3f}, {gap:.3f} below its accuracy at batch "
        f"{cfg.reference_batch}; " + "; ".join(texts) + "."
    )
    if gap <= 0:
        sentence += " BN has no gap here to repair."
    if "ghostbatchnorm" in cfg.large_norms:
        sentence += (
            f" Ghost BN computes plain BN at batch ≤ {cfg.ghost_virtual_batch}; at batch {cfg.large_batch} "
            f"it reaches {mean('large', 'ghostbatchnorm'):.3f} vs BN {mean('large', 'batchnorm'):.3f}."
        )
    return sentence, numbers


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: BatchSizeConfig) -> list[Path]:
    plt = pyplot()
    arch, tiny, ref = _arch(cfg), cfg.tiny_batch, cfg.reference_batch
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    sel = {"model": arch, "epochs": cfg.tiny_epochs, "batch_size": tiny}
    bn = by_seed(rows, **sel, norm="batchnorm")
    per = {fix: (bn, by_seed(rows, **sel, norm=fix)) for fix in _fixes(cfg) if fix != PRECISE}
    per[PRECISE] = (bn, by_seed(rows, "precise_test_acc", **sel, norm="batchnorm"))
    paired_panel(ax1, per, ("BN", "the fix"))
    at_ref = by_seed(rows, model=arch, epochs=cfg.tiny_epochs, batch_size=ref, norm="batchnorm")
    if at_ref:
        ax1.axhline(mean_std(at_ref.values())[0], color="C0", ls="--", lw=1, label=f"BN at batch {ref}")
        ax1.legend(fontsize=7)
    ax1.set(ylabel="test accuracy (eval mode)", title=f"{arch}, batch {tiny}, {cfg.tiny_epochs} epochs: BN → each fix")
    large = {"model": cfg.large_arch, "epochs": cfg.large_epochs, "batch_size": cfg.large_batch}
    if "ghostbatchnorm" in cfg.large_norms:
        per = {
            "ghostbatchnorm": (by_seed(rows, **large, norm="batchnorm"), by_seed(rows, **large, norm="ghostbatchnorm"))
        }
        paired_panel(ax2, per, ("BN", f"Ghost BN (virtual {cfg.ghost_virtual_batch})"))
    ax2.set(ylabel="test accuracy (eval mode)", title=f"{cfg.large_arch}, batch {cfg.large_batch} (reported only)")
    fig.suptitle(f"C13 small-batch-fixes on {cfg.dataset} (thin: one seed; bold: mean)")
    fig.tight_layout()
    return [save_figure(fig, out_dir, "small-batch-fixes")]


_QUICK = dict(
    tiny_archs=("mlp",),
    tiny_norms=("batchnorm", *FIXES),
    large_norms=("batchnorm", "ghostbatchnorm"),
)

EXPERIMENT = register_experiment(
    Experiment(
        name="small-batch-fixes",
        claim="C13",
        title="Batch Renorm, GroupNorm and precise statistics each narrow BN's gap at tiny batch (Ghost BN cannot)",
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
                ghost_virtual_batch=16,
                **_QUICK,
            ),
            "quick": BatchSizeConfig(**_QUICK),
            "full": BatchSizeConfig(
                seeds=3,
                max_seeds=6,
                dataset="cifar10",
                model_kwargs={"resnet": {"depth": 6, "width": 4}, "mlp": {"width": 512, "depth": 3}},
                large_arch="resnet",
                large_batch=1024,
                tiny_epochs=30,
                large_epochs=90,
                lr=0.1,
                group_norm_groups=32,
                threads=4,
                **_QUICK,
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
