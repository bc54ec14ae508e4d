"""normlab's kernels as PyTorch operators: the ``normlab::`` namespace.

Five operators carry every norm in the library (``torch.ops.normlab.*``):

==============================  ==========================================================
``batch_norm_fwd``              (A, C, B) view -> output, per-channel mean, biased var, invstd
``batch_norm_bwd``              its analytic backward: dx, dweight, dbias
``row_norm_fwd``                normalise over the trailing ``red`` dims (LN, RMS, GN, IN)
``row_norm_bwd``                its analytic backward
``update_running_stats_``       the running-statistics update, in place, with the
                                non-finite-batch guard and the momentum conventions
==============================  ==========================================================

Each has a schema, one implementation for every device (``CompositeExplicitAutograd``:
the compiled C kernels of ``normlab._native`` on the CPU when they take the tensors,
the tensor-op kernels of ``normlab._kernels`` otherwise), a fake kernel (shapes and
dtypes only, for ``torch.compile`` and ``torch.export``), and the forward operators an
autograd formula (``torch.library.register_autograd`` with ``setup_context``). The
backward runs the backward operator; when the backward itself is recorded
(``create_graph=True``, Hessian-vector products) it runs the same formula in
differentiable tensor ops (:func:`normlab.autograd.norm_backward`), so second
derivatives are exact. To ``torch.export`` the operators are opaque nodes (an exported
program names them), and the buffers mutated by ``update_running_stats_`` are declared
in its schema. While ``torch.compile`` traces, :mod:`normlab.functional` runs the norms'
formulas in tensor ops instead, so that inductor can fuse them with their neighbours
(see ``functional._composite``); the running-statistics update stays the
``update_running_stats_`` operator there too (no graph break, no host sync).

``torch.func`` transforms (``vmap``, ``grad``, ``jvp``, ``jacrev``, ``hessian``) need
forward-mode derivatives and batching rules that an opaque operator cannot give;
under them :mod:`normlab.functional` computes the same formulas in differentiable
tensor ops instead (see ``functional._under_functorch``).

The operators take float32 and float64 tensors (half inputs are converted by the
callers, which accumulate in float32) and contiguous inputs.

Eager calls on plain CPU tensors take a shorter road, because on small tensors the Python
around a kernel costs more than the kernel:

* float32/float64 tensors that the compiled kernels take run the C++ operators
  ``normlab::batch_norm_eager`` and ``normlab::row_norm_eager`` (``csrc/eager_ops.cpp``,
  built on first use by :mod:`normlab._native`): the same kernels and the same contract, on
  the input in its own shape and memory format, with the backward a C++ autograd node (a
  recorded backward calls ``normlab::norm_backward_graph``, the formula of
  :func:`normlab.autograd.norm_backward`, so there is one);
* otherwise (no C++ compiler, other dtypes), :func:`batch_norm_forward`,
  :func:`row_norm_forward` and :func:`update_running_stats` run the very same
  implementations, setup and backward through a ``torch.autograd.Function``.

Anything that traces (``torch.compile``, ``torch.export``, fake or functional tensors, a
dispatch mode) gets the operators.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from normlab import _kernels as K
from normlab import _native

__all__ = [
    "batch_norm_fwd",
    "batch_norm_bwd",
    "row_norm_fwd",
    "row_norm_bwd",
    "update_running_stats_",
    "batch_norm_forward",
    "row_norm_forward",
    "update_running_stats",
    "eager_fast",
    "batch_norm_eager",
    "batch_norm_train_eager",
    "row_norm_eager",
    "ema_args",
    "ema_weight",
]

_lib = torch.library.Library("normlab", "DEF")  # noqa: TOR901 - the library lives as long as the process
_lib.define("batch_norm_fwd(Tensor x3, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)")
_lib.define(
    "batch_norm_bwd(Tensor grad, Tensor x3, Tensor mean, Tensor invstd, Tensor? weight, bool[3] need) "
    "-> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "row_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, int red, bool centered) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "row_norm_bwd(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, int red, "
    "bool centered, bool[3] need) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "norm_backward_graph(Tensor grad, Tensor x, Tensor? weight, float eps, int[] dims, bool centered, bool[3] need, "
    "int[]? affine_shape) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
    "Tensor(d!) num_nonfinite_batches, Tensor mean, Tensor var, Tensor count, float? momentum, bool decay, "
    "bool debias, bool unbiased, str who) -> ()"
)


# --------------------------------------------------------------------------- implementations (every device)


def _batch_norm_fwd(x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    y3, mean, var, invstd = K.column_forward(x3, weight, bias, eps)
    return y3, mean, var, invstd


def _empty_unneeded(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _batch_norm_bwd(grad: Tensor, x3: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, need: list[bool]):
    dx, dw, db = K.column_backward(grad.contiguous(), x3, mean, invstd, weight, tuple(need))
    return _empty_unneeded(dx, x3), _empty_unneeded(dw, x3), _empty_unneeded(db, x3)


def _row_norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, red: int, centered: bool):
    y, mean, var, invstd = K.row_forward(x, red, centered, eps, weight, bias)
    return y, mean, var, invstd


def _row_norm_bwd(grad, x, mean, invstd, weight, bias, red: int, centered: bool, need: list[bool]):
    dx, dw, db = K.row_backward(grad.contiguous(), x, mean, invstd, weight, bias, red, centered, tuple(need))
    return _empty_unneeded(dx, x), _empty_unneeded(dw, x), _empty_unneeded(db, x)


def _norm_backward_graph(grad, x, weight, eps: float, dims: list[int], centered: bool, need: list[bool], affine_shape):
    """:func:`normlab.autograd.norm_backward` as an operator: what the C++ nodes of csrc/eager_ops.cpp call when
    their backward is recorded (``create_graph=True``); unneeded gradients come back empty."""
    from normlab.autograd import norm_backward

    shape = None if affine_shape is None else torch.Size(affine_shape)
    dx, dw, db = norm_backward(grad, x, weight, eps, tuple(dims), centered, tuple(need), shape)
    return _empty_unneeded(dx, x), _empty_unneeded(dw, x), _empty_unneeded(db, x)


_lib.impl("norm_backward_graph", _norm_backward_graph, "CompositeImplicitAutograd")
_lib.impl("batch_norm_fwd", _batch_norm_fwd, "CompositeExplicitAutograd")
_lib.impl("batch_norm_bwd", _batch_norm_bwd, "CompositeExplicitAutograd")
_lib.impl("row_norm_fwd", _row_norm_fwd, "CompositeExplicitAutograd")
_lib.impl("row_norm_bwd", _row_norm_bwd, "CompositeExplicitAutograd")


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


def ema_args(
    momentum: float | None, num_batches_tracked: Tensor, n: float, decay: bool, debias: bool, unbiased: bool
) -> tuple[float, float]:
    """On the CPU: the new batch's weight (:func:`ema_weight`) and the factor of its variance (``n / (n - 1)``
    when ``unbiased``) for a batch of ``n`` values per feature. Reads ``num_batches_tracked`` only when the
    weight depends on the step (cumulative average, debiasing)."""
    step = int(num_batches_tracked) + 1 if momentum is None or debias else 1
    weight = ema_weight(momentum, step, convention="decay" if decay else "torch", debias=debias)
    return weight, (n / (n - 1) if unbiased and n > 1 else 1.0)


_warned: set[str] = set()


def _warn_skipped(who: str, status: int, dtype: torch.dtype) -> None:
    """Warn once per process and reason that a batch was kept out of the running statistics.

    ``status`` is the update's result, ``_native.EMA_NONFINITE`` or ``_native.EMA_OVERFLOW``.
    """
    reason = "nonfinite" if status == _native.EMA_NONFINITE else "overflow"
    if reason in _warned:
        return
    _warned.add(reason)
    if reason == "nonfinite":
        what = "a batch with non-finite values (NaN or infinity)"
        hint = "check the input or the loss scale"
    else:
        what = f"a finite batch whose variance overflows {dtype} (values too large for the layer's dtype)"
        hint = "rescale the input, or run the layer in float64"
    warnings.warn(
        f"{who}: {what} was not used to update the running statistics (the update was skipped and counted in "
        f"`num_nonfinite_batches`); {hint} — further skips are counted silently",
        RuntimeWarning,
        stacklevel=2,
    )


def _update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    num_nonfinite_batches: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    momentum: float | None,
    decay: bool,
    debias: bool,
    unbiased: bool,
    who: str,
) -> None:
    convention = "decay" if decay else "torch"
    on_host = not isinstance(count, Tensor) or count.device.type == "cpu"  # a number on the eager path
    if on_host and num_batches_tracked.device.type == "cpu":  # host numbers: no sync to avoid
        n = float(count)
        if n == 0:  # an empty batch: nothing to average in, counted as torch.nn counts it
            num_batches_tracked.add_(1)
            return
        weight, scale = ema_args(momentum, num_batches_tracked, n, decay, debias, unbiased)
        if _native.usable(mean, var, running_mean, running_var):
            status = _native.ema_update(running_mean, running_var, mean, var, weight, scale)
        else:
            status = _update_tensor_ops(running_mean, running_var, mean, var, scale, weight)
        if status == _native.EMA_UPDATED:
            num_batches_tracked.add_(1)
        else:
            num_nonfinite_batches.add_(1)
            _warn_skipped(who, status, running_var.dtype)
        return
    # on accelerators: no host sync; the skip is decided by torch.where and counted, not warned about
    n = count.to(mean.dtype)
    scale = n / (n - 1).clamp(min=1) if unbiased else torch.ones_like(n)
    var = var * scale
    ok = torch.isfinite(mean).all() & torch.isfinite(var).all() & (n > 0)
    step = (num_batches_tracked + 1).to(running_mean.dtype)
    weight = ema_weight(momentum, step, convention=convention, debias=debias)
    running_mean.copy_(
        torch.where(ok, running_mean * (1 - weight) + mean.to(running_mean.dtype) * weight, running_mean)
    )
    running_var.copy_(torch.where(ok, running_var * (1 - weight) + var.to(running_var.dtype) * weight, running_var))
    num_batches_tracked.add_((ok | (n == 0)).long())
    num_nonfinite_batches.add_((~ok & (n > 0)).long())


def _update_tensor_ops(running_mean, running_var, mean, var, scale: float, weight: float) -> int:
    """The CPU update in tensor ops (mixed dtypes, or no compiled kernels): ``ema_update``'s contract."""
    if not torch.isfinite(mean).all():
        return _native.EMA_NONFINITE
    var = var.to(running_var.dtype) * scale
    if not torch.isfinite(var).all():
        return _native.EMA_OVERFLOW
    running_mean.mul_(1 - weight).add_(mean.to(running_mean.dtype), alpha=weight)
    running_var.mul_(1 - weight).add_(var, alpha=weight)
    return _native.EMA_UPDATED


