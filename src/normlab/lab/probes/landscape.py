"""The loss landscape around a point: along the gradient, and on random filter-normalised slices.

* :func:`gradient_landscape` — Santurkar et al. 2018 ("How Does Batch
  Normalization Help Optimization?", §3.1 and Fig. 4): at the current
  parameters ``w`` with gradient ``g = grad L(w)`` on one batch, for each step
  size ``eta`` it measures the loss ``L(w - eta g)`` ("loss landscape"), the
  gradient change ``|grad L(w) - grad L(w - eta g)|`` ("gradient
  predictiveness") and the effective beta-smoothness
  ``max_eta |grad L(w) - grad L(w - eta g)| / |eta g|``.
* :func:`random_direction`, :func:`loss_slice_1d`, :func:`loss_slice_2d` —
  Li et al. 2018 ("Visualizing the Loss Landscape of Neural Nets", §4):
  ``L(w + a d1)`` and ``L(w + a d1 + b d2)`` along random Gaussian directions
  rescaled filter by filter to the norms of the weights' filters.

Every loss and gradient is evaluated on the same batch, in the mode asked for,
with the same RNG state (so dropout masks and noise are the same at every
point), and with the buffers as found (a train-mode BN updates only clones of
its running statistics). The model's parameters are never written: perturbed
values are passed to a stateless call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from normlab.lab.probes._common import Batch, Evaluator, LossSpec, dot, norm, objective, probing, select_params

__all__ = [
    "gradient_landscape",
    "GradientLandscape",
    "random_direction",
    "loss_slice_1d",
    "loss_slice_2d",
    "LossSlice",
]


@dataclass(frozen=True)
class GradientLandscape:
    """Result of :func:`gradient_landscape` (all arrays indexed like ``etas``).

    ``loss[i] = L(w - etas[i] g)``; ``grad_change[i] = |g - grad L(w - etas[i] g)|``;
    ``beta[i] = grad_change[i] / (etas[i] |g|)``; ``beta_eff = max(beta)``
    (Santurkar et al.'s effective beta-smoothness); ``curvature[i] = g . (g -
    grad L(w - etas[i] g)) / (etas[i] |g|^2)``, the finite-difference curvature
    along ``g`` (for a quadratic ``1/2 w^T A w`` it is the Rayleigh quotient
    ``g^T A g / g^T g`` at every eta, while ``beta`` is ``|A g| / |g|``).
    ``loss_range = max(loss) - min(loss)`` over the etas and ``L(w)``.
    """

    etas: np.ndarray
    loss: np.ndarray
    grad_change: np.ndarray
    beta: np.ndarray
    curvature: np.ndarray
    loss0: float
    grad_norm: float
    params: list[str] = field(repr=False)

    @property
    def beta_eff(self) -> float:
        return float(np.max(self.beta))

    @property
    def loss_range(self) -> float:
        vals = np.append(self.loss, self.loss0)
        return float(np.max(vals) - np.min(vals))

    def as_dict(self) -> dict:
        return {
            "etas": self.etas.tolist(),
            "loss": self.loss.tolist(),
            "grad_change": self.grad_change.tolist(),
            "beta": self.beta.tolist(),
            "curvature": self.curvature.tolist(),
            "loss0": self.loss0,
            "grad_norm": self.grad_norm,
            "beta_eff": self.beta_eff,
            "loss_range": self.loss_range,
            "params": list(self.params),
        }


@dataclass(frozen=True)
class LossSlice:
    """Result of :func:`loss_slice_1d` (``betas is None``, ``loss`` shaped (len(alphas),)) or
    :func:`loss_slice_2d` (``loss[i, j] = L(w + alphas[i] d1 + betas[j] d2)``, shaped (len(alphas), len(betas)))."""

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    loss0: float
    params: list[str] = field(repr=False)

    def as_dict(self) -> dict:
        return {
            "alphas": self.alphas.tolist(),
            "betas": None if self.betas is None else self.betas.tolist(),
            "loss": self.loss.tolist(),
            "loss0": self.loss0,
            "params": list(self.params),
        }


def _etas(etas: Sequence[float] | Tensor | np.ndarray) -> np.ndarray:
    arr = np.asarray(etas.tolist() if isinstance(etas, Tensor) else etas, dtype=np.float64).reshape(-1)
    if arr.size == 0 or not np.all(arr > 0) or not np.all(np.isfinite(arr)):
        raise ValueError(f"etas must be a non-empty sequence of positive finite step sizes, got {arr.tolist()}")
    return arr


def gradient_landscape(
    model: nn.Module,
    loss: LossSpec,
    batch: Batch | None = None,
    *,
    mode: str,
    etas: Sequence[float] | Tensor | np.ndarray,
    params: Iterable[str | Tensor] | None = None,
) -> GradientLandscape:
    """Loss, gradient change and effective beta-smoothness along the gradient (Santurkar et al. 2018).

    ``g`` is the gradient over ``params`` (default: all trainable parameters);
    only those parameters move, to ``w - eta g``. Losses and gradients are
    float64 summaries of the model's own dtype computations. A non-finite loss
    at some eta is recorded as such (``nan``/``inf``), not raised.
    """
    eta_arr = _etas(etas)
    fn = objective(model, loss, batch)
    names = select_params(model, params)
    with probing(model, mode):
        ev = Evaluator(model, fn)
        loss0, g, _ = ev.gradient(names)
        g = [t.detach() for t in g]
        gn = norm(g)
        base = {n: ev.params[n].detach() for n in names}
        losses, changes, betas, curvs = [], [], [], []
        for eta in eta_arr:
            moved = {n: base[n] - eta * gi for n, gi in zip(names, g)}  # w - eta g, new tensors
            l_eta, g_eta, _ = ev.gradient(names, moved)
            diff = [a - b.detach() for a, b in zip(g, g_eta)]  # grad L(w) - grad L(w - eta g)
            change = norm(diff)
            losses.append(float(l_eta.detach()))
            changes.append(change)
            betas.append(change / (eta * gn) if gn > 0 else float("nan"))
            curvs.append(dot(g, diff) / (eta * gn * gn) if gn > 0 else float("nan"))
    return GradientLandscape(
        eta_arr, np.array(losses), np.array(changes), np.array(betas), np.array(curvs), float(loss0.detach()), gn, names
    )


def random_direction(
    model: nn.Module,
    *,
    params: Iterable[str | Tensor] | None = None,
    seed: int = 0,
    ignore_1d: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """A filter-normalised random direction (Li et al. 2018, §4), one tensor per parameter name.

    For a parameter ``w`` with ``w.dim() > 1`` (Linear weight (out, in), conv
    weight (out, in, *k)): draw ``d ~ N(0, I)`` shaped like ``w``, then for every
    filter ``i`` (slice along dim 0: one output unit or output channel) rescale
    ``d[i] <- d[i] * |w[i]| / |d[i]|`` (Frobenius norms). For 1-D parameters
    (biases, norm layers' scale and shift): zeros when ``ignore_1d`` (Li et
    al.'s default ``ignore='biasbn'``: they stay fixed), else ``d = w`` (their
    code's alternative). Drawn on the CPU from a generator seeded with ``seed``
    (or the given ``generator``), so the direction does not depend on the device.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    out = {}
    for n in select_params(model, params):
        w = named[n].detach()
        if w.dim() <= 1:
            out[n] = torch.zeros_like(w) if ignore_1d else w.clone()
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)  # (out, in, *k)
        w64 = w.to(device="cpu", dtype=torch.float64)
        dn = d.flatten(1).norm(dim=1)  # (out,)
        wn = w64.flatten(1).norm(dim=1)  # (out,)
        scale = (wn / (dn + 1e-10)).view(-1, *([1] * (w.dim() - 1)))
        out[n] = (d * scale).to(device=w.device, dtype=w.dtype)
    return out


