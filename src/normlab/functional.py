"""The functional core: every norm is "statistics over axes, standardise, affine".

The functions mirror ``torch.nn.functional`` (same argument names and order
where PyTorch has the function) and run on normlab's own forward and analytic
backward (``normlab.autograd``). They differ only in the axes they reduce:

=============  ====================================  =======================
norm           statistics over                        affine per
=============  ====================================  =======================
batch_norm     every axis but the feature axis         feature
layer_norm     the trailing ``normalized_shape``       element of that shape
rms_norm       the same, mean square only (no centre)  element of that shape
group_norm     each group of channels and its space    channel
instance_norm  each sample's channel over its space    channel
=============  ====================================  =======================

so GroupNorm with one group is LayerNorm over (C, *spatial) with per-channel
affine, and with ``C`` groups it is InstanceNorm (the tests assert both).

Running statistics follow PyTorch by default: the batch variance used to
normalise is the biased one; the running variance stores the unbiased one
(``n / (n - 1)``); ``momentum`` is the weight of the new batch. A batch whose
statistics are not finite leaves the running buffers untouched.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from normlab import _native
from normlab.autograd import ColumnNorm, RowNorm

__all__ = [
    "batch_norm",
    "layer_norm",
    "rms_norm",
    "group_norm",
    "instance_norm",
    "batch_norm_train",
    "moments",
    "update_running_stats",
    "ema_weight",
    "convert_momentum",
]

_HALF = (torch.float16, torch.bfloat16)


def _check_floating(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point input, got {x.dtype}; convert it with x.float()")


def _axis(dim: int, ndim: int, who: str) -> int:
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"{who}: feature axis {dim} is out of range for a {ndim}-D input "
            f"(valid: {-ndim}..{ndim - 1}); pass feature_dim=-1 for channels-last (N, ..., C) data"
        )
    return dim % ndim


# --------------------------------------------------------------------------- batch norm


def _column_view(x: Tensor, dim: int):
    """View ``x`` as (A, C, B) with C the feature axis, without copying when possible.

    Returns the view and a function that maps an (A, C, B) result back to ``x``'s
    shape and memory layout.
    """
    shape = x.shape
    c = shape[dim]
    if x.is_contiguous():
        a = math.prod(shape[:dim])
        return x.view(a, c, -1), lambda y3: y3.view(shape)
    last = x.movedim(dim, -1)  # channels-last memory is contiguous once C is moved last
    if last.is_contiguous():
        return last.reshape(-1, c, 1), lambda y3: y3.view(last.shape).movedim(-1, dim)
    xc = x.contiguous()
    return xc.view(math.prod(shape[:dim]), c, -1), lambda y3: y3.view(shape)


def moments(x: Tensor, dims: Sequence[int], *, unbiased: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``x`` over ``dims`` (no autograd), by the exact two-pass formula.

    The reference statistics of the library: the same kernels BatchNorm uses.
    """
    _check_floating(x, "moments")
    dims = sorted(d % x.dim() for d in dims)
    keep = [d for d in range(x.dim()) if d not in dims]
    with torch.no_grad():
        perm = x.permute(*keep, *dims).contiguous()
        rows = perm.reshape(1, math.prod(perm.shape[: len(keep)]), -1)
        mean, var = ColumnNorm.apply(rows, None, None, 0.0)[1:]
        n = rows.shape[2]
    if unbiased:
        var = var * (n / max(n - 1, 1))
    out_shape = [x.shape[d] for d in keep]
    return mean.view(out_shape), var.view(out_shape)


def ema_weight(
    momentum: float | None,
    step: Tensor | int,
    *,
    convention: str = "torch",
    debias: bool = False,
) -> Tensor | float:
    """The weight ``m`` of the new batch in ``running = (1 - m) * running + m * batch``.

    * ``convention="torch"``: ``momentum`` is that weight (PyTorch, default 0.1);
      ``None`` gives the cumulative average ``m = 1 / step``.
    * ``convention="decay"``: ``momentum`` is the decay of the old value
      (Keras/Flax, e.g. 0.99), so ``m = 1 - momentum``.
    * ``debias=True``: Adam-style zero-debiasing, ``m_t = m / (1 - (1 - m)^t)``:
      the buffers then hold the bias-corrected average of an EMA started at zero
      (the first batch is taken whole).

    ``step`` counts the batches seen including this one (``num_batches_tracked``).
    """
    if momentum is None:
        if convention != "torch":
            raise ValueError("momentum=None (cumulative average) is only meaningful with convention='torch'")
        return 1.0 / step
    if convention == "torch":
        m = momentum
    elif convention == "decay":
        m = 1.0 - momentum
    else:
        raise ValueError(f"unknown momentum convention {convention!r}; choose 'torch' or 'decay'")
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum {momentum} gives a new-batch weight {m} outside [0, 1] ({convention} convention)")
    if debias:
        return m / (1.0 - (1.0 - m) ** step)
    return m