_lib.impl("update_running_stats_", _update_running_stats_, "CompositeExplicitAutograd")
# the statistics never require grad: nothing to record for autograd
_lib.impl("update_running_stats_", torch.library.fallthrough_kernel, "Autograd")


# --------------------------------------------------------------------------- fake kernels (shapes and dtypes)


@torch.library.register_fake("normlab::batch_norm_fwd")
def _(x3, weight, bias, eps):
    c = x3.shape[1]
    return torch.empty_like(x3), x3.new_empty(c), x3.new_empty(c), x3.new_empty(c)


@torch.library.register_fake("normlab::batch_norm_bwd")
def _(grad, x3, mean, invstd, weight, need):
    c = x3.shape[1]
    return (
        torch.empty_like(x3) if need[0] else x3.new_empty(0),
        x3.new_empty(c) if need[1] and weight is not None else x3.new_empty(0),
        x3.new_empty(c) if need[2] else x3.new_empty(0),
    )


def _keep_shape(x: Tensor, red: int) -> list:
    return [*x.shape[: x.dim() - red], *([1] * red)]


@torch.library.register_fake("normlab::row_norm_fwd")
def _(x, weight, bias, eps, red, centered):
    keep = _keep_shape(x, red)
    return torch.empty_like(x), x.new_empty(keep), x.new_empty(keep), x.new_empty(keep)


