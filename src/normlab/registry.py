"""Things by name: one small :class:`Registry`, and the table of norm layers (``make_norm("batchnorm", 64)``).

A :class:`Registry` maps lower-case names to objects. It is used for norms
(here), and in the lab for datasets, models and experiments: ``register`` works
as a call or as a decorator, a name registered twice is refused, and an unknown
name raises :class:`RegistryError` listing the known ones (the ``normlab``
command turns it into exit status 2).

Models never hard-code a norm; they take ``norm_layer=`` and build it through
:func:`make_norm`, which accepts

* a registered name (``"batchnorm"``, ``"layernorm"``, ``"rmsnorm"``,
  ``"groupnorm"``, ``"instancenorm"``, ``"batchrenorm"``, ``"ghostbatchnorm"``,
  ``"noisybatchnorm"``, ``"none"``, and what users register);
* a class, called as ``cls(num_features, **kw)``;
* a ``functools.partial`` or any callable, called the same way.

Every factory receives ``feature_dim``: 1 for channel-first data (N, C, *)
(the default), -1 for features-last data (N, S, D) or (N, H, W, C). Where a
norm is defined for one layout only, the factory maps it onto the matching
layer: for channel-first data ``"layernorm"`` is ``GroupNorm(1, C)`` (statistics
over (C, *spatial) per sample, the GroupNorm paper's definition of LayerNorm
for conv nets) and ``"rmsnorm"`` its uncentred form.

All of normlab's own norm names are in the table at the end of this module;
the layers themselves never import the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from torch import nn

from normlab.layers import (
    BatchNorm,
    BatchRenorm,
    GhostBatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    NoisyBatchNorm,
    RMSNorm,
)

__all__ = [
    "Registry",
    "RegistryError",
    "NORMS",
    "make_norm",
    "register_norm",
    "norm_names",
    "NormSpec",
    "check_options",
]

T = TypeVar("T")


class RegistryError(KeyError):
    """A name registered twice, or a name nobody registered (the message lists the known names)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Objects by case-insensitive name.

    ``kind`` names what is registered in messages ("norm", "dataset", ...).
    ``discover``, if given, is called once before the first look-up or listing
    (to import the modules that register themselves). An object may also be
    found under ``aliases`` (e.g. an experiment under its claim id); aliases are
    unique across the registry too, but are not listed by :meth:`names`.
    """

    def __init__(self, kind: str, *, discover: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._discover = discover
        self._discovered = discover is None

    def register(self, name: str, obj: T | None = None, *, aliases: tuple[str, ...] = ()):
        """Register ``obj`` under ``name``; without ``obj``, a decorator that registers what it decorates."""

        def add(o: T) -> T:
            key = self._key(name)
            taken = [n for n in (key, *map(self._key, aliases)) if n in self._items or n in self._aliases]
            if taken:
                owner = self._aliases.get(taken[0], taken[0])
                raise RegistryError(f"the {self.kind} name {taken[0]!r} is already registered (to {owner!r})")
            self._items[key] = o
            for a in aliases:
                self._aliases[self._key(a)] = key
            return o

        return add(obj) if obj is not None else add

    def unregister(self, name: str) -> T:
        """Remove ``name`` (and its aliases) and return what it held; for tests and interactive sessions."""
        key = self._resolve(name)
        self._aliases = {a: k for a, k in self._aliases.items() if k != key}
        return self._items.pop(key)

    def get(self, name: str) -> T:
        """The object registered as ``name`` (or under an alias); unknown names raise :class:`RegistryError`."""
        return self._items[self._resolve(name)]

    def canonical(self, name: str) -> str:
        """The registered name that ``name`` (any case, or an alias) refers to."""
        return self._resolve(name)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and (self._key(name) in self._items or self._key(name) in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"

    @staticmethod
    def _key(name: str) -> str:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a registry name must be a non-empty string, got {name!r}")
        return name.lower()

    def _load(self) -> None:
        if not self._discovered:
            self._discovered = True
            assert self._discover is not None
            self._discover()

    def _resolve(self, name: str) -> str:
        self._load()
        key = self._key(str(name))
        key = self._aliases.get(key, key)
        if key not in self._items:
            known = ", ".join(sorted(self._items)) or "(none registered)"
            raise RegistryError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")
        return key


def check_options(who: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Raise ``TypeError`` naming ``who``, the unknown keyword options among ``given`` and the ``valid`` ones."""
    valid = list(valid)
    bad = sorted(set(given) - set(valid))
    if bad:
        raise TypeError(
            f"{who} got unknown option(s) {', '.join(map(repr, bad))}; valid options: {', '.join(valid) or '(none)'}"
        )


