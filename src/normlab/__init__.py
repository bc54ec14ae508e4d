"""normlab: normalisation layers written from first principles, and a lab that tests what is claimed about them.

The layers are drop-in replacements for ``torch.nn``'s (same signatures,
conventions and state dicts) with forward and backward written out::

    import normlab
    bn = normlab.BatchNorm2d(64)
    norm = normlab.make_norm("groupnorm", 64)
    model = normlab.convert(torchvision_style_model)   # swap every torch norm
"""

from normlab import functional
from normlab.audit import AuditReport, audit
from normlab.convert import convert, fuser_method_mapping, to_normlab, to_torch
from normlab.layers import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm,
    GhostBatchNorm,
    GroupNorm,
    InstanceNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    NoisyBatchNorm,
    RMSNorm,
    SyncBatchNorm,
    convert_sync_batchnorm,
)
from normlab.normfree import ScaledStdConv1d, ScaledStdConv2d, SkipInit, WSLinear, adaptive_grad_clip_, fixup_init_
from normlab.registry import make_norm, norm_names, register_norm
from normlab.running_stats import accumulate_stats, freeze, recalibrate, unfreeze

__version__ = "0.1.0"

__all__ = [
    "functional",
    "convert",
    "to_normlab",
    "to_torch",
    "fuser_method_mapping",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
    "make_norm",
    "norm_names",
    "register_norm",
    "BatchRenorm",
    "GhostBatchNorm",
    "NoisyBatchNorm",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "recalibrate",
    "freeze",
    "unfreeze",
    "accumulate_stats",
    "SkipInit",
    "fixup_init_",
    "ScaledStdConv1d",
    "ScaledStdConv2d",
    "WSLinear",
    "adaptive_grad_clip_",
    "audit",
    "AuditReport",
]
