"""A multilayer perceptron with a configurable norm, its placement, activation and dropout."""

from __future__ import annotations

import math

from torch import Tensor, nn

from normlab.lab.models._common import layer_block, register_model
from normlab.registry import NormSpec

__all__ = ["MLP"]


@register_model("mlp")
class MLP(nn.Module):
    """flatten -> [Linear -> norm -> act (-> dropout)] x ``depth`` -> Linear.

    Input (N, *in_shape), flattened to (N, D); output logits (N, num_classes).
    ``depth`` counts the hidden layers (0 = a linear classifier), each of
    ``width`` units; see :func:`normlab.lab.models.layer_block` for
    ``norm_position`` ("pre_act" | "post_act" | "before_linear") and
    ``dropout_position`` ("after_act" | "before_norm"). Norms are built by
    ``make_norm(norm_layer, features, feature_dim=1)`` on (N, features).
    ``init``: "torch" (PyTorch's default), "kaiming" (He normal, fan-in, ReLU
    gain) or "xavier" (Glorot normal). Blocks are ``self.blocks[i]`` with
    parts ``linear``, ``norm``, ``act`` (``dropout``).
    """

    def __init__(
        self,
        *,
        in_shape: tuple[int, ...],
        num_classes: int,
        norm_layer: NormSpec = "batchnorm",
        width: int = 128,
        depth: int = 3,
        activation: str = "relu",
        dropout: float = 0.0,
        dropout_position: str = "after_act",
        norm_position: str = "pre_act",
        bias: bool = True,
        init: str = "torch",
    ) -> None:
        super().__init__()
        if depth < 0 or width < 1:
            raise ValueError(f"MLP needs depth >= 0 and width >= 1, got depth={depth}, width={width}")
        d_in = math.prod(in_shape)
        self.flatten = nn.Flatten()
        self.blocks = nn.Sequential(
            *(
                layer_block(
                    nn.Linear(d_in if i == 0 else width, width, bias=bias),
                    d_in if i == 0 else width,
                    width,
                    norm_layer=norm_layer,
                    norm_position=norm_position,
                    activation=activation,
                    dropout=dropout,
                    dropout_position=dropout_position,
                )
                for i in range(depth)
            )
        )
        self.head = nn.Linear(width if depth else d_in, num_classes)
        _init_linear(self, init)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (sequences) is accepted and not needed: padded positions are zero in normlab's data."""
        return self.head(self.blocks(self.flatten(x)))  # (N, num_classes)


def _init_linear(model: nn.Module, init: str) -> None:
    if init == "torch":
        return
    if init not in ("kaiming", "xavier"):
        raise ValueError(f"init={init!r} is not one of: 'torch', 'kaiming', 'xavier'")
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if init == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
