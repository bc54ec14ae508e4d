"""LayerNorm and RMSNorm: statistics of each sample over its trailing dims.

Each is an instance of the ``torch.nn`` class it replaces (same constructor,
parameters and state dict); the forward is normlab's.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from normlab import functional as NF
from normlab.layers.base import NormLayer

__all__ = ["LayerNorm", "RMSNorm"]


def _shape(normalized_shape: int | Sequence[int], who: str) -> tuple[int, ...]:
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not ns or any((not isinstance(d, int)) or d <= 0 for d in ns):
        raise ValueError(
            f"{who}: normalized_shape must be a positive int or a non-empty sequence of them, got {normalized_shape!r}"
        )
    return ns


class LayerNorm(NormLayer, nn.LayerNorm):
    """As :class:`torch.nn.LayerNorm` (and an instance of it).

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias`` with mean and biased
    variance over the trailing ``normalized_shape`` dims of each sample; no
    running statistics, so train and eval behave the same.

    Shape: input (*, *normalized_shape); output the same.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        ns = _shape(normalized_shape, "LayerNorm")
        NF.check_eps(eps, "LayerNorm")
        super().__init__(ns, eps, elementwise_affine, bias, device=device, dtype=dtype)

    def _forward(self, input: Tensor) -> Tensor:
        params = self._parameters  # (nn.Module's __getattr__ would look each one up)
        weight, bias, ns = params["weight"], params["bias"], self.normalized_shape
        NF._check_floating(input, "LayerNorm")
        NF._check_normalized_shape(input, ns, "LayerNorm")
        for name, t in (("weight", weight), ("bias", bias)):  # a parameter replaced since construction
            NF._check_affine_shape(t, ns, name, "LayerNorm")
        return NF._layer_norm(input, ns, weight, bias, self.eps)


class RMSNorm(NormLayer, nn.RMSNorm):
    """As :class:`torch.nn.RMSNorm` (and an instance of it): ``y = x / sqrt(mean(x^2) + eps) * weight``.

    No centring and no bias. ``eps=None`` uses ``torch.finfo(x.dtype).eps``.

    Shape: input (*, *normalized_shape); output the same.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        ns = _shape(normalized_shape, "RMSNorm")
        if eps is not None:
            NF.check_eps(eps, "RMSNorm")
        super().__init__(ns, eps, elementwise_affine, device=device, dtype=dtype)

    def _forward(self, input: Tensor) -> Tensor:
        return NF.rms_norm(input, self.normalized_shape, self.weight, self.eps)
