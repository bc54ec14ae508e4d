"""Pre-activation ResNet / Wide-ResNet for images (C, H, W) and signals (C, L), with or without normalisation."""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

from torch import Tensor, nn

from normlab.lab.models._common import build_norm, check_choice, conv_ops, make_activation, register_model
from normlab.normfree import (
    ResidualBlock,
    ScalarBias,
    ScalarScale,
    ScaledStdConv1d,
    ScaledStdConv2d,
    SkipInit,
    fixup_init_,
    nonlinearity_gamma,
)
from normlab.registry import NormSpec

__all__ = ["PreActResNet", "wrn_depth_to_blocks"]

_KAIMING = {"relu": "relu", "gelu": "relu", "identity": "linear", "tanh": "tanh", "sigmoid": "sigmoid"}


def wrn_depth_to_blocks(n: int) -> int:
    """Residual blocks of WRN-n-k (He/Zagoruyko convention: ``n = 6 b + 4`` with ``b`` blocks per stage, 3 stages).

    ``build_model("resnet", depth=wrn_depth_to_blocks(16), width=4)`` is WRN-16-4 (6 blocks).
    """
    if n < 10 or (n - 4) % 6:
        raise ValueError(f"a Wide-ResNet depth n must satisfy n = 6b + 4 with b >= 1 (10, 16, 22, 28, ...), got {n}")
    return (n - 4) // 2


def _is_none(norm_layer: NormSpec) -> bool:
    return norm_layer is None or (isinstance(norm_layer, str) and norm_layer.lower() == "none")


