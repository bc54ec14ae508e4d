"""What the audit records while the model runs on the batches, without changing it: every buffer swapped for a
copy (:class:`SwappedBuffers`), and per norm layer its inputs' sizes, shapes and pooled per-feature moments
(:class:`Recorder`, :class:`Calls`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normlab.audit.kinds import is_ghost, norm_kind, uses_batch_stats


class Calls:
    """Everything recorded about one norm layer's calls: batch sizes, shapes, pooled per-feature moments."""

    __slots__ = ("first", "batches", "shapes", "batch_stat_sizes", "n", "mean", "m2", "nonfinite", "features")

    def __init__(self, first: int) -> None:
        self.first = first  # the global call index of the first call (call order)
        self.batches: list[int] = []  # x.shape[0] per call
        self.shapes: list[tuple[int, ...]] = []
        self.batch_stat_sizes: list[int] = []  # x.shape[0] of calls that normalised with batch statistics
        self.n: Tensor | None = None  # (C,) float64 values per feature
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None  # sum of squared deviations from the mean
        self.nonfinite = 0  # calls whose input held NaN/inf
        self.features: int | None = None


def feature_moments(m: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """Per-feature (count, mean, sum of squared deviations) of a BN input, in float64, or None if unusable."""
    if x.dim() < 2:
        return None
    return moments_along(x, getattr(m, "_feature_dim", 1) % x.dim(), mask)


def moments_along(x: Tensor, dim: int, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """Per-feature (count, mean, sum of squared deviations) over every axis but ``dim`` (and over the positions
    where a bool ``mask`` of ``x``'s shape without ``dim`` is True), in float64; None when no value is left."""
    xf = x.detach().movedim(dim, -1)  # (..., C)
    if mask is not None and mask.dtype == torch.bool and mask.shape == xf.shape[:-1]:
        xf = xf[mask]
    xf = xf.reshape(-1, xf.shape[-1]).double()  # (M, C)
    if xf.shape[0] == 0:
        return None
    mean = xf.mean(0)
    m2 = (xf - mean).square().sum(0)
    return torch.full_like(mean, float(xf.shape[0])), mean, m2


class Recorder:
    """Forward hooks on the norm layers recording what :class:`Calls` holds."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.calls: dict[nn.Module, Calls] = {}
        self._count = 0
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in layers]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return
        rec = self.calls.get(module)
        if rec is None:
            rec = self.calls[module] = Calls(self._count)
        self._count += 1
        with torch.no_grad():
            batch = int(x.shape[0]) if x.dim() else 1
            rec.batches.append(batch)
            rec.shapes.append(tuple(x.shape))
            finite = bool(torch.isfinite(x).all())
            if not finite:
                rec.nonfinite += 1
            if norm_kind(module) != "batch":
                return
            if uses_batch_stats(module) and not is_ghost(module):
                rec.batch_stat_sizes.append(batch)
            mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
            moments = feature_moments(module, x, mask if isinstance(mask, Tensor) else None) if finite else None
            if moments is None:
                return
            n, mean, m2 = moments
            if rec.n is None or rec.n.shape != n.shape:
                rec.n, rec.mean, rec.m2 = n, mean, m2
                return
            total = rec.n + n  # Chan et al.'s parallel combination of (count, mean, M2)
            delta = mean - rec.mean
            rec.mean = rec.mean + delta * (n / total)
            rec.m2 = rec.m2 + m2 + delta.square() * (rec.n * n / total)
            rec.n = total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class SwappedBuffers:
    """Every buffer of every module replaced by a copy while the model runs; the originals put back on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[tuple[nn.Module, str, Tensor]] = []
        for m in model.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    self.saved.append((m, name, b))

    def __enter__(self) -> SwappedBuffers:
        with torch.no_grad():
            for m, name, b in self.saved:
                m._buffers[name] = b.clone()
        return self

    def __exit__(self, *exc) -> None:
        for m, name, b in self.saved:
            m._buffers[name] = b
