"""Norm layers by name: ``make_norm("batchnorm", 64)``.

Models never hard-code a norm; they take ``norm_layer=`` and build it through
:func:`make_norm`, which accepts

* a registered name (``"batchnorm"``, ``"layernorm"``, ``"rmsnorm"``,
  ``"groupnorm"``, ``"instancenorm"``, ``"none"``, and what other modules
  register, e.g. ``"batchrenorm"``);
* a class, called as ``cls(num_features, **kw)``;
* a ``functools.partial`` or any callable, called the same way.

Every factory receives ``feature_dim``: 1 for channel-first data (N, C, *)
(the default), -1 for features-last data (N, S, D) or (N, H, W, C). Where a
norm is defined for one layout only, the factory maps it onto the matching
layer: for channel-first data ``"layernorm"`` is ``GroupNorm(1, C)`` (statistics
over (C, *spatial) per sample, the GroupNorm paper's definition of LayerNorm
for conv nets) and ``"rmsnorm"`` its uncentred form.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from normlab.layers import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm

__all__ = ["make_norm", "register_norm", "norm_names", "NormSpec"]

NormSpec = str | type | Callable[..., nn.Module] | None
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_norm(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register ``factory(num_features, *, feature_dim=1, **kw)`` under ``name`` (also usable as a decorator)."""

    def add(f):
        key = name.lower()
        if key in _REGISTRY:
            raise KeyError(f"a norm named {name!r} is already registered")
        _REGISTRY[key] = f
        return f

    return add(factory) if factory is not None else add


def norm_names() -> list[str]:
    """The registered norm names, sorted."""
    return sorted(_REGISTRY)


def make_norm(spec: NormSpec, num_features: int, **kw) -> nn.Module:
    """Build a norm layer for ``num_features`` features from a name, a class or a callable."""
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        key = spec.lower()
        if key not in _REGISTRY:
            raise KeyError(f"unknown norm {spec!r}; known norms: {', '.join(norm_names())}")
        return _REGISTRY[key](num_features, **kw)
    if callable(spec):
        # a class or partial in torch.nn's style knows only channel-first data: pass feature_dim
        # on only when it asks for something else (normlab.BatchNorm and LayerNorm-like callables take it)
        if kw.get("feature_dim", 1) == 1:
            kw.pop("feature_dim", None)
        return spec(num_features, **kw)
    raise TypeError(f"norm_layer must be a name, a class or a callable, got {type(spec).__name__}")


def _largest_divisor(c: int, at_most: int) -> int:
    return max(g for g in range(1, min(c, at_most) + 1) if c % g == 0)


class _Identity(nn.Identity):
    """No normalisation; accepts and ignores the norm arguments."""

    def __init__(self, num_features: int | None = None, *args, **kwargs) -> None:
        super().__init__()


@register_norm("none")
def _none(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
    return _Identity(num_features)


@register_norm("batchnorm")
def _batchnorm(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
    return BatchNorm(num_features, feature_dim=feature_dim, **kw)


def _channels_first_only(name: str, feature_dim: int) -> None:
    if feature_dim != 1:
        raise ValueError(f"{name} normalises channel-first data (N, C, *); got feature_dim={feature_dim}")


@register_norm("layernorm")
def _layernorm(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
    if feature_dim == 1:
        return GroupNorm(1, num_features, **kw)
    return LayerNorm(num_features, **kw)


@register_norm("rmsnorm")
def _rmsnorm(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
    if feature_dim == 1:
        kw.setdefault("bias", False)
        return GroupNorm(1, num_features, centered=False, **kw)
    return RMSNorm(num_features, **kw)


@register_norm("groupnorm")
def _groupnorm(num_features: int, *, feature_dim: int = 1, num_groups: int | None = None, **kw) -> nn.Module:
    _channels_first_only("groupnorm", feature_dim)
    groups = num_groups if num_groups is not None else _largest_divisor(num_features, 32)
    return GroupNorm(groups, num_features, **kw)


@register_norm("instancenorm")
def _instancenorm(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
    _channels_first_only("instancenorm", feature_dim)
    kw.setdefault("affine", True)
    return InstanceNorm(num_features, **kw)
