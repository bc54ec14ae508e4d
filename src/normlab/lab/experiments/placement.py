"""``placement`` (C6): S0's analysis puts BN on a layer's input (before the conv); common practice puts it after.

Pre-registration
----------------
**Claim** (S0, sections "Cauchy inequality" to "BN appears"; our words): for one
weight layer ``g(<x, w> + b)``, the change of the loss gradient with respect
to ``w`` is bounded by a factor that grows with ``‖E[x ⊗ x]‖₁``, the second
moment of the layer's *input*; subtracting the mean of ``x`` minimises that term
and dividing by its standard deviation sets its scale, so the gradient's
Lipschitz constant L falls and larger steps become safe. Hence the analysis
concludes that BN belongs *before* the fully connected or convolution layer —
normalising each weight layer's input — whereas the common practice (Ioffe &
Szegedy) normalises the conv's output before the activation. S0 makes no
prediction about which arrangement ends with the better model; what it does
predict is (1) a smaller input second-moment term for the layer's weights
with BN before the conv, and (2) through the smaller L, better progress at a
learning rate high enough for L to matter. (In a later comment the author
calls the rule "normalise the block's input", the block being what one takes it
to be; we test the rule as the article states it.)

**Arms.** The same CNN (three conv blocks of 8/16/32 channels, kernel 3,
max-pooling) on MNIST-1D, 8 epochs of SGD (momentum 0.9) at batch 64, with BN
``before_linear`` (norm → conv → ReLU: S0's placement), ``pre_act`` (conv → norm
→ ReLU: common practice) or ``post_act`` (conv → ReLU → norm), and without any
norm (reference), at a moderate (0.05) and a high (0.5) learning rate. Paired by
seed (same seed: same batch order; the conv weights are drawn alike, the BN
layers differ in size by placement). The *input term* of a run is S0's
``‖E[x ⊗ x]‖₁ / d`` of each conv's input patches ``x`` (``d`` = channels × kernel
taps; 1 + the absolute correlations for a standardised input), measured in eval
mode on 1,000 training examples after training, geometric mean over the
convs. *Speed* is the mean training loss over all scheduled steps, each step
capped at the chance loss ln 10 and every step after a divergence counted as
ln 10 (a diverged run "knows nothing"; the metric stays finite and bounded); a
run whose weights diverged counts as an input term of 10⁶ (its inputs blew up).

Deciding parts (paired by seed):

* ``input-term-smaller``: input term of ``before_linear`` vs ``pre_act`` at lr 0.05
  (trained normally), "less", log scale, δ = ×1.5 — a practical threshold: the
  Lipschitz bound grows with the square root of the term, so ×1.5 in the term is
  ×1.22 in the bound, about the smallest change of safe step size worth moving
  a layer for.
* ``faster-at-high-lr``: speed of ``before_linear`` vs ``pre_act`` at lr 0.5,
  "less", log scale, δ = ×1.1 — a practical threshold: a 10 % lower mean
  training loss over the same steps; smaller speed-ups are not worth moving a
  layer for. (Student t on the log ratio: the capped metric is bounded, so a
  diverged seed widens the interval rather than running away.)

Reported parts (shown, never deciding): ``faster-at-moderate-lr`` (the same at lr
0.05, where S0 predicts nothing: every placement is stable); ``post-act-vs-before``
(speed of ``before_linear`` vs ``post_act`` at lr 0.5: ``post_act`` normalises the
activation, which is nearly the next conv's input — only max-pooling lies
between); ``input-term-post-act`` (input term of ``post_act`` vs ``pre_act`` at lr
0.05: how much of S0's effect survives the pooling); ``test-acc-at-high-lr``
(test accuracy of ``before_linear`` minus ``pre_act`` at lr 0.5, "greater", δ 0.01:
the end result S0 does not predict).

**Does not hold** if either deciding part does not hold: the input term is not
smaller with BN before the conv (or within ×1.5 of the common placement's), or
at the high learning rate BN before the conv does not train faster than the
common placement (slower, or within 10 %).

**Budget**: seeds in rounds of 3 up to 12 (quick), 8 runs per seed; see *Runtime*.

Runtime
-------
Command: ``normlab run placement`` (``--scale smoke|quick|full``). Quick on this
2-core CPU, one thread per run: measured 82 s of CPU (user + system,
``/usr/bin/time``) for 6 seeds (48 runs; the first quick run was decided at
its second look), so about 165 s at the full budget of 12 seeds. Full
(CIFAR-10, CNN 64-128-256, 30 epochs) is for a GPU.
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
    group,
    mean_std,
    pyplot,
    register_experiment,
    save_figure,
    values,
)
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["PlacementConfig", "EXPERIMENT", "capped_mean_loss", "speed_metrics", "input_terms"]

RECOMMENDED = "before_linear"  # S0's placement: normalise the layer's input
COMMON = "pre_act"  # the common practice: conv -> norm -> activation
REFERENCE = "no norm"  # the grid label of the run without normalisation
DIVERGED_TERM = 1e6  # the input term a run counts as when its weights diverged (its inputs blew up)


@dataclass(frozen=True)
class PlacementConfig:
    """C6 placement; see the module docstring for the pre-registration, the command and the runtimes."""

    seeds: int = 3  # seeds per round (the first look, and each later round)
    max_seeds: int = 12  # seed budget per grid point
    threads: int = 1  # torch threads per run (not part of the run id)
    dataset: str = "mnist1d"  # dataset name (normlab.lab.data.dataset_names())
    n_train: int | None = None  # training examples (None = the whole training set)
    channels: tuple[int, ...] = (8, 16, 32)  # conv channels per block of the CNN
    norm: str = "batchnorm"  # the norm being placed
    positions: tuple[str, ...] = ("before_linear", "pre_act", "post_act")  # where it goes (models.NORM_POSITIONS)
    reference: bool = True  # also train without any norm (drawn and reported, never judged)
    lrs: tuple[float, ...] = (0.05, 0.5)  # SGD learning rates (momentum 0.9): moderate, high (the parts use both)
    epochs: int = 8  # passes over the training set
    batch_size: int = 64  # examples per optimizer step
    probe_examples: int = 1000  # training examples on which the input terms are measured
    data_dir: str | None = None  # folder of the CIFAR batches (full scale only; not part of the run id)

    def __post_init__(self) -> None:
        if not {RECOMMENDED, COMMON, "post_act"} <= set(self.positions):
            raise ValueError(f"positions must include before_linear, pre_act and post_act, got {self.positions}")
        if len(self.lrs) != 2 or self.lrs[0] >= self.lrs[1]:
            raise ValueError(f"lrs must be (moderate, high) with moderate < high, got {self.lrs}")


def _grid(cfg: PlacementConfig):
    settings = [(p, cfg.norm) for p in cfg.positions] + ([(REFERENCE, "none")] if cfg.reference else [])
    for lr in cfg.lrs:
        for placement, norm in settings:
            yield {
                "placement": placement,
                "dataset": cfg.dataset,
                "n_train": cfg.n_train,
                "model": "cnn",
                "model_kwargs": {
                    "channels": list(cfg.channels),
                    "norm_position": placement if placement != REFERENCE else COMMON,
                },
                "norm": norm,
                "optimizer": "sgd",
                "lr": lr,
                "momentum": 0.9,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "probe_examples": cfg.probe_examples,
            }


# --------------------------------------------------------------------------- measurements


def capped_mean_loss(step_loss: list[float], total_steps: int, cap: float) -> float:
    """Mean over ``total_steps`` scheduled steps of min(loss, cap); non-finite or missing steps count as ``cap``."""
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    vals = [min(x, cap) if x is not None and math.isfinite(x) else cap for x in step_loss[:total_steps]]
    vals += [cap] * (total_steps - len(vals))
    return sum(vals) / total_steps


def input_terms(model, x) -> list[tuple[float, float]]:
    """Per conv layer of ``model`` (in order): ``(‖E[p pᵀ]‖₁ / d, tr E[p pᵀ] / d)`` over its input patches ``p``.

    ``p`` is the vector a conv output position sees (``d`` = in-channels × kernel taps, with the layer's own
    zero padding), gathered over every example of ``x`` and every output position, in eval mode; ``‖·‖₁`` is
    the entrywise L1 norm S0 writes. Computed in float64. The model's mode is restored.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    seen: dict[int, Any] = {}
    hooks = [c.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
             for i, c in enumerate(convs)]  # fmt: skip
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = []
    for i, conv in enumerate(convs):
        h = seen[i].double()
        k, pad = conv.kernel_size, conv.padding
        if isinstance(conv, nn.Conv1d):
            cols = F.pad(h, (pad[0], pad[0])).unfold(2, k[0], conv.stride[0])  # (N, C, L_out, k)
            p = cols.permute(0, 2, 1, 3).reshape(-1, h.shape[1] * k[0])  # (N * L_out, C * k)
        else:
            cols = F.unfold(h, k, padding=pad, stride=conv.stride)  # (N, C * kh * kw, L_out)
            p = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N * L_out, C * kh * kw)
        m = p.T @ p / p.shape[0]  # (d, d): E[p pᵀ]
        d = m.shape[0]
        out.append((m.abs().sum().item() / d, m.trace().item() / d))
    return out


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs and all(x > 0 for x in xs) else float("nan")


