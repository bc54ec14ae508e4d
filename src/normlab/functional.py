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

Inside ``torch.func`` transforms and while ``torch.compile`` traces, the same
formulas run in differentiable tensor ops (:func:`_composite`), which the
transforms can batch and differentiate and inductor can fuse. Compiled, the
running statistics are still updated by the ``normlab::update_running_stats_``
operator; under a transform they are not updated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab import _kernels as K
from normlab import _ops
from normlab._ops import ema_weight

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
    "check_eps",
    "check_mask",
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


def check_eps(eps: float, who: str) -> float:
    """``eps`` must be a positive finite number (it keeps ``1 / sqrt(var + eps)`` finite on constant input)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < eps < math.inf):
        raise ValueError(
            f"{who}: eps must be a positive finite number (it keeps 1/sqrt(var + eps) finite on constant input), "
            f"got {eps!r}; the usual value is 1e-5"
        )
    return float(eps)


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, asked only while something traces (an export is a trace: TorchScript's
    or dynamo's), so an eager call does not pay for the question."""
    traced = torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
    return traced and torch.onnx.is_in_onnx_export()


def _under_functorch() -> bool:
    """True inside a ``torch.func`` transform (vmap, grad, jvp, jacrev, hessian, ...).

    The ``normlab::`` operators are opaque to the transforms (no forward-mode
    derivative, no batching rule), so under a transform the same formulas run in
    differentiable tensor ops (:func:`_composite_norm`).
    """
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _composite() -> bool:
    """True where the norms run as differentiable tensor ops (:func:`_composite_norm`) instead of the operators.

    Inside a ``torch.func`` transform (:func:`_under_functorch`), and while
    ``torch.compile`` traces: there an opaque ``normlab::`` node would keep
    inductor from fusing the norm with its neighbours (BatchNorm -> ReLU ->
    pooling) and from choosing layouts, while the same formulas in tensor ops
    compile to code as fast as ``torch.nn``'s norms. The running-statistics
    update stays the ``normlab::update_running_stats_`` operator either way.
    ``torch.export`` keeps the forward operators (an exported program names them).
    """
    if torch.compiler.is_compiling():
        return not torch.compiler.is_exporting()
    return torch._C._are_functorch_transforms_active()


def _composite_norm(x: Tensor, dims: tuple[int, ...], eps: float, centered: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(xhat, mean, biased var)`` over ``dims`` in differentiable tensor ops (two-pass: centre, then square).

    As in the kernels, a float32 mean is summed in float64 and what rounding it to float32 loses is
    subtracted too (``_kernels._split``), so ``|mean| >> std`` costs no accuracy.
    """
    if not centered:
        var = (x * x).mean(dims, keepdim=True)
        return x * torch.rsqrt(var + eps), torch.zeros((), dtype=x.dtype, device=x.device), var
    mean, lo = K._split(x.mean(dims, keepdim=True, dtype=K._wide(x.dtype)), x.dtype)
    xc = x - mean if lo is None else x - mean - lo
    var = (xc * xc).mean(dims, keepdim=True)
    return xc * torch.rsqrt(var + eps), mean, var


class _CompiledNorm(torch.autograd.Function):
    """:func:`_composite_norm` and the affine, with the analytic backward: the norm as ``torch.compile`` traces it.

    Autograd's chain rule back through both statistics costs inductor a second sweep over the data; the
    analytic formula of :mod:`normlab.autograd` (``dx = invstd * (gw - mean(gw) - xhat * mean(gw * xhat))``)
    needs per-feature sums in one sweep, then one elementwise pass, which is what torch.nn's norms compile
    to. When the weight is constant along the statistics' axes (BatchNorm) it is factored out, so the sums
    of ``grad`` and ``grad * xhat`` serve ``dx``, ``dweight`` and ``dbias`` alike. Once differentiable:
    a compiled backward is not differentiated again (``torch.func`` transforms use plain autograd).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dims: tuple[int, ...], eps: float, centered: bool):
        xhat, mean, var = _composite_norm(x, dims, eps, centered)
        ctx.save_for_backward(xhat, var, weight)
        ctx.dims, ctx.eps, ctx.centered = dims, eps, centered
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.mark_non_differentiable(mean, var)
        return _affine(xhat, weight, bias), mean, var

    @staticmethod
    def backward(ctx, grad, _gmean, _gvar):
        xhat, var, weight = ctx.saved_tensors
        dims = ctx.dims
        invstd = torch.rsqrt(var + ctx.eps)
        factored = weight is None or all(weight.shape[d] == 1 for d in dims)
        g = grad if factored else grad * weight
        inner = g - xhat * (g * xhat).mean(dims, keepdim=True)
        if ctx.centered:
            inner = inner - g.mean(dims, keepdim=True)
        need = ctx.needs_input_grad
        dx = inner * (invstd if weight is None or not factored else invstd * weight) if need[0] else None
        dw = K._sum_to(grad * xhat, weight.shape) if need[1] else None
        db = K._sum_to(grad, ctx.bias_shape) if need[2] else None
        return dx, dw, db, None, None, None


