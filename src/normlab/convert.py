"""Swap the norm layers of any model between ``torch.nn`` and normlab, in place.

The new modules take over the very same ``Parameter`` and buffer tensors, so
an optimizer built on the old model keeps working and training continues
identically; the train/eval mode of every module is kept.

Also here, for tools that look layers up by their exact type rather than by
``isinstance``: :func:`scriptable` (what ``torch.jit.script`` compiles in place
of a normlab layer) and :func:`fuser_method_mapping` (normlab's BatchNorm in
``torch.ao.quantization.fuse_modules``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normlab import layers as L
from normlab.layers.base import replace_modules, swap

__all__ = ["convert", "to_normlab", "to_torch", "scriptable", "fuser_method_mapping"]

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
            or not getattr(module, "centered", True)
        ):
            raise ValueError(
                f"{type(module).__name__} uses frozen, debiased or biased-variance running statistics (or an "
                "uncentred GroupNorm), which torch.nn has no equivalent for; unfreeze it (normlab.unfreeze) or "
                "build it with debias=False and unbiased_running_var=True before converting"
            )
        if getattr(module, "momentum_convention", "torch") == "decay":
            kwargs["momentum"] = 1.0 - module.momentum
    return kwargs


def convert(model: nn.Module, to: str = "normlab") -> nn.Module:
    """Replace every norm layer of ``model`` (``to="normlab"`` or ``"torch"``); returns the model.

    A model that *is* a norm layer is returned converted (the caller must use
    the return value). Layers with no counterpart are left alone.
    """
    if to not in ("normlab", "torch"):
        raise ValueError(f"to must be 'normlab' or 'torch', got {to!r}")
    pairs = {src: (dst, args) for t, n, args in _PAIRS for src, dst in ([(t, n)] if to == "normlab" else [(n, t)])}

    def replace(m: nn.Module) -> nn.Module | None:
        if type(m) not in pairs:
            return None
        dst, args = pairs[type(m)]
        return swap(m, dst, **_source_kwargs(m, args, to))

    return replace_modules(model, replace)


def to_normlab(model: nn.Module) -> nn.Module:
    """``convert(model, "normlab")``."""
    return convert(model, "normlab")


def to_torch(model: nn.Module) -> nn.Module:
    """``convert(model, "torch")``."""
    return convert(model, "torch")


class _AnyRankBatchNorm(_BatchNorm):
    """``torch.nn``'s BatchNorm for (N, C, *) inputs of any rank: what :class:`normlab.BatchNorm` scripts to."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError("BatchNorm: expected an input of at least 2 dims (N, C, *)")


class _AnyRankInstanceNorm(_InstanceNorm):
    """``torch.nn``'s InstanceNorm for (N, C, *spatial) inputs: what :class:`normlab.InstanceNorm` scripts to."""

    def _get_no_batch_dim(self) -> int:
        return -1

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 3:
            raise ValueError("InstanceNorm: expected an input (N, C, *spatial) with at least 1 spatial dim")


def scriptable(module: nn.Module) -> nn.Module:
    """The ``torch.nn`` layer that computes what ``module`` computes in eval mode, sharing its tensors.

    ``torch.jit.script`` cannot compile normlab's Python forward, so every
    normlab layer hands it this instead (its ``__prepare_scriptable__``).
    BatchNorm-family layers script to ``torch.nn``'s BatchNorm of the same
    tensors: identical in eval mode (Renorm, Ghost and Noisy BatchNorm are
    BatchNorm in eval); in train mode the scripted model follows ``torch.nn``'s
    conventions. Layers whose options ``torch.nn`` lacks (frozen or debiased
    statistics, features not on axis 1, uncentred GroupNorm) raise a clear error.
    """
    kind = type(module)
    for torch_cls, normlab_cls, args in _PAIRS:
        if kind is normlab_cls:
            return swap(module, torch_cls, **_source_kwargs(module, args, "torch"))
    if isinstance(module, L.BatchNorm):
        if module.feature_dim != 1:
            raise ValueError(
                f"torch.jit.script: {kind.__name__}(feature_dim={module.feature_dim}) has no torch.nn equivalent "
                "(torch.nn's BatchNorm normalises axis 1); script a model whose BatchNorm has feature_dim=1, or "
                "use torch.jit.trace / torch.export"
            )
        return swap(module, _AnyRankBatchNorm, **_source_kwargs(module, _BN_ARGS, "torch"))
    if isinstance(module, L.InstanceNorm):
        return swap(module, _AnyRankInstanceNorm, **_source_kwargs(module, _BN_ARGS, "torch"))
    raise TypeError(f"torch.jit.script: no torch.nn equivalent for {kind.__name__}")


def fuser_method_mapping() -> dict:
    """``torch.ao.quantization`` fuser methods for normlab's BatchNorm{1,2,3}d, as for ``torch.nn``'s.

    ``fuse_modules`` looks fuser methods up by the layers' exact types, so it
    needs normlab's added::

        torch.ao.quantization.fuse_modules(model.eval(), [["conv", "bn", "relu"]],
            fuse_custom_config_dict={"additional_fuser_method_mapping": normlab.fuser_method_mapping()})

    The mapping is PyTorch's own table with each ``torch.nn.BatchNorm{1,2,3}d``
    replaced by normlab's; the fused modules are PyTorch's.
    """
    from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD

    ours = {torch_cls: normlab_cls for torch_cls, normlab_cls, _ in _PAIRS[:3]}
    return {
        tuple(ours.get(t, t) for t in types): method
        for types, method in _DEFAULT_OP_LIST_TO_FUSER_METHOD.items()
        if any(t in ours for t in types)
    }