def speed_metrics(result, ds) -> dict[str, Any]:
    """A run's speed: ``scheduled_steps``, ``chance_loss`` (ln K) and :func:`capped_mean_loss` over those steps.

    ``result`` is what :func:`normlab.lab.train.train` returned, ``ds`` the dataset it trained on.
    """
    config = result.config
    n = len(ds.y_train)
    steps_per_epoch = n // config.batch_size if config.drop_last else math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    cap = math.log(ds.num_classes)
    return {
        "scheduled_steps": total,
        "chance_loss": cap,
        "capped_mean_loss": capped_mean_loss(result.step_loss, total, cap),
    }


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import load_data, train

    config = run.train_config()
    result = train(config, progress=run.progress)
    metrics = result.to_metrics()
    ds = load_data(config)
    terms = input_terms(result.model, ds.x_train[: int(run["probe_examples"])])
    l1 = _geomean([t[0] for t in terms])
    tr = _geomean([t[1] for t in terms])
    metrics.update(
        **speed_metrics(result, ds),
        input_term=l1 if math.isfinite(l1) else None,  # None after a divergence (non-finite weights)
        input_trace=tr if math.isfinite(tr) else None,
        input_terms=[list(t) for t in terms],
    )
    return metrics


# --------------------------------------------------------------------------- parts


