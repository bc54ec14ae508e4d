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

* an empty batch (no value per feature) gives an empty output and leaves
  the running statistics as they are, as ``torch.nn`` does (which, like
  ``torch.nn``, still counts it in ``num_batches_tracked``); one value per
  feature in training is an error.

Every layer here is an instance of the ``torch.nn`` class it replaces
(``normlab.BatchNorm2d`` is an ``nn.BatchNorm2d``; :class:`BatchNorm` a
``_BatchNorm``), so tools that find BatchNorm layers by ``isinstance`` find
these. The running-statistics update is one ``normlab::update_running_stats_``
operator call: no host sync and no graph break under ``torch.compile``.

Shape: ``BatchNorm1d`` (N, C) or (N, C, L); ``BatchNorm2d`` (N, C, H, W);
``BatchNorm3d`` (N, C, D, H, W); output as input, in the input's memory format
(channels-last included).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab import _ops
from normlab import functional as NF
from normlab.layers.base import MaskedNormLayer, add_nonfinite_counter

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

Stats = list[tuple[Tensor, Tensor, "int | Tensor"]]  # [(mean, biased var, count)], one per running-stats update


class _BatchNormBase(MaskedNormLayer, _BatchNorm):
    """The BatchNorm family's template: checks and bookkeeping here, training statistics in one hook.

    ``_forward`` validates the input (type, rank, feature axis, mask), takes the
    eval path (running statistics) when batch statistics are not used, and
    otherwise calls :meth:`_train_forward` — the one method Ghost, Renorm, Noisy
    and Sync BatchNorm override — then folds each batch statistic it returns into
    the running buffers (:meth:`_update`, one ``normlab::update_running_stats_``
    call: no host sync, no graph break).
    """

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
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        NF.check_eps(eps, name)
        NF.ema_weight(momentum, 1, convention=momentum_convention, debias=debias)  # validate early
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.momentum_convention = momentum_convention
        self.debias = debias
        self.frozen = frozen
        self.unbiased_running_var = unbiased_running_var
        add_nonfinite_counter(self, device)

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

    def _feature_axis(self, input: Tensor) -> int:
        """Check the input and return its feature axis."""
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        dim = self._feature_dim % input.dim() if input.dim() else 0
        got = input.shape[dim]
        if got != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input has {got} features on axis {dim} (shape {tuple(input.shape)}), "
                f"but the layer was built with num_features={self.num_features}; "
                f"build it as {type(self).__name__}({got}) or fix the preceding layer's output width"
            )
        return dim

    def _uses_batch_stats(self) -> bool:
        return (self.training and not self.frozen) or self.running_mean is None

    def _forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        dim = self._feature_axis(input)
        if mask is not None:
            mask = NF.check_mask(mask, input, dim, type(self).__name__)
        if not self._uses_batch_stats():
            return NF.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, eps=self.eps, feature_dim=dim
            )
        if mask is None and type(self)._train_forward is _BatchNormBase._train_forward:
            y = self._train_step_in_one_call(input, dim)
            if y is not None:
                return y
        y, stats = self._train_forward(input, dim, mask)
        if self.training and self.track_running_stats and not NF._under_functorch():
            for mean, var, count in stats:
                self._update(mean, var, count)
        return y

    def _train_step_in_one_call(self, input: Tensor, dim: int) -> Tensor | None:
        """The common training step (no mask, this class's hook) as one C++ call, or ``None`` where it does not
        apply: ``normlab::batch_norm_train_eager`` computes what :meth:`_train_forward` then :meth:`_update`
        compute, without their Python (on small layers it costs more than the arithmetic)."""
        buffers, params = self._buffers, self._parameters  # (nn.Module's __getattr__ would look each one up)
        rm, rv, nbt = buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"]
        weight, bias = params["weight"], params["bias"]
        if not self.track_running_stats or rm is None or rm.dtype != input.dtype or not rm.is_contiguous():
            return None
        if not rv.is_contiguous() or not _ops.eager_fast(input, weight, bias):
            return None
        layout = NF._column_layout(input, dim)
        if layout is None or layout[0] * layout[2] < 2:  # other layouts; one value per feature is the general error
            return None
        n = layout[0] * layout[2]
        decay = self.momentum_convention == "decay"
        ema = _ops.ema_args(self.momentum, nbt, n, decay, self.debias, self.unbiased_running_var)
        state = (rm, rv, nbt, buffers["num_nonfinite_batches"])
        return _ops.batch_norm_train_eager(input, weight, bias, self.eps, dim, layout, state, type(self).__name__, ema)

    def _train_forward(self, input: Tensor, dim: int, mask: Tensor | None) -> tuple[Tensor, Stats]:
        """The hook: training-mode output and the batch statistics to fold into the running ones."""
        y, mean, var, count = NF.batch_norm_train(input, self.weight, self.bias, self.eps, feature_dim=dim, mask=mask)
        return y, [(mean, var, count)]

    def _update(self, mean: Tensor, var: Tensor, count: int | Tensor) -> None:
        """Blend batch statistics into the running ones; a non-finite batch is skipped, counted and warned about."""
        _ops.update_running_stats(
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.num_nonfinite_batches,
            mean.detach(),
            var.detach(),
            count,
            self.momentum,
            self.momentum_convention == "decay",
            self.debias,
            self.unbiased_running_var,
            type(self).__name__,
        )


class BatchNorm(_BatchNormBase):
    """BatchNorm over any input with the features on ``feature_dim`` (default 1).

    ``BatchNorm(64)`` accepts (N, 64), (N, 64, L), (N, 64, H, W), ... ;
    ``BatchNorm(64, feature_dim=-1)`` accepts (N, H, W, 64) and (N, S, 64).
    An instance of ``torch.nn.modules.batchnorm._BatchNorm``.
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
                f"{type(self).__name__}: expected an input of at least 2 dims (a batch and a feature axis), "
                f"got {input.dim()}D"
            )
        if not -input.dim() <= self._feature_dim < input.dim():
            raise IndexError(
                f"{type(self).__name__}: feature_dim={self._feature_dim} is out of range for a {input.dim()}D input"
            )

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


class BatchNorm1d(_BatchNormBase, nn.BatchNorm1d):
    """As :class:`torch.nn.BatchNorm1d` (and an instance of it): input (N, C) or (N, C, L)."""

    _check_input_dim = _dims_checker("BatchNorm1d", (2, 3), "(N, C) or (N, C, L)")


class BatchNorm2d(_BatchNormBase, nn.BatchNorm2d):
    """As :class:`torch.nn.BatchNorm2d` (and an instance of it): input (N, C, H, W), contiguous or channels-last."""

    _check_input_dim = _dims_checker("BatchNorm2d", (4,), "(N, C, H, W)")


class BatchNorm3d(_BatchNormBase, nn.BatchNorm3d):
    """As :class:`torch.nn.BatchNorm3d` (and an instance of it): input (N, C, D, H, W), contiguous or channels-last."""

    _check_input_dim = _dims_checker("BatchNorm3d", (5,), "(N, C, D, H, W)")
