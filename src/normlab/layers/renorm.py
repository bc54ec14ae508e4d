"""Batch Renormalization (Ioffe, 2017): BatchNorm whose training output does not depend on the batch's statistics alone.

In training, with the batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)``
(biased variance, as BatchNorm) and the running ones ``mu``,
``sigma = sqrt(running_var + eps)`` (those eval mode divides by),

.. math::

    r = \\mathrm{clip}(\\sigma_B / \\sigma,\\ 1/r_{max},\\ r_{max}), \\qquad
    d = \\mathrm{clip}((\\mu_B - \\mu) / \\sigma,\\ -d_{max},\\ d_{max})

    y = \\gamma \\left(\\frac{x - \\mu_B}{\\sigma_B}\\, r + d\\right) + \\beta

with ``r`` and ``d`` treated as constants in backprop (no gradient flows
through them). When neither is clipped, ``y`` equals the eval-mode output
``gamma (x - mu) / sigma + beta``; with ``r_max = 1``, ``d_max = 0`` it is
BatchNorm. The running statistics are updated after the output is computed,
exactly as BatchNorm updates them (same momentum conventions, unbiased
variance stored by default), so ``state_dict`` keys and shapes equal those of
``torch.nn.BatchNorm*d``. Eval mode (and ``frozen``) is BatchNorm's.

Warm-up, as in the paper (BN first, then the limits relaxed): at step ``t``
(``num_batches_tracked`` before this batch, i.e. the batches already seen)

    r_max(t) = 1 + (r_max - 1) * f_r(t),     d_max(t) = d_max * f_d(t)

where ``f(t)`` ramps linearly from 0 at ``start`` to 1 at ``end`` of the
schedule ``(start, end)``: ``r_max_warmup=(5000, 40000)`` and
``d_max_warmup=(5000, 25000)`` by default (the paper's values). Pass ``(0, 0)``
to use the final limits from the first step.

Shape: as :class:`normlab.BatchNorm`, input (N, C, *) for ``feature_dim=1``,
(N, ..., C) for ``feature_dim=-1``; output as input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import functional as NF
from normlab.layers.batchnorm import BatchNorm

__all__ = ["BatchRenorm"]


def _check_warmup(name: str, w) -> tuple[int, int]:
    ok = isinstance(w, (tuple, list)) and len(w) == 2 and all(isinstance(s, int) and s >= 0 for s in w)
    if not ok or w[0] > w[1]:
        raise ValueError(f"BatchRenorm: {name} must be (start, end) steps with 0 <= start <= end, got {w!r}")
    return int(w[0]), int(w[1])


def _ramp(step: Tensor, start: int, end: int) -> Tensor:
    """0 up to ``start``, linear to 1 at ``end``, 1 after (a step function at ``end`` when start == end)."""
    if end > start:
        return ((step - start) / (end - start)).clamp(0.0, 1.0)
    return (step >= end).to(step.dtype)


class BatchRenorm(BatchNorm):
    """Batch Renormalization: BatchNorm's output corrected by clipped ``r``, ``d`` towards the running statistics.

    Arguments as :class:`normlab.BatchNorm`, plus keyword-only ``r_max`` (>= 1,
    default 3), ``d_max`` (>= 0, default 5), ``r_max_warmup`` and
    ``d_max_warmup`` (``(start, end)`` steps, see the module docstring).
    Needs running statistics (``track_running_stats=True``).
    """

    def __init__(
        self,
        num_features: int,
        *args,
        r_max: float = 3.0,
        d_max: float = 5.0,
        r_max_warmup: tuple[int, int] = (5000, 40000),
        d_max_warmup: tuple[int, int] = (5000, 25000),
        **kwargs,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)
        if not self.track_running_stats:
            raise ValueError(
                "BatchRenorm: r and d are measured against the running statistics, so track_running_stats must be "
                "True; for batch statistics only use BatchNorm(track_running_stats=False)"
            )
        if not r_max >= 1.0:
            raise ValueError(f"BatchRenorm: r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
        if not d_max >= 0.0:
            raise ValueError(f"BatchRenorm: d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.r_max_warmup = _check_warmup("r_max_warmup", r_max_warmup)
        self.d_max_warmup = _check_warmup("d_max_warmup", d_max_warmup)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", r_max={self.r_max}, d_max={self.d_max}, r_max_warmup={self.r_max_warmup}, "
            f"d_max_warmup={self.d_max_warmup}"
        )

    def limits(self, step: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(r_max(t), d_max(t))`` at ``step`` (default: the current ``num_batches_tracked``), as 0-d tensors."""
        if step is None:
            step = self.num_batches_tracked
        t = torch.as_tensor(step, device=self.running_mean.device).to(torch.float64)
        r = 1.0 + (self.r_max - 1.0) * _ramp(t, *self.r_max_warmup)
        d = self.d_max * _ramp(t, *self.d_max_warmup)
        return r, d

    def _train_forward(self, input: Tensor, dim: int, mask: Tensor | None):
        if not self.training or self.running_mean is None:  # batch statistics outside training: plain BatchNorm
            return super()._train_forward(input, dim, mask)
        xhat, mean, var, count = NF.batch_norm_train(input, None, None, self.eps, feature_dim=dim, mask=mask)
        with torch.no_grad():  # r and d: constants for autograd
            r_max, d_max = self.limits()
            sigma = torch.sqrt(self.running_var + self.eps)
            r = torch.sqrt(var + self.eps).div_(sigma)
            r = torch.minimum(torch.maximum(r, (1.0 / r_max).to(r.dtype)), r_max.to(r.dtype))
            d = (mean - self.running_mean).div_(sigma)
            d = torch.minimum(torch.maximum(d, (-d_max).to(d.dtype)), d_max.to(d.dtype))
        scale, shift = r, d  # (C,)
        if self.weight is not None:
            scale = self.weight * r
            shift = self.weight * d
        if self.bias is not None:
            shift = shift + self.bias
        view = [1] * input.dim()
        view[dim] = self.num_features
        y = torch.addcmul(shift.view(view).to(xhat.dtype), xhat, scale.view(view).to(xhat.dtype))
        return y, [(mean, var, count)]  # the running statistics are updated after the output is computed
