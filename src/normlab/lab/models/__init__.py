"""Models that take ``norm_layer=`` and build every norm through :func:`normlab.make_norm`.

::

    from normlab.lab.models import build_model
    net = build_model("resnet", in_shape=(3, 32, 32), num_classes=10, norm_layer="none", depth=100,
                      residual_scale=0.0)           # SkipInit, 100 residual blocks

Registered: ``"mlp"`` (:class:`MLP`), ``"cnn"`` (:class:`CNN`), ``"resnet"``
(:class:`PreActResNet`), ``"transformer"`` (:class:`TransformerClassifier`).
"""

from normlab.lab.models._common import build_model, layer_block, model_names, register_model
from normlab.lab.models.cnn import CNN
from normlab.lab.models.mlp import MLP
from normlab.lab.models.resnet import PreActResNet, wrn_depth_to_blocks
from normlab.lab.models.transformer import SelfAttention, TransformerBlock, TransformerClassifier

__all__ = [
    "build_model",
    "model_names",
    "register_model",
    "layer_block",
    "MLP",
    "CNN",
    "PreActResNet",
    "wrn_depth_to_blocks",
    "TransformerClassifier",
    "TransformerBlock",
    "SelfAttention",
]