def _parts(cfg: PlacementConfig) -> list[Part]:
    moderate, high = cfg.lrs
    at = lambda p, lr: {"placement": p, "lr": lr}  # noqa: E731
    term_why = (
        "practical: the Lipschitz bound grows with √term; ×1.5 in it is ×1.22 in the safe step, the least worth it"
    )
    speed_why = "practical: a 10 % lower mean training loss over the same steps; less is not worth moving a layer for"
    return [
        Part("input-term-smaller", f"the convs' input term ‖E[x⊗x]‖₁/d is smaller with BN before the conv than "
             f"between conv and activation (lr {moderate:g})", "input_term", at(RECOMMENDED, moderate),
             at(COMMON, moderate), direction="less", margin=1.5, why=term_why, log=True, missing=DIVERGED_TERM,
             unit="‖E[x⊗x]‖₁/d", label_a=RECOMMENDED, label_b=COMMON),
        Part("faster-at-high-lr", f"BN before the conv trains faster than between conv and activation at lr {high:g}",
             "capped_mean_loss", at(RECOMMENDED, high), at(COMMON, high), direction="less", margin=1.1,
             why=speed_why, log=True, unit="mean training loss (nats)", label_a=RECOMMENDED, label_b=COMMON),
        Part("faster-at-moderate-lr", f"the same at lr {moderate:g}, where every placement is stable",
             "capped_mean_loss", at(RECOMMENDED, moderate), at(COMMON, moderate), direction="less", margin=1.1,
             why=speed_why, log=True, decides=False, unit="mean training loss (nats)", label_a=RECOMMENDED,
             label_b=COMMON),
        Part("post-act-vs-before", f"BN before the conv trains faster than BN after the activation at lr {high:g}",
             "capped_mean_loss", at(RECOMMENDED, high), at("post_act", high), direction="less", margin=1.1,
             why=speed_why, log=True, decides=False, unit="mean training loss (nats)", label_a=RECOMMENDED,
             label_b="post_act"),
        Part("input-term-post-act", f"BN after the activation (max-pooling between it and the next conv) also gives "
             f"a smaller input term than between conv and activation (lr {moderate:g})", "input_term",
             at("post_act", moderate), at(COMMON, moderate), direction="less", margin=1.5, why=term_why, log=True,
             decides=False, missing=DIVERGED_TERM, unit="‖E[x⊗x]‖₁/d", label_a="post_act", label_b=COMMON),
        Part("test-acc-at-high-lr", f"test accuracy with BN before the conv is higher than between conv and "
             f"activation at lr {high:g}", "final_test_acc", at(RECOMMENDED, high), at(COMMON, high),
             direction="greater", margin=0.01, why="one point of test accuracy (10 of 1,000 test signals)",
             decides=False, missing=0.1, unit="accuracy", label_a=RECOMMENDED, label_b=COMMON),
    ]  # fmt: skip


