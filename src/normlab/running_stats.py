"""BatchNorm running statistics beyond the moving average: precise recalibration, freezing, micro-batches.

Works on any model, for ``torch.nn`` BatchNorm layers and normlab's
(``BatchNorm*``, ``BatchRenorm``, ``GhostBatchNorm``, ``SyncBatchNorm``):

* :func:`recalibrate` — "precise BN": replace the running statistics by the
  plain average, over a given number of batches, of the per-batch means and
  variances (unbiased ``n / (n - 1)`` per batch when the layer stores the
  unbiased variance — PyTorch's default — biased otherwise). Leaves the model
  as it found it: every module's train/eval mode, ``track_running_stats``,
  momentum, ``num_batches_tracked`` and hooks.
* :func:`freeze` / :func:`unfreeze` — frozen BN normalises with its running
  statistics and never updates them, also inside ``model.train()``; the affine
  parameters stay trainable unless asked otherwise.
* :func:`accumulate_stats` — gradient accumulation: inside the ``with`` block
  each micro-batch is normalised with its own statistics as usual, but the
  running statistics are updated once, on exit, with the statistics of all
  micro-batches together — the same update a forward of the full batch makes.

The statistics are measured by forward hooks on the layers' inputs (the
normlab kernels, so the numbers are those the layers compute themselves);
while they are measured the layers' own updates are switched off by setting
``track_running_stats = False`` (train-mode layers then use batch statistics,
as before) and switched back afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab import functional as NF
from normlab._feed import feed
from normlab.convert import convert
from normlab.functional import _column_view
from normlab.layers.batchnorm import _BatchNormBase
from normlab.layers.ghost import GhostBatchNorm
from normlab.layers.sync import (
    SyncBatchNorm,
    _local_moments,
    _to_sync,
    combine_moments,
    gather_moments,
    is_distributed,
)

__all__ = ["recalibrate", "freeze", "unfreeze", "accumulate_stats", "batchnorm_modules"]

ModuleSpec = Iterable[nn.Module | str] | None


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, (_BatchNormBase, _BatchNorm))


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model`` (torch.nn's and normlab's, the model itself included), in module order."""
    return [m for m in model.modules() if _is_bn(m)]


def _resolve(model: nn.Module, modules: ModuleSpec, who: str) -> list[nn.Module]:
    """The BN layers named or given in ``modules`` (all of the model's when ``None``), each once."""
    if modules is None:
        return batchnorm_modules(model)
    named = dict(model.named_modules())
    out: list[nn.Module] = []
    for spec in modules:
        if isinstance(spec, str):
            if spec not in named:
                raise KeyError(
                    f"{who}: the model has no module named {spec!r}; names are those of model.named_modules()"
                )
            spec = named[spec]
        if not _is_bn(spec):
            raise TypeError(
                f"{who}: {type(spec).__name__} is not a BatchNorm layer; pass BatchNorm modules or their names"
            )
        if not any(spec is m for m in out):
            out.append(spec)
    return out


def _tracks(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None and getattr(m, "running_var", None) is not None


def _feature_dim(m: nn.Module, x: Tensor) -> int:
    return getattr(m, "_feature_dim", 1) % x.dim()


def _call_stats(m: nn.Module, args: tuple, kwargs: dict, split_ghost: bool) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``[(count, mean, biased var)]`` of one call's input: one entry, or one per virtual batch of a GhostBatchNorm."""
    x = args[0]
    mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
    dim = _feature_dim(m, x)
    with torch.no_grad():
        x = x.detach()
        if isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)) and is_distributed(m.process_group):
            xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            n, mean, m2 = _local_moments(_column_view(xf, dim)[0])
            return [gather_moments(n, mean, m2, group=m.process_group)]
        if split_ghost and isinstance(m, GhostBatchNorm):
            parts = x.split(m.virtual_batch_size, 0)
            masks = mask.split(m.virtual_batch_size, 0) if mask is not None else (None,) * len(parts)
        else:
            parts, masks = (x,), (mask,)
        out = []
        for xp, mp in zip(parts, masks):
            _, mean, var, count = NF.batch_norm_train(xp, None, None, 0.0, feature_dim=dim, mask=mp)
            out.append((torch.as_tensor(count, dtype=mean.dtype, device=mean.device).reshape(()), mean, var))
        return out


