"""Normalizer-free residual networks: SkipInit, Fixup, Scaled Weight Standardization, Adaptive Gradient Clipping.

Small pieces a model composes; :mod:`normlab.lab.models` uses them in its ResNet.

* :class:`SkipInit` (De & Smith 2020): a learnable scalar ``alpha`` on each
  residual branch, ``out = skip(x) + alpha * branch(x)``; initialised at 0
  (every block starts as the identity) or at ``1/sqrt(depth)``.
* :func:`fixup_init_` (Zhang, Dauphin & Ma 2019): zero-initialise the last
  weight layer of every residual branch (and the classifier), He-initialise
  the other branch layers and scale them by ``L ** (-1 / (2m - 2))`` for ``L``
  branches of ``m`` weight layers; :class:`ScalarBias` / :class:`ScalarScale`
  are Fixup's scalar biases (init 0) and multiplier (init 1).
* :class:`ScaledStdConv2d` / :class:`ScaledStdConv1d` / :class:`WSLinear`
  (Brock, De & Smith 2021): the weight used is
  ``W_hat[i] = gain[i] * gamma * (W[i] - mean(W[i])) / sqrt(var(W[i]) * fan_in)``,
  statistics over the fan-in of output unit ``i`` (biased variance), so that
  ``W_hat`` has zero mean and variance ``(gain * gamma)^2 / fan_in`` per unit and
  a unit-variance input gives an output of variance about 1 after the
  nonlinearity with gain ``gamma`` (:func:`nonlinearity_gamma`).
* :func:`adaptive_grad_clip_` (Brock, De, Smith & Simonyan 2021): clip each
  output unit's gradient to ``clipping * max(||W_i||, eps)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ResidualBlock",
    "SkipInit",
    "ScalarBias",
    "ScalarScale",
    "fixup_init_",
    "residual_blocks",
    "branch_weight_layers",
    "ScaledStdConv1d",
    "ScaledStdConv2d",
    "WSLinear",
    "scaled_weight_standardization",
    "nonlinearity_gamma",
    "adaptive_grad_clip_",
    "unitwise_norm",
]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- scalars


class ScalarScale(nn.Module):
    """``y = scale * x`` with one learnable scalar (Fixup's multiplier, initialised at 1)."""

    def __init__(self, init: float = 1.0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.init = float(init)
        self.scale = nn.Parameter(torch.full((), self.init, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale.fill_(self.init)

    def extra_repr(self) -> str:
        return f"init={self.init:g}"


class SkipInit(nn.Module):
    """SkipInit's learnable branch scalar: ``y = alpha * x``, ``alpha`` initialised at ``init`` (default 0).

    Placed at the end of a residual branch: ``out = skip(x) + alpha * branch(x)``.
    De & Smith (2020) use ``init=0``; any ``init <= 1 / sqrt(depth)`` keeps a
    ``depth``-block network trainable without normalisation.
    """

    def __init__(self, init: float = 0.0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.init = float(init)
        self.alpha = nn.Parameter(torch.full((), self.init, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.alpha

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.init)

    def extra_repr(self) -> str:
        return f"init={self.init:g}"


class ScalarBias(nn.Module):
    """``y = x + bias`` with one learnable scalar (Fixup's bias, initialised at 0)."""

    def __init__(self, init: float = 0.0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.init = float(init)
        self.bias = nn.Parameter(torch.full((), self.init, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.bias.fill_(self.init)

    def extra_repr(self) -> str:
        return f"init={self.init:g}"


# --------------------------------------------------------------------------- the block


class ResidualBlock(nn.Module):
    """``out = merge * (skip(x) + alpha(branch(x)))``.

    ``branch``: the residual branch (any module); ``skip``: the shortcut
    (``None`` = identity); ``alpha``: a :class:`SkipInit` (or any module) applied
    to the branch output, ``None`` = 1; ``merge``: a constant factor on the sum
    (``1/sqrt(2)`` keeps the forward variance from growing with depth).
    Probes find blocks by their ``branch`` attribute and may call
    ``block.skip(x)`` and ``block.branch(x)`` separately.
    """

    def __init__(
        self, branch: nn.Module, skip: nn.Module | None = None, alpha: nn.Module | None = None, merge: float = 1.0
    ) -> None:
        super().__init__()
        self.branch = branch
        self.skip = skip if skip is not None else nn.Identity()
        self.alpha = alpha
        self.merge = float(merge)

    def forward(self, x: Tensor) -> Tensor:
        b = self.branch(x)
        if self.alpha is not None:
            b = self.alpha(b)
        out = self.skip(x) + b
        return out * self.merge if self.merge != 1.0 else out

    def extra_repr(self) -> str:
        return f"merge={self.merge:g}" if self.merge != 1.0 else ""


# --------------------------------------------------------------------------- Fixup


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of ``model``: every sub-module with a ``branch`` attribute, in order."""
    return [m for m in model.modules() if isinstance(getattr(m, "branch", None), nn.Module)]


def branch_weight_layers(block: nn.Module) -> list[nn.Module]:
    """The Linear/Conv layers of ``block.branch``, in registration (= forward) order."""
    return [m for m in block.branch.modules() if isinstance(m, _WEIGHT_LAYERS)]


def fixup_init_(
    model: nn.Module,
    *,
    head: nn.Module | None = None,
    nonlinearity: str = "relu",
    mode: str = "fan_in",
) -> nn.Module:
    """Apply Fixup's initialisation to the residual blocks of ``model`` (in place); returns ``model``.

    With ``L`` residual branches (blocks found by :func:`residual_blocks`) and
    ``m`` weight layers in a branch:

    1. the last weight layer of every branch gets weight 0 (and bias 0);
    2. every other branch weight layer is He-initialised
       (``kaiming_normal_(mode=mode, nonlinearity=nonlinearity)``) and multiplied
       by ``L ** (-1 / (2 m - 2))`` (``m = 1``: nothing to scale);
    3. ``head`` (the classifier), if given, gets weight 0 and bias 0.

    The scalar biases and multipliers (rule 3 of the paper) are structure, not
    initialisation: build the branches with :class:`ScalarBias` /
    :class:`ScalarScale` (``build_model("resnet", fixup=True)`` does), and do
    not use normalisation layers.
    """
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError("fixup_init_: the model has no residual blocks (sub-modules with a `branch` attribute)")
    num_branches = len(blocks)
    with torch.no_grad():
        for block in blocks:
            layers = branch_weight_layers(block)
            if not layers:
                raise ValueError(f"fixup_init_: a residual branch has no Linear/Conv layer: {block.branch}")
            m = len(layers)
            factor = num_branches ** (-1.0 / (2 * m - 2)) if m > 1 else 1.0
            for layer in layers[:-1]:
                nn.init.kaiming_normal_(layer.weight, mode=mode, nonlinearity=nonlinearity)
                layer.weight.mul_(factor)
                if layer.bias is not None:
                    layer.bias.zero_()
            nn.init.zeros_(layers[-1].weight)
            if layers[-1].bias is not None:
                nn.init.zeros_(layers[-1].bias)
        if head is not None:
            nn.init.zeros_(head.weight)
            if getattr(head, "bias", None) is not None:
                nn.init.zeros_(head.bias)
    return model


# --------------------------------------------------------------------------- Scaled Weight Standardization


def nonlinearity_gamma(activation: str | nn.Module) -> float:
    """``1 / std(f(z))`` for ``z ~ N(0, 1)``: the gain that restores unit variance after the nonlinearity ``f``.

    Computed by the trapezoid rule on [-12, 12] (step 1e-4); ``"relu"`` gives
    the exact ``sqrt(2 / (1 - 1/pi)) = 1.71286`` (Brock et al.'s published table,
    estimated by sampling, lists 1.7140).
    ``activation`` is a name (``"relu"``, ``"tanh"``, ``"sigmoid"``,
    ``"gelu"``, ``"silu"``, ``"identity"``, ...) or a module.
    """
    if isinstance(activation, str):
        names = {
            "identity": nn.Identity(),
            "linear": nn.Identity(),
            "relu": nn.ReLU(),
            "tanh": nn.Tanh(),
            "sigmoid": nn.Sigmoid(),
            "gelu": nn.GELU(),
            "silu": nn.SiLU(),
            "elu": nn.ELU(),
            "softplus": nn.Softplus(),
            "leaky_relu": nn.LeakyReLU(),
        }
        if activation.lower() not in names:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(sorted(names))}, or pass a module")
        activation = names[activation.lower()]
    z = np.linspace(-12.0, 12.0, 240_001)  # trapezoid rule on a fine grid: exact enough even at ReLU's kink
    w = np.exp(-0.5 * z**2)
    w[[0, -1]] *= 0.5
    w = w / w.sum()
    with torch.no_grad():
        f = activation(torch.from_numpy(z)).numpy()
    mean = (w * f).sum()
    var = (w * (f - mean) ** 2).sum()
    return float(1.0 / math.sqrt(var))


def scaled_weight_standardization(
    weight: Tensor, gain: Tensor | None = None, gamma: float = 1.0, eps: float = 1e-4
) -> Tensor:
    """``gain * gamma * (W - mean) / sqrt(max(var * fan_in, eps))`` per output unit (row of ``weight``).

    ``weight`` (out, *fan_in dims); mean and biased variance over the fan-in of
    each output unit; ``gain`` (out,) or None. Differentiable in ``weight`` and ``gain``.
    """
    fan_in = weight[0].numel()
    dims = tuple(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
    scale = torch.rsqrt(torch.clamp(var * fan_in, min=eps)) * gamma
    if gain is not None:
        scale = scale * gain.view(-1, *([1] * (weight.dim() - 1)))
    return (weight - mean) * scale


class _ScaledWS:
    """Mixin: the layer's ``weight`` is used standardised per output unit, times ``gain * gamma``."""

    weight: nn.Parameter

    def _init_ws(self, gamma: float, eps: float, gain: bool) -> None:
        out = self.weight.shape[0]
        self.gamma = float(gamma)
        self.eps = float(eps)
        if gain:
            self.gain = nn.Parameter(torch.ones(out, device=self.weight.device, dtype=self.weight.dtype))
        else:
            self.register_parameter("gain", None)

    def standardized_weight(self) -> Tensor:
        """The weight actually applied: :func:`scaled_weight_standardization` of ``weight`` with this layer's gain."""
        return scaled_weight_standardization(self.weight, self.gain, self.gamma, self.eps)


class ScaledStdConv2d(_ScaledWS, nn.Conv2d):
    """``nn.Conv2d`` with Scaled Weight Standardization (Brock et al. 2021); input (N, C, H, W).

    Extra keywords: ``gamma`` (the nonlinearity gain, :func:`nonlinearity_gamma`;
    1.0 = none), ``eps`` (floor of ``var * fan_in``, 1e-4 as in the paper's code),
    ``gain`` (a learnable per-output-channel gain, init 1).
    """

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-4, gain: bool = True, **kwargs) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_ws(gamma, eps, gain)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma:g}, eps={self.eps:g}"


class ScaledStdConv1d(_ScaledWS, nn.Conv1d):
    """``nn.Conv1d`` with Scaled Weight Standardization; input (N, C, L). Keywords as :class:`ScaledStdConv2d`."""

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-4, gain: bool = True, **kwargs) -> None:
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._init_ws(gamma, eps, gain)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma:g}, eps={self.eps:g}"


class WSLinear(_ScaledWS, nn.Linear):
    """``nn.Linear`` with Scaled Weight Standardization over each output unit's ``in_features`` weights.

    Input (*, in_features). Keywords as :class:`ScaledStdConv2d`.
    """

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-4, gain: bool = True, **kwargs) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_ws(gamma, eps, gain)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={self.gamma:g}, eps={self.eps:g}"


# --------------------------------------------------------------------------- AGC


def unitwise_norm(x: Tensor) -> Tensor:
    """Frobenius norm per output unit: over all dims but the first for ``x.dim() >= 2`` (kept, to broadcast);
    the whole tensor's norm for scalars and vectors (biases, gains)."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def adaptive_grad_clip_(parameters: Tensor | Iterable[Tensor], clipping: float = 0.01, eps: float = 1e-3) -> None:
    """Adaptive Gradient Clipping, unit-wise, in place (Brock, De, Smith & Simonyan 2021).

    For every unit ``i`` (a row of a Linear weight, an output filter of a conv;
    a whole bias or gain vector):

    ``g_i <- g_i * clipping * max(||W_i||, eps) / ||g_i||`` if ``||g_i|| > clipping * max(||W_i||, eps)``,
    else ``g_i`` unchanged.

    The paper does not clip the final classifier: pass the parameters without it.
    """
    if clipping <= 0:
        raise ValueError(f"clipping must be > 0, got {clipping}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    with torch.no_grad():
        for p in parameters:
            if p.grad is None:
                continue
            g = p.grad
            max_norm = unitwise_norm(p).clamp(min=eps) * clipping
            grad_norm = unitwise_norm(g)
            clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
            g.copy_(torch.where(grad_norm > max_norm, clipped, g))