@torch.library.register_fake("normlab::row_norm_bwd")
def _(grad, x, mean, invstd, weight, bias, red, centered, need):
    return (
        torch.empty_like(x) if need[0] else x.new_empty(0),
        x.new_empty(weight.shape) if need[1] and weight is not None else x.new_empty(0),
        x.new_empty(bias.shape) if need[2] and bias is not None else x.new_empty(0),
    )


@torch.library.register_fake("normlab::update_running_stats_")
def _(running_mean, running_var, num_batches_tracked, num_nonfinite_batches, *args):
    return None


# --------------------------------------------------------------------------- autograd


def _setup_batch_norm(ctx, inputs, output) -> None:
    x3, weight, bias, eps = inputs
    _, mean, var, invstd = output
    ctx.save_for_backward(x3, weight, mean, invstd)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var, invstd)


def _backward_batch_norm(ctx, grad, _gmean, _gvar, _ginvstd):
    from normlab.autograd import norm_backward

    x3, weight, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    c = x3.shape[1]
    if torch.is_grad_enabled():  # create_graph: differentiate the analytic formula
        w = None if weight is None else weight.view(1, c, 1)
        dx, dw, db = norm_backward(grad, x3, w, ctx.eps, (0, 2), True, need, (1, c, 1))
        return dx, None if dw is None else dw.view(c), None if db is None else db.view(c), None
    need = [need[0], need[1] and weight is not None, need[2]]
    dx, dw, db = (_batch_norm_bwd if _eager(x3) else batch_norm_bwd)(grad, x3, mean, invstd, weight, need)
    return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None


