"""normlab's normalisation layers: each an instance of the ``torch.nn`` layer it replaces."""

from normlab.layers.base import NormLayer
from normlab.layers.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from normlab.layers.ghost import GhostBatchNorm
from normlab.layers.groupnorm import GroupNorm, InstanceNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.layers.layernorm import LayerNorm, RMSNorm
from normlab.layers.noisy import NoisyBatchNorm
from normlab.layers.renorm import BatchRenorm
from normlab.layers.sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "NormLayer",
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
    "SyncBatchNorm",
    "convert_sync_batchnorm",
]