def convert_momentum(value: float, *, to: str) -> float:
    """Convert a momentum between conventions: ``to="decay"`` maps PyTorch's 0.01 to 0.99, ``to="torch"`` back."""
    if to not in ("torch", "decay"):
        raise ValueError(f"to must be 'torch' or 'decay', got {to!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {value}")
    return 1.0 - value


_warned_nonfinite = False


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    weight: float | Tensor,
    *,
    unbiased: bool = True,
) -> Tensor:
    """Blend batch statistics into running buffers in place; returns whether the batch was finite.

    ``var`` is the biased batch variance over ``count`` values per feature; the
    buffer stores the unbiased one when ``unbiased`` (PyTorch). A batch whose
    mean or variance is not finite leaves the buffers untouched. On the CPU
    (plain numbers for ``count`` and ``weight``) this is one compiled call and
    the result a Python bool; elsewhere it avoids any host sync (the choice is
    made with ``torch.where``) and the result is a bool tensor.
    """
    if (
        not isinstance(weight, Tensor)
        and not isinstance(count, Tensor)
        and _native.usable(mean.detach(), var.detach(), running_mean, running_var)
    ):
        scale = count / (count - 1) if unbiased and count > 1 else 1.0
        return _native.ema_update(running_mean, running_var, mean.detach(), var.detach(), weight, scale)
    with torch.no_grad():
        mean = mean.detach()
        var = var.detach()
        if unbiased:
            var = (
                var * (count / (count - 1)) if not isinstance(count, Tensor) else var * count / (count - 1).clamp(min=1)
            )
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
        if running_mean is not None:
            new = running_mean * (1 - weight) + mean.to(running_mean.dtype) * weight
            running_mean.copy_(torch.where(finite, new, running_mean))
        if running_var is not None:
            new = running_var * (1 - weight) + var.to(running_var.dtype) * weight
            running_var.copy_(torch.where(finite, new, running_var))
    return finite


def warn_nonfinite(where: str) -> None:
    """Warn (once per process) that a non-finite batch was kept out of running statistics."""
    global _warned_nonfinite
    if not _warned_nonfinite:
        _warned_nonfinite = True
        warnings.warn(
            f"{where}: a batch with non-finite values was not used to update the running statistics "
            "(the update was skipped and counted in `num_nonfinite_batches`); check the input or the loss "
            "scale — further skips are counted silently",
            RuntimeWarning,
            stacklevel=3,
        )


def _affine_view(t: Tensor | None, c: int, dim: int, ndim: int) -> Tensor | None:
    if t is None:
        return None
    shape = [1] * ndim
    shape[dim] = c
    return t.view(shape)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    feature_dim: int = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """Batch normalisation, as :func:`torch.nn.functional.batch_norm`, plus a feature axis and a mask.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias`` with the statistics
    over every axis except ``feature_dim``. In training the batch statistics are
    used (biased variance) and, if buffers are given, blended into them with
    weight ``momentum`` (unbiased variance stored). In eval the running
    statistics are used.

    Shape: ``input`` is (N, C, *) for ``feature_dim=1``; any layout for another
    axis, e.g. (N, H, W, C) or (N, S, D) with ``feature_dim=-1``. ``mask`` (the
    input's shape without the feature axis, ``True`` = a real position) keeps
    padded positions out of the statistics.
    """
    _check_floating(input, "batch_norm")
    dim = _axis(feature_dim, input.dim(), "batch_norm")
    if input.dim() < 2:
        raise ValueError(
            "batch_norm: expected an input with a batch axis and a feature axis (>= 2-D), "
            f"got shape {tuple(input.shape)}"
        )
    c = input.shape[dim]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.shape != (c,):
            raise ValueError(
                f"batch_norm: {name} has shape {tuple(t.shape)} but the input has {c} features on axis {dim} "
                f"(input shape {tuple(input.shape)}); build the layer with num_features={c} "
                "or pass the right feature_dim"
            )
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: eval mode needs running_mean and running_var (or pass training=True)")
        scale = torch.rsqrt(running_var + eps)
        if weight is not None:
            scale = scale * weight
        shift = -running_mean * scale
        if bias is not None:
            shift = shift + bias
        nd = input.dim()
        return torch.addcmul(
            _affine_view(shift, c, dim, nd).to(input.dtype), input, _affine_view(scale, c, dim, nd).to(input.dtype)
        )

    y, mean, var, count = batch_norm_train(input, weight, bias, eps, feature_dim=dim, mask=mask)
    if running_mean is not None or running_var is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