def _setup_row_norm(ctx, inputs, output) -> None:
    x, weight, bias, eps, red, centered = inputs
    _, mean, var, invstd = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.eps, ctx.red, ctx.centered = eps, red, centered
    ctx.mark_non_differentiable(mean, var, invstd)


def _backward_row_norm(ctx, grad, _gmean, _gvar, _ginvstd):
    from normlab.autograd import norm_backward

    x, weight, bias, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    red, centered = ctx.red, ctx.centered
    if torch.is_grad_enabled():
        affine = weight if weight is not None else bias
        shape = None if affine is None else affine.shape
        stat_dims = tuple(range(x.dim() - red, x.dim()))
        dx, dw, db = norm_backward(grad, x, weight, ctx.eps, stat_dims, centered, need, shape)
        return dx, dw, db, None, None, None
    need = [need[0], need[1] and weight is not None, need[2] and bias is not None]
    bwd = _row_norm_bwd if _eager(x) else row_norm_bwd
    dx, dw, db = bwd(grad, x, mean, invstd, weight, bias, red, centered, need)
    return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None, None, None


torch.library.register_autograd("normlab::batch_norm_fwd", _backward_batch_norm, setup_context=_setup_batch_norm)
torch.library.register_autograd("normlab::row_norm_fwd", _backward_row_norm, setup_context=_setup_row_norm)

# the operators, resolved once (calling an overload directly skips the packet's look-up)
batch_norm_fwd = torch.ops.normlab.batch_norm_fwd.default
batch_norm_bwd = torch.ops.normlab.batch_norm_bwd.default
row_norm_fwd = torch.ops.normlab.row_norm_fwd.default
row_norm_bwd = torch.ops.normlab.row_norm_bwd.default
update_running_stats_ = torch.ops.normlab.update_running_stats_.default


# --------------------------------------------------------------------------- the eager path


def _eager(x: Tensor) -> bool:
    """True for an eager call on a plain CPU tensor: nothing traces it, so the operators' Python layers can go."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:  # dynamo, torch.jit.trace
        return False
    return type(x) is Tensor and x.is_cpu and _get_current_dispatch_mode() is None


class _EagerBatchNorm(torch.autograd.Function):
    """``batch_norm_fwd`` for eager CPU calls: its implementation, setup and backward, without the dispatcher."""

    @staticmethod
    def forward(ctx, x3, weight, bias, eps):
        out = _batch_norm_fwd(x3, weight, bias, eps)
        _setup_batch_norm(ctx, (x3, weight, bias, eps), out)
        return out

    backward = staticmethod(_backward_batch_norm)


class _EagerRowNorm(torch.autograd.Function):
    """``row_norm_fwd`` for eager CPU calls (see :class:`_EagerBatchNorm`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, red, centered):
        out = _row_norm_fwd(x, weight, bias, eps, red, centered)
        _setup_row_norm(ctx, (x, weight, bias, eps, red, centered), out)
        return out

    backward = staticmethod(_backward_row_norm)