# --------------------------------------------------------------------------- explanation and figure


def _explain(rows: list[dict[str, Any]], cfg: PlacementConfig, judgement: Judgement):
    rows = [r for r in rows if r["seed"] < judgement.seeds]
    texts, numbers = [], {}
    for lr in cfg.lrs:
        rs = [r for r in rows if r["lr"] == lr]
        placed = [p for p in (*cfg.positions, REFERENCE) if any(r["placement"] == p for r in rs)]
        loss = {p: mean_std(values(rs, "capped_mean_loss", placement=p))[0] for p in placed}
        acc = {p: mean_std(values(rs, "final_test_acc", placement=p))[0] for p in placed}
        div = {p: sum(bool(r.get("diverged")) for r in rs if r["placement"] == p) for p in placed}
        fastest = min((p for p in placed if p != REFERENCE), key=loss.__getitem__)
        texts.append(
            f"lr {lr:g}: fastest {fastest}; mean training loss "
            + ", ".join(f"{p} {loss[p]:.3f}" for p in placed)
            + "; test accuracy "
            + ", ".join(f"{p} {acc[p]:.3f}" for p in placed)
            + (
                "; diverged " + ", ".join(f"{p} {k}/{judgement.seeds}" for p, k in div.items() if k)
                if any(div.values())
                else ""
            )  # fmt: skip
        )
        numbers[f"lr={lr:g}"] = {"capped_mean_loss": loss, "final_test_acc": acc, "diverged": div, "fastest": fastest}
    moderate = cfg.lrs[0]
    terms = {p: mean_std([v for v in values([r for r in rows if r["lr"] == moderate], "input_term", placement=p)
                          if v is not None])[0]
             for p in cfg.positions}  # fmt: skip
    # not a part (not pre-registered): the term relative to the input's mean square, tr E[x xᵀ]/d, which takes
    # the scale out and leaves what centring changes (S0 calls the division by σ a choice of scale, not a minimum)
    rel = {p: mean_std([r["input_term"] / r["input_trace"] for r in rows if r["lr"] == moderate
                        and r["placement"] == p and r.get("input_term") and r.get("input_trace")] or [math.nan])[0]
           for p in cfg.positions}  # fmt: skip
    trace = {p: mean_std([r["input_trace"] for r in rows if r["lr"] == moderate and r["placement"] == p
                          and r.get("input_trace")] or [math.nan])[0]
             for p in cfg.positions}  # fmt: skip
    if terms[RECOMMENDED] > terms[COMMON] and rel[RECOMMENDED] < rel[COMMON]:
        texts.append(
            f"BN before the conv centres the convs' inputs (term/trace {rel[RECOMMENDED]:.3g} vs {rel[COMMON]:.3g}) "
            f"but gives them a larger mean square (trace/d {trace[RECOMMENDED]:.3g} vs {trace[COMMON]:.3g} after "
            "ReLU and pooling), so S0's raw term ends up larger"
        )
    texts.append(
        f"input term ‖E[x⊗x]‖₁/d at lr {moderate:g}: "
        + ", ".join(f"{p} {v:.3g}" for p, v in terms.items())
        + "; relative to its trace (scale taken out, not pre-registered): "
        + ", ".join(f"{p} {v:.3g}" for p, v in rel.items())
    )
    numbers["input_term"], numbers["input_term_over_trace"] = terms, rel
    return " | ".join(texts), numbers


