"""``bn-vs-ln`` (C8): LayerNorm has no train/test difference and suits variable-length sequences; BN does not.

Pre-registration
----------------
**Claim** (our words). BatchNorm normalises each feature across the samples
of a batch, LayerNorm all features of one sample. So LN behaves the same in
training and at test time, does not depend on which other samples share the
batch, and suits variable-length (padded) sequences; BN, computed over a
padded batch as a user would write it, depends on the padding, on the
companions and on the mode -- and, the sources add, LN simply gives the
better Transformer, which is why Transformers use it. **Source**: S3 §6-7
(BN normalises one feature over samples, LN one sample over features; BN
keeps running statistics for inference, LN needs none; in NLP sentences have
different lengths and normalising across the batch loses information, so
Transformers use LN -- "the most direct reason is that LN works better", as
the Transformer paper says) and S2 (LN has no difference between the training
and the test phase; BN over (N, S, D) is left vague "because NLP does not use
BN").

**Arms**: a tiny pre-norm Transformer (2 blocks, d_model 32, 4 heads) on
variable-length sequences, trained with Adam, with four norms: ``layernorm``
and ``rmsnorm`` (each token over its features); ``batchnorm`` -- BN over the
(N, S) positions of each feature **with the padding in its statistics**, as
a user writes ``BatchNorm`` on a padded batch; ``batchnorm-masked`` -- the
same BN with the padding masked out of its statistics, the remedy (reported
only). Same seed = same initial draw and batch order in every arm (paired).

**Deciding parts** (four):

* ``bn-padding`` -- metric ``padding_change_train``: the relative change
  ``||a - b|| / ||a||`` of the logits of 256 test sequences when 16 more
  padded positions are appended (train mode, batches of 32, as in training).
  Plain BN against the bound 0, direction "greater", **δ = 0.01**.
* ``bn-companions`` -- ``composition_change``: the relative change of the
  logits of 16 test sequences batched (train mode) with two different sets of
  16 companions. Plain BN vs 0, "greater", **δ = 0.01**.
* ``bn-train-eval`` -- ``train_eval_change``: the relative change of the
  logits between train mode (batch statistics) and eval mode (running
  statistics). Plain BN vs 0, "greater", **δ = 0.01**.

  Why δ = 0.01 for the three: a practical threshold -- a change of 1 % of the
  logits' norm is the smallest dependence we call real (float32 round-off of
  a reordered sum is ~1e-6, four orders below).
* ``ln-beats-bn`` -- the task: final test accuracy (eval mode, 1000 test
  sequences, 4 classes) of LN vs plain BN, paired by seed, direction
  "greater", **δ = 0.02**. Why: a practical threshold just above one run's
  binomial standard error on 1000 test sequences (at most 0.016): a smaller
  gap is not "LN works better". A diverged run counts as chance (0.25).

**Reported parts** (shown, never deciding): ``ln-invariant`` and
``rmsnorm-invariant`` -- the largest of the three changes for LN / RMSNorm,
"≈ 0" within δ = 1e-4 (round-off room); these hold by construction (a
per-token norm, attention and pooling that ignore padded positions), so they
check the implementation rather than test the claim. ``masked-bn-padding``
(masked BN's padding change ≈ 0 within 1e-4: the remedy works),
``masked-bn-companions`` and ``masked-bn-train-eval`` (> 0, δ 0.01: what
the remedy leaves), ``ln-beats-masked-bn`` and ``rmsnorm-beats-bn`` (test
accuracy, δ 0.02), ``ln-loss-below-bn`` (test loss in nats, LN vs plain BN,
"less", log scale, margin ×1.1: a 10 % lower loss).

**Does not hold** if plain BN's change under added padding, other
companions, or train vs eval mode is shown to be below 1 % (or zero), or LN's
test accuracy is not higher than plain BN's by 0.02 (lower, or shown within
±0.02).

Note on the data (``"synthetic-sequences"``): the class sets each token's
mean, lengths are uniform in 8..32, and each sequence carries a random gain
``exp(0.5 N(0,1))`` -- a per-sample scale, the nuisance that S3's second
argument for LN is about (LN puts every token on a sphere, removing its
scale; a per-feature BN does not). The task therefore favours a per-sample
norm by construction of that nuisance; the part tests whether that argument
shows in a trained model, and how much.

**Budget** (quick): seeds in rounds of 3, at most 12 (4 runs per seed).
Measured runtime: see Design.

Design
------
The tiny pre-norm Transformer (``build_model("transformer")``: linear
embedding + learned positions, 2 blocks of attention and MLP, a final norm,
masked mean pooling, d_model 32, 4 heads) is trained on
``"synthetic-sequences"`` (padded positions are zero and masked out of
attention and pooling). ``batchnorm`` normalises each feature over the (N, S)
positions of the batch, padding included (``mask_norm_stats=False``);
``batchnorm-masked`` leaves the padding out of its statistics
(``feature_dim=-1``, ``mask=``).

After training, three probes on the test sequences (logits compared by their
relative change ``||a - b|| / ||a||``, and the fraction of predictions that
change; each on a copy of the model, which is left untouched):

1. **padding**: the same sequences with ``extra_padding`` more padded
   positions (zeros, mask False) -- train mode (batch statistics over batches
   of the training batch size) and eval mode;
2. **batch composition**: train mode, ``batch_size / 2`` probe sequences
   batched with two different sets of companions;
3. **train/test difference**: the logits of the same batches in train mode
   vs eval mode, and the test accuracy in both modes.

Command: ``normlab run bn-vs-ln`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU (one thread per run): smoke ~10 s; quick (2,000
sequences, 4 epochs, 4 runs per seed): 83 s of CPU for 6 seeds (user +
system, measured with ``/usr/bin/time`` on the shared machine), about 13 s per
seed, so ~2.7 min at the full budget of 12 seeds; full (d_model 256, 4 blocks, 20,000 sequences,
20 epochs) is for a GPU.

Expected (Ba et al. 2016; Shen et al. 2020, "PowerNorm"; the sources): LN and
RMSNorm outputs do not depend on padding, companions or mode; plain BN's
depend on all three; masking removes the padding dependence only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
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
    values,
)
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["BnVsLnConfig", "EXPERIMENT", "VARIANTS", "relative_change", "probe_model", "measure"]

# variant name -> (registered norm, whether the norm's statistics see the padding mask)
VARIANTS = {
    "layernorm": ("layernorm", True),
    "rmsnorm": ("rmsnorm", True),
    "batchnorm": ("batchnorm", False),  # BN as a user writes it on a padded batch: padding in its statistics
    "batchnorm-masked": ("batchnorm", True),  # the remedy: padding masked out of its statistics
}
PROBES = ("padding_change_train", "composition_change", "train_eval_change")  # the three sensitivity probes


@dataclass(frozen=True)
class BnVsLnConfig:
    """C8 bn-vs-ln; the module docstring has the pre-registration, the command and the runtimes."""

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per variant
    threads: int = 1  # torch threads per run (not part of the run id)
    n_train: int = 2000  # training sequences
    n_test: int = 1000  # test sequences
    seq_len: int = 32  # padded sequence length (positions); real lengths are uniform in 8 .. seq_len
    dim: int = 16  # features per token
    d_model: int = 32  # Transformer width (features)
    depth: int = 2  # Transformer blocks
    heads: int = 4  # attention heads
    epochs: int = 4  # passes over the training set
    batch_size: int = 32  # sequences per optimizer step (and per probe batch)
    lr: float = 1e-3  # Adam learning rate (constant)
    extra_padding: int = 16  # padded positions appended by the padding probe
    probe_examples: int = 256  # test sequences used by the padding and train/eval probes
    composition_groups: int = 4  # probe groups of the batch-composition probe (batch_size/2 sequences each)


def _grid(cfg: BnVsLnConfig):
    need = cfg.probe_examples + cfg.composition_groups * 3 * (cfg.batch_size // 2)
    if cfg.n_test < need:
        raise ConfigError(f"n_test={cfg.n_test} is too small for the probes; need at least {need}")
    for variant, (norm, masked) in VARIANTS.items():
        yield {
            "variant": variant,
            "dataset": "synthetic-sequences",
            "data_kwargs": {"n_test": cfg.n_test, "seq_len": cfg.seq_len, "dim": cfg.dim},
            "n_train": cfg.n_train,
            "model": "transformer",
            "model_kwargs": {
                "d_model": cfg.d_model,
                "depth": cfg.depth,
                "heads": cfg.heads,
                "max_len": cfg.seq_len + cfg.extra_padding,
                "mask_norm_stats": masked,
            },
            "norm": norm,
            "optimizer": "adam",
            "lr": cfg.lr,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "extra_padding": cfg.extra_padding,
            "probe_examples": cfg.probe_examples,
            "composition_groups": cfg.composition_groups,
        }


# --------------------------------------------------------------------------- probes


def relative_change(a, b) -> float:
    """``||a - b|| / ||a||`` (Frobenius norms, float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / a.norm().clamp_min(1e-300)).item()


