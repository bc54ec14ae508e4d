"""The dynamic checks: from what the norm layers received on the batches (:class:`~normlab.audit.recording.Calls`).

:func:`check_dynamic` runs them in order; each step reads the calls in call order and adds its findings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab.audit.kinds import batches_tracked, is_frozen, norm_kind, running_stats, uses_batch_stats
from normlab.audit.recording import Calls
from normlab.audit.state import AuditState

__all__ = ["check_dynamic"]

Ordered = list[tuple[nn.Module, Calls]]


def check_dynamic(state: AuditState) -> None:
    """Every check that needs the batches, on the layers in the order the forward pass called them."""
    ordered = sorted(state.calls.items(), key=lambda kv: kv[1].first)
    check_nonfinite_activations(state, ordered)
    check_single_value_groups(state, ordered)
    check_small_batch(state, ordered)
    check_running_stats_gap(state, ordered)


def check_nonfinite_activations(state: AuditState, ordered: Ordered) -> None:
    """NaN/inf inputs: reported at the first norm layer (in call order) they reach."""
    bad = [m for m, c in ordered if c.nonfinite]
    if not bad:
        return
    first = bad[0]
    state.add(
        "nonfinite-activations",
        "error",
        first,
        f"its input held NaN/inf in {state.calls[first].nonfinite} of {len(state.calls[first].batches)} "
        f"calls; it is the first norm layer (in call order) they reach, {len(bad)} norm layers in all.",
        "look at the layers before it (and at the input data); normlab's BN layers keep non-finite batches "
        "out of the running statistics",
        related=tuple(bad[1:6]),
        layers_affected=len(bad),
    )


def check_single_value_groups(state: AuditState, ordered: Ordered) -> None:
    """GroupNorm/InstanceNorm groups that hold one value per sample (normalised to 0: the output is β)."""
    for m, c in ordered:
        kind = norm_kind(m)
        if kind not in ("group", "instance") or not c.shapes:
            continue
        shape = c.shapes[0]
        if len(shape) < 2:
            continue
        per_group = math.prod(shape[2:]) if len(shape) > 2 else 1
        if kind == "group":
            per_group *= shape[1] // max(1, getattr(m, "num_groups", shape[1]))
        if per_group <= 1 and uses_batch_stats(m):
            state.add(
                "single-value-groups",
                "error",
                m,
                f"on input {tuple(shape)} each group holds {per_group} value per sample: it is normalised to 0 "
                "and the output is β, whatever the input.",
                "fewer groups (GroupNorm), or a norm over more values at this point (BatchNorm, LayerNorm over "
                "the features)",
                input_shape=list(shape),
                values_per_group=per_group,
            )


def check_small_batch(state: AuditState, ordered: Ordered) -> None:
    """BN layers normalising with the statistics of too few samples: one finding for all of them."""
    th = state.th
    small = [(m, min(c.batch_stat_sizes)) for m, c in ordered if c.batch_stat_sizes]
    small = [(m, n) for m, n in small if n < th.small_batch]
    if not small:
        return
    n = min(n for _, n in small)
    layers = [m for m, _ in small]
    state.add(
        "small-batch",
        "error" if n <= th.tiny_batch else "warning",
        "",
        f"{len(layers)} BatchNorm layer(s) ({_names_list([state.names[m] for m in layers])}) normalise "
        f"with the statistics of batches of {n} sample(s): the "
        "statistics are noisy and each sample's output depends on the few others. With BN, ResNet-50 on "
        "ImageNet goes from 23.6% error at 32 images per batch to 34.7% at 2 (GroupNorm: 24.1% at both; "
        "Wu & He 2018). Under gradient accumulation BN sees the micro-batch, not the accumulated batch.",
        "larger batches, or a norm that does not depend on the batch in place of each BN: "
        "normlab.make_norm('groupnorm', C) (norm_layer='groupnorm' for normlab's models); with "
        "micro-batches, normlab.accumulate_stats(model) at least gives the running statistics of the "
        "whole batch (each micro-batch is still normalised on its own)",
        related=tuple(layers),
        batch_size=n,
        layers=len(layers),
    )


@dataclass
class _Gap:
    """Running statistics against the data of one layer: per channel SMD and variance ratio, and their summaries."""

    smd: Tensor  # (C,) (mean_data - running_mean) / sqrt(running_var + eps)
    ratio: Tensor  # (C,) (var_data + eps) / (running_var + eps)
    samples: int
    initial: bool  # the running statistics are still mean 0, variance 1, nothing tracked

    @property
    def smd_rms(self) -> float:
        return float(self.smd.square().mean().sqrt())

    @property
    def log_ratio_rms(self) -> float:
        return float(self.ratio.log().square().mean().sqrt())


def check_running_stats_gap(state: AuditState, ordered: Ordered) -> None:
    """Running statistics far from the statistics of the layers' inputs (train/test gap), with the likely cause."""
    th = state.th
    few, live, earlier = [], 0, []
    for m, c in ordered:
        if norm_kind(m) != "batch" or c.n is None or running_stats(m) is None:
            continue
        if state.expect == "train" and uses_batch_stats(m):
            live += 1  # training normalises with batch statistics; its running ones are not used yet
            continue
        gap = _measure_gap(m, c)
        if gap is None:
            continue
        if gap.samples < th.min_samples:
            few.append(state.names[m])
            continue
        state.compared.add(m)
        if gap.smd_rms <= th.gap_smd and gap.log_ratio_rms <= th.gap_log_var:
            continue
        _add_gap(state, m, gap, earlier)
        earlier.append(state.names[m])
    if few:
        state.notes.append(
            f"running statistics not compared with the data for {len(few)} BN layer(s) ({', '.join(few[:4])}"
            f"{', ...' if len(few) > 4 else ''}): fewer than {th.min_samples} samples"
        )
    if live:
        state.notes.append(
            f"audited for training: the running statistics of {live} train-mode BN layer(s) were not compared "
            "with the data (training does not use them); audit the model in eval mode after training for that"
        )


