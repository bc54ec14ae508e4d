"""Pieces shared by the models: the model registry, activations, norm placement inside a layer block."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from normlab.registry import NormSpec, Registry, check_options, make_norm

__all__ = [
    "register_model",
    "model_names",
    "build_model",
    "make_activation",
    "ACTIVATIONS",
    "NORM_POSITIONS",
    "DROPOUT_POSITIONS",
    "takes_mask",
    "layer_block",
    "check_choice",
    "build_norm",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}
NORM_POSITIONS = ("pre_act", "post_act", "before_linear")
DROPOUT_POSITIONS = ("after_act", "before_norm")

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
_COMMON = ("in_shape", "num_classes", "norm_layer")


def build_norm(norm_layer: NormSpec, num_features: int, feature_dim: int = 1) -> nn.Module:
    """``make_norm(norm_layer, num_features, feature_dim=feature_dim)``; for channel-first data (the default,
    ``feature_dim=1``) the keyword is left out, so plain classes such as ``normlab.BatchNorm2d`` work too."""
    if feature_dim == 1:
        return make_norm(norm_layer, num_features)
    return make_norm(norm_layer, num_features, feature_dim=feature_dim)


def check_choice(name: str, value, choices) -> None:
    """Raise a ValueError naming the valid choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of: {', '.join(map(repr, choices))}")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name: ``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"gelu"``, ``"identity"``."""
    check_choice("activation", name, tuple(ACTIVATIONS))
    return ACTIVATIONS[name]()


def takes_mask(module: nn.Module) -> bool:
    """Whether ``module.forward`` accepts a ``mask=`` keyword (normlab's BatchNorm family does)."""
    try:
        return "mask" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def register_model(name: str):
    """Register a model class or factory ``f(*, in_shape, num_classes, norm_layer, **options)`` (a decorator)."""
    return MODELS.register(name)


def model_names() -> list[str]:
    """The registered model names, sorted."""
    return MODELS.names()


def _options(factory) -> list[str]:
    params = inspect.signature(factory).parameters
    return [p for p, v in params.items() if p not in _COMMON and v.kind is not inspect.Parameter.VAR_KEYWORD]


def build_model(
    name: str,
    *,
    in_shape: tuple[int, ...],
    num_classes: int,
    norm_layer: NormSpec = "batchnorm",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kw,
) -> nn.Module:
    """Build a registered model for inputs of shape (N, *in_shape) and ``num_classes`` outputs.

    ``norm_layer`` is anything :func:`normlab.make_norm` accepts (a name, a
    class, a ``functools.partial``); ``"none"`` or ``None`` for no
    normalisation. ``**kw`` are the model's own options (an unknown one raises
    and lists the valid ones). The model is moved to ``device``/``dtype`` if given.
    """
    key = MODELS.canonical(name)
    factory = MODELS.get(key)
    check_options(f"model {key!r}", kw, _options(factory))
    in_shape = tuple(int(s) for s in in_shape)
    if not in_shape or any(s < 1 for s in in_shape):
        raise ValueError(
            f"in_shape must be a non-empty tuple of positive sizes (one sample, no batch axis), got {in_shape}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = factory(in_shape=in_shape, num_classes=num_classes, norm_layer=norm_layer, **kw)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def layer_block(
    linear: nn.Module,
    in_features: int,
    out_features: int,
    *,
    norm_layer: NormSpec,
    norm_position: str = "pre_act",
    activation: str = "relu",
    dropout: float = 0.0,
    dropout_position: str = "after_act",
    pool: nn.Module | None = None,
    feature_dim: int = 1,
) -> nn.Sequential:
    """One weight layer with its norm, activation, dropout (and pooling) in the chosen order.

    ``norm_position``:

    * ``"pre_act"`` (the common practice): linear -> norm -> act
    * ``"post_act"``: linear -> act -> norm
    * ``"before_linear"`` (normalise the layer's *input*, as the smoothness
      analysis prescribes): norm -> linear -> act; the norm then has
      ``in_features`` features

    ``dropout_position``: ``"after_act"`` puts dropout right after the
    activation; ``"before_norm"`` right before the norm (dropout feeding BN:
    the "variance shift" setting of Li et al. 2019). ``pool`` comes last.
    The parts are named ``linear``, ``norm``, ``act``, ``dropout``, ``pool``.
    """
    check_choice("norm_position", norm_position, NORM_POSITIONS)
    check_choice("dropout_position", dropout_position, DROPOUT_POSITIONS)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    layer = build_norm(norm_layer, in_features if norm_position == "before_linear" else out_features, feature_dim)
    order = {
        "pre_act": ["linear", "norm", "act"],
        "post_act": ["linear", "act", "norm"],
        "before_linear": ["norm", "linear", "act"],
    }[norm_position]
    if dropout > 0:
        at = order.index("act") + 1 if dropout_position == "after_act" else order.index("norm")
        order.insert(at, "dropout")
    parts = {"linear": linear, "norm": layer, "act": make_activation(activation), "dropout": nn.Dropout(dropout)}
    seq = OrderedDict((k, parts[k]) for k in order)
    if pool is not None:
        seq["pool"] = pool
    return nn.Sequential(seq)


def conv_ops(in_shape: tuple[int, ...], model: str) -> tuple[int, type, type]:
    """``(spatial dims, Conv class, MaxPool class)`` for (C, H, W) images or (C, L) signals."""
    if len(in_shape) == 3:
        return 2, nn.Conv2d, nn.MaxPool2d
    if len(in_shape) == 2:
        return 1, nn.Conv1d, nn.MaxPool1d
    raise ValueError(
        f"{model} needs in_shape (C, H, W) for images or (C, L) for signals, got {in_shape}; "
        "use 'mlp' for vectors or 'transformer' for (S, D) sequences"
    )
