"""The small CNN of the high-learning-rate experiment: conv blocks with or without a norm, then a classifier."""

from __future__ import annotations

import math

from torch import Tensor, nn

from normlab.lab.models._common import conv_ops, layer_block, register_model
from normlab.lab.models.mlp import _init_linear
from normlab.registry import NormSpec

__all__ = ["CNN"]


@register_model("cnn")
class CNN(nn.Module):
    """[conv k x k -> norm -> act -> maxpool 2] per entry of ``channels``, then flatten -> Linear.

    Conv2d for (C, H, W) images, Conv1d for (C, L) signals ("same" padding);
    input (N, *in_shape), output logits (N, num_classes). Each block halves
    the spatial size (``pool=False``: no pooling); the classifier sees the
    flattened last feature map. Norms: ``make_norm(norm_layer, channels,
    feature_dim=1)``; ``norm_position``, ``dropout``, ``dropout_position``,
    ``activation`` and ``init`` as in :class:`normlab.lab.models.MLP`. Blocks
    are ``self.blocks[i]`` with parts ``linear`` (the conv), ``norm``, ``act``, ``pool``.
    """

    def __init__(
        self,
        *,
        in_shape: tuple[int, ...],
        num_classes: int,
        norm_layer: NormSpec = "batchnorm",
        channels: tuple[int, ...] = (32, 64, 128),
        kernel_size: int = 3,
        activation: str = "relu",
        norm_position: str = "pre_act",
        dropout: float = 0.0,
        dropout_position: str = "after_act",
        pool: bool = True,
        bias: bool = True,
        init: str = "torch",
    ) -> None:
        super().__init__()
        ndim, conv, maxpool = conv_ops(in_shape, "cnn")
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {channels}")
        size = list(in_shape[1:])
        blocks, c_in = [], in_shape[0]
        for i, c in enumerate(channels):
            if pool and min(size) < 2:
                raise ValueError(
                    f"in_shape {in_shape} is too small for {len(channels)} pooling blocks (spatial size {tuple(size)} "
                    f"before block {i}); use fewer channels entries or pool=False"
                )
            blocks.append(
                layer_block(
                    conv(c_in, c, kernel_size, padding=kernel_size // 2, bias=bias),
                    c_in,
                    c,
                    norm_layer=norm_layer,
                    norm_position=norm_position,
                    activation=activation,
                    dropout=dropout,
                    dropout_position=dropout_position,
                    pool=maxpool(2) if pool else None,
                )
            )
            size = [s // 2 for s in size] if pool else size
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c_in * math.prod(size), num_classes)
        self.ndim = ndim
        _init_linear(self, init)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flatten(self.blocks(x)))  # (N, C, *spatial) -> (N, num_classes)