def _norm_in_tensor_ops(x: Tensor, weight, bias, dims: tuple[int, ...], eps: float, centered: bool):
    """``(y, mean, biased var)`` over ``dims`` in tensor ops (see :func:`_composite`); statistics keepdim-shaped.

    ``weight``/``bias`` broadcast against ``x``. While ``torch.compile`` traces, with the analytic
    backward (:class:`_CompiledNorm`); in a ``torch.func`` transform, plain autograd (forward mode,
    batching and second derivatives included).
    """
    if torch.compiler.is_compiling():
        return _CompiledNorm.apply(x, weight, bias, dims, eps, centered)
    xhat, mean, var = _composite_norm(x, dims, eps, centered)
    return _affine(xhat, weight, bias), mean, var


def check_mask(mask: Tensor, input: Tensor, dim: int, who: str = "batch_norm") -> Tensor:
    """Validate a BatchNorm ``mask`` and return it as a bool tensor.

    ``mask`` has the input's shape without the feature axis ``dim``; it is
    boolean, or numbers that are all 0 or 1 (any other value would silently
    weight positions in the statistics). The value check reads the mask, so it
    is skipped while ``torch.compile`` traces.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{who}: mask must be a bool tensor, got {type(mask).__name__}")
    expect = input.shape[:dim] + input.shape[dim + 1 :]
    if mask.shape != expect:
        raise ValueError(
            f"{who}: mask has shape {tuple(mask.shape)}, expected {tuple(expect)} "
            f"(the input's shape {tuple(input.shape)} without the feature axis {dim})"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not torch.compiler.is_compiling() and not ((mask == 0) | (mask == 1)).all():
        bad = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
        raise ValueError(
            f"{who}: mask must be boolean (True = a real position) or hold only 0 and 1, but it holds {bad} "
            f"({mask.dtype}); pass mask.bool() if non-zero means real, or fix how the mask is built"
        )
    return mask.bool()


# --------------------------------------------------------------------------- batch norm


def _column_layout(x: Tensor, dim: int) -> tuple[int, int, int] | None:
    """``x``'s memory as (A, C, B) with C the feature axis: contiguous, or channels-last (C moved last is
    contiguous, then B = 1); ``None`` for any other layout."""
    shape = x.shape
    c, a, b = shape[dim], math.prod(shape[:dim]), math.prod(shape[dim + 1 :])
    if x.is_contiguous():
        return a, c, b
    if x.movedim(dim, -1).is_contiguous():
        return a * b, c, 1
    return None


def _column_view(x: Tensor, dim: int):
    """View ``x`` as (A, C, B) with C the feature axis, without copying when possible.

    Returns the view and a function that maps an (A, C, B) result back to ``x``'s
    shape and memory layout.
    """
    shape = x.shape
    c = shape[dim]
    a, b = math.prod(shape[:dim]), math.prod(shape[dim + 1 :])
    if x.is_contiguous():
        return x.view(a, c, b), lambda y3: y3.view(shape)
    last = x.movedim(dim, -1)  # channels-last memory is contiguous once C is moved last
    if last.is_contiguous():
        return last.reshape(a * b, c, 1), lambda y3: y3.view(last.shape).movedim(-1, dim)
    return x.contiguous().view(a, c, b), lambda y3: y3.view(shape)


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
        if x.dtype in _HALF:
            rows = rows.float()
        mean, var = _ops.batch_norm_forward(rows, None, None, 0.0)[1:3]
        n = rows.shape[2]
    if unbiased:
        var = var * (n / max(n - 1, 1))
    out_shape = [x.shape[d] for d in keep]
    return mean.view(out_shape), var.view(out_shape)


def convert_momentum(value: float, *, to: str) -> float:
    """Convert a momentum between conventions: ``to="decay"`` maps PyTorch's 0.01 to 0.99, ``to="torch"`` back."""
    if to not in ("torch", "decay"):
        raise ValueError(f"to must be 'torch' or 'decay', got {to!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {value}")
    return 1.0 - value


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    weight: float | None,
    *,
    unbiased: bool = True,
    num_batches_tracked: Tensor | None = None,
    num_nonfinite_batches: Tensor | None = None,
    who: str = "update_running_stats",
) -> Tensor:
    """Blend batch statistics into running buffers in place; returns whether the batch was used (a bool tensor).

    ``running = (1 - weight) * running + weight * batch``; ``weight=None`` is the
    cumulative average over ``num_batches_tracked`` batches. ``var`` is the biased
    batch variance over ``count`` values per feature; the buffer stores the
    unbiased one when ``unbiased`` (PyTorch). A batch whose statistics are not
    finite leaves the buffers untouched, is counted in ``num_nonfinite_batches``
    and warned about once (on the CPU). ``num_batches_tracked`` (if given) counts
    the batches used. One call of the ``normlab::update_running_stats_`` operator.
    """
    device = running_mean.device
    nbt = num_batches_tracked if num_batches_tracked is not None else torch.zeros((), dtype=torch.long, device=device)
    skipped = (
        num_nonfinite_batches if num_nonfinite_batches is not None else torch.zeros((), dtype=torch.long, device=device)
    )
    before = skipped.clone()
    _ops.update_running_stats(
        running_mean, running_var, nbt, skipped, mean.detach(), var.detach(), count, weight, False, False, unbiased, who
    )
    return skipped == before


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
    check_eps(eps, "batch_norm")
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
        if dim == 1 and _in_onnx_export():  # the standard BatchNormalization node
            return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
        return _batch_norm_eval(input, running_mean, running_var, weight, bias, eps, dim)

    y, mean, var, count = batch_norm_train(input, weight, bias, eps, feature_dim=dim, mask=mask)
    if running_mean is not None and running_var is not None and not _under_functorch():
        update_running_stats(running_mean, running_var, mean, var, count, momentum, who="batch_norm")
    return y


