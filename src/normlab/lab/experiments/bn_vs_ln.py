"""``bn-vs-ln`` (C8): LayerNorm has no train/test difference and suits variable-length sequences; BN does not.

The tiny pre-norm Transformer (``build_model("transformer")``: linear
embedding + learned positions, 2 blocks of attention and MLP, a final norm,
masked mean pooling, d_model 32, 4 heads) is trained on
``"synthetic-sequences"`` (variable-length sequences with a padding mask;
padded positions are zero and masked out of attention and pooling) with

* ``layernorm`` and ``rmsnorm``: each token normalised over its features;
* ``batchnorm``: each feature normalised over the real (N, S) positions of the
  batch, the padding **masked out** of its statistics (``feature_dim=-1``,
  ``mask=``) — the BN of the claim;
* ``batchnorm-unmasked`` (reference, not judged): the same BN with the padding
  left in its statistics (``mask_norm_stats=False``), to show what masking
  removes.

After training, three probes on the test sequences (logits compared by their
relative change ``||a - b|| / ||a||``; each on a copy of the model, which is
left untouched):

1. **padding**: the same sequences with ``extra_padding`` more padded
   positions (zeros, mask False) — train mode (batch statistics over batches
   of the training batch size) and eval mode;
2. **batch composition**: train mode, ``batch_size / 2`` probe sequences
   batched with two different sets of companions; the probe sequences'
   logits compared (and the fraction of their predictions that flip);
3. **train/test difference**: the logits of the same batches in train mode
   vs eval mode, and the test accuracy in both modes.

A change counts as zero below ``tolerance`` (1e-4: float32 round-off of a
reordered sum gives ~1e-6). Verdict rule
(:func:`~normlab.lab.experiments.framework.threshold` on the per-seed values, whole
interval mean ± 1 std on the claimed side of ``tolerance``, then
:func:`~normlab.lab.experiments.framework.combine`):

* *LN/RMSNorm stable*: for both, the padding change (train mode), the
  batch-composition change and the train/eval change are below
  ``tolerance``;
* *BN sensitive to batch composition*: masked BN's batch-composition change
  is above ``tolerance``;
* *BN sensitive to padding*: masked BN's padding change (train mode) is above
  ``tolerance``;
* *BN has a train/test difference*: masked BN's train/eval change is above
  ``tolerance``.

The claim holds when all parts hold. Note that a BN whose statistics mask
the padding is padding-invariant by construction (the same real tokens give
the same statistics), so its padding part is expected to fail: the
unmasked reference shows the sensitivity that masking removes. The summary
reports both, and the test accuracies (reported, not judged).

Command: ``normlab run bn-vs-ln`` (``--scale smoke|quick|full``).
Runtime on this 2-core CPU (one thread per run, other jobs on the machine):
smoke ~10 s; quick (2,000 sequences, 4 epochs, 4 variants x 3 seeds = 12
runs) ~1 min measured (59 s); full (d_model 256, 4 blocks, 20,000 sequences,
20 epochs, 5 seeds) is for a GPU, not run here.
Expected (Ba et al. 2016; Shen et al. 2020, "PowerNorm"; the reference
texts): LN/RMSNorm outputs do not depend on padding, companions or mode; BN's
depend on its batch in training and differ between train and eval mode.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.lab.config import ConfigError
from normlab.lab.experiments.framework import (
    Experiment,
    Run,
    Verdict,
    combine,
    fmt_mean_std,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
    threshold,
    values,
)

__all__ = ["BnVsLnConfig", "EXPERIMENT", "VARIANTS", "relative_change"]

# variant name -> (registered norm, whether the norm's statistics see the padding mask)
VARIANTS = {
    "layernorm": ("layernorm", True),
    "rmsnorm": ("rmsnorm", True),
    "batchnorm": ("batchnorm", True),
    "batchnorm-unmasked": ("batchnorm", False),
}
PROBES = ("padding_change_train", "composition_change", "train_eval_change")  # the judged probe metrics


@dataclass(frozen=True)
class BnVsLnConfig:
    """C8 bn-vs-ln; see the module docstring for the command, runtimes and the expected result."""

    seeds: int = 3  # seeds per variant
    variants: tuple[str, ...] = ("layernorm", "rmsnorm", "batchnorm", "batchnorm-unmasked")  # keys of VARIANTS
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
    tolerance: float = 1e-4  # relative output change below this counts as none (float32 round-off ~1e-6)
    threads: int = 1  # torch threads per run


def _grid(cfg: BnVsLnConfig):
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; choose from: {', '.join(VARIANTS)}")
    need = cfg.probe_examples + cfg.composition_groups * 3 * (cfg.batch_size // 2)
    if cfg.n_test < need:
        raise ConfigError(f"n_test={cfg.n_test} is too small for the probes; need at least {need}")
    for variant in cfg.variants:
        norm, masked = VARIANTS[variant]
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
            "threads": cfg.threads,
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
    """The padding, batch-composition and train/eval probes of the module docstring on test sequences ``x``."""
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
    import torch

    from normlab.lab.runtime import resolve_device
    from normlab.lab.train import load_data, train

    tc = run.train_config()
    result = train(tc, progress=run.progress)
    model = result.model
    ds = load_data(tc)
    device = resolve_device(tc.device)
    x, mask, y = ds.x_test.to(device), ds.mask_test.to(device), ds.y_test.to(device)
    old = torch.get_num_threads()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        metrics = result.to_metrics()
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
    finally:
        torch.set_num_threads(old)
    return metrics


# --------------------------------------------------------------------------- analysis


_PROBE_TEXT = {
    "padding_change_train": "padding (train mode)",
    "composition_change": "batch composition",
    "train_eval_change": "train vs eval",
}


def _analyse(rows: list[dict[str, Any]], cfg: BnVsLnConfig) -> Verdict:
    present = {r["variant"] for r in rows}
    stable = [v for v in ("layernorm", "rmsnorm") if v in present]
    if not stable or "batchnorm" not in present:
        raise ConfigError("bn-vs-ln needs 'batchnorm' and at least one of 'layernorm', 'rmsnorm' in variants")
    tol = cfg.tolerance

    def v(metric: str, variant: str) -> list[float]:
        return values(rows, metric, variant=variant)

    stable_parts = {
        f"{s} {_PROBE_TEXT[p]}": threshold(v(p, s), tol, "less", name=f"{s} {_PROBE_TEXT[p]} change")
        for s in stable
        for p in PROBES
    }

    def bn(metric: str, text: str) -> Verdict:
        return threshold(v(metric, "batchnorm"), tol, "greater", name=f"BN {text} change")

    parts = {
        "LN/RMSNorm stable": combine(stable_parts),
        "BN sensitive to batch composition": bn("composition_change", "batch-composition"),
        "BN sensitive to padding": bn("padding_change_train", "padding (train mode)"),
        "BN train/test difference": bn("train_eval_change", "train vs eval"),
    }
    verdict = combine(parts)
    order = [x for x in cfg.variants if x in present]

    def f(metric: str, x: str, digits: int = 3) -> str:
        return fmt_mean_std(v(metric, x), digits)

    table = "; ".join(
        f"{x}: padding {f('padding_change_train', x, 2)}, companions {f('composition_change', x, 2)}, "
        f"train/eval {f('train_eval_change', x, 2)}"
        for x in order
    )
    accs = "; ".join(f"{x} {f('final_test_acc', x)} (train mode {f('train_mode_test_acc', x)})" for x in order)
    head = "; ".join(f"{k}: {p.status}" for k, p in parts.items())
    summary = f"{head} | relative logit change (tolerance {tol:g}): {table} | test accuracy, eval mode: {accs}"
    numbers = dict(verdict.numbers)
    reported = (*PROBES, "padding_change_eval", "composition_flips", "final_test_acc", "train_mode_test_acc")
    numbers["by_variant"] = {x: {m: mean_std(v(m, x))[:2] for m in reported} for x in order}
    return Verdict(verdict.status, summary, numbers)


# --------------------------------------------------------------------------- figure


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: BnVsLnConfig) -> list[Path]:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    order = [x for x in cfg.variants if any(r["variant"] == x for r in rows)]
    probes = (*PROBES, "padding_change_eval")
    labels = ("padding, train mode", "batch companions, train mode", "train vs eval mode", "padding, eval mode")
    width = 0.8 / len(probes)
    floor = 1e-9  # exact zeros drawn at this height on the log axis
    for j, (p, label) in enumerate(zip(probes, labels)):
        stats = [mean_std(values(rows, p, variant=x))[:2] for x in order]
        xs = [i + (j - (len(probes) - 1) / 2) * width for i in range(len(order))]
        heights, errors = [max(m, floor) for m, _ in stats], [s for _, s in stats]
        ax1.bar(xs, heights, width, yerr=errors, capsize=2, label=label, color=f"C{j}")
    ax1.axhline(cfg.tolerance, color="k", ls="--", lw=1, label=f"tolerance {cfg.tolerance:g}")
    ax1.set_xticks(range(len(order)))
    ax1.set_xticklabels(order)
    ax1.set(
        yscale="log",
        ylabel="relative change of the logits (log scale)",
        title=f"sensitivity of the outputs (exact 0 drawn at {floor:g})",
    )
    ax1.legend(fontsize=8)
    modes = (("final_test_acc", "eval mode"), ("train_mode_test_acc", "train mode (batch statistics)"))
    for j, (key, label) in enumerate(modes):
        stats = [mean_std(values(rows, key, variant=x))[:2] for x in order]
        xs = [i + (j - 0.5) * 0.35 for i in range(len(order))]
        ax2.bar(xs, [m for m, _ in stats], 0.35, yerr=[s for _, s in stats], capsize=3, label=label, color=f"C{j + 4}")
    ax2.set_xticks(range(len(order)))
    ax2.set_xticklabels(order, rotation=20)
    ax2.set(ylabel="test accuracy (fraction)", title="test accuracy", ylim=(0, 1))
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    n_seeds = len({r["seed"] for r in rows})
    fig.suptitle(
        f"C8: tiny Transformer on variable-length sequences, LN / RMSNorm / BN (mean ± std over {n_seeds} seeds)"
    )
    return [save_figure(fig, out_dir, "bn-vs-ln")]


EXPERIMENT = register_experiment(
    Experiment(
        name="bn-vs-ln",
        claim="C8",
        title="LayerNorm/RMSNorm outputs are stable; BN's depend on padding, batch companions and mode",
        config=BnVsLnConfig,
        scales={
            "smoke": BnVsLnConfig(
                seeds=2,
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
        analyse=_analyse,
        plot=_plot,
        description=__doc__ or "",
    )
)