class _Collector:
    """Forward hooks recording the statistics of every train-mode, unfrozen call of the given layers."""

    def __init__(self, modules: list[nn.Module], *, split_ghost: bool) -> None:
        self.records: dict[nn.Module, list[tuple[Tensor, Tensor, Tensor]]] = {m: [] for m in modules}
        self.split_ghost = split_ghost
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if module.training and not getattr(module, "frozen", False):
            self.records[module].extend(_call_stats(module, args, kwargs, self.split_ghost))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _measuring(
    model: nn.Module, targets: list[nn.Module], *, split_ghost: bool, mode: str | None
) -> Iterator[_Collector]:
    """Hooks on ``targets`` with their own updates switched off; restores modes, flags and hooks on exit.

    ``mode`` (recalibration) sets the other modules to ``"eval"``/``"train"``/``"keep"``
    and the targets to unfrozen train mode; ``None`` changes no mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(m, m.track_running_stats, getattr(m, "frozen", None)) for m in targets]
    collector = _Collector(targets, split_ghost=split_ghost)
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        for m in targets:
            if mode is not None:
                m.train()
                if isinstance(m, _BatchNormBase):
                    m.frozen = False
            m.track_running_stats = False
        yield collector
    finally:
        collector.remove()
        for m, tracking, frozen in flags:
            m.track_running_stats = tracking
            if frozen is not None:
                m.frozen = frozen
        for m, training in modes:
            m.training = training


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    modules: ModuleSpec = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    others: str = "eval",
) -> int:
    """Precise BN: set running statistics to the average of per-batch statistics over ``batches``.

    For each BN layer, over the first ``num_batches`` batches (all when
    ``None``): ``running_mean = mean_b(mu_b)`` and ``running_var = mean_b(v_b)``
    where ``v_b`` is the batch's variance in the layer's storage convention —
    unbiased (``n_b / (n_b - 1)`` times the biased one) for ``torch.nn`` layers
    and normlab's default, biased with ``unbiased_running_var=False``. Every
    batch weighs the same, whatever its size; a ``GhostBatchNorm``'s virtual
    batches count as batches; a ``SyncBatchNorm`` under ``torch.distributed``
    averages the statistics of the global batches. Batches whose statistics
    are not finite are left out (with a warning).

    Args:
        model: any module; its BN layers with running statistics are
            recalibrated (``modules`` restricts them: modules or their names).
            Frozen layers are skipped unless listed in ``modules``.
        batches: an iterable of model inputs: a tensor ``x``, ``(x, y)``,
            ``(x, y, mask)`` (called as ``model(x, mask=mask)``), a dict of
            keyword arguments, or anything ``forward`` understands. Put them on
            the model's device.
        num_batches: at most this many batches (all when None); fewer is a warning, not an error.
        forward: ``forward(model, batch)`` runs the model on one batch.
        others: mode of the modules that are not recalibrated during the
            passes: ``"eval"`` (default: dropout off, the statistics the
            eval-time network sees), ``"train"``, or ``"keep"`` their own.

    The recalibrated layers run in train mode with batch statistics, under
    ``torch.no_grad()``. Afterwards every module's mode, ``momentum``,
    ``track_running_stats``, ``num_batches_tracked`` and hooks are as before;
    only ``running_mean``/``running_var`` change. Returns the number of
    batches used.
    """
    if others not in ("eval", "train", "keep"):
        raise ValueError(f"recalibrate: others must be 'eval', 'train' or 'keep', got {others!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches <= 0):
        raise ValueError(f"recalibrate: num_batches must be a positive int or None, got {num_batches!r}")
    listed = modules is not None
    chosen = _resolve(model, modules, "recalibrate")
    targets = [m for m in chosen if _tracks(m) and (listed or not getattr(m, "frozen", False))]
    if not targets:
        raise ValueError(
            "recalibrate: the model has no (unfrozen) BatchNorm layer with running statistics; nothing to recalibrate"
        )
    run = forward or functools.partial(feed, who="recalibrate")
    seen = 0
    with _measuring(model, targets, split_ghost=True, mode=others) as collector, torch.no_grad():
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            run(model, batch)
            seen += 1
    if seen == 0:
        raise ValueError("recalibrate: `batches` yielded no batch; pass an iterable of model inputs")
    if num_batches is not None and seen < num_batches:
        warnings.warn(
            f"recalibrate: the batches ran out after {seen} of num_batches={num_batches}; "
            f"the statistics are those of the {seen} batches there were",
            UserWarning,
            stacklevel=2,
        )
    names = {m: n for n, m in model.named_modules()}
    for m in targets:
        _set_population_stats(m, collector.records[m], names.get(m, type(m).__name__))
    return seen


def _set_population_stats(m: nn.Module, records: list, name: str) -> None:
    unbiased = getattr(m, "unbiased_running_var", True)
    means, variances, skipped = [], [], 0
    for n, mean, var in records:
        n = n.double()
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            skipped += 1
            continue
        means.append(mean.double())
        variances.append(var.double() * (n / (n - 1)) if unbiased else var.double())
    if skipped:
        warnings.warn(
            f"recalibrate: {name}: left out {skipped} batch(es) with non-finite statistics",
            RuntimeWarning,
            stacklevel=3,
        )
    if not means:
        warnings.warn(
            f"recalibrate: {name} saw no usable batch; its running statistics are unchanged",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    with torch.no_grad():
        m.running_mean.copy_(torch.stack(means).mean(0))
        m.running_var.copy_(torch.stack(variances).mean(0))


# --------------------------------------------------------------------------- micro-batches


@contextlib.contextmanager
def accumulate_stats(model: nn.Module, modules: ModuleSpec = None) -> Iterator[None]:
    """Defer BN running-statistics updates to the end of a gradient-accumulation step::

        with normlab.accumulate_stats(model):
            for xb, yb in zip(x.chunk(4), y.chunk(4)):
                loss_fn(model(xb), yb).div(4).backward()
        optimizer.step()

    Inside the block every train-mode BN layer normalises each micro-batch
    with that micro-batch's statistics (as it always does) and records its
    count, mean and variance instead of updating the running buffers. On a
    normal exit the records are combined by the parallel-variance formula into
    the statistics of all micro-batches together, and each layer makes *one*
    update with them in its own convention (momentum, cumulative average,
    debiasing, unbiased or biased storage, ``num_batches_tracked`` + 1): the
    running statistics are those a forward of the concatenated batch would
    leave, for every layer whose input is the same either way (a layer after
    another BN sees micro-batch-normalised inputs, as in any micro-batched
    training). If the block raises, no update is made.

    ``GhostBatchNorm`` layers keep updating per virtual batch (their updates
    already equal the full batch's when each micro-batch holds whole virtual
    batches). A layer called several times per forward is updated once with
    all its calls pooled.
    """
    chosen = _resolve(model, modules, "accumulate_stats")
    targets = [m for m in chosen if _tracks(m) and not isinstance(m, GhostBatchNorm)]
    with _measuring(model, targets, split_ghost=False, mode=None) as collector:
        yield
    for m in targets:
        records = collector.records[m]
        if records:
            n, mean, var = combine_moments(
                torch.stack([r[0] for r in records]),
                torch.stack([r[1] for r in records]),
                torch.stack([r[2] * r[0] for r in records]),
            )
            _apply_update(m, mean, var, n)


def _apply_update(m: nn.Module, mean: Tensor, var: Tensor, count: Tensor) -> None:
    """One running-statistics update with the statistics of a whole batch, in the layer's convention."""
    if isinstance(m, _BatchNormBase):
        m._update(mean, var, count)
        return
    # torch.nn's rule (momentum, or the cumulative average over num_batches_tracked), with normlab's guard:
    # a non-finite batch changes nothing, num_batches_tracked included
    NF.update_running_stats(
        m.running_mean,
        m.running_var,
        mean,
        var,
        count,
        m.momentum,
        num_batches_tracked=m.num_batches_tracked,
        who=f"accumulate_stats: {type(m).__name__}",
    )


