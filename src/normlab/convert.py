"""Swap the norm layers of any model between ``torch.nn`` and normlab, in place.

The new modules take over the very same ``Parameter`` and buffer tensors, so
an optimizer built on the old model keeps working and training continues
identically; the train/eval mode of every module is kept.
"""

from __future__ import annotations

import torch
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


def _source_kwargs(module: nn.Module, argnames: tuple[str, ...], to: str) -> dict:
    kwargs = {k: getattr(module, k) for k in argnames}
    if to == "torch":  # PyTorch knows one momentum convention and no frozen or debiased statistics
        if (
            getattr(module, "frozen", False)
            or getattr(module, "debias", False)
            or not getattr(module, "unbiased_running_var", True)
        ):
            raise ValueError(
                f"{type(module).__name__} uses frozen, debiased or biased-variance running statistics, which torch.nn "
                "has no equivalent for; unfreeze it (normlab.unfreeze) or build it with debias=False and "
                "unbiased_running_var=True before converting"
            )
        if getattr(module, "momentum_convention", "torch") == "decay":
            kwargs["momentum"] = 1.0 - module.momentum
    return kwargs


def _swap(module: nn.Module, target: type, argnames: tuple[str, ...], to: str) -> nn.Module:
    new = target(**_source_kwargs(module, argnames, to), device="meta")  # placeholder storage, replaced below
    for name in list(new._parameters):
        new._parameters[name] = module._parameters.get(name)  # the same Parameter objects (or None)
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    device = tensors[0].device if tensors else torch.device("cpu")
    for name, b in list(new._buffers.items()):
        if name in module._buffers:
            new._buffers[name] = module._buffers[name]
        elif b is not None:  # a buffer only the target has (normlab's counters): fresh zeros
            new._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
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
        return _swap(model, dst, args, to)
    for name, child in model.named_children():
        setattr(model, name, convert(child, to))
    return model


def to_normlab(model: nn.Module) -> nn.Module:
    """``convert(model, "normlab")``."""
    return convert(model, "normlab")


def to_torch(model: nn.Module) -> nn.Module:
    """``convert(model, "torch")``."""
    return convert(model, "torch")