@register_model("resnet")
class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016) / Wide-ResNet, with SkipInit, Fixup and merge-scaling options.

    Layout: stem conv 3x3 (``base_width`` channels) -> ``depth`` residual blocks
    in ``stages`` stages -> norm -> act -> global average pool -> Linear.
    ``depth`` is the **number of residual blocks** (two convs each), split as
    evenly as possible over the stages (earlier stages get the remainder);
    WRN-n-k is ``depth=(n-4)/2, stages=3, width=k`` (:func:`wrn_depth_to_blocks`).
    Stage ``s`` has ``round(base_width * width * 2**s)`` channels; its first
    block halves the spatial size (``s >= 1``, stride-2 conv) and projects
    the skip path with a 1x1 conv. Conv2d for (C, H, W), Conv1d for (C, L).

    Each block (``self.blocks[i]``, a :class:`normlab.normfree.ResidualBlock`)
    computes ``out = merge * (skip(x) + alpha * branch(x))`` with

    * ``branch``: norm -> act -> conv3x3 -> norm -> act -> conv3x3
      (``norm_position="post_act"``: act -> norm -> conv, twice);
    * ``skip``: identity, or norm -> act -> conv1x1 where the shape changes
      (its own norm, equal to sharing the branch's first one at init);
    * ``alpha``: ``residual_scale=None`` -> 1 (plain); a float -> a learnable
      :class:`SkipInit` scalar initialised to it (0 and ``1/sqrt(depth)`` are
      De & Smith's choices);
    * ``merge``: 1, or ``1/sqrt(2)`` with ``merge_scale=True`` (a float sets it).

    ``activation="identity"`` gives a deep *linear* ResNet. ``fixup=True``
    (needs ``norm_layer="none"``) builds Fixup branches act -> b -> conv -> b ->
    act -> b -> conv -> scale -> b (scalar biases ``b`` at 0, multiplier at 1) and
    applies :func:`normlab.normfree.fixup_init_`. ``weight_standardization=True``
    uses Scaled WS convs (gain ``gamma`` of the activation) as in NF-ResNets.
    Convs are He-initialised (fan-in, the activation's gain; the stem with gain 1); they carry a bias
    only without normalisation (``conv_bias=None``) unless told otherwise.
    """

    def __init__(
        self,
        *,
        in_shape: tuple[int, ...],
        num_classes: int,
        norm_layer: NormSpec = "batchnorm",
        depth: int = 6,
        width: float = 1,
        base_width: int = 16,
        stages: int = 3,
        activation: str = "relu",
        residual_scale: float | None = None,
        merge_scale: bool | float = False,
        fixup: bool = False,
        norm_position: str = "pre_act",
        weight_standardization: bool = False,
        conv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        ndim, conv_cls, _ = conv_ops(in_shape, "resnet")
        check_choice("norm_position", norm_position, ("pre_act", "post_act"))
        check_choice("activation", activation, tuple(_KAIMING))
        if not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be a positive int, got {stages!r}")
        if not isinstance(depth, int) or depth < stages:
            raise ValueError(f"depth (the number of residual blocks) must be an int >= stages={stages}, got {depth!r}")
        if width <= 0 or base_width < 1:
            raise ValueError(f"width and base_width must be positive, got width={width}, base_width={base_width}")
        if fixup and not _is_none(norm_layer):
            raise ValueError(f"fixup=True replaces normalisation; build it with norm_layer='none' (got {norm_layer!r})")
        if fixup and residual_scale is not None:
            raise ValueError("fixup=True has its own branch multiplier; leave residual_scale=None")
        if residual_scale is not None and not isinstance(residual_scale, (int, float)):
            raise ValueError(
                f"residual_scale must be None or a number (e.g. 0 or 1/sqrt(depth)), got {residual_scale!r}"
            )
        merge = (1 / math.sqrt(2) if merge_scale else 1.0) if isinstance(merge_scale, bool) else float(merge_scale)
        if conv_bias is None:
            conv_bias = _is_none(norm_layer) and not fixup

        if weight_standardization:
            ws = ScaledStdConv2d if ndim == 2 else ScaledStdConv1d
            conv_act = partial(ws, gamma=nonlinearity_gamma(activation))
        else:
            conv_act = conv_cls
        make = partial(build_norm, norm_layer)

        def pre(c: int) -> list[tuple[str, nn.Module]]:  # the norm + activation in front of a conv
            if fixup:
                return [("act", make_activation(activation))]
            parts = [("norm", make(c)), ("act", make_activation(activation))]
            return parts if norm_position == "pre_act" else parts[::-1]

        def branch(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            conv1 = conv_act(c_in, c_out, 3, stride=stride, padding=1, bias=conv_bias)
            conv2 = conv_act(c_out, c_out, 3, padding=1, bias=conv_bias)
            if fixup:
                layers = [
                    ("act1", make_activation(activation)),
                    ("bias1a", ScalarBias()),
                    ("conv1", conv1),
                    ("bias1b", ScalarBias()),
                    ("act2", make_activation(activation)),
                    ("bias2a", ScalarBias()),
                    ("conv2", conv2),
                    ("scale", ScalarScale()),
                    ("bias2b", ScalarBias()),
                ]
            else:
                first, second = pre(c_in), pre(c_out)
                layers = [(f"{k}1", m) for k, m in first] + [("conv1", conv1)]
                layers += [(f"{k}2", m) for k, m in second] + [("conv2", conv2)]
            return nn.Sequential(OrderedDict(layers))

        self.stem = conv_cls(in_shape[0], base_width, 3, padding=1, bias=conv_bias)
        per_stage = [depth // stages + (1 if s < depth % stages else 0) for s in range(stages)]
        widths = [max(1, round(base_width * width * 2**s)) for s in range(stages)]
        blocks, c_in = [], base_width
        self.stage_starts: list[int] = []
        for s, (n, c) in enumerate(zip(per_stage, widths)):
            self.stage_starts.append(len(blocks))
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                skip = None
                if stride != 1 or c_in != c:
                    proj = conv_act(c_in, c, 1, stride=stride, bias=conv_bias)
                    skip = nn.Sequential(OrderedDict(pre(c_in) + [("conv", proj)]))
                alpha = SkipInit(float(residual_scale)) if residual_scale is not None else None
                blocks.append(ResidualBlock(branch(c_in, c, stride), skip, alpha, merge))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.final = nn.Sequential(OrderedDict(pre(c_in) + ([("bias", ScalarBias())] if fixup else [])))
        self.head = nn.Linear(c_in, num_classes)
        self.depth = depth

        gain = _KAIMING[activation]
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):  # the stem sees the raw input, every other conv an activation
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear" if m is self.stem else gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if fixup:
            fixup_init_(self, head=self.head, nonlinearity=gain)

    def forward(self, x: Tensor) -> Tensor:
        h = self.final(self.blocks(self.stem(x)))  # (N, C, *spatial)
        return self.head(h.mean(dim=tuple(range(2, h.dim()))))  # (N, num_classes)
