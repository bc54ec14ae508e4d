"""GroupNorm and InstanceNorm: per-sample statistics over groups of channels and space.

GroupNorm with one group is LayerNorm over (C, *spatial) with a per-channel
affine; with ``C`` groups it is InstanceNorm. Both run on the same row kernel.
Each layer is an instance of the ``torch.nn`` class it replaces; a channels-last
input gives a channels-last output, as ``torch.nn``'s.
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab import functional as NF
from normlab.layers.base import NormLayer, add_nonfinite_counter

__all__ = ["GroupNorm", "InstanceNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class GroupNorm(NormLayer, nn.GroupNorm):
    """As :class:`torch.nn.GroupNorm` (and an instance of it): input (N, C, *), ``C`` split into ``num_groups`` groups.

    Each sample's group is standardised with its own mean and biased variance;
    ``weight``/``bias`` are per channel. ``centered=False`` (keyword-only, not
    in PyTorch) divides by the root mean square instead — RMSNorm over groups.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        centered: bool = True,
    ) -> None:
        if num_groups <= 0 or num_channels % num_groups != 0:
            divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
            raise ValueError(
                f"GroupNorm: num_groups={num_groups} must divide num_channels={num_channels}; "
                f"valid choices are {divisors}"
            )
        NF.check_eps(eps, "GroupNorm")
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype, bias=bias)
        self.centered = centered

    def _forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm: expected input (N, {self.num_channels}, *), got shape {tuple(input.shape)}; "
                "the channel axis must be dim 1 with num_channels entries"
            )
        params = self._parameters  # (nn.Module's __getattr__ would look each one up)
        weight, bias = params["weight"], params["bias"]
        NF._check_floating(input, "GroupNorm")
        for name, t in (("weight", weight), ("bias", bias)):  # a parameter replaced since construction
            NF._check_affine_shape(t, (self.num_channels,), name, "GroupNorm")
        return NF._group_norm(input, self.num_groups, weight, bias, self.eps, self.centered)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.centered else ", centered=False")


class _InstanceNormBase(NormLayer, _InstanceNorm):
    _spatial_dims: tuple[int, ...] = ()  # accepted numbers of spatial dims; () = any >= 1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        NF.check_eps(eps, name)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        add_nonfinite_counter(self, device)

    def _get_no_batch_dim(self) -> int:
        return self._spatial_dims[0] + 1 if self._spatial_dims else -1

    def _check_input_dim(self, input: Tensor) -> None:
        name = type(self).__name__
        spatial = self._spatial_dims
        ok = (input.dim() - 2 in spatial or input.dim() - 1 in spatial) if spatial else input.dim() >= 3
        if not ok:
            want = " or ".join(f"{s + 1}D (unbatched) or {s + 2}D" for s in spatial) if spatial else "(N, C, *spatial)"
            raise ValueError(f"{name}: expected {want} input, got {input.dim()}D input of shape {tuple(input.shape)}")

    def _forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        unbatched = (
            bool(self._spatial_dims)
            and input.dim() - 1 in self._spatial_dims
            and input.dim() - 2 not in self._spatial_dims
        )
        if unbatched:
            return self._forward(input.unsqueeze(0)).squeeze(0)
        if input.shape[1] != self.num_features:
            msg = (
                f"{type(self).__name__}: input has {input.shape[1]} channels (shape {tuple(input.shape)}) "
                f"but num_features={self.num_features}"
            )
            if self.affine:
                raise ValueError(msg + "; build the layer with the input's channel count")
            warnings.warn(msg + "; num_features is not used because affine=False", stacklevel=3)
        use_input_stats = self.training or not self.track_running_stats
        momentum = self.momentum if self.momentum is not None else 0.0
        return NF.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats,
            momentum,
            self.eps,
            num_nonfinite_batches=self.num_nonfinite_batches,
            who=type(self).__name__,
        )


class InstanceNorm(_InstanceNormBase):
    """InstanceNorm over (N, C, *spatial) with any number of spatial dims (>= 1)."""


class InstanceNorm1d(_InstanceNormBase, nn.InstanceNorm1d):
    """As :class:`torch.nn.InstanceNorm1d` (and an instance of it): input (N, C, L) or unbatched (C, L)."""

    _spatial_dims = (1,)


class InstanceNorm2d(_InstanceNormBase, nn.InstanceNorm2d):
    """As :class:`torch.nn.InstanceNorm2d` (and an instance of it): input (N, C, H, W) or unbatched (C, H, W)."""

    _spatial_dims = (2,)


class InstanceNorm3d(_InstanceNormBase, nn.InstanceNorm3d):
    """As :class:`torch.nn.InstanceNorm3d` (and an instance of it): input (N, C, D, H, W) or unbatched (C, D, H, W)."""

    _spatial_dims = (3,)
