"""The analytic backward of every norm, written out.

Two forward operators cover every norm (``normlab._ops``, registered with
``torch.library``):

* ``normlab::batch_norm_fwd`` — statistics per channel ``C`` of an ``(A, C, B)``
  view (BatchNorm). Returns the output and the batch mean and biased variance.
* ``normlab::row_norm_fwd`` — statistics per leading index over the trailing
  ``red`` dims (LayerNorm, RMSNorm, GroupNorm, InstanceNorm).

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
kernels of ``normlab._kernels`` run (the ``*_bwd`` operators).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import _kernels as K

__all__ = ["norm_backward"]


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