NormSpec = str | type | Callable[..., nn.Module] | None
NORMS: Registry[Callable[..., nn.Module]] = Registry("norm")


def register_norm(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register ``factory(num_features, *, feature_dim=1, **kw)`` under ``name`` (also usable as a decorator)."""
    return NORMS.register(name, factory)


def norm_names() -> list[str]:
    """The registered norm names, sorted."""
    return NORMS.names()


def make_norm(spec: NormSpec, num_features: int, **kw) -> nn.Module:
    """Build a norm layer for ``num_features`` features from a name, a class or a callable."""
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        return NORMS.get(spec)(num_features, **kw)
    if callable(spec):
        # a class or partial in torch.nn's style knows only channel-first data: pass feature_dim
        # on only when it asks for something else (normlab.BatchNorm and LayerNorm-like callables take it)
        if kw.get("feature_dim", 1) == 1:
            kw.pop("feature_dim", None)
        return spec(num_features, **kw)
    raise TypeError(f"norm_layer must be a name, a class or a callable, got {type(spec).__name__}")


# --------------------------------------------------------------------------- the table of normlab's norms


def _largest_divisor(c: int, at_most: int) -> int:
    return max(g for g in range(1, min(c, at_most) + 1) if c % g == 0)


class _Identity(nn.Identity):
    """No normalisation; accepts and ignores the norm arguments."""

    def __init__(self, num_features: int | None = None, *args, **kwargs) -> None:
        super().__init__()


def _channels_first_only(name: str, feature_dim: int) -> None:
    if feature_dim != 1:
        raise ValueError(f"{name} normalises channel-first data (N, C, *); got feature_dim={feature_dim}")


def _none(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
    return _Identity(num_features)


def _batchnorm_family(cls: type) -> Callable[..., nn.Module]:
    def factory(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
        return cls(num_features, feature_dim=feature_dim, **kw)

    factory.__name__ = factory.__qualname__ = f"make_{cls.__name__}"
    factory.__doc__ = f"``{cls.__name__}(num_features, feature_dim=feature_dim, **kw)``."
    return factory


def _layernorm(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
    if feature_dim == 1:
        return GroupNorm(1, num_features, **kw)
    return LayerNorm(num_features, **kw)


def _rmsnorm(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
    if feature_dim == 1:
        kw.setdefault("bias", False)
        return GroupNorm(1, num_features, centered=False, **kw)
    return RMSNorm(num_features, **kw)


def _groupnorm(num_features: int, *, feature_dim: int = 1, num_groups: int | None = None, **kw) -> nn.Module:
    _channels_first_only("groupnorm", feature_dim)
    groups = num_groups if num_groups is not None else _largest_divisor(num_features, 32)
    return GroupNorm(groups, num_features, **kw)


def _instancenorm(num_features: int, *, feature_dim: int = 1, **kw) -> nn.Module:
    _channels_first_only("instancenorm", feature_dim)
    kw.setdefault("affine", True)
    return InstanceNorm(num_features, **kw)


for _name, _factory in {
    "none": _none,
    "batchnorm": _batchnorm_family(BatchNorm),
    "batchrenorm": _batchnorm_family(BatchRenorm),
    "ghostbatchnorm": _batchnorm_family(GhostBatchNorm),
    "noisybatchnorm": _batchnorm_family(NoisyBatchNorm),
    "layernorm": _layernorm,
    "rmsnorm": _rmsnorm,
    "groupnorm": _groupnorm,
    "instancenorm": _instancenorm,
}.items():
    NORMS.register(_name, _factory)
del _name, _factory
