"""What a layer is, read from its class and attributes: which kind of norm, its running statistics, whether it
is frozen, its declared EMA weight; dropout probabilities; the conv/linear layers that feed norms.

torch.nn's and normlab's norm layers are recognised by class; third-party ("timm-style") ones by class name and
attributes (see :func:`norm_kind`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import is_lazy

from normlab import layers as L

_BATCH_NORMS = (_BatchNorm, L.BatchNorm, L.BatchNorm1d, L.BatchNorm2d, L.BatchNorm3d)
_INSTANCE_NORMS = (_InstanceNorm, L.InstanceNorm, L.InstanceNorm1d, L.InstanceNorm2d, L.InstanceNorm3d)


def class_names(m: nn.Module) -> list[str]:
    return [c.__name__ for c in type(m).__mro__]


def norm_kind(m: nn.Module) -> str | None:
    """ "batch" | "instance" | "group" | "layer" | "rms" for norm layers (torch, normlab, timm-style), else None."""
    if isinstance(m, _BATCH_NORMS):
        return "batch"
    if isinstance(m, _INSTANCE_NORMS):
        return "instance"
    if isinstance(m, (nn.GroupNorm, L.GroupNorm)):
        return "group"
    if isinstance(m, (nn.LayerNorm, L.LayerNorm)):
        return "layer"
    if isinstance(m, (nn.RMSNorm, L.RMSNorm)):
        return "rms"
    names = class_names(m)

    def has(s: str) -> bool:
        return any(s in n for n in names)

    if has("InstanceNorm") and hasattr(m, "num_features"):
        return "instance"
    if (has("BatchNorm") or has("BatchRenorm")) and (hasattr(m, "running_mean") or hasattr(m, "num_features")):
        return "batch"
    if has("GroupNorm") and hasattr(m, "num_groups"):
        return "group"
    if has("LayerNorm") and (hasattr(m, "normalized_shape") or hasattr(m, "weight") or _leaf_with_state(m)):
        return "layer"
    if has("RMSNorm") and (hasattr(m, "normalized_shape") or hasattr(m, "weight") or _leaf_with_state(m)):
        return "rms"
    return None


def _leaf_with_state(m: nn.Module) -> bool:
    """No submodules, and parameters or buffers of its own (a hand-written layer: S2's LayerNorm has ``gamma``)."""
    own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    return bool(own) and not any(True for _ in m.children())


def looks_like_norm(m: nn.Module) -> bool:
    """A norm layer for the behavioural checks: a recognised kind (:func:`norm_kind`), or a module without
    submodules that has ``running_*`` buffers or a ``momentum`` attribute, whatever its class is called."""
    if norm_kind(m) is not None:
        return True
    if any(True for _ in m.children()):
        return False
    return any(name.startswith("running_") for name, _ in m.named_buffers(recurse=False)) or hasattr(m, "momentum")


def feature_axis(m: nn.Module, x: Tensor, size: int) -> int | None:
    """The axis of ``x`` that holds ``size`` features: the layer's ``_feature_dim`` (normlab), else axis 1
    (PyTorch's layout), else the last axis (channels-last, as (N, H, W, C)); None when none has that size."""
    for axis in (getattr(m, "_feature_dim", 1), 1, -1):
        if isinstance(axis, int) and -x.dim() <= axis < x.dim() and x.shape[axis] == size:
            return axis % x.dim()
    return None


def is_real(t: Any) -> bool:
    """A tensor with storage (not None, not a lazy module's uninitialised placeholder)."""
    return isinstance(t, Tensor) and not is_lazy(t)


def running_stats(m: nn.Module) -> tuple[Tensor, Tensor] | None:
    rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    return (rm, rv) if is_real(rm) and is_real(rv) else None


def is_frozen(m: nn.Module) -> bool:
    """normlab's ``frozen=True``, or a class named ``*Frozen*`` (torchvision/timm FrozenBatchNorm2d)."""
    return bool(getattr(m, "frozen", False)) or any("Frozen" in n for n in class_names(m))


def uses_batch_stats(m: nn.Module) -> bool:
    """Whether a BN/InstanceNorm normalises with the statistics of its input right now."""
    if running_stats(m) is None:
        return True
    if norm_kind(m) == "instance" and not getattr(m, "track_running_stats", True):
        return True
    return m.training and not is_frozen(m)


def is_ghost(m: nn.Module) -> bool:
    return hasattr(m, "virtual_batch_size")


def dropout_p(m: nn.Module) -> float | None:
    """The drop probability of a dropout module (``nn.Dropout*``, or a class named ``*Dropout`` with ``p``)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return float(m.p)
    if type(m).__name__.endswith("Dropout") and isinstance(getattr(m, "p", None), (int, float)):
        return float(m.p)
    return None


def is_affine_map(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


def out_features(m: nn.Module) -> int | None:
    return getattr(m, "out_channels", getattr(m, "out_features", None))


def num_features(m: nn.Module) -> int | None:
    for a in ("num_features", "num_channels"):
        if isinstance(getattr(m, a, None), int):
            return getattr(m, a)
    w = getattr(m, "weight", None)
    return w.numel() if isinstance(w, Tensor) and w.dim() == 1 else None


def affine_params(m: nn.Module) -> list[Tensor]:
    return [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]


def declared_weight(m: nn.Module) -> tuple[str, float | None] | None:
    """(convention, weight of the new batch) of a BN's running estimate; weight None = cumulative average."""
    if not hasattr(m, "momentum"):
        return None
    mom = m.momentum
    conv = getattr(m, "momentum_convention", "torch")
    if mom is None:
        return conv, None
    mom = float(mom)
    return conv, (mom if conv == "torch" else 1.0 - mom)


def removes_channel_mean(norm: nn.Module) -> bool:
    """Whether the norm subtracts a per-channel mean, which removes any per-channel bias before it."""
    kind = norm_kind(norm)
    if kind == "batch":
        return not (is_frozen(norm) and getattr(norm, "bias", None) is None)
    if kind == "instance":
        return True
    if kind == "group":
        return getattr(norm, "num_groups", None) == getattr(norm, "num_channels", 0)
    return False


def batches_tracked(m: nn.Module) -> int:
    t = getattr(m, "num_batches_tracked", None)
    return int(t) if isinstance(t, Tensor) else -1


def buffer_numel(m: nn.Module, key: str) -> int:
    t = getattr(m, key, None)
    return t.numel() if isinstance(t, Tensor) else 0
