"""BatchNorm layers: PyTorch's signatures and conventions, normlab's forward and backward.

.. math::

    y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}} \\gamma + \\beta

with the statistics per feature over the batch (and any spatial or sequence)
axes. Conventions, exactly as ``torch.nn.BatchNorm*d``:

* training normalises with the *biased* batch variance; the running variance
  stores the *unbiased* one (``n / (n - 1)``);
* ``momentum`` (default 0.1) is the weight of the new batch:
  ``running = (1 - momentum) * running + momentum * batch``; ``momentum=None``
  is a cumulative average over ``num_batches_tracked`` batches;
* eval mode uses the running statistics; ``track_running_stats=False`` always
  uses batch statistics; ``affine=False`` has no ``weight``/``bias``.

Beyond PyTorch (keyword-only, defaults reproduce PyTorch):

* ``momentum_convention="decay"`` reads ``momentum`` as Keras/Flax do (0.99 =
  keep 99 % of the old value); ``debias=True`` zero-debiases the EMA
  (Adam-style), so early running statistics are not pulled towards 0 and 1;
  ``unbiased_running_var=False`` stores the biased batch variance, as Keras
  and Flax do (``True``, PyTorch's choice, stores ``n / (n - 1)`` times it);
* a batch whose statistics are not finite does not touch the running
  statistics: the update is skipped, counted in ``num_nonfinite_batches`` (a
  non-persistent buffer, so state dicts stay identical to PyTorch's) and
  warned about once;
* ``frozen=True`` uses and keeps the running statistics even in ``train()``
  (see :func:`normlab.freeze`), while ``weight``/``bias`` stay trainable;
* :class:`BatchNorm` takes an explicit ``feature_dim`` for (N, H, W, C) or
  (N, S, D) data, and ``forward(x, mask=...)`` keeps padded positions out of
  the statistics.

Shape: ``BatchNorm1d`` (N, C) or (N, C, L); ``BatchNorm2d`` (N, C, H, W);
``BatchNorm3d`` (N, C, D, H, W); output as input, in the input's memory format
(channels-last included).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import functional as NF
from normlab.layers.base import NormBase

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNormBase(NormBase):
    _feature_dim = 1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        momentum_convention: str = "torch",
        debias: bool = False,
        frozen: bool = False,
        unbiased_running_var: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        NF.ema_weight(momentum, 1, convention=momentum_convention, debias=debias)  # validate early
        self.momentum_convention = momentum_convention
        self.debias = debias
        self.frozen = frozen
        self.unbiased_running_var = unbiased_running_var
        self.register_buffer(
            "num_nonfinite_batches", torch.tensor(0, dtype=torch.long, device=device), persistent=False
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.momentum_convention != "torch":
            s += f", momentum_convention={self.momentum_convention!r}"
        if self.debias:
            s += ", debias=True"
        if self.frozen:
            s += ", frozen=True"
        if not self.unbiased_running_var:
            s += ", unbiased_running_var=False"
        return s

    def _check_input_dim(self, input: Tensor) -> None:
        pass

    def _check_features(self, input: Tensor, dim: int) -> None:
        got = input.shape[dim]
        if got != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input has {got} features on axis {dim} (shape {tuple(input.shape)}), "
                f"but the layer was built with num_features={self.num_features}; "
                f"build it as {type(self).__name__}({got}) or fix the preceding layer's output width"
            )

    def _uses_batch_stats(self) -> bool:
        return (self.training and not self.frozen) or self.running_mean is None

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        dim = self._feature_dim % input.dim() if input.dim() else 0
        self._check_features(input, dim)
        if not self._uses_batch_stats():
            return NF.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, eps=self.eps, feature_dim=dim
            )
        y, mean, var, count = NF.batch_norm_train(input, self.weight, self.bias, self.eps, feature_dim=dim, mask=mask)
        if self.training and self.track_running_stats:
            self._update(mean, var, count)
        return y

    def _update(self, mean: Tensor, var: Tensor, count) -> None:
        """Blend the batch statistics into the running ones; a non-finite batch is skipped and counted."""
        kw = {"convention": self.momentum_convention, "debias": self.debias}
        with torch.no_grad():
            if mean.device.type == "cpu":  # host numbers: one compiled update, no tensor bookkeeping
                step = int(self.num_batches_tracked) + 1
                weight = NF.ema_weight(self.momentum, step, **kw)
                finite = NF.update_running_stats(
                    self.running_mean, self.running_var, mean, var, count, weight, unbiased=self.unbiased_running_var
                )
                (self.num_batches_tracked if finite else self.num_nonfinite_batches).add_(1)
                if not finite:
                    NF.warn_nonfinite(type(self).__name__)
                return
            # on accelerators: no host sync; the skip is decided by torch.where and counted, not warned about
            finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
            self.num_batches_tracked.add_(finite.long())
            self.num_nonfinite_batches.add_((~finite).long())
            step = self.num_batches_tracked.clamp(min=1).to(self.running_mean.dtype)
            weight = NF.ema_weight(self.momentum, step, **kw)
            NF.update_running_stats(
                self.running_mean, self.running_var, mean, var, count, weight, unbiased=self.unbiased_running_var
            )


class BatchNorm(_BatchNormBase):
    """BatchNorm over any input with the features on ``feature_dim`` (default 1).

    ``BatchNorm(64)`` accepts (N, 64), (N, 64, L), (N, 64, H, W), ... ;
    ``BatchNorm(64, feature_dim=-1)`` accepts (N, H, W, 64) and (N, S, 64).
    """

    def __init__(self, num_features: int, *args, feature_dim: int = 1, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self._feature_dim = feature_dim

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"BatchNorm: expected an input of at least 2 dims (a batch and a feature axis), got {input.dim()}D"
            )
        if not -input.dim() <= self._feature_dim < input.dim():
            raise IndexError(f"BatchNorm: feature_dim={self._feature_dim} is out of range for a {input.dim()}D input")

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", feature_dim={self._feature_dim}" if self._feature_dim != 1 else "")


def _dims_checker(name: str, allowed: tuple[int, ...], hint: str):
    def check(self, input: Tensor) -> None:
        if input.dim() not in allowed:
            want = " or ".join(f"{d}D" for d in allowed)
            raise ValueError(
                f"{name}: expected {want} input {hint}, got {input.dim()}D input of shape {tuple(input.shape)}"
            )

    return check


class BatchNorm1d(_BatchNormBase):
    """As :class:`torch.nn.BatchNorm1d`: input (N, C) or (N, C, L)."""

    _check_input_dim = _dims_checker("BatchNorm1d", (2, 3), "(N, C) or (N, C, L)")


class BatchNorm2d(_BatchNormBase):
    """As :class:`torch.nn.BatchNorm2d`: input (N, C, H, W), contiguous or channels-last."""

    _check_input_dim = _dims_checker("BatchNorm2d", (4,), "(N, C, H, W)")


class BatchNorm3d(_BatchNormBase):
    """As :class:`torch.nn.BatchNorm3d`: input (N, C, D, H, W), contiguous or channels-last."""

    _check_input_dim = _dims_checker("BatchNorm3d", (5,), "(N, C, D, H, W)")
