"""Fast, exact reductions and elementwise passes for the normalisation core.

Everything here runs without autograd on plain tensors; ``normlab.autograd``
wraps it. Each function dispatches to the compiled CPU kernels of
``normlab._native`` when they can take the tensors (CPU, contiguous,
float32/float64) and otherwise runs the tensor-op version below, which works
on any device. Both compute the same formulas; the tests run on both.

Two layouts cover every norm in the library:

* **column** — ``x3`` of shape ``(A, C, B)``: statistics per ``C`` over ``A``
  and ``B`` (BatchNorm in any memory format, once viewed this way);
* **row** — ``x`` of shape ``(R, *rest)``: statistics per leading index over
  the trailing ``red`` dims (LayerNorm, RMSNorm, GroupNorm, InstanceNorm).

Why chunks: on a CPU a fresh large tensor costs more than the arithmetic (it is
mapped and page-faulted anew), and ``torch.var_mean`` uses a slow Welford
kernel. So variances are computed by the exact two-pass formula
``sum((x - mean)^2)``, with ``x - mean`` materialised a few megabytes at a
time in one reused buffer that stays in cache. Centering before squaring keeps
the result accurate when ``|mean| >> std`` (the one-pass ``E[x^2] - E[x]^2``
does not).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlab import _native

__all__: list[str] = []  # private module

_CHUNK_BYTES = 2 << 20  # per reused buffer; fits in L2/L3 on current CPUs


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in at least float32 (half inputs accumulate in float32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _rows_per_chunk(t: Tensor) -> int:
    per_row = max(1, t[0].numel() * t.element_size())
    return max(1, min(t.shape[0], _CHUNK_BYTES // per_row))


def _chunks(n: int, step: int):
    for i in range(0, n, step):
        yield i, min(n, i + step)


# --------------------------------------------------------------------------- column layout


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype means are summed in: float64 for float32 (the mean of values with |mean| >> std needs it)."""
    return torch.float64 if dtype == torch.float32 else stat_dtype(dtype)


