"""Swap the norm layers of any model between ``torch.nn`` and normlab, in place.

The new modules take over the very same ``Parameter`` and buffer tensors, so
an optimizer built on the old model keeps working and training continues
identically; the train/eval mode of every module is kept.
"""

from __future__ import annotations

from torch import nn

from normlab import layers as L

__all__ = ["convert", "to_normlab", "to_torch"]

# (torch class, normlab class, constructor arguments read off the source module)
_BN_ARGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_PAIRS: list[tuple[type, type, tuple[str, ...]]] = [
    (nn.BatchNorm1d, L.BatchNorm1d, _BN_ARGS),
    (nn.BatchNorm2d, L.BatchNorm2d, _BN_ARGS),
    (nn.BatchNorm3d, L.BatchNorm3d, _BN_ARGS),
    (nn.InstanceNorm1d, L.InstanceNorm1d, _BN_ARGS),
    (nn.InstanceNorm2d, L.InstanceNorm2d, _BN_ARGS),
    (nn.InstanceNorm3d, L.InstanceNorm3d, _BN_ARGS),
    (nn.LayerNorm, L.LayerNorm, ("normalized_shape", "eps", "elementwise_affine")),
    (nn.RMSNorm, L.RMSNorm, ("normalized_shape", "eps", "elementwise_affine")),
    (nn.GroupNorm, L.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
]


def _swap(module: nn.Module, target: type, argnames: tuple[str, ...]) -> nn.Module:
    kwargs = {k: getattr(module, k) for k in argnames}
    new = target(**kwargs, device="meta")  # placeholder storage, replaced below
    for name, p in module.named_parameters(recurse=False):
        setattr(new, name, p)
    for name in ("weight", "bias"):
        if getattr(module, name, None) is None and name in new._parameters:
            new.register_parameter(name, None)
    for name, b in module.named_buffers(recurse=False):
        if name in new._buffers:
            new._buffers[name] = b
    for name, b in list(new._buffers.items()):  # buffers only the target has (normlab's counters)
        if b is not None and b.device.type == "meta":
            ref = next(iter(module.parameters(recurse=False)), None) or next(iter(module.buffers(recurse=False)), None)
            device = ref.device if ref is not None else "cpu"
            new._buffers[name] = b.new_zeros(b.shape, device=device)
    new.train(module.training)
    return new


def convert(model: nn.Module, to: str = "normlab") -> nn.Module:
    """Replace every norm layer of ``model`` (``to="normlab"`` or ``"torch"``); returns the model.

    A model that *is* a norm layer is returned converted (the caller must use
    the return value). Layers with no counterpart are left alone.
    """
    if to not in ("normlab", "torch"):
        raise ValueError(f"to must be 'normlab' or 'torch', got {to!r}")
    pairs = {src: (dst, args) for t, n, args in _PAIRS for src, dst in ([(t, n)] if to == "normlab" else [(n, t)])}
    kind = type(model)
    if kind in pairs:
        dst, args = pairs[kind]
        return _swap(model, dst, args)
    for name, child in model.named_children():
        setattr(model, name, convert(child, to))
    return model


def to_normlab(model: nn.Module) -> nn.Module:
    """``convert(model, "normlab")``."""
    return convert(model, "normlab")


def to_torch(model: nn.Module) -> nn.Module:
    """``convert(model, "torch")``."""
    return convert(model, "torch")