def _batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight, bias, eps: float, dim: int):
    """``(x - running_mean) * (weight / sqrt(running_var + eps)) + bias`` in differentiable tensor ops.

    The mean is subtracted first (folding it into the shift, ``x * s - mean * s``, loses ``|mean| / std``
    ulps), and half-precision inputs are computed in float32 and rounded once.
    """
    dt = torch.float32 if x.dtype in _HALF else x.dtype
    c, nd = x.shape[dim], x.dim()
    scale = torch.rsqrt(running_var.to(dt) + eps)
    if weight is not None:
        scale = scale * weight.to(dt)
    xc = x.to(dt) - _affine_view(running_mean.to(dt), c, dim, nd)
    if bias is None:
        y = xc * _affine_view(scale, c, dim, nd)
    else:
        y = torch.addcmul(_affine_view(bias.to(dt), c, dim, nd), xc, _affine_view(scale, c, dim, nd))
    return y.to(x.dtype)


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
    statistics (EMA, cumulative, recalibration, synchronisation). An empty batch
    (no values per feature) gives an empty output and ``count`` 0, as
    ``torch.nn`` returns an empty output; one value per feature is an error.
    """
    _check_floating(input, "batch_norm")
    dim = _axis(feature_dim, input.dim(), "batch_norm")
    c = input.shape[dim]
    if mask is not None:
        return _masked_batch_norm(input, check_mask(mask, input, dim), dim, weight, bias, eps)
    n = input.numel() // max(c, 1)
    if n == 1:
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
    if _composite():
        c, nd = x.shape[dim], x.dim()
        dims = tuple(d for d in range(nd) if d != dim)
        y, mean, var = _norm_in_tensor_ops(
            x, _affine_view(weight, c, dim, nd), _affine_view(bias, c, dim, nd), dims, eps, True
        )
        return y, mean.detach().reshape(c), var.detach().reshape(c)
    if _ops.eager_fast(x, weight, bias):
        layout = _column_layout(x, dim)
        if layout is not None:
            y, mean, var, _ = _ops.batch_norm_eager(x, weight, bias, eps, dim, layout)
            return y, mean, var
    x3, back = _column_view(x, dim)
    y3, mean, var, _ = _ops.batch_norm_forward(x3, weight, bias, eps)
    return back(y3), mean, var


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _masked_batch_norm(x: Tensor, mask: Tensor, dim: int, weight, bias, eps: float):
    """Masked statistics in plain differentiable ops (autograd provides the backward)."""
    m = mask.to(x.dtype).unsqueeze(dim)
    dims = tuple(d for d in range(x.dim()) if d != dim)
    count = m.sum(dims)  # scalar count, the same for every feature
    if not torch.compiler.is_compiling() and float(count) == 1:
        raise ValueError("batch_norm: the mask leaves 1 valid position; need more than 1 in training (or none)")
    mean = (x * m).sum(dims, keepdim=True) / count.clamp(min=1)
    xc = (x - mean) * m
    var = (xc * xc).sum(dims, keepdim=True) / count.clamp(min=1)
    c = x.shape[dim]
    nd = x.dim()
    y = _affine((x - mean) * torch.rsqrt(var + eps), _affine_view(weight, c, dim, nd), _affine_view(bias, c, dim, nd))
    return y, mean.detach().view(c), var.detach().view(c), count.detach()


# --------------------------------------------------------------------------- row norms


def _row_layout(view: Sequence[int], red: int, affine_shape: Sequence[int], affine: bool) -> tuple[int, ...]:
    """The kernels' (R, K, G, L) for ``x`` seen as ``view``, normalised over its trailing ``red`` dims.

    R rows of K elements; the affine parameter (broadcast shape ``affine_shape``) of element k of row r
    is index (r % G) * (K / L) + k / L: G counts its distinct values along the leading dims after the
    first, L the trailing normalised elements that share one value (as ``_native.row_layout``).
    """
    lead, inner = view[: len(view) - red], view[len(view) - red :]
    r, k = math.prod(lead), math.prod(inner)
    if not affine:
        return r, k, 1, max(k, 1)
    g = math.prod(affine_shape[1 : len(lead)])
    l = 1
    for d, a in zip(reversed(inner), reversed(affine_shape[len(lead) :])):
        if a != 1:
            break
        l *= d
    return r, k, g, l


def _row_norm(
    x: Tensor, view: Sequence[int], red: int, weight, bias, eps: float, centered: bool, affine_shape, stats=False
):
    """Normalise ``x`` viewed as ``view`` over its trailing ``red`` dims; returns y, mean, var.

    ``weight``/``bias`` as the layer holds them; ``affine_shape`` is their broadcast shape against
    ``view`` (size 1 on dim 0). Without ``stats`` the mean and variance may come back ``None``.
    """
    if x.dtype in _HALF:
        y, mean, var = _row_norm(x.float(), view, red, _f32(weight), _f32(bias), eps, centered, affine_shape, stats)
        return y.to(x.dtype), mean, var
    if x.is_contiguous() and _ops.eager_fast(x, weight, bias):
        layout = _row_layout(view, red, affine_shape, weight is not None or bias is not None)
        out = _ops.row_norm_eager(x, weight, bias, eps, centered, view, red, layout, affine_shape, stats)
        return (out[0], out[1], out[2]) if stats else (out[0], None, None)
    weight = None if weight is None else weight.view(affine_shape)
    bias = None if bias is None else bias.view(affine_shape)
    xv = x.reshape(view)
    if _composite():
        y, mean, var = _norm_in_tensor_ops(xv, weight, bias, tuple(range(xv.dim() - red, xv.dim())), eps, centered)
        if not centered:
            mean = torch.zeros_like(var)
        return y.view(x.shape), mean.detach(), var.detach()
    y, mean, var, _ = _ops.row_norm_forward(xv.contiguous(), weight, bias, eps, red, centered)
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
    check_eps(eps, "layer_norm")
    ns = _check_normalized_shape(input, normalized_shape, "layer_norm")
    _check_affine_shape(weight, ns, "weight", "layer_norm")
    _check_affine_shape(bias, ns, "bias", "layer_norm")
    return _layer_norm(input, ns, weight, bias, eps)


def _layer_norm(input: Tensor, ns: tuple[int, ...], weight, bias, eps: float) -> Tensor:
    """:func:`layer_norm` once its arguments are checked (``normlab.LayerNorm`` checks its own; see
    :func:`_group_norm`)."""
    if _in_onnx_export():  # the standard LayerNormalization node
        return F.layer_norm(input, ns, weight, bias, eps)
    lead = input.numel() // max(math.prod(ns), 1)
    return _row_norm(input, (lead, *ns), len(ns), weight, bias, eps, True, (1, *ns))[0]


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
    eps = torch.finfo(input.dtype).eps if eps is None else check_eps(eps, "rms_norm")
    if _in_onnx_export():  # the standard RMSNormalization node (opset 23)
        return F.rms_norm(input, ns, weight, eps)
    lead = input.numel() // max(math.prod(ns), 1)
    return _row_norm(input, (lead, *ns), len(ns), weight, None, eps, False, (1, *ns))[0]


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
    check_eps(eps, "group_norm")
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
    return _group_norm(input, num_groups, weight, bias, eps, centered)


def _group_norm(input: Tensor, num_groups: int, weight, bias, eps: float, centered: bool) -> Tensor:
    """:func:`group_norm` once its arguments are checked (``normlab.GroupNorm`` checks its own, mostly at
    construction: on a small layer the checks cost as much as the arithmetic)."""
    if centered and _in_onnx_export():  # the standard GroupNormalization node
        return F.group_norm(input, num_groups, weight, bias, eps)
    n, c = input.shape[:2]
    cg = c // num_groups
    spatial = math.prod(input.shape[2:])
    y = _row_norm(input, (n, num_groups, cg, spatial), 2, weight, bias, eps, centered, (1, num_groups, cg, 1))[0]
    return _like_layout(y, input)


def _like_layout(y: Tensor, input: Tensor) -> Tensor:
    """``y`` in ``input``'s memory format: a channels-last input gives a channels-last output, as torch.nn's."""
    if input.dim() in (4, 5) and not input.is_contiguous():
        fmt = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
        if input.is_contiguous(memory_format=fmt):
            return y.contiguous(memory_format=fmt)
    return y


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    num_nonfinite_batches: Tensor | None = None,
    who: str = "instance_norm",
) -> Tensor:
    """Instance normalisation, as :func:`torch.nn.functional.instance_norm`.

    Input (N, C, *); statistics of each sample's channel over its spatial
    positions. With buffers and ``use_input_stats`` the running statistics
    receive the batch average of the per-instance mean and unbiased variance
    (PyTorch's convention); without ``use_input_stats`` they are used instead.
    A batch with non-finite statistics leaves the buffers untouched and is
    counted in ``num_nonfinite_batches`` (if given) and warned about once; an
    empty batch or an empty spatial axis gives an empty output and no update.
    """
    _check_floating(input, "instance_norm")
    check_eps(eps, "instance_norm")
    if input.dim() < 3:
        raise ValueError(
            f"instance_norm: expected input (N, C, L, ...) with spatial dims, got shape {tuple(input.shape)}"
        )
    n, c = input.shape[:2]
    if not use_input_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    spatial = math.prod(input.shape[2:])
    if spatial == 1:
        raise ValueError(
            f"instance_norm: expected more than 1 spatial element per channel, got input shape {tuple(input.shape)}"
        )
    y, mean, var = _row_norm(input, (n, c, spatial), 1, weight, bias, eps, True, (1, c, 1), stats=True)
    if running_mean is not None and running_var is not None and y.numel() and not _under_functorch():
        mean = mean.view(n, c).mean(0)
        var = (var.view(n, c) * (spatial / (spatial - 1))).mean(0)
        update_running_stats(
            running_mean,
            running_var,
            mean,
            var,
            spatial,
            momentum,
            unbiased=False,
            num_nonfinite_batches=num_nonfinite_batches,
            who=who,
        )
    return y