def batch_norm_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    feature_dim: int = 1,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, int | Tensor]:
    """Training-mode BatchNorm without buffers: ``(y, mean, biased var, count)``.

    The building block of every BN layer: the caller decides what to do with the
    statistics (EMA, cumulative, recalibration, synchronisation).
    """
    _check_floating(input, "batch_norm")
    dim = _axis(feature_dim, input.dim(), "batch_norm")
    c = input.shape[dim]
    if mask is not None:
        return _masked_batch_norm(input, mask, dim, weight, bias, eps)
    n = input.numel() // max(c, 1)
    if n <= 1:
        raise ValueError(
            f"batch_norm: expected more than 1 value per feature in training, got input shape {tuple(input.shape)}; "
            "use a batch of at least 2, switch the layer to eval(), "
            "or use a batch-independent norm (GroupNorm/LayerNorm)"
        )
    y, mean, var = _batch_norm_train(input, dim, weight, bias, eps)
    return y, mean, var, n


def _batch_norm_train(x: Tensor, dim: int, weight, bias, eps: float):
    if x.dtype in _HALF:  # accumulate and normalise in float32, return the input's dtype
        y, mean, var = _batch_norm_train(x.float(), dim, _f32(weight), _f32(bias), eps)
        return y.to(x.dtype), mean, var
    x3, back = _column_view(x, dim)
    y3, mean, var = ColumnNorm.apply(x3, weight, bias, eps)
    return back(y3), mean, var


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def _masked_batch_norm(x: Tensor, mask: Tensor, dim: int, weight, bias, eps: float):
    """Masked statistics in plain differentiable ops (autograd provides the backward)."""
    expect = x.shape[:dim] + x.shape[dim + 1 :]
    if mask.shape != expect:
        raise ValueError(
            f"batch_norm: mask has shape {tuple(mask.shape)}, expected {tuple(expect)} "
            f"(the input's shape {tuple(x.shape)} without the feature axis {dim})"
        )
    m = mask.to(x.dtype).unsqueeze(dim)
    dims = tuple(d for d in range(x.dim()) if d != dim)
    count = m.sum(dims)  # scalar count, the same for every feature
    if float(count) <= 1:
        raise ValueError(f"batch_norm: the mask leaves {int(count)} valid position(s); need more than 1 in training")
    mean = (x * m).sum(dims, keepdim=True) / count
    xc = (x - mean) * m
    var = (xc * xc).sum(dims, keepdim=True) / count
    c = x.shape[dim]
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _affine_view(weight, c, dim, x.dim())
    if bias is not None:
        y = y + _affine_view(bias, c, dim, x.dim())
    return y, mean.detach().view(c), var.detach().view(c), count.detach()


# --------------------------------------------------------------------------- row norms


def _row_norm(x: Tensor, view: Sequence[int], red: int, weight, bias, eps: float, centered: bool):
    """Normalise ``x`` viewed as ``view`` over its trailing ``red`` dims; returns y, mean, var.

    ``weight``/``bias`` broadcast against ``view`` with size 1 on dim 0.
    """
    if x.dtype in _HALF:
        y, mean, var = _row_norm(x.float(), view, red, _f32(weight), _f32(bias), eps, centered)
        return y.to(x.dtype), mean, var
    y, mean, var = RowNorm.apply(x.reshape(view), weight, bias, eps, red, centered)
    return y.view(x.shape), mean, var


def _check_normalized_shape(x: Tensor, normalized_shape, who: str) -> tuple[int, ...]:
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(ns) == 0 or tuple(x.shape[x.dim() - len(ns) :]) != ns or x.dim() < len(ns):
        raise ValueError(
            f"{who}: normalized_shape {ns} must equal the input's trailing dims, but the input has shape "
            f"{tuple(x.shape)}; build the layer with "
            f"normalized_shape={tuple(x.shape[-len(ns) :]) if ns else x.shape[-1:]}"
        )
    return ns


