"""normlab's normalisation layers (``torch.nn`` modules)."""

from normlab.layers.base import NormBase
from normlab.layers.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.layers.groupnorm import GroupNorm, InstanceNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.layers.layernorm import LayerNorm, RMSNorm
# last: these register themselves in normlab.registry, which imports the layers above
from normlab.layers.renorm import BatchRenorm  # noqa: E402
from normlab.layers.ghost import GhostBatchNorm  # noqa: E402
from normlab.layers.noisy import NoisyBatchNorm  # noqa: E402

__all__ = [
    "NormBase",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "BatchRenorm",
    "GhostBatchNorm",
    "NoisyBatchNorm",
]
