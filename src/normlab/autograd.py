"""``torch.autograd.Function`` wrappers: forward and analytic backward, written out.

Two functions cover every norm:

* :class:`ColumnNorm` — statistics per channel ``C`` of an ``(A, C, B)`` view
  (BatchNorm). Returns the output and the batch mean and biased variance.
* :class:`RowNorm` — statistics per leading index over the trailing ``red``
  dims (LayerNorm, RMSNorm, GroupNorm, InstanceNorm).

With ``xhat = (x - mu) * invstd`` and ``gw = grad * weight`` the backward is

    centred (mean and variance):  dx = invstd * (gw - mean(gw) - xhat * mean(gw * xhat))
    RMS (no centring):            dx = invstd * (gw - xhat * mean(gw * xhat))
    dweight = sum(grad * xhat),   dbias = sum(grad)

where ``mean`` runs over the statistics' axes and the sums over the axes the
affine parameters are broadcast along.

Twice differentiable: when the backward itself is recorded (``create_graph=True``,
as in Hessian-vector products) it runs :func:`norm_backward`, the same formula
in differentiable tensor ops with the statistics recomputed from ``x``, so
autograd differentiates the analytic backward. Otherwise the fast chunked
kernels of ``normlab._kernels`` run under ``no_grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import _kernels as K

__all__ = ["ColumnNorm", "RowNorm", "norm_backward"]


def norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    stat_dims: tuple[int, ...],
    centered: bool,
    need: tuple[bool, bool, bool],
    affine_shape: torch.Size | tuple[int, ...] | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The analytic backward in differentiable ops (statistics recomputed from ``x``).

    ``weight`` (if given) is already shaped to broadcast against ``x``, and
    ``affine_shape`` is that broadcast shape (``None`` when there is neither
    weight nor bias). Returns ``(dx, dweight, dbias)`` shaped like the affine.
    """
    if centered:
        mean = x.mean(stat_dims, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(stat_dims, keepdim=True)
    else:
        xc = x
        var = (x * x).mean(stat_dims, keepdim=True)
    invstd = torch.rsqrt(var + eps)
    xhat = xc * invstd
    gw = grad if weight is None else grad * weight
    dx = dw = db = None
    if need[0]:
        inner = gw - xhat * (gw * xhat).mean(stat_dims, keepdim=True)
        if centered:
            inner = inner - gw.mean(stat_dims, keepdim=True)
        dx = invstd * inner
    if affine_shape is not None and need[1]:
        dw = K._sum_to(grad * xhat, affine_shape)
    if affine_shape is not None and need[2]:
        db = K._sum_to(grad, affine_shape)
    return dx, dw, db


class ColumnNorm(torch.autograd.Function):
    """Per-channel normalisation of ``x3`` (A, C, B) with batch statistics.

    ``forward(x3, weight, bias, eps) -> (y3, mean, var)``; ``weight``/``bias``
    are ``(C,)`` or ``None``; ``mean``/``var`` (biased) are not differentiable.
    """

    @staticmethod
    def forward(ctx, x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        y3, mean, var, invstd = K.column_forward(x3, weight, bias, eps)  # stats (C,)
        ctx.save_for_backward(x3, weight, bias, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y3, mean, var

    @staticmethod
    def backward(ctx, gy3: Tensor, _gmean, _gvar):
        x3, weight, bias, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        c = x3.shape[1]
        if torch.is_grad_enabled():  # create_graph: differentiate the analytic formula
            w = None if weight is None else weight.view(1, c, 1)
            dx, dw, db = norm_backward(gy3, x3, w, ctx.eps, (0, 2), True, need, (1, c, 1))
            return dx, None if dw is None else dw.view(c), None if db is None else db.view(c), None
        return (*K.column_backward(gy3.contiguous(), x3, mean, invstd, weight, need), None)


class RowNorm(torch.autograd.Function):
    """Normalisation over the trailing ``red`` dims of ``x`` with per-row statistics.

    ``forward(x, weight, bias, eps, red, centered) -> (y, mean, var)``:
    ``weight``/``bias`` broadcast against ``x`` with size 1 on dim 0 (or are
    ``None``); ``mean`` is ``None``-like (zeros) when ``centered`` is False, in
    which case ``var`` is the mean square (RMSNorm).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight, bias, eps: float, red: int, centered: bool):
        x = x.contiguous()
        y, mean, var, invstd = K.row_forward(x, red, centered, eps, weight, bias)  # stats keepdim-shaped
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps, ctx.red, ctx.centered = eps, red, centered
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy: Tensor, _gmean, _gvar):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        red, centered = ctx.red, ctx.centered
        stat_dims = tuple(range(x.dim() - red, x.dim()))
        if torch.is_grad_enabled():
            affine = weight if weight is not None else bias
            shape = None if affine is None else affine.shape
            dx, dw, db = norm_backward(gy, x, weight, ctx.eps, stat_dims, centered, need, shape)
            return dx, dw, db, None, None, None
        dx, dw, db = K.row_backward(gy.contiguous(), x, mean, invstd, weight, bias, red, centered, need)
        return dx, dw, db, None, None, None
