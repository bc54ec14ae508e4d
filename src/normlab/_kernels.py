"""Fast, exact reductions and elementwise passes for the normalisation core.

Everything here runs without autograd on plain tensors; ``normlab.autograd``
wraps it. Two layouts cover every norm in the library:

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

import torch
from torch import Tensor

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


def column_mean_var(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x3`` (A, C, B) over A and B."""
    a, c, b = x3.shape
    n = a * b
    sdt = stat_dtype(x3.dtype)
    mean = x3.sum((0, 2), dtype=sdt) / n  # (C,)
    m2 = torch.zeros(c, dtype=sdt, device=x3.device)
    step = _rows_per_chunk(x3)
    buf = torch.empty((step, c, b), dtype=sdt, device=x3.device)
    centre = mean.view(1, c, 1)
    for i, j in _chunks(a, step):
        d = buf[: j - i]
        torch.sub(x3[i:j], centre, out=d)  # (a', C, B)
        if b >= 32:  # long contiguous rows: a norm kernel beats square + sum
            m2 += torch.linalg.vector_norm(d, dim=2).square_().sum(0)
        else:
            m2 += d.mul_(d).sum((0, 2))
    return mean, m2 / n


def column_sums_for_backward(g3: Tensor, x3: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``sum(g)`` and ``sum(g * (x - mean))`` per channel of (A, C, B) tensors."""
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


def row_stats(x: Tensor, red: int, centered: bool) -> tuple[Tensor | None, Tensor]:
    """Per-row mean (or None) and biased variance / mean square over the trailing ``red`` dims.

    Returned with ``keepdim`` shape so they broadcast against ``x``.
    """
    dims = tuple(range(x.dim() - red, x.dim()))
    sdt = stat_dtype(x.dtype)
    k = 1
    for d in dims:
        k *= x.shape[d]
    flat = x.reshape(*x.shape[: x.dim() - red], k)
    if not centered:
        ms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True, dtype=sdt).square_() / k
        return None, ms.view(*x.shape[: x.dim() - red], *([1] * red))
    mean = flat.sum(-1, keepdim=True, dtype=sdt) / k
    m2 = torch.empty_like(mean)
    step = _rows_per_chunk(flat)
    buf = torch.empty((step, *flat.shape[1:]), dtype=sdt, device=x.device)
    for i, j in _chunks(flat.shape[0], step):
        d = buf[: j - i]
        torch.sub(flat[i:j], mean[i:j], out=d)
        torch.linalg.vector_norm(d, dim=-1, keepdim=True, out=m2[i:j])
    var = m2.square_() / k
    keep = (*x.shape[: x.dim() - red], *([1] * red))
    return mean.view(keep), var.view(keep)


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
        for s in scales:
            if s is not None:
                o.mul_(_rows(s, i, j))
        if addend is not None:
            o.addcmul_(_rows(addend[0], i, j), _rows(addend[1], i, j))
        if shift is not None:
            o.add_(_rows(shift, i, j))
    return out