def batch_norm_forward(x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """``normlab::batch_norm_fwd(x3, weight, bias, eps)`` -> ``(y3, mean, var, invstd)``, differentiable in y3."""
    if _eager(x3):
        return _EagerBatchNorm.apply(x3, weight, bias, eps)
    return batch_norm_fwd(x3, weight, bias, eps)


def row_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, red: int, centered: bool):
    """``normlab::row_norm_fwd(...)`` -> ``(y, mean, var, invstd)``, differentiable in y."""
    if _eager(x):
        return _EagerRowNorm.apply(x, weight, bias, eps, red, centered)
    return row_norm_fwd(x, weight, bias, eps, red, centered)


def eager_fast(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """True when the C++ eager operators (``csrc/eager_ops.cpp``) take this call.

    An eager call (:func:`_eager`, outside ``torch.func`` transforms) on a non-empty float32/float64
    CPU tensor, with parameters of its dtype, contiguous, on the CPU, and the operators built. The
    memory layout of ``x`` is the caller's to check (each operator takes its own).
    """
    if not (_eager(x) and x.dtype in _native._DTYPES and x.numel()) or torch._C._are_functorch_transforms_active():
        return False  # (torch.func transforms cannot see into a C++ autograd node)
    for t in (weight, bias):
        if t is not None and (t.dtype != x.dtype or not t.is_cpu or not t.is_contiguous()):
            return False
    return _native.eager_ops()


def batch_norm_eager(x: Tensor, weight, bias, eps: float, dim: int, layout: tuple[int, int, int]):
    """``normlab::batch_norm_eager``: ``batch_norm_fwd`` on ``x`` itself, whose memory is ``layout`` = (A, C, B).

    ``(y, mean, var, invstd)`` with ``y`` in ``x``'s shape and memory format; only after :func:`eager_fast`.
    """
    return torch.ops.normlab.batch_norm_eager.default(x, weight, bias, eps, dim, layout)


def batch_norm_train_eager(
    x: Tensor,
    weight,
    bias,
    eps: float,
    dim: int,
    layout,
    buffers: tuple[Tensor, Tensor, Tensor, Tensor],
    who: str,
    ema: tuple[float, float],
) -> Tensor:
    """``normlab::batch_norm_train_eager``: :func:`batch_norm_eager` and the running-statistics update in one call.

    ``buffers`` = (running_mean, running_var, num_batches_tracked, num_nonfinite_batches), the running
    ones in ``x``'s dtype and contiguous; ``ema`` = :func:`ema_args`. A skipped batch is warned about as
    :func:`update_running_stats` warns. Only after :func:`eager_fast`.
    """
    y, status = torch.ops.normlab.batch_norm_train_eager.default(x, weight, bias, eps, dim, layout, *buffers, *ema)
    if status != _native.EMA_UPDATED:
        _warn_skipped(who, status, buffers[1].dtype)
    return y


def row_norm_eager(x: Tensor, weight, bias, eps: float, centered: bool, view, red: int, layout, affine_shape, stats):
    """``normlab::row_norm_eager``: ``row_norm_fwd`` on contiguous ``x`` seen as ``view`` (statistics keep its shape).

    ``weight``/``bias`` as the layer holds them, ``affine_shape`` their broadcast shape against ``view``,
    ``layout`` the kernels' (R, K, G, L). Returns ``[y, mean, var, invstd]`` with ``y`` in ``x``'s shape, or
    ``[y]`` alone when not ``stats`` (cheaper: each output has autograd bookkeeping). Only after :func:`eager_fast`.
    """
    return torch.ops.normlab.row_norm_eager.default(
        x, weight, bias, eps, centered, view, red, layout, affine_shape, stats
    )


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    num_nonfinite_batches: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int | float | Tensor,
    momentum: float | None,
    decay: bool,
    debias: bool,
    unbiased: bool,
    who: str,
) -> None:
    """``normlab::update_running_stats_(...)``, in place; ``count`` may also be a number."""
    args = (running_mean, running_var, num_batches_tracked, num_nonfinite_batches, mean, var)
    if _eager(running_mean):
        _update_running_stats_(*args, count, momentum, decay, debias, unbiased, who)
        return
    if not isinstance(count, Tensor):
        count = torch.tensor(float(count), dtype=torch.float64)
    update_running_stats_(*args, count, momentum, decay, debias, unbiased, who)