# --------------------------------------------------------------------------- freezing


def freeze(model: nn.Module, modules: ModuleSpec = None, *, affine_trainable: bool = True) -> nn.Module:
    """Freeze BN layers: normalise with the running statistics and keep them, even in ``model.train()``.

    ``modules`` (modules or names from ``model.named_modules()``) chooses the
    layers; all BN layers by default. Frozen layers compute the eval-mode
    output ``weight * (x - running_mean) / sqrt(running_var + eps) + bias``
    and its gradients in either mode; ``affine_trainable=False`` also sets
    ``requires_grad=False`` on ``weight``/``bias``.

    ``torch.nn.BatchNorm{1,2,3}d`` and ``torch.nn.SyncBatchNorm`` layers have no
    frozen mode, so they are replaced in their parent modules by the equivalent
    normlab layers (:func:`normlab.convert`, :class:`normlab.SyncBatchNorm`),
    which take over the very same ``Parameter`` and buffer tensors (an optimizer
    built before keeps working), but not hooks registered on the old module.
    Use the returned model: it is a new object when ``model`` itself is such a
    layer.
    """
    targets = _resolve(model, modules, "freeze")
    for m in targets:
        if not _tracks(m):
            raise ValueError(
                f"freeze: {type(m).__name__} has no running statistics (track_running_stats=False), so there is "
                "nothing to freeze it with; leave it out of `modules`"
            )
    swapped: dict[nn.Module, nn.Module] = {}
    for m in targets:
        if isinstance(m, nn.SyncBatchNorm) and not isinstance(m, _BatchNormBase):  # torch's: normlab's, same tensors
            swapped[m] = _to_sync(m, m.process_group)
        elif not isinstance(m, _BatchNormBase):
            new = convert(m, "normlab")
            if not isinstance(new, _BatchNormBase):
                raise TypeError(
                    f"freeze: {type(m).__name__} cannot be converted to a normlab layer to freeze it; "
                    "use torch.nn.BatchNorm1d/2d/3d or normlab's BatchNorm layers"
                )
            swapped[m] = new
    if swapped:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if child in swapped:
                    setattr(parent, name, swapped[child])
        model = swapped.get(model, model)
    for m in targets:
        m = swapped.get(m, m)
        m.frozen = True
        if not affine_trainable:
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(False)
    return model


def unfreeze(model: nn.Module, modules: ModuleSpec = None) -> nn.Module:
    """Undo :func:`freeze`: batch statistics and updates again in train mode, ``weight``/``bias`` trainable.

    ``modules`` as in :func:`freeze` (default: every frozen BN layer). Layers that
    :func:`freeze` converted from ``torch.nn`` stay normlab layers (they behave
    the same; ``normlab.convert(model, "torch")`` converts them back). Returns
    the model.
    """
    listed = modules is not None
    for m in _resolve(model, modules, "unfreeze"):
        if not isinstance(m, _BatchNormBase):
            if listed:
                raise TypeError(f"unfreeze: {type(m).__name__} is a torch.nn layer, which is never frozen")
            continue
        if not listed and not m.frozen:
            continue
        m.frozen = False
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(True)
    return model