def _smooth(xs: list[float], k: int) -> list[float]:
    """Trailing moving average over ``k`` steps (for readable per-step curves)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: PlacementConfig) -> list[Path]:
    plt = pyplot()
    by_lr = group(rows, "lr")
    fig, axes = plt.subplots(2, len(by_lr) + 1, figsize=(5.5 * (len(by_lr) + 1), 8), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    order = list(cfg.positions) + [REFERENCE]
    colours = {p: f"C{i}" for i, p in enumerate(order)}
    for j, ((lr,), rs) in enumerate(by_lr.items()):
        ax = axes[0, j]
        for (placement,), prs in group(rs, "placement").items():
            for k, r in enumerate(prs):
                cap = r.get("chance_loss", math.log(10))
                loss = [min(x, cap) if x is not None and math.isfinite(x) else cap for x in r["step_loss"]]
                ax.plot(_smooth(loss, 10), lw=0.8, alpha=0.7, color=colours.get(placement),
                        ls="--" if placement == REFERENCE else "-", label=placement if k == 0 else None)  # fmt: skip
        ax.set(yscale="log", xlabel="optimizer step", ylabel="training loss (nats, 10-step mean, capped at ln K)",
               title=f"SGD lr={lr:g}: training loss, every seed")  # fmt: skip
        ax.legend(fontsize=8)
        ax = axes[1, j]
        names = [p for p in order if any(r["placement"] == p for r in rs)]
        for i, p in enumerate(names):
            ls = values(rs, "capped_mean_loss", placement=p)
            ax.scatter([i] * len(ls), ls, color=colours[p], alpha=0.7)
            m, s, _ = mean_std(ls)
            ax.errorbar([i], [m], yerr=[s], color=colours[p], marker="_", ms=20, capsize=6)
        ax.set_xticks(range(len(names)), names)
        ax.set(yscale="log", ylabel="mean training loss over the run (nats, capped)",
               title=f"speed at lr={lr:g}: lower is faster")  # fmt: skip
    ax = axes[0, -1]
    moderate = [r for r in rows if r["lr"] == min(cfg.lrs) and r.get("input_terms") and r["placement"] != REFERENCE]
    for (placement,), prs in group(moderate, "placement").items():
        for k, r in enumerate(prs):
            ax.plot(range(1, len(r["input_terms"]) + 1), [t[0] for t in r["input_terms"]], marker="o", alpha=0.6,
                    color=colours[placement], label=placement if k == 0 else None)  # fmt: skip
    ax.set_xticks(range(1, len(cfg.channels) + 1))
    ax.set(yscale="log", xlabel="conv layer", ylabel="‖E[x⊗x]‖₁ / d of its input patches",
           title=f"S0's input term after training, lr={min(cfg.lrs):g}")  # fmt: skip
    ax.legend(fontsize=8)
    ax = axes[1, -1]
    for i, p in enumerate(order):
        for j, lr in enumerate(cfg.lrs):
            acc = values([r for r in rows if r["lr"] == lr], "final_test_acc", placement=p)
            if acc:
                ax.scatter([i + 0.2 * (j - 0.5)] * len(acc), acc, color=colours[p], marker="os"[j % 2], alpha=0.7,
                           label=f"lr {lr:g}" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(order)), order)
    ax.set(ylabel="test accuracy", title="test accuracy (circles: moderate lr, squares: high lr)")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.suptitle(f"C6 placement: {cfg.norm} before the conv (S0) / before the activation / after the activation")
    return [save_figure(fig, out_dir, "placement")]


EXPERIMENT = register_experiment(
    Experiment(
        name="placement",
        claim="C6",
        title="S0: normalise a layer's input (BN before the conv) — a smaller input term, faster at a high step",
        config=PlacementConfig,
        scales={
            "smoke": PlacementConfig(
                seeds=2,
                max_seeds=2,
                dataset="digits",
                n_train=256,
                channels=(4, 8),
                epochs=1,
                batch_size=32,
                probe_examples=128,
            ),
            "quick": PlacementConfig(),
            "full": PlacementConfig(
                seeds=5,
                max_seeds=20,
                dataset="cifar10",
                channels=(64, 128, 256),
                lrs=(0.05, 0.8),
                epochs=30,
                batch_size=128,
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