def _measure_gap(m: nn.Module, c: Calls) -> _Gap | None:
    """The gap of one layer, or None when its statistics are broken (nonfinite-buffers says so) or of another size."""
    rm, rv = (t.detach().double().flatten() for t in running_stats(m))
    if not (torch.isfinite(rm).all() and torch.isfinite(rv).all()) or bool((rv < 0).any()):
        return None
    if rm.numel() != c.mean.numel():
        return None
    eps = float(getattr(m, "eps", 1e-5) or 0.0)
    var = c.m2 / (c.n - 1).clamp(min=1)  # unbiased, as the running variance stores it
    return _Gap(
        smd=(c.mean - rm) / (rv + eps).sqrt(),
        ratio=(var + eps) / (rv + eps),
        samples=sum(c.batches),
        initial=batches_tracked(m) == 0 and bool((rm == 0).all()) and bool((rv == 1).all()),
    )


def _add_gap(state: AuditState, m: nn.Module, gap: _Gap, earlier: list[str]) -> None:
    th = state.th
    smd, ratio = gap.smd, gap.ratio
    smd_rms, lr_rms = gap.smd_rms, gap.log_ratio_rms
    worst = int(smd.abs().argmax())
    frozen = is_frozen(m) or (state.expect == "train" and not m.training)
    numbers = (
        f"on these {gap.samples} samples the eval-normalised output is off by {smd_rms:.2f} standard deviations "
        f"in its mean (rms over {smd.numel()} channels; channel {worst}: {float(smd[worst]):+.2f}) and its "
        f"variance is {float(ratio.quantile(0.5)):.3g}x what it should be (median; range "
        f"{float(ratio.min()):.3g}-{float(ratio.max()):.3g})."
    )
    cause, fix = _gap_cause(state.names[m], gap.initial, frozen, earlier)
    state.add(
        "running-stats-mismatch",
        "error" if smd_rms > th.gap_smd_error or lr_rms > th.gap_log_var_error else "warning",
        m,
        "running statistics do not describe the data: " + numbers + cause,
        fix,
        smd_rms=smd_rms,
        smd_max=float(smd.abs().max()),
        worst_channel=worst,
        log_var_ratio_rms=lr_rms,
        var_ratio_median=float(ratio.quantile(0.5)),
        var_ratio_min=float(ratio.min()),
        var_ratio_max=float(ratio.max()),
        samples=gap.samples,
        batches=state.batches,
        frozen=frozen,
    )


def _gap_cause(name: str, initial: bool, frozen: bool, earlier: list[str]) -> tuple[str, str]:
    """(the likely cause, the fix) of a gap: never updated, frozen, inherited from an earlier layer, or other data."""
    if initial:
        return (
            " The running statistics are still their initial values (mean 0, variance 1): never updated.",
            "train the model, or normlab.recalibrate(model, loader) on data like this",
        )
    if frozen:
        return (
            " These statistics are frozen (the layer keeps its running statistics while the model trains): "
            "fine-tuning changed the layers before it, or the data, so they no longer describe what it sees.",
            f"normlab.recalibrate(model, loader, modules=['{name}']) on the fine-tuning data (frozen layers "
            "are recalibrated only when listed), or normlab.unfreeze",
        )
    if earlier:
        return (
            f" Layer {earlier[0]}, called earlier in the forward pass, is off too, and this gap may be "
            "inherited from it (its eval output is what this layer sees).",
            "normlab.recalibrate(model, loader) on data like this (it fixes all the layers together)",
        )
    return (
        " Train/test inconsistency: the running statistics were gathered on other data or by other "
        "weights (a new domain, weights changed after the last statistics update, a large momentum, "
        "dropout before BN).",
        "normlab.recalibrate(model, loader) on data like this (precise BN statistics)",
    )


def _names_list(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")