def _logits(model, x, mask, *, train: bool, batch_size: int):
    """Logits of ``x`` in batches of ``batch_size``, in train or eval mode, on a copy of ``model``."""
    import torch

    probe = copy.deepcopy(model).train(train)
    with torch.no_grad():
        return torch.cat(
            [probe(x[i : i + batch_size], mask=mask[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        )


def _pad(x, mask, extra: int):
    """The same sequences with ``extra`` more padded positions at the end (zeros, mask False)."""
    import torch

    n, s, d = x.shape
    return torch.cat([x, x.new_zeros(n, extra, d)], 1), torch.cat([mask, mask.new_zeros(n, extra)], 1)


def probe_model(
    model, x, mask, *, batch_size: int, extra_padding: int, probe_examples: int, groups: int
) -> dict[str, float]:
    """The padding, batch-composition and train/eval probes of the module docstring on test sequences ``x``.

    Returns relative logit changes (``padding_change_train``, ``padding_change_eval``, ``composition_change``,
    ``train_eval_change``) and fractions of changed predictions (``padding_flips_train``, ``composition_flips``).
    """
    import torch

    xp, mp = x[:probe_examples], mask[:probe_examples]
    xpad, mpad = _pad(xp, mp, extra_padding)
    out: dict[str, float] = {}
    train_logits = _logits(model, xp, mp, train=True, batch_size=batch_size)
    eval_logits = _logits(model, xp, mp, train=False, batch_size=batch_size)
    padded_train = _logits(model, xpad, mpad, train=True, batch_size=batch_size)
    padded_eval = _logits(model, xpad, mpad, train=False, batch_size=batch_size)
    out["padding_change_train"] = relative_change(train_logits, padded_train)
    out["padding_change_eval"] = relative_change(eval_logits, padded_eval)
    out["train_eval_change"] = relative_change(eval_logits, train_logits)
    out["padding_flips_train"] = (train_logits.argmax(-1) != padded_train.argmax(-1)).double().mean().item()
    half = batch_size // 2
    changes, flips, start = [], [], probe_examples
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        for _ in range(groups):  # each group: `half` probe sequences + two disjoint sets of `half` companions
            idx = torch.arange(start, start + half)
            comp_a = torch.arange(start + half, start + 2 * half)
            comp_b = torch.arange(start + 2 * half, start + 3 * half)
            start += 3 * half
            a = probe(torch.cat([x[idx], x[comp_a]]), mask=torch.cat([mask[idx], mask[comp_a]]))[:half]
            b = probe(torch.cat([x[idx], x[comp_b]]), mask=torch.cat([mask[idx], mask[comp_b]]))[:half]
            changes.append(relative_change(a, b))
            flips.append((a.argmax(-1) != b.argmax(-1)).double().mean().item())
    out["composition_change"] = sum(changes) / len(changes)
    out["composition_flips"] = sum(flips) / len(flips)
    return out


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.runtime import resolve_device
    from normlab.lab.train import load_data, train

    tc = run.train_config()
    result = train(tc, progress=run.progress)
    model = result.model
    ds = load_data(tc)  # the same data train() loads
    device = resolve_device(tc.device)
    x, mask, y = ds.x_test.to(device), ds.mask_test.to(device), ds.y_test.to(device)
    metrics = result.to_metrics()
    metrics["num_classes"] = int(model.head.out_features)
    metrics.update(
        probe_model(
            model,
            x,
            mask,
            batch_size=tc.batch_size,
            extra_padding=int(run["extra_padding"]),
            probe_examples=int(run["probe_examples"]),
            groups=int(run["composition_groups"]),
        )
    )
    train_logits = _logits(model, x, mask, train=True, batch_size=tc.batch_size)
    metrics["train_mode_test_acc"] = (train_logits.argmax(-1) == y).double().mean().item()
    return metrics


# --------------------------------------------------------------------------- analysis


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def measure(rows: list[dict[str, Any]], cfg: BnVsLnConfig) -> list[dict[str, Any]]:
    """One row per run: variant, seed, the probes, ``max_change`` (the largest of the three), test accuracy and loss.

    A diverged run's test accuracy and loss are None (the parts count its accuracy as chance); its probes are
    whatever its model gives.
    """
    out = []
    for r in rows:
        ok = not r.get("diverged")
        row = {"variant": r["variant"], "seed": int(r["seed"])}
        for key in (*PROBES, "padding_change_eval", "padding_flips_train", "composition_flips"):
            row[key] = r.get(key)
        probes = [r.get(p) for p in PROBES]
        row["max_change"] = max(probes) if all(_finite(p) for p in probes) else None
        row["test_acc"] = float(r["final_test_acc"]) if ok and _finite(r.get("final_test_acc")) else None
        row["test_loss"] = float(r["final_test_loss"]) if ok and _finite(r.get("final_test_loss")) else None
        row["train_mode_test_acc"] = r.get("train_mode_test_acc")
        out.append(row)
    return out


def _parts(cfg: BnVsLnConfig) -> list[Part]:
    bn, masked, ln, rms = ({"variant": v} for v in ("batchnorm", "batchnorm-masked", "layernorm", "rmsnorm"))
    chance = 1.0 / 4  # the sequences have 4 classes
    real = "practical threshold: a change of 1 % of the logits' norm is the smallest dependence we call real"
    floor = "round-off room: float32 round-off of a reordered sum is ~1e-6"
    acc_why = "just above one run's binomial standard error on 1000 test sequences (at most 0.016)"
    change = dict(bound=0.0, direction="greater", margin=0.01, why=real, unit="relative logit change")
    zero = dict(bound=0.0, direction="equivalent", margin=1e-4, why=floor, unit="relative logit change")
    acc = dict(metric="test_acc", direction="greater", margin=0.02, why=acc_why, missing=chance, unit="accuracy")
    return [
        Part("bn-padding", "plain BN's outputs change when padding is added (train mode)", "padding_change_train",
             bn, label_a="BN (padding in its statistics)", **change),
        Part("bn-companions", "plain BN's outputs change with the other sequences of the batch", "composition_change",
             bn, label_a="BN (padding in its statistics)", **change),
        Part("bn-train-eval", "plain BN's outputs differ between train and eval mode", "train_eval_change", bn,
             label_a="BN (padding in its statistics)", **change),
        Part("ln-beats-bn", "the Transformer with LN reaches a higher test accuracy than with plain BN", a=ln, b=bn,
             label_a="LN", label_b="BN", **acc),
        Part("ln-invariant", "LN's outputs do not change with padding, companions or mode (by construction)",
             "max_change", ln, decides=False, label_a="LN", **zero),
        Part("rmsnorm-invariant", "RMSNorm's outputs do not change with padding, companions or mode (by construction)",
             "max_change", rms, decides=False, label_a="RMSNorm", **zero),
        Part("masked-bn-padding", "masked BN's outputs do not change when padding is added: the remedy works",
             "padding_change_train", masked, decides=False, label_a="masked BN", **zero),
        Part("masked-bn-companions", "masked BN's outputs still change with the batch's other sequences",
             "composition_change", masked, decides=False, label_a="masked BN", **change),
        Part("masked-bn-train-eval", "masked BN's outputs still differ between train and eval mode",
             "train_eval_change", masked, decides=False, label_a="masked BN", **change),
        Part("ln-beats-masked-bn", "LN reaches a higher test accuracy than masked BN (reported)", a=ln, b=masked,
             decides=False, label_a="LN", label_b="masked BN", **acc),
        Part("rmsnorm-beats-bn", "RMSNorm reaches a higher test accuracy than plain BN (reported)", a=rms, b=bn,
             decides=False, label_a="RMSNorm", label_b="BN", **acc),
        Part("ln-loss-below-bn", "LN reaches a lower test loss than plain BN (reported)", "test_loss", ln, bn,
             direction="less", margin=1.1, log=True, why="a 10 % lower test loss is the smallest gap worth a sentence",
             missing=math.log(4), decides=False, unit="nats", label_a="LN", label_b="BN"),
    ]  # fmt: skip


def _explain(rows: list[dict[str, Any]], cfg: BnVsLnConfig, judgement: Judgement) -> tuple[str, dict[str, Any]]:
    """The sensitivities of plain and masked BN, the per-token norms' invariance, and the task, in numbers."""
    per = [r for r in measure(rows, cfg) if r["seed"] < judgement.seeds]

    def m(metric: str, variant: str) -> float:
        xs = [r[metric] for r in per if r["variant"] == variant and _finite(r[metric])]
        return mean_std(xs)[0] if xs else math.nan

    numbers = {
        v: {k: m(k, v) for k in (*PROBES, "padding_change_eval", "padding_flips_train", "composition_flips",
                                  "max_change", "test_acc", "test_loss", "train_mode_test_acc")}
        for v in VARIANTS
    }  # fmt: skip
    b, mb = numbers["batchnorm"], numbers["batchnorm-masked"]
    per_token = max(numbers["layernorm"]["max_change"], numbers["rmsnorm"]["max_change"])
    finding = (
        f"Plain BN's logits change by {b['padding_change_train']:.2g} (relative) when padding is added "
        f"({100 * b['padding_flips_train']:.2g} % of predictions flip), by {b['composition_change']:.2g} with other "
        f"companions and by {b['train_eval_change']:.2g} between train and eval mode; masking the padding removes "
        f"the first ({mb['padding_change_train']:.2g}) but not the others ({mb['composition_change']:.2g}, "
        f"{mb['train_eval_change']:.2g}); LN and RMSNorm change by at most {per_token:.2g}. Test accuracy: "
        + ", ".join(f"{v} {numbers[v]['test_acc']:.3f}" for v in VARIANTS)
        + "; test loss: "
        + ", ".join(f"{v} {numbers[v]['test_loss']:.3f}" for v in VARIANTS)
        + f". LN vs plain BN: test accuracy {numbers['layernorm']['test_acc'] - b['test_acc']:+.3f}, test loss "
        f"×{numbers['layernorm']['test_loss'] / b['test_loss']:.2f}."
    )
    return finding, numbers


# --------------------------------------------------------------------------- figure


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: BnVsLnConfig) -> list[Path]:
    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [2, 1, 1]})
    order = [x for x in VARIANTS if any(r["variant"] == x for r in rows)]
    probes = (*PROBES, "padding_change_eval")
    labels = ("padding, train mode", "batch companions, train mode", "train vs eval mode", "padding, eval mode")
    width = 0.8 / len(probes)
    floor = 1e-9  # exact zeros drawn at this height on the log axis
    for j, (p, label) in enumerate(zip(probes, labels)):
        stats = [mean_std(values(rows, p, variant=x))[:2] for x in order]
        xs = [i + (j - (len(probes) - 1) / 2) * width for i in range(len(order))]
        heights, errors = [max(m, floor) for m, _ in stats], [s for _, s in stats]
        ax1.bar(xs, heights, width, yerr=errors, capsize=2, label=label, color=f"C{j}")
    ax1.axhline(0.01, color="k", ls="--", lw=1, label="δ = 0.01 (1 % of the logits' norm)")
    ax1.set_xticks(range(len(order)))
    ax1.set_xticklabels(order)
    ax1.set(
        yscale="log",
        ylabel="relative change of the logits (log scale)",
        title=f"sensitivity of the outputs (exact 0 drawn at {floor:g})",
    )
    ax1.legend(fontsize=8)
    modes = (("final_test_acc", "eval mode"), ("train_mode_test_acc", "train mode (batch statistics)"))
    low = 1.0
    for j, (key, label) in enumerate(modes):
        stats = [mean_std(values(rows, key, variant=x))[:2] for x in order]
        low = min([low, *(m - s for m, s in stats)])
        xs = [i + (j - 0.5) * 0.35 for i in range(len(order))]
        ax2.bar(xs, [m for m, _ in stats], 0.35, yerr=[s for _, s in stats], capsize=3, label=label, color=f"C{j + 4}")
    ax2.set_xticks(range(len(order)))
    ax2.set_xticklabels(order, rotation=20)
    ax2.set(ylabel="test accuracy (fraction)", title="test accuracy", ylim=(max(0.0, low - 0.05), 1))
    ax2.legend(fontsize=8)
    stats = [mean_std(values(rows, "final_test_loss", variant=x))[:2] for x in order]
    ax3.bar(range(len(order)), [m for m, _ in stats], 0.6, yerr=[s for _, s in stats], capsize=3, color="C7")
    ax3.set_xticks(range(len(order)))
    ax3.set_xticklabels(order, rotation=20)
    ax3.set(ylabel="test loss (nats, eval mode)", title="test loss")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3, axis="y")
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle(
        f"C8: tiny Transformer on variable-length sequences, LN / RMSNorm / plain BN / masked BN "
        f"(mean ± std over {n_seeds} seeds)"
    )
    fig.tight_layout()
    return [save_figure(fig, out_dir, "bn-vs-ln")]


EXPERIMENT = register_experiment(
    Experiment(
        name="bn-vs-ln",
        claim="C8",
        title="LayerNorm/RMSNorm outputs are stable and give the better Transformer; plain BN's depend on padding, "
        "batch companions and mode",
        config=BnVsLnConfig,
        scales={
            "smoke": BnVsLnConfig(
                seeds=2,
                max_seeds=2,
                n_train=128,
                n_test=128,
                seq_len=12,
                d_model=16,
                depth=1,
                epochs=1,
                batch_size=16,
                extra_padding=4,
                probe_examples=32,
                composition_groups=2,
            ),
            "quick": BnVsLnConfig(),
            "full": BnVsLnConfig(
                seeds=5,
                max_seeds=20,
                n_train=20000,
                n_test=2000,
                seq_len=64,
                d_model=256,
                depth=4,
                heads=8,
                epochs=20,
                batch_size=64,
                threads=4,
            ),
        },
        grid=_grid,
        run_one=_run_one,
        parts=_parts,
        measure=measure,
        explain=_explain,
        plot=_plot,
        description=__doc__ or "",
    )
)
