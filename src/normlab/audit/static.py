"""The static checks: from the modules, their attributes and the module graph (no data needed).

Each ``check_*`` function reads an :class:`~normlab.audit.state.AuditState` and adds its findings to it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normlab.audit.graph import dropouts_feeding
from normlab.audit.kinds import (
    affine_params,
    batches_tracked,
    buffer_numel,
    declared_weight,
    dropout_p,
    is_affine_map,
    is_frozen,
    is_real,
    norm_kind,
    num_features,
    out_features,
    removes_channel_mean,
    running_stats,
    uses_batch_stats,
)
from normlab.audit.state import AuditState

__all__ = [
    "check_modes",
    "check_momentum",
    "check_buffers",
    "check_groups",
    "check_running_stats_off",
    "check_frozen_affine",
    "check_graph",
    "check_untrained",
]


def check_momentum(state: AuditState) -> None:
    """The declared momentum of every BN with running statistics: cumulative, another framework's convention,
    or outside the usual range (layers whose measured update contradicts the attribute are reported by the
    behavioural ``momentum-mismatch`` instead)."""
    for m in state.bns:
        if getattr(m, "running_mean", None) is None:  # no running statistics (lazy ones count)
            continue
        if m in state.momentum_contradicted:  # what the attribute says is not what the layer does: reported there
            continue
        ew = declared_weight(m)
        if ew is None:
            continue
        conv, w = ew
        if w is None:
            state.add(
                "momentum-cumulative",
                "info",
                m,
                f"momentum=None: the running statistics are the plain average of every batch since the last "
                f"reset ({batches_tracked(m)} so far), early-training batches weighing as much as the latest ones.",
                "fine for a one-off pass over data after training (that is normlab.recalibrate's job); for "
                "training, use an EMA, e.g. momentum=0.1",
                momentum=None,
            )
            continue
        mom = float(m.momentum)
        found = _momentum_finding(state, m, mom, conv, w)
        if found is not None:
            check, severity, message, fix = found
            state.add(check, severity, m, message, fix, momentum=mom, convention=conv, new_batch_weight=w)


def _momentum_finding(
    state: AuditState, m: nn.Module, mom: float, conv: str, w: float
) -> tuple[str, str, str, str] | None:
    """(check, severity, message, fix) for a new-batch weight ``w`` from another convention or out of range."""
    th = state.th
    if conv == "torch" and w >= th.momentum_foreign:
        return (
            "momentum-convention",
            "error",
            f"momentum={mom:g} in PyTorch's convention gives the newest batch a weight of {w:.0%}: the "
            f"running statistics are essentially the last (micro-)batch's. {mom:g} is a Keras/Flax/TF "
            "*decay* (the weight of the old value) carried over as a PyTorch momentum.",
            f"momentum=normlab.functional.convert_momentum({mom:g}, to='torch')  # = {1 - mom:.3g}",
        )
    if conv == "decay" and w >= th.momentum_foreign:
        return (
            "momentum-convention",
            "error",
            f"momentum={mom:g} with momentum_convention='decay' keeps only {mom:.0%} of the old value, so "
            f"the newest batch weighs {w:.0%}: {mom:g} is a PyTorch momentum read as a decay.",
            f"momentum=normlab.functional.convert_momentum({mom:g}, to='decay')  # = {1 - mom:.3g}, "
            "or momentum_convention='torch'",
        )
    if w <= 0.0:
        return (
            "momentum-range",
            "error",
            f"momentum={mom:g} ({conv} convention): the newest batch has weight 0, so the running "
            "statistics never move from their current values.",
            "a weight of the new batch between 0.001 and 0.1 (PyTorch's default is momentum=0.1); "
            f"model = normlab.freeze(model, ['{state.names[m]}']) if fixed statistics are what you want",
        )
    if w > th.momentum_high:
        return (
            "momentum-range",
            "warning",
            f"momentum={mom:g} ({conv} convention) gives the newest batch a weight of {w:.0%}: the last "
            f"two batches carry {1 - (1 - w) ** 2:.0%} of the running statistics, which are then noisy.",
            "a weight of the new batch between 0.001 and 0.1 (PyTorch's default momentum=0.1)",
        )
    if w < th.momentum_low:
        return (
            "momentum-range",
            "warning",
            f"momentum={mom:g} ({conv} convention) gives the newest batch a weight of {w:.2g}: it takes "
            f"about {math.log(20) / w:,.0f} batches to forget 95% of the starting values, so after a short "
            "run (or fine-tuning) the statistics still describe the old weights or data.",
            "a larger momentum, or normlab.recalibrate(model, loader) after training",
        )
    return None


def check_buffers(state: AuditState) -> None:
    """Running statistics, γ and β of every norm layer: non-finite values first (the rest is meaningless then),
    then γ (all zero, or dead channels), then the running variance (below eps, or exploding)."""
    for m in state.norms:
        if _check_nonfinite_buffers(state, m):
            continue
        _check_gamma(state, m)
        _check_running_var(state, m)


def _check_nonfinite_buffers(state: AuditState, m: nn.Module) -> bool:
    """NaN/inf in the running statistics, γ or β, or a negative running variance; True if any was found."""
    run = running_stats(m)
    bad = {}
    for key, t in (
        ("running_mean", run and run[0]),
        ("running_var", run and run[1]),
        ("weight", getattr(m, "weight", None)),
        ("bias", getattr(m, "bias", None)),
    ):
        if is_real(t) and t.is_floating_point():
            k = int((~torch.isfinite(t.detach())).sum())
            if k:
                bad[key] = k
    negative = int((run[1].detach() < 0).sum()) if run is not None else 0
    if not bad and not negative:
        return False
    what = ", ".join(f"{k} ({v} of {buffer_numel(m, k)} non-finite)" for k, v in bad.items())
    if negative:
        what += (", " if what else "") + f"running_var ({negative} negative)"
    state.add(
        "nonfinite-buffers",
        "error",
        m,
        f"{what}: every eval output of the affected channels is NaN/inf or meaningless. A NaN batch "
        "in training (or an overflow in float16) entered the running statistics.",
        "find the non-finite batch (normlab's BN layers skip such batches and count them in "
        "num_nonfinite_batches); then normlab.recalibrate(model, loader) to rebuild the statistics",
        nonfinite=bad,
        negative_running_var=negative,
    )
    return True


def _check_gamma(state: AuditState, m: nn.Module) -> None:
    """A per-channel γ that is exactly 0 everywhere (zero-gamma), or channels whose |γ| is ~0 (dead-channels)."""
    gamma = getattr(m, "weight", None)
    per_channel = norm_kind(m) in ("batch", "group", "instance")
    if not (per_channel and is_real(gamma) and gamma.dim() >= 1 and gamma.numel() > 1):
        return
    g = gamma.detach().abs().double().flatten()
    if bool((g == 0).all()):
        state.add(
            "zero-gamma",
            "info",
            m,
            "every γ of this layer is exactly 0, so it outputs β whatever its input: a zero-initialised "
            "residual branch (fine at initialisation; a dead branch if still so after training).",
            "nothing at initialisation; after training, check the layer's γ receives gradients",
            channels=g.numel(),
        )
        return
    th = state.th
    med = float(g.median())
    dead = (g < th.dead_gamma * med).nonzero().flatten().tolist() if med > 0 else []
    if dead:
        state.add(
            "dead-channels",
            "warning",
            m,
            f"{len(dead)} of {g.numel()} channels have |γ| below {th.dead_gamma:g} x the layer's "
            f"median |γ| ({med:.3g}): they output the constant β and pass no signal or gradient.",
            "intended if channels were pruned on purpose; otherwise look for too strong weight decay "
            "on γ or a saturated input, and consider re-initialising these channels",
            channels=dead[:32],
            count=len(dead),
            median_abs_gamma=med,
        )


def _check_running_var(state: AuditState, m: nn.Module) -> None:
    """Channels whose running variance is below eps (dead-channels) or above 1e6 (exploding-channels)."""
    run = running_stats(m)
    if run is None or not run[1].is_floating_point():
        return
    th = state.th
    rv = run[1].detach().double().flatten()
    eps = float(getattr(m, "eps", 1e-5) or 0.0)
    low = (rv < eps).nonzero().flatten().tolist()
    if low:
        state.add(
            "dead-channels",
            "warning",
            m,
            f"{len(low)} of {rv.numel()} channels have a running variance below eps={eps:g}: their input "
            "was constant in training, and in eval any deviation from the running mean is multiplied "
            f"by up to 1/sqrt(eps) = {1 / math.sqrt(eps) if eps > 0 else float('inf'):.3g}.",
            "look for dead ReLUs or a constant input before this layer; normlab.recalibrate(model, "
            "loader) if the statistics are stale",
            channels=low[:32],
            count=len(low),
            eps=eps,
        )
    huge = (rv > th.exploding_var).nonzero().flatten().tolist()
    if huge:
        state.add(
            "exploding-channels",
            "warning",
            m,
            f"{len(huge)} of {rv.numel()} channels have a running variance above {th.exploding_var:g} "
            f"(largest {float(rv.max()):.3g}): the activations before this layer have blown up, and "
            "values that large overflow float16 (max 65504).",
            "lower the learning rate or clip gradients (normlab.adaptive_grad_clip_); check the input scaling",
            channels=huge[:32],
            count=len(huge),
            max_running_var=float(rv.max()),
        )


def check_groups(state: AuditState) -> None:
    for m in state.norms:
        if norm_kind(m) != "group":
            continue
        g, c = getattr(m, "num_groups", None), getattr(m, "num_channels", None)
        if not isinstance(g, int) or not isinstance(c, int) or g <= 0:
            continue
        if c % g:
            divisors = [d for d in range(1, c + 1) if c % d == 0]
            state.add(
                "groupnorm-groups",
                "error",
                m,
                f"num_groups={g} does not divide num_channels={c}: the groups cannot be formed evenly "
                "(torch.nn.GroupNorm refuses this; this layer either fails or mixes channels unevenly).",
                f"num_groups one of {divisors}, e.g. normlab.make_norm('groupnorm', {c})",
                num_groups=g,
                num_channels=c,
            )
        elif c // g < state.th.min_channels_per_group and g > 1:
            state.add(
                "groupnorm-groups",
                "warning",
                m,
                f"num_groups={g} for {c} channels leaves {c // g} channel(s) per group"
                + (
                    ": this is InstanceNorm, the weakest of the variants Wu & He (2018, Table 1) compared with "
                    "GroupNorm's 32 groups on ImageNet."
                    if c == g
                    else ", too few for stable group statistics."
                ),
                f"fewer groups, e.g. normlab.make_norm('groupnorm', {c}) (32 groups or the largest divisor "
                "below), or InstanceNorm if per-channel statistics are what you want",
                num_groups=g,
                num_channels=c,
                channels_per_group=c // g,
            )


def check_modes(state: AuditState) -> None:
    if state.expect == "eval" and state.model.training:
        state.add(
            "mode-mismatch",
            "error",
            state.model,
            "the model is in train mode but is audited for evaluation: every BN normalises with the statistics "
            "of the eval batch and updates its running statistics with it; dropout is on.",
            "model.eval() before evaluating (and model.train() before training again)",
        )
        return
    if state.expect == "train" and not state.model.training:
        state.add(
            "mode-mismatch",
            "warning",
            state.model,
            "the model is in eval mode but is audited for training: BN layers will normalise with running "
            "statistics that never update, and dropout is off.",
            "model.train() before training",
        )
        return
    for m, name in state.names.items():
        kind = norm_kind(m)
        if state.expect == "eval" and m.training and m is not state.model:
            if kind in ("batch", "instance") and running_stats(m) is not None and uses_batch_stats(m):
                state.add(
                    "mode-mismatch",
                    "error",
                    m,
                    "in train mode inside a model in eval mode: it normalises with the statistics of each eval "
                    "batch instead of its running statistics, and updates those with every eval batch.",
                    "call model.eval() after any .train() on a submodule (model.eval() sets every submodule)",
                )
            elif dropout_p(m):
                state.add(
                    "mode-mismatch",
                    "error",
                    m,
                    "dropout in train mode inside a model in eval mode: eval outputs are random.",
                    "call model.eval() after any .train() on a submodule",
                )
        elif state.expect == "train" and kind == "batch" and not m.training and not is_frozen(m):
            trainable = [p for p in affine_params(m) if p.requires_grad]
            if running_stats(m) is not None and (trainable or not affine_params(m)) and m is not state.model:
                state.add(
                    "mode-mismatch",
                    "warning",
                    m,
                    "in eval mode inside a model in train mode: it normalises with running statistics that "
                    "never update, while the layers around it (and its own γ/β) keep training; the next "
                    "model.train() silently undoes it.",
                    f"if fixed statistics are meant: model = normlab.freeze(model, ['{name}']) (explicit, and "
                    "survives model.train()); otherwise model.train()",
                )


def check_running_stats_off(state: AuditState) -> None:
    if state.expect != "eval":
        return
    for m in state.bns:
        if running_stats(m) is None:
            state.add(
                "no-running-stats",
                "warning",
                m,
                "no running statistics (track_running_stats=False): in eval it normalises with the statistics of "
                "each eval batch, so a sample's output depends on the rest of the batch, and batches of one "
                "sample fail or are normalised against themselves.",
                "build it with track_running_stats=True and fill the statistics with normlab.recalibrate(model, "
                "loader); or, if batch independence is the point, a per-sample norm "
                "(normlab.make_norm('groupnorm', C))",
            )


def check_frozen_affine(state: AuditState) -> None:
    if state.expect != "train":
        return
    producers = _producers(state)
    for m in state.bns:
        if not m.training or is_frozen(m) or running_stats(m) is None:
            continue
        params = affine_params(m)
        if params:
            frozen = not any(p.requires_grad for p in params)
        else:
            prod = producers.get(m)
            pp = list(prod.parameters()) if prod is not None else []
            frozen = bool(pp) and not any(p.requires_grad for p in pp)
        if frozen:
            name = state.names[m]
            state.add(
                "frozen-affine-live-stats",
                "warning",
                m,
                "its parameters are frozen (requires_grad=False) but it is in train mode, so it still normalises "
                "with batch statistics and updates its running statistics at every step: the 'frozen' part "
                "keeps changing, away from the statistics its weights were trained with.",
                f"model = normlab.freeze(model, ['{name}'], affine_trainable=False) (statistics fixed even in "
                "model.train()), or call .eval() on the frozen part after every model.train()",
            )


def check_untrained(state: AuditState) -> None:
    if state.expect != "eval":
        return
    for m in state.bns:
        run = running_stats(m)
        if run is None or m in state.compared or uses_batch_stats(m):
            continue
        if batches_tracked(m) == 0 and bool((run[0] == 0).all()) and bool((run[1] == 1).all()):
            state.add(
                "untrained-running-stats",
                "error",
                m,
                "the running statistics are still their initial values (mean 0, variance 1, no batch tracked): "
                "eval normalises as if every channel had mean 0 and variance 1.",
                "train the model, or normlab.recalibrate(model, loader) on data like the eval data",
            )


def _producers(state: AuditState) -> dict[nn.Module, nn.Module]:
    out: dict[nn.Module, nn.Module] = {}
    for node in state.graph or ():
        if node.module is not None and node.data_input is not None and node.data_input.module is not None:
            out.setdefault(node.module, node.data_input.module)
    return out


def check_graph(state: AuditState) -> None:
    if state.graph is None:
        return
    seen: set[tuple] = set()
    for node in state.graph:
        evaluating = state.expect == "eval" and not state.model.training
        if node.kind == "function" and node.always_on and node.dropout and evaluating:
            key = ("dropout-always-on", node.name)
            if key not in seen:
                seen.add(key)
                state.add(
                    "dropout-always-on",
                    "error",
                    node.name,
                    f"the forward of {node.name or 'the model'} calls F.dropout(..., p={node.dropout:g}) with "
                    "training=True (F.dropout's default), so dropout stays on in eval mode.",
                    "F.dropout(x, p, training=self.training), or an nn.Dropout module",
                )
        m = node.module
        if m is None or norm_kind(m) is None:
            continue
        prod = node.data_input
        if (
            prod is not None
            and prod.module is not None
            and is_affine_map(prod.module)
            and isinstance(getattr(prod.module, "bias", None), Tensor)
            and prod.users == 1
            and removes_channel_mean(m)
            and out_features(prod.module) == num_features(m)
        ):
            key = ("bias", prod.module, m)
            if key not in seen:
                seen.add(key)
                state.add(
                    "bias-before-norm",
                    "info",
                    prod.module,
                    f"its bias is removed by {state.label(m)}, which subtracts each channel's mean right after: "
                    "the bias gets zero gradient and only costs parameters (β already shifts each channel).",
                    "bias=False on this layer",
                    related=(m,),
                )
        if norm_kind(m) == "batch":
            for d in dropouts_feeding(node):
                key = ("dropout", d.module or d.name, m)
                if key in seen:
                    continue
                seen.add(key)
                where = state.label(d.module) if d.module is not None else f"F.dropout in {d.name or 'the model'}"
                p = d.dropout
                state.add(
                    "dropout-before-bn",
                    "warning",
                    d.module if d.module is not None else d.name,
                    f"{where} (p={p:g}) feeds {state.label(m)} with no norm layer between: in training the "
                    f"dropout scales the variance of what BN sees by up to 1/(1-p) = {inv1m(p):.3g}, "
                    "so the running variance is too large for eval inputs (variance shift, Li et al. 2019).",
                    "move the dropout after the last BN (e.g. just before the classifier), or after training "
                    "run normlab.recalibrate(model, loader), which measures the statistics with dropout off",
                    related=(m,),
                    p=p,
                )


def inv1m(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1 else float("inf")