def _split(mean_wide: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``mean`` rounded to ``dtype`` and the remainder rounding lost (``None`` when nothing was lost)."""
    mean = mean_wide.to(dtype)
    return mean, None if mean_wide.dtype == dtype else (mean_wide - mean.to(mean_wide.dtype)).to(dtype)


def column_mean_var(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x3`` (A, C, B) over A and B."""
    if _native.usable(x3):
        mean, var = _native.column_mean_var(x3)
        return mean.to(x3.dtype), var.to(x3.dtype)
    mean_wide, var = _column_moments(x3)
    return mean_wide.to(var.dtype), var


def _column_moments(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Tensor-op ``(mean, var)`` of (A, C, B); the mean in the wide dtype, the variance in the statistics dtype."""
    a, c, b = x3.shape
    n = a * b
    sdt = stat_dtype(x3.dtype)
    mean = x3.sum((0, 2), dtype=_wide(x3.dtype)) / n  # (C,)
    m2 = torch.zeros(c, dtype=sdt, device=x3.device)
    step = _rows_per_chunk(x3)
    buf = torch.empty((step, c, b), dtype=sdt, device=x3.device)
    hi, lo = _split(mean, sdt)
    for i, j in _chunks(a, step):
        d = buf[: j - i]
        torch.sub(x3[i:j], hi.view(1, c, 1), out=d)  # (a', C, B)
        if lo is not None:
            d.sub_(lo.view(1, c, 1))
        if b >= 32:  # long contiguous rows: a norm kernel beats square + sum
            m2 += torch.linalg.vector_norm(d, dim=2).square_().sum(0)
        else:
            m2 += d.mul_(d).sum((0, 2))
    return mean, m2 / n


def column_sums_for_backward(g3: Tensor, x3: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``sum(g)`` and ``sum(g * (x - mean))`` per channel of (A, C, B) tensors."""
    if _native.usable(g3, x3):
        sum_g, sum_gc = _native.column_sums_for_backward(g3, x3, mean)
        return sum_g.to(x3.dtype), sum_gc.to(x3.dtype)
    a, c, b = x3.shape
    sdt = stat_dtype(x3.dtype)
    sum_g = g3.sum((0, 2), dtype=sdt)
    sum_gc = torch.zeros(c, dtype=sdt, device=x3.device)
    step = _rows_per_chunk(x3)
    buf = torch.empty((step, c, b), dtype=sdt, device=x3.device)
    centre = mean.view(1, c, 1)
    for i, j in _chunks(a, step):
        d = buf[: j - i]
        torch.sub(x3[i:j], centre, out=d)
        sum_gc += d.mul_(g3[i:j]).sum((0, 2))
    return sum_g, sum_gc


# --------------------------------------------------------------------------- row layout


def row_forward(
    x: Tensor, red: int, centered: bool, eps: float, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise ``x`` over its trailing ``red`` dims, statistics and output in one sweep.

    Chunk by chunk (rows of dim 0): the centred values are written straight
    into the output, their norm gives the variance (exact two-pass formula, the
    second pass in cache), then the output is scaled and shifted in place. So
    ``x`` is read from memory once and the output written once.

    Returns ``y`` and the per-row ``mean`` (zeros when not ``centered``),
    ``var`` (biased; the mean square when not ``centered``) and ``invstd``,
    keepdim-shaped.
    ``weight``/``bias`` broadcast against ``x`` with size 1 on dim 0.
    """
    lead = x.shape[: x.dim() - red]
    keep = (*lead, *([1] * red))
    if x.numel() == 0:  # no rows, or rows of nothing: statistics of nothing are mean 0, variance 0
        zeros = torch.zeros(keep, dtype=stat_dtype(x.dtype), device=x.device)
        return torch.empty_like(x), zeros, zeros.clone(), torch.full_like(zeros, eps).rsqrt_()
    layout = _native.row_layout(x, red, weight if weight is not None else bias)
    if layout is not None and _native.usable(x, weight, bias):
        y, mean, var, rstd = _native.row_forward(x, layout, centered, eps, weight, bias)
        return y, mean.view(keep), var.view(keep), rstd.view(keep)
    k = x[0].numel() // max(1, math.prod(lead[1:])) if x.numel() else 1
    flat = x.view(*lead, -1)  # (R, ..., K)
    sdt = stat_dtype(x.dtype)
    mean = torch.zeros((*lead, 1), dtype=sdt, device=x.device)
    var = torch.empty((*lead, 1), dtype=sdt, device=x.device)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    yflat = y.view(flat.shape)
    # per-row factor when the affine is constant along the last normalised dim (GroupNorm, InstanceNorm)
    fold = weight is not None and weight.shape[-1] == 1 and red >= 1
    for i, j in _chunks(flat.shape[0], _rows_per_chunk(flat)):
        xc, yc = flat[i:j], yflat[i:j]
        if centered:
            hi, lo = _split(torch.sum(xc, -1, keepdim=True, dtype=_wide(x.dtype)).div_(k), sdt)
            mean[i:j] = hi
            torch.sub(xc, hi, out=yc)
            if lo is not None:  # what rounding the mean to x's dtype lost (see _split)
                yc.sub_(lo)
        else:
            yc.copy_(xc)
        torch.linalg.vector_norm(yc, dim=-1, keepdim=True, dtype=sdt, out=var[i:j])
        inv = var[i:j].square_().div_(k).add(eps).rsqrt_()
        yv = y[i:j]  # the chunk in x's own shape, for the affine
        if fold:
            yv.mul_(inv.view(inv.shape[:-1] + (1,) * red).mul(weight).to(x.dtype))
        else:
            yc.mul_(inv.to(x.dtype))
            if weight is not None:
                yv.mul_(weight)
        if bias is not None:
            yv.add_(bias)
    var = var.view(keep)
    return y, mean.view(keep), var, torch.rsqrt(var + eps)


# --------------------------------------------------------------------------- elementwise passes


def _rows(t: Tensor | None, i: int, j: int) -> Tensor | None:
    """Rows ``i:j`` of a per-row tensor; a tensor broadcast along dim 0 (size 1) is returned whole."""
    if t is None or t.dim() == 0 or t.shape[0] == 1:
        return t
    return t[i:j]


def centred_affine(
    x: Tensor,
    centre: Tensor | None,
    scales: tuple[Tensor | None, ...],
    shift: Tensor | None = None,
    addend: tuple[Tensor, Tensor] | None = None,
    centre_lo: Tensor | None = None,
) -> Tensor:
    """``(x - centre) * scales[0] * scales[1] ... + addend[0] * addend[1] + shift`` in one sweep over ``x``.

    Every operand broadcasts against ``x`` and has size 1 or ``x.shape[0]`` on
    dim 0. Subtracting the centre first keeps full precision when
    ``|mean| >> std`` (folding it into a shift, ``x * s - mean * s``, does not);
    working chunk by chunk keeps the intermediate passes in cache, so the cost
    is one read of each input and one write of the output.
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    step = _rows_per_chunk(x)
    for i, j in _chunks(x.shape[0], step):
        o = out[i:j]
        if centre is None:
            o.copy_(x[i:j])
        else:
            torch.sub(x[i:j], _rows(centre, i, j), out=o)
            if centre_lo is not None:  # what rounding the centre to x's dtype lost (see _split)
                o.sub_(_rows(centre_lo, i, j))
        for s in scales:
            if s is not None:
                o.mul_(_rows(s, i, j))
        if addend is not None:
            o.addcmul_(_rows(addend[0], i, j), _rows(addend[1], i, j))
        if shift is not None:
            o.add_(_rows(shift, i, j))
    return out


def column_forward(x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """BatchNorm forward on (A, C, B): ``(y3, mean, var, invstd)`` with per-channel (C,) statistics.

    An empty batch gives mean 0 and variance 0 (the statistics of nothing; callers do not use them).
    """
    if x3.numel() == 0:
        zeros = torch.zeros(x3.shape[1], dtype=stat_dtype(x3.dtype), device=x3.device)
        return torch.empty_like(x3), zeros, zeros.clone(), torch.full_like(zeros, eps).rsqrt_()
    if _native.usable(x3, weight, bias):
        return _native.column_forward(x3, weight, bias, eps)
    mean_wide, var = _column_moments(x3)
    mean, lo = _split(mean_wide, var.dtype)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight
    shift = bias if bias is not None else torch.zeros_like(scale)
    return column_affine(x3, mean, scale, shift, centre_lo=lo), mean, var, invstd


def column_backward(
    g3: Tensor, x3: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, need: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """BatchNorm backward on (A, C, B): ``(dx, dweight, dbias)``, each ``None`` when not needed.

    With ``a = weight * invstd`` and ``k = mean(g * xhat) * invstd`` per channel,
    ``dx = a * (g - mean(g) - xhat * mean(g * xhat)) = (x - mean) * (-a k) + g * a - a * mean(g)``;
    ``dweight = sum(g * xhat)``, ``dbias = sum(g)``.
    """
    need = (need[0], need[1] and weight is not None, need[2])
    if x3.numel() == 0:  # an empty batch: empty input gradient, zero parameter gradients (sums of nothing)
        c = x3.shape[1]
        zeros = torch.zeros(c, dtype=x3.dtype, device=x3.device)
        return (
            torch.empty_like(x3) if need[0] else None,
            zeros if need[1] else None,
            zeros.clone() if need[2] else None,
        )
    if _native.usable(g3, x3, mean, invstd, weight):
        return _native.column_backward(g3, x3, mean, invstd, weight, need)
    n = x3.shape[0] * x3.shape[2]
    sum_g, sum_gc = column_sums_for_backward(g3, x3, mean)  # (C,), (C,)
    dx = None
    if need[0]:
        a = invstd if weight is None else invstd * weight
        k = sum_gc * invstd * invstd / n
        dx = column_affine(x3, mean, -a * k, -a * sum_g / n, g3, a)
    dw = (sum_gc * invstd).to(weight.dtype) if need[1] else None
    db = sum_g.to(x3.dtype) if need[2] else None
    return dx, dw, db


def column_affine(
    x3: Tensor,
    centre: Tensor,
    kx: Tensor,
    shift: Tensor,
    g3: Tensor | None = None,
    kg: Tensor | None = None,
    *,
    centre_lo: Tensor | None = None,
) -> Tensor:
    """``(x - centre) * kx + g * kg + shift`` on (A, C, B) tensors with per-channel (C,) coefficients.

    BatchNorm's output (``kx = weight * invstd``, ``shift = bias``) and its input
    gradient (see ``ColumnNorm.backward``) are both of this form.
    """
    if _native.usable(x3, g3) and centre_lo is None:
        return _native.column_affine(x3, centre, kx, shift, g3, kg)
    c = x3.shape[1]

    def col(t):
        return t.view(1, c, 1).to(x3.dtype)

    addend = None if g3 is None else (g3, col(kg))
    lo = None if centre_lo is None else col(centre_lo)
    return centred_affine(x3, col(centre), (col(kx),), col(shift), addend, centre_lo=lo)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the dims where ``shape`` has size 1 (keepdim), i.e. undo broadcasting."""
    dims = tuple(d for d, s in enumerate(shape) if s == 1 and t.shape[d] != 1)
    return t.sum(dims, keepdim=True) if dims else t


def row_backward(
    gy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    red: int,
    centered: bool,
    need: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of :func:`row_forward`: ``(dx, dweight, dbias)`` (each ``None`` when not needed).

    ``dx = invstd * (gw - mean(gw) - xhat * mean(gw * xhat))`` with ``gw = g * weight``
    (no ``mean(gw)`` term when not centred); ``dweight = sum(g * xhat)``,
    ``dbias = sum(g)`` over the axes the affine broadcasts along.
    """
    need_dw = weight is not None and need[1]
    need_db = bias is not None and need[2]
    if x.numel() == 0:  # empty input gradient, zero parameter gradients (sums of nothing)
        return (
            torch.empty_like(x) if need[0] else None,
            torch.zeros_like(weight) if need_dw else None,
            torch.zeros_like(bias) if need_db else None,
        )
    affine = weight if weight is not None else bias
    layout = _native.row_layout(x, red, affine)
    if layout is not None and _native.usable(gy, x, weight):
        dx, dw, db = _native.row_backward(gy, x, layout, weight, mean, invstd, centered, need[0], need_dw or need_db)
        return dx, dw.view(weight.shape) if need_dw else None, db.view(bias.shape) if need_db else None
    stat_dims = tuple(range(x.dim() - red, x.dim()))
    sdt = invstd.dtype
    dx = torch.empty_like(x) if need[0] else None
    dw = torch.zeros(weight.shape, dtype=sdt, device=x.device) if need_dw else None
    step = _rows_per_chunk(x)
    xh = torch.empty((step, *x.shape[1:]), dtype=sdt, device=x.device)
    tmp = torch.empty_like(xh)
    gwb = torch.empty_like(xh) if weight is not None else None
    for i, j in _chunks(x.shape[0], step):
        xhc, tc = xh[: j - i], tmp[: j - i]
        inv = invstd[i:j]
        torch.sub(x[i:j], mean[i:j], out=xhc)
        xhc.mul_(inv)
        gc = gy[i:j]
        if dw is not None:
            dw += _sum_to(torch.mul(gc, xhc, out=tc), dw.shape)
        if dx is None:
            continue
        gw = gc if weight is None else torch.mul(gc, weight, out=gwb[: j - i])
        m2 = torch.mul(gw, xhc, out=tc).mean(stat_dims, keepdim=True)
        dxc = dx[i:j]
        torch.mul(xhc, m2, out=dxc)
        torch.sub(gw, dxc, out=dxc)
        if centered:
            dxc.sub_(gw.mean(stat_dims, keepdim=True))
        dxc.mul_(inv)
    db = _sum_to(gy, bias.shape) if need_db else None
    if dw is not None:
        dw = dw.to(weight.dtype)
    return dx, dw, db