def _check_direction(d: dict[str, Tensor], ev: Evaluator, what: str) -> list[str]:
    for n, t in d.items():
        if n not in ev.params:
            raise KeyError(f"{what} has an entry {n!r} that is not a parameter of the model")
        if t.shape != ev.params[n].shape:
            raise ValueError(f"{what}[{n!r}] has shape {tuple(t.shape)}, the parameter {tuple(ev.params[n].shape)}")
    return list(d)


def _grid(values, name: str) -> np.ndarray:
    arr = np.asarray(values.tolist() if isinstance(values, Tensor) else values, dtype=np.float64).reshape(-1)
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers")
    return arr


def _slice(model, loss, batch, mode, alphas, betas, directions, params, seed, ignore_1d) -> LossSlice:
    fn = objective(model, loss, batch)
    a = _grid(alphas, "alphas")
    b = None if betas is None else _grid(betas, "betas")
    ndir = 1 if b is None else 2
    if directions is None:
        gen = torch.Generator().manual_seed(seed)
        directions = [random_direction(model, params=params, generator=gen, ignore_1d=ignore_1d) for _ in range(ndir)]
    if len(directions) != ndir:
        raise ValueError(f"expected {ndir} direction(s), got {len(directions)}")
    with probing(model, mode), torch.no_grad():
        ev = Evaluator(model, fn)
        names = sorted({n for d in directions for n in _check_direction(d, ev, "direction")}, key=list(ev.params).index)
        base = {n: ev.params[n].detach() for n in names}
        dirs = [{n: d.get(n, torch.zeros_like(base[n])).to(base[n]) for n in names} for d in directions]
        loss0 = float(ev.loss())
        grid = np.empty((a.size, 1 if b is None else b.size))
        for i, ai in enumerate(a):
            for j, bj in enumerate([0.0] if b is None else b):
                vals = {n: base[n] + ai * dirs[0][n] + (bj * dirs[1][n] if b is not None else 0) for n in names}
                grid[i, j] = float(ev.loss(vals))
    return LossSlice(a, b, grid[:, 0] if b is None else grid, loss0, names)


def loss_slice_1d(
    model: nn.Module,
    loss: LossSpec,
    batch: Batch | None = None,
    *,
    mode: str,
    alphas: Sequence[float] | Tensor | np.ndarray,
    direction: dict[str, Tensor] | None = None,
    params: Iterable[str | Tensor] | None = None,
    seed: int = 0,
    ignore_1d: bool = True,
) -> LossSlice:
    """``L(w + alpha d)`` for each alpha; ``d`` a filter-normalised random direction (seeded) unless given (Li 2018)"""
    dirs = None if direction is None else [direction]
    return _slice(model, loss, batch, mode, alphas, None, dirs, params, seed, ignore_1d)


def loss_slice_2d(
    model: nn.Module,
    loss: LossSpec,
    batch: Batch | None = None,
    *,
    mode: str,
    alphas: Sequence[float] | Tensor | np.ndarray,
    betas: Sequence[float] | Tensor | np.ndarray,
    directions: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None,
    params: Iterable[str | Tensor] | None = None,
    seed: int = 0,
    ignore_1d: bool = True,
) -> LossSlice:
    """``L(w + alpha d1 + beta d2)`` on the grid alphas x betas; ``d1``, ``d2`` two independent
    filter-normalised random directions drawn in turn from one generator seeded with ``seed`` (Li et al. 2018)."""
    dirs = None if directions is None else list(directions)
    return _slice(model, loss, batch, mode, alphas, betas, dirs, params, seed, ignore_1d)
