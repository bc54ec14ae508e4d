"""Saturating activations and per-layer gradient norms (the classical explanation of BN, CLAIMS.md C14).

Ioffe & Szegedy 2015 (§1) argue that normalising pre-activations keeps
sigmoid/tanh units out of their flat regions, where the derivative vanishes.

:func:`saturation` hooks every ``nn.Sigmoid`` and ``nn.Tanh`` (or the
activation modules chosen) and reads their input ``z`` (the pre-activation). A
value is *saturated* when the derivative, relative to its maximum at ``z = 0``,
is below ``threshold``:

* sigmoid: ``s(z)(1 - s(z)) / (1/4) < threshold``; for ``threshold = 0.05``
  that is ``|z| > 4.36`` (``s(z) < 0.0126`` or ``> 0.9874``);
* tanh: ``1 - tanh(z)^2 < threshold``; for ``threshold = 0.05``, ``|z| > 2.18``.

:func:`gradient_norms` is ``|grad_{theta_l} L|_2`` for each layer's own
parameters (weight and bias together).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normlab.lab.probes._common import Batch, Evaluator, LossSpec, norm, objective, probing, select_layers
from normlab.lab.probes.activations import _first_tensor, _run_batches

__all__ = ["saturation", "SaturationStats", "relative_derivative", "gradient_norms"]


def relative_derivative(kind: str, z: Tensor) -> Tensor:
    """``phi'(z) / phi'(0)`` for ``kind`` in {"sigmoid", "tanh"}, elementwise, in float64."""
    z = z.detach().to(torch.float64)
    if kind == "sigmoid":
        s = torch.sigmoid(z)
        return 4.0 * s * (1.0 - s)
    if kind == "tanh":
        return 1.0 - torch.tanh(z) ** 2
    raise ValueError(f"unknown activation kind {kind!r}; known: sigmoid, tanh")


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    return None


@dataclass(frozen=True)
class SaturationStats:
    """One activation layer: ``fraction`` = saturated values / all values seen (``count`` of ``total``);
    ``mean_derivative`` = mean of ``phi'(z) / phi'(0)``; ``kind`` "sigmoid" or "tanh"."""

    name: str
    kind: str
    fraction: float
    count: int
    total: int
    mean_derivative: float

    def as_dict(self) -> dict:
        return asdict(self)


def saturation(
    model: nn.Module,
    batches: Batch | Iterable[Batch],
    *,
    mode: str,
    threshold: float = 0.05,
    layers: Iterable[str | nn.Module] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, SaturationStats]:
    """Fraction of saturated pre-activations per sigmoid/tanh module over ``batches`` (see the module docstring)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold is relative to the derivative's maximum and must be in (0, 1), got {threshold}")
    chosen = select_layers(model, layers, default=lambda m: _kind(m) is not None, what="nn.Sigmoid/nn.Tanh")
    acc: dict[str, list] = {}
    hooks = []
    for name, m in chosen:
        kind = _kind(m)
        if kind is None:
            raise TypeError(f"{name}: saturation is defined here for nn.Sigmoid and nn.Tanh, not {type(m).__name__}")

        def hook(mod, args, name=name, kind=kind):
            r = relative_derivative(kind, _first_tensor(args, name))
            a = acc.setdefault(name, [kind, 0, 0, 0.0])
            a[1] += int((r < threshold).sum())
            a[2] += r.numel()
            a[3] += float(r.sum())

        hooks.append((m, "pre", hook))
    _run_batches(model, batches, mode, forward, hooks)
    return {
        n: SaturationStats(n, k, c / t, c, t, s / t) for n, (k, c, t, s) in ((n, acc[n]) for n, _ in chosen if n in acc)
    }


def gradient_norms(
    model: nn.Module,
    loss: LossSpec,
    batch: Batch | None = None,
    *,
    mode: str,
    layers: Iterable[str | nn.Module] | None = None,
) -> dict[str, float]:
    """``|grad L|_2`` over each layer's own trainable parameters (default layers: every Linear/Conv), by name."""
    fn = objective(model, loss, batch)
    chosen = select_layers(model, layers)
    groups = {}
    for lname, layer in chosen:
        own = [f"{lname}.{p}" if lname else p for p, t in layer.named_parameters(recurse=False) if t.requires_grad]
        if not own:
            raise ValueError(f"layer {lname!r} has no trainable parameters of its own")
        groups[lname] = own
    names = [n for own in groups.values() for n in own]
    with probing(model, mode):
        _, grads, _ = Evaluator(model, fn).gradient(names)
    g = dict(zip(names, grads))
    return {lname: norm([g[n] for n in own]) for lname, own in groups.items()}