def _check_affine_shape(t: Tensor | None, shape: tuple[int, ...], name: str, who: str) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{who}: {name} has shape {tuple(t.shape)}, expected {shape}")


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalisation, as :func:`torch.nn.functional.layer_norm`.

    Statistics (mean, biased variance) of each sample over the trailing
    ``normalized_shape`` dims; ``weight``/``bias`` have that shape.
    """
    _check_floating(input, "layer_norm")
    ns = _check_normalized_shape(input, normalized_shape, "layer_norm")
    _check_affine_shape(weight, ns, "weight", "layer_norm")
    _check_affine_shape(bias, ns, "bias", "layer_norm")
    lead = input.numel() // max(math.prod(ns), 1)
    w = None if weight is None else weight.view(1, *ns)
    b = None if bias is None else bias.view(1, *ns)
    return _row_norm(input, (lead, *ns), len(ns), w, b, eps, True)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS normalisation, as :func:`torch.nn.functional.rms_norm`: ``x / sqrt(mean(x^2) + eps) * weight``.

    ``eps=None`` uses ``torch.finfo(input.dtype).eps``, as PyTorch does.
    """
    _check_floating(input, "rms_norm")
    ns = _check_normalized_shape(input, normalized_shape, "rms_norm")
    _check_affine_shape(weight, ns, "weight", "rms_norm")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    lead = input.numel() // max(math.prod(ns), 1)
    w = None if weight is None else weight.view(1, *ns)
    return _row_norm(input, (lead, *ns), len(ns), w, None, eps, False)[0]


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    centered: bool = True,
) -> Tensor:
    """Group normalisation, as :func:`torch.nn.functional.group_norm`.

    Input (N, C, *); statistics of each sample over each group of ``C / num_groups``
    channels and all spatial positions; per-channel ``weight``/``bias`` of shape (C,).
    ``centered=False`` divides by the root mean square instead (RMSNorm over the
    group; with one group, RMSNorm for channel-first feature maps).
    """
    _check_floating(input, "group_norm")
    if input.dim() < 2:
        raise ValueError(f"group_norm: expected input (N, C, *), got shape {tuple(input.shape)}")
    n, c = input.shape[:2]
    if num_groups <= 0 or c % num_groups != 0:
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        raise ValueError(
            f"group_norm: num_groups={num_groups} must divide the {c} channels; valid choices are {divisors}"
        )
    _check_affine_shape(weight, (c,), "weight", "group_norm")
    _check_affine_shape(bias, (c,), "bias", "group_norm")
    cg = c // num_groups
    spatial = input.numel() // max(n * c, 1)
    w = None if weight is None else weight.view(1, num_groups, cg, 1)
    b = None if bias is None else bias.view(1, num_groups, cg, 1)
    return _row_norm(input, (n, num_groups, cg, spatial), 2, w, b, eps, centered)[0]


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance normalisation, as :func:`torch.nn.functional.instance_norm`.

    Input (N, C, *); statistics of each sample's channel over its spatial
    positions. With buffers and ``use_input_stats`` the running statistics
    receive the batch average of the per-instance mean and unbiased variance
    (PyTorch's convention); without ``use_input_stats`` they are used instead.
    """
    _check_floating(input, "instance_norm")
    if input.dim() < 3:
        raise ValueError(
            f"instance_norm: expected input (N, C, L, ...) with spatial dims, got shape {tuple(input.shape)}"
        )
    n, c = input.shape[:2]
    if not use_input_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    spatial = input.numel() // max(n * c, 1)
    if spatial <= 1:
        raise ValueError(
            f"instance_norm: expected more than 1 spatial element per channel, got input shape {tuple(input.shape)}"
        )
    w = None if weight is None else weight.view(1, c, 1)
    b = None if bias is None else bias.view(1, c, 1)
    y, mean, var = _row_norm(input, (n, c, spatial), 1, w, b, eps, True)
    if running_mean is not None or running_var is not None:
        mean = mean.view(n, c).mean(0)
        var = (var.view(n, c) * (spatial / (spatial - 1))).mean(0)
        update_running_stats(running_mean, running_var, mean, var, spatial, momentum, unbiased=False)
    return y
