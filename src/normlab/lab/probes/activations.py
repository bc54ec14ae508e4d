"""Statistics of what flows through a network, collected by forward hooks.

Layer inputs (:func:`layer_input_stats`)
    For each chosen layer (default: every ``nn.Linear`` and ``nn.Conv*d``) the
    input ``x`` is read as rows of features: a Linear input (..., D) as
    (rows, D) with the features last; a conv input (N, C, *spatial) as
    (N * prod(spatial), C), channels as features over batch x space (any
    other chosen module: channels on axis 1, or ``feature_dim=``). Over all
    rows of all batches (population statistics, float64, merged exactly across
    batches by Chan et al.'s pairwise update) it gives

    * ``mean = E[x]`` (D,) and ``var`` (D,), the biased per-feature variance;
    * ``covariance C = E[(x - E x)(x - E x)^T]`` (D, D);
    * the second-moment matrix ``M(s) = E[(x - s)(x - s)^T] = C + (E x - s)(E x - s)^T``
      for a shift ``s`` (D,), and its entrywise L1 norm ``|M(s)|_1 = sum_ij |M(s)_ij|``:
      ``second_moment_l1 = |M(0)|_1 = |E[x x^T]|_1`` (no centring) and
      ``covariance_l1 = |M(E x)|_1 = |C|_1`` (centring), with the Frobenius and
      spectral norms of the same two matrices beside them;
    * :meth:`LayerInputStats.optimal_shift`, the shift minimising ``|M(s)|_1``,
      found numerically.

    The claim under test (CLAIMS.md C5, after Santurkar et al. 2018 §4 where
    ``|E[x x^T]|`` bounds the gradient's Lipschitz constant for a layer's
    weights) is that centring, ``s = E[x]``, minimises this term. For the
    Frobenius and spectral norms and the trace that is a theorem (``C`` is
    positive semi-definite, so ``M(s) >= C`` in the Loewner order; the
    Frobenius norm and trace are *strictly* larger for ``s != E x``). For the
    entrywise L1 norm it is not: ``|C + d d^T|_1 = sum_ij |C_ij + d_i d_j|`` with
    ``d = E x - s`` can fall *below* ``|C|_1`` when features are negatively
    correlated (three features with pairwise correlation -1/2 and
    ``d = (1,1,1)/sqrt(2)`` give 4.5 < 6), and the minimiser is not unique when
    ``C`` has non-zero off-diagonal entries. ``optimal_shift`` therefore reports
    the objective gap ``|C|_1 - min_s |M(s)|_1`` (0 when centring is optimal)
    beside the distance of the minimiser found from ``E[x]``; for a diagonal
    ``C`` the minimiser is unique and equals ``E[x]``
    (``|M(s)|_1 = tr C + (sum_i |d_i|)^2``).

Residual blocks (:func:`residual_stats`)
    A residual block is any module with a ``branch`` sub-module computing
    ``out = skip(x) + alpha * branch(x)`` (docs/ARCHITECTURE.md). Per block, in
    the order blocks run, with channels on ``feature_dim`` (1 for (N, C, *),
    -1 for (N, S, D)) and statistics per channel over every other axis:

    * ``skip_variance``: average channel variance of the block *input* ``x``
      (the skip path; De & Smith 2020, §3 and Fig. 2: grows ~ linearly with
      depth with BN);
    * ``branch_variance``: average channel variance of ``branch(x)`` (stays
      ~ 1 with BN at the end of the branch), before any ``alpha``;
    * ``skip_output``: if the block has a ``skip`` sub-module (e.g. a 1x1
      projection where the shape changes), the statistics of ``skip(x)``;
    * ``output_sq_mean`` / ``output_variance``: average squared channel mean
      and average channel variance of the block output, the two curves of
      Brock et al. 2021's signal propagation plots ("Characterizing signal
      propagation to close the performance gap in unnormalized ResNets", §3);
      the same for the input and the branch are kept too.

``average channel variance`` is ``mean_c Var[x_c]`` and ``average squared channel
mean`` is ``mean_c (E[x_c])^2`` with ``E``/``Var`` (biased) over the batch and
every spatial or sequence position (padded positions included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab.lab.probes._common import (
    Batch,
    Evaluator,
    forward_fn,
    iter_batches,
    model_device,
    probing,
    select_layers,
)

__all__ = [
    "layer_input_stats",
    "LayerInputStats",
    "ShiftOptimum",
    "shift_objective",
    "minimize_shift_objective",
    "residual_stats",
    "find_blocks",
    "blocks_as_arrays",
    "BlockStats",
    "ChannelStats",
    "input_moments",
    "distribution_shift",
]


# --------------------------------------------------------------------------- accumulators


class _Moments:
    """Exact population mean and (co)variance of rows, merged batch by batch (Chan, Golub & LeVeque 1979).

    ``add(rows)`` with rows (n, D); keeps ``n``, ``mean`` (D,), and either the
    centred sum of outer products (D, D) or only its diagonal (D,), in float64.
    """

    def __init__(self, full: bool) -> None:
        self.full = full
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().to(torch.float64)  # (n, D)
        nb = rows.shape[0]
        if nb == 0:
            return
        mb = rows.mean(0)  # (D,)
        xc = rows - mb
        m2b = xc.T @ xc if self.full else (xc * xc).sum(0)  # (D, D) or (D,)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        if mb.shape != self.mean.shape:
            raise ValueError(f"the number of features changed between calls: {self.mean.shape[0]} then {mb.shape[0]}")
        n = self.n + nb
        delta = mb - self.mean  # (D,)
        corr = torch.outer(delta, delta) if self.full else delta * delta
        self.m2 = self.m2 + m2b + corr * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n

    def var(self) -> Tensor:
        return (self.m2.diagonal() if self.full else self.m2) / self.n

    def cov(self) -> Tensor:
        return self.m2 / self.n


def _rows(x: Tensor, feature_dim: int) -> Tensor:
    """(…, C at feature_dim, …) -> (rows, C)."""
    if x.dim() < 2:
        raise ValueError(f"expected an input with a batch axis and a feature axis, got shape {tuple(x.shape)}")
    return x.movedim(feature_dim, -1).reshape(-1, x.shape[feature_dim])


def _layer_feature_dim(module: nn.Module) -> int:
    """``nn.Linear`` (and ``nn.LazyLinear``) and ``nn.Bilinear`` read features last; every other module on axis 1."""
    return -1 if isinstance(module, (nn.Linear, nn.Bilinear)) else 1


def _first_tensor(args: tuple, who: str) -> Tensor:
    if not args or not isinstance(args[0], Tensor):
        raise TypeError(f"{who}: expected the first positional input to be a tensor")
    return args[0]


def _run_batches(model, batches, mode, forward, hooks: list[tuple[nn.Module, str, Callable]]) -> None:
    """Run every batch through ``model`` under ``no_grad`` with ``hooks`` attached, leaving the model as found."""
    run = forward_fn(forward, model_device(model))
    current: list[Any] = [None]
    with probing(model, mode), torch.no_grad():
        ev = Evaluator(model, lambda: run(model, current[0]))
        handles = []
        try:
            for module, kind, fn in hooks:
                reg = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
                handles.append(reg(fn))
            for b in iter_batches(batches):
                current[0] = b
                ev()
        finally:
            for h in handles:
                h.remove()


# --------------------------------------------------------------------------- layer inputs


def shift_objective(cov: Tensor, mean: Tensor, shift: Tensor) -> float:
    """``|E[(x - s)(x - s)^T]|_1 = sum_ij |C_ij + d_i d_j|``, ``d = E[x] - s``; cov (D, D), mean and shift (D,)."""
    d = (mean - shift).to(torch.float64)
    return float((cov.to(torch.float64) + torch.outer(d, d)).abs().sum())


@dataclass(frozen=True)
class ShiftOptimum:
    """The numerically best shift ``s*`` for ``|E[(x - s)(x - s)^T]|_1``.

    ``objective = |M(s*)|_1``; ``at_mean = |C|_1`` (centring); ``at_zero =
    |E[x x^T]|_1`` (no shift); ``gap = at_mean - objective`` (>= 0 up to the
    optimiser's accuracy; ~0 means centring attains the minimum);
    ``distance = |s* - E[x]|_2`` and ``relative_distance`` = that over
    ``|E[x]|_2``. When ``C`` has non-zero off-diagonal entries the minimiser
    need not be unique, so judge centring by ``gap``, not by ``distance``.
    """

    shift: Tensor
    objective: float
    at_mean: float
    at_zero: float
    gap: float
    distance: float
    relative_distance: float

    def as_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}


def minimize_shift_objective(
    cov: Tensor, mean: Tensor, *, restarts: int = 2, seed: int = 0, max_iter: int = 100
) -> ShiftOptimum:
    """Minimise ``f(s) = sum_ij |C_ij + d_i d_j|``, ``d = E[x] - s``, over ``s`` (non-smooth, non-convex).

    Method: L-BFGS (strong Wolfe line search) on the smoothed objective
    ``sum_ij sqrt((C_ij + d_i d_j)^2 + eps^2)`` with ``eps`` lowered in stages
    ``0.1 m, 1e-3 m, 1e-5 m, 1e-7 m`` (``m`` the mean of ``|C_ij|``), from the start
    ``s = 0`` (``d = E x``), from ``s`` just off ``E[x]`` (``d = 0`` is a
    stationary point of the smoothed objective, so it is perturbed by ``1e-3 sqrt(m)``),
    and from ``restarts`` random starts ``d ~ N(0, diag C)`` (seeded). The end
    point with the smallest exact ``f`` wins; ``E[x]`` itself is *not* a
    candidate, so ``distance`` measures where the optimiser went, not where it
    started. A local method on a non-convex objective: ``gap`` is a lower bound
    on how much better than centring one can do.
    """
    cov = cov.detach().to(device="cpu", dtype=torch.float64)  # (D, D)
    mu = mean.detach().to(device="cpu", dtype=torch.float64)  # (D,)
    dim = mu.shape[0]
    gen = torch.Generator().manual_seed(seed)
    scale = float(cov.abs().mean()) or 1.0
    exact = lambda d: float((cov + torch.outer(d, d)).abs().sum())  # noqa: E731
    starts = [mu.clone(), 1e-3 * scale**0.5 * torch.randn(dim, generator=gen, dtype=torch.float64)]
    sd = cov.diagonal().clamp(min=0).sqrt()
    starts += [sd * torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(restarts)]
    best_d, best_f = None, float("inf")
    for d0 in starts:
        d = d0.clone().requires_grad_(True)
        for eps in (1e-1, 1e-3, 1e-5, 1e-7):
            e2 = (eps * scale) ** 2
            opt = torch.optim.LBFGS(
                [d],
                lr=1,
                max_iter=max_iter,
                tolerance_grad=1e-14,
                tolerance_change=1e-16,
                history_size=20,
                line_search_fn="strong_wolfe",
            )

            def closure(opt=opt, d=d, e2=e2):  # bound now: LBFGS calls it within this iteration
                opt.zero_grad()
                f = ((cov + torch.outer(d, d)) ** 2 + e2).sqrt().sum()
                f.backward()
                return f

            with torch.enable_grad():
                opt.step(closure)
        f = exact(d.detach())
        if f < best_f:
            best_d, best_f = d.detach().clone(), f
    shift = mu - best_d
    at_mean, at_zero = float(cov.abs().sum()), exact(mu)
    dist = float(best_d.norm())
    mn = float(mu.norm())
    return ShiftOptimum(shift, best_f, at_mean, at_zero, at_mean - best_f, dist, dist / mn if mn > 0 else float("inf"))


@dataclass(frozen=True)
class LayerInputStats:
    """Population statistics of one layer's input features (see the module docstring for the exact definitions).

    ``mean`` (D,), ``var`` (D,) and ``covariance`` (D, D, or ``None`` when not
    collected) are float64 CPU tensors over ``count`` rows.
    """

    name: str
    kind: str
    num_features: int
    count: int
    mean: Tensor = field(repr=False)
    var: Tensor = field(repr=False)
    covariance: Tensor | None = field(default=None, repr=False)

    def _cov(self) -> Tensor:
        if self.covariance is None:
            raise ValueError(f"{self.name}: the covariance was not collected (covariance=False)")
        return self.covariance

    def second_moment(self, shift: Tensor | None = None) -> Tensor:
        """``E[(x - s)(x - s)^T] = C + (E x - s)(E x - s)^T`` (D, D); ``shift=None`` is ``s = 0``, i.e. ``E[x x^T]``."""
        d = self.mean if shift is None else self.mean - shift.to(self.mean)
        return self._cov() + torch.outer(d, d)

    @property
    def second_moment_l1(self) -> float:
        """``|E[x x^T]|_1``, entrywise (no centring)."""
        return float(self.second_moment().abs().sum())

    @property
    def covariance_l1(self) -> float:
        """``|E[(x - E x)(x - E x)^T]|_1``, entrywise (with centring)."""
        return float(self._cov().abs().sum())

    @property
    def second_moment_fro(self) -> float:
        return float(torch.linalg.matrix_norm(self.second_moment(), "fro"))

    @property
    def covariance_fro(self) -> float:
        return float(torch.linalg.matrix_norm(self._cov(), "fro"))

    @property
    def second_moment_spectral(self) -> float:
        return float(torch.linalg.eigvalsh(self.second_moment())[-1])

    @property
    def covariance_spectral(self) -> float:
        return float(torch.linalg.eigvalsh(self._cov())[-1])

    def shift_objective(self, shift: Tensor) -> float:
        """``|E[(x - s)(x - s)^T]|_1`` for the shift ``s`` (D,)."""
        return shift_objective(self._cov(), self.mean, shift)

    def optimal_shift(self, **kw) -> ShiftOptimum:
        """The shift minimising ``|E[(x - s)(x - s)^T]|_1``: :func:`minimize_shift_objective` on these moments."""
        return minimize_shift_objective(self._cov(), self.mean, **kw)

    def as_dict(self, *, with_shift: bool = False) -> dict:
        out = {
            "name": self.name,
            "kind": self.kind,
            "num_features": self.num_features,
            "count": self.count,
            "mean": self.mean.tolist(),
            "var": self.var.tolist(),
        }
        if self.covariance is not None:
            out.update(
                second_moment_l1=self.second_moment_l1,
                covariance_l1=self.covariance_l1,
                second_moment_fro=self.second_moment_fro,
                covariance_fro=self.covariance_fro,
                second_moment_spectral=self.second_moment_spectral,
                covariance_spectral=self.covariance_spectral,
            )
            if with_shift:
                out["optimal_shift"] = self.optimal_shift().as_dict()
        return out


def layer_input_stats(
    model: nn.Module,
    batches: Batch | Iterable[Batch],
    *,
    mode: str,
    layers: Iterable[str | nn.Module] | None = None,
    covariance: bool = True,
    max_features: int = 4096,
    feature_dim: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, LayerInputStats]:
    """Per-layer input statistics over ``batches``, keyed by module name (in ``named_modules`` order).

    The feature axis of a layer's input is the last one for ``nn.Linear``
    (and ``nn.Bilinear``) and axis 1 (channels) for every other layer
    (convolutions, activations, norms, ...), unless ``feature_dim`` is given,
    which then applies to every chosen layer (e.g. ``-1`` for a sequence
    model's (N, S, D) activations).

    ``batches``: an input tensor, or an iterable of batches (``x``, ``(x, y)``
    or ``(x, y, mask)``; wrap a single pair in a list). ``forward(model,
    batch)`` overrides how a batch is run (default ``model(x)`` or
    ``model(x, mask=mask)``). ``covariance=False`` keeps only mean and variance
    (no D x D matrix); layers with more than ``max_features`` input features
    raise unless ``covariance=False``. Each call of a layer adds its rows.
    """
    chosen = select_layers(model, layers)
    acc: dict[str, _Moments] = {}
    kinds: dict[str, str] = {}

    def make_hook(name: str, module: nn.Module):
        fdim = _layer_feature_dim(module) if feature_dim is None else feature_dim
        if isinstance(module, nn.modules.conv._ConvNd):
            kinds[name] = "conv"
        else:
            kinds[name] = "linear" if isinstance(module, nn.Linear) else type(module).__name__

        def hook(mod, args):
            x = _first_tensor(args, name or "model")
            rows = _rows(x, fdim % max(x.dim(), 1))  # (rows, D)
            if covariance and rows.shape[1] > max_features:
                raise ValueError(
                    f"{name}: {rows.shape[1]} input features would need a {rows.shape[1]}^2 covariance; "
                    f"raise max_features or pass covariance=False"
                )
            acc.setdefault(name, _Moments(covariance)).add(rows)

        return hook

    _run_batches(model, batches, mode, forward, [(m, "pre", make_hook(n, m)) for n, m in chosen])
    out = {}
    for name, _ in chosen:
        if name not in acc:
            continue  # the layer did not run on these batches
        a = acc[name]
        out[name] = LayerInputStats(
            name, kinds[name], a.mean.shape[0], a.n, a.mean.cpu(), a.var().cpu(), a.cov().cpu() if covariance else None
        )
    return out


def input_moments(
    model: nn.Module,
    batches: Batch | Iterable[Batch],
    *,
    mode: str,
    layers: Iterable[str | nn.Module] | None = None,
    feature_dim: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, LayerInputStats]:
    """Per-feature mean and variance of each layer's input: ``layer_input_stats(..., covariance=False)``."""
    return layer_input_stats(
        model, batches, mode=mode, layers=layers, covariance=False, feature_dim=feature_dim, forward=forward
    )


def distribution_shift(
    before: dict[str, LayerInputStats], after: dict[str, LayerInputStats]
) -> dict[str, dict[str, float]]:
    """How far each layer's input distribution moved between two measurements (e.g. consecutive steps, same batch).

    Per layer present in both, with ``mu``/``var`` the per-feature mean and
    biased variance (D,) and RMS over features ``rms(v) = sqrt(mean_i v_i^2)``:
    ``mean_shift = rms(mu' - mu)``, ``std_mean_shift = rms((mu' - mu) / sqrt(var))``
    (in units of the earlier standard deviation), ``var_shift = rms(var' - var)``
    and ``log_var_shift = rms(log var' - log var)``. Features with zero
    variance are left out of the standardised and log terms.
    """
    out = {}
    for name in before:
        if name not in after:
            continue
        a, b = before[name], after[name]
        if a.mean.shape != b.mean.shape:
            raise ValueError(f"{name}: {a.num_features} features before but {b.num_features} after")
        dm = b.mean - a.mean
        ok = (a.var > 0) & (b.var > 0)
        rms = lambda v: float(v.pow(2).mean().sqrt()) if v.numel() else float("nan")  # noqa: E731
        out[name] = {
            "mean_shift": rms(dm),
            "std_mean_shift": rms(dm[ok] / a.var[ok].sqrt()),
            "var_shift": rms(b.var - a.var),
            "log_var_shift": rms(b.var[ok].log() - a.var[ok].log()),
        }
    return out


# --------------------------------------------------------------------------- residual blocks


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel population mean and biased variance (C,) of one tensor; ``avg_var = mean_c var_c``,
    ``avg_sq_mean = mean_c mean_c^2``."""

    mean: Tensor = field(repr=False)
    var: Tensor = field(repr=False)

    @property
    def avg_var(self) -> float:
        return float(self.var.mean())

    @property
    def avg_sq_mean(self) -> float:
        return float(self.mean.pow(2).mean())

    @classmethod
    def from_moments(cls, m: _Moments) -> ChannelStats:
        return cls(m.mean.cpu(), m.var().cpu())


@dataclass(frozen=True)
class BlockStats:
    """Statistics of one residual block (module with a ``branch``); ``depth`` counts blocks from 1 in run order.

    ``skip``: the block input; ``branch``: ``branch(x)`` (before ``alpha``);
    ``output``: the block output; ``skip_output``: ``skip(x)`` when the block
    has a ``skip`` sub-module, else ``None``. ``alpha`` is the block's scalar
    ``alpha`` (a number, a one-element tensor, or a module holding a scalar
    ``alpha`` such as :class:`normlab.normfree.SkipInit`), else ``None``.
    """

    name: str
    depth: int
    skip: ChannelStats
    branch: ChannelStats
    output: ChannelStats
    alpha: float | None = None
    skip_output: ChannelStats | None = None

    @property
    def skip_variance(self) -> float:
        return self.skip.avg_var

    @property
    def branch_variance(self) -> float:
        return self.branch.avg_var

    @property
    def output_variance(self) -> float:
        return self.output.avg_var

    @property
    def output_sq_mean(self) -> float:
        return self.output.avg_sq_mean

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "depth": self.depth,
            "alpha": self.alpha,
            "skip_variance": self.skip.avg_var,
            "skip_sq_mean": self.skip.avg_sq_mean,
            "branch_variance": self.branch.avg_var,
            "branch_sq_mean": self.branch.avg_sq_mean,
            "output_variance": self.output.avg_var,
            "output_sq_mean": self.output.avg_sq_mean,
            "skip_output_variance": None if self.skip_output is None else self.skip_output.avg_var,
        }


def _alpha(block: nn.Module) -> float | None:
    a = getattr(block, "alpha", None)
    if isinstance(a, nn.Module):
        a = getattr(a, "alpha", None)
    if isinstance(a, Tensor) and a.numel() == 1:
        return float(a.detach())
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    return None


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Residual blocks: submodules with a ``branch`` attribute that is an ``nn.Module``, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "branch", None), nn.Module)]


def residual_stats(
    model: nn.Module,
    batches: Batch | Iterable[Batch],
    *,
    mode: str,
    feature_dim: int = 1,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> list[BlockStats]:
    """Skip-path, branch and output statistics of every residual block, in the order the blocks run.

    See the module docstring for the quantities (De & Smith 2020; Brock et al.
    2021). ``feature_dim`` is the channel axis of the tensors flowing through
    the blocks: 1 for (N, C, *) and (N, D), -1 for sequences (N, S, D).
    """
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(
            "no residual blocks found: a block is a module with a `branch` sub-module (see docs/ARCHITECTURE.md)"
        )
    order: list[str] = []
    acc: dict[tuple[str, str], _Moments] = {}

    def add(name: str, part: str, t: Any) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: the block's {part} is not a tensor ({type(t).__name__})")
        acc.setdefault((name, part), _Moments(False)).add(_rows(t, feature_dim % t.dim()))

    hooks: list[tuple[nn.Module, str, Callable]] = []
    for name, block in blocks:

        def pre(mod, args, name=name):
            if name not in order:
                order.append(name)
            add(name, "skip", _first_tensor(args, name))

        hooks.append((block, "pre", pre))
        hooks.append((block, "post", lambda mod, args, out, name=name: add(name, "output", out)))
        hooks.append((block.branch, "post", lambda mod, args, out, name=name: add(name, "branch", out)))
        skip = getattr(block, "skip", None)
        if isinstance(skip, nn.Module) and skip is not block.branch:
            hooks.append((skip, "post", lambda mod, args, out, name=name: add(name, "skip_out", out)))
    _run_batches(model, batches, mode, forward, hooks)
    by_name = dict(blocks)
    out = []
    for depth, name in enumerate(order, start=1):
        parts = [acc.get((name, p)) for p in ("skip", "branch", "output")]
        if any(p is None for p in parts):
            raise ValueError(f"{name}: the block ran but its branch did not; is `branch` the module the block calls?")
        so = acc.get((name, "skip_out"))
        out.append(
            BlockStats(
                name,
                depth,
                *(ChannelStats.from_moments(p) for p in parts),
                _alpha(by_name[name]),
                None if so is None else ChannelStats.from_moments(so),
            )
        )
    return out


def blocks_as_arrays(stats: list[BlockStats]) -> dict[str, np.ndarray]:
    """Columns of :func:`residual_stats` as arrays over depth (for plotting)."""
    rows = [s.as_dict() for s in stats]
    skip = ("name", "alpha", "skip_output_variance")
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0] if k not in skip}
