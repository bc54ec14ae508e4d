"""Typed, frozen configurations and the ``key=value`` parser every command and experiment uses.

:class:`TrainConfig` describes one training run (each field commented with its
unit); :func:`parse_overrides` applies command-line style ``key=value``
overrides to any frozen dataclass (a :class:`TrainConfig` or an experiment's
config), type-checked against the field's annotation. Every problem is a
:class:`ConfigError` with a one-line message naming the valid keys or choices
(the ``normlab`` command turns it into exit status 2)::

    from normlab.lab.config import TrainConfig, parse_overrides
    cfg = parse_overrides(TrainConfig(), ["dataset=digits", "model=mlp", "norm=none", "lr=0.05"])
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ConfigError", "TrainConfig", "parse_overrides", "DEVICE_PATTERN"]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the valid keys or choices."""


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_EPOCHS = 1_000_000  # a run longer than this is bounded by max_steps instead
FLOAT32_MAX = 3.4028234663852886e38  # the largest learning rate or weight decay a float32 parameter can take


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on. Units are given per field.

    Treat the dict fields as read-only. ``to_dict()`` gives the JSON-ready form
    stored in the run store.
    """

    # -- data
    dataset: str = "digits"  # name from normlab.lab.data.dataset_names()
    data_kwargs: dict[str, Any] = field(default_factory=dict)  # extra keywords for load_dataset (e.g. sizes)
    n_train: int | None = None  # training examples used (a seeded subset); None = all
    data_seed: int = 0  # seed of the dataset itself (synthetic generation, n_train subset)
    augment: str | None = None  # augmentation name passed to Batches (e.g. "flip-crop"); None = off
    # -- model
    model: str = "mlp"  # name from normlab.lab.models.model_names()
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra keywords for build_model (width, depth, ...)
    norm: str = "batchnorm"  # name from normlab.norm_names(); "none" = no normalisation
    norm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra keywords for every norm layer (e.g. momentum)
    # -- optimisation
    optimizer: Literal["sgd", "adam"] = "sgd"  # update rule
    lr: float = 0.05  # peak learning rate (per unit gradient)
    momentum: float = 0.9  # SGD momentum coefficient (ignored by Adam)
    nesterov: bool = False  # Nesterov momentum for SGD (needs momentum > 0)
    betas: tuple[float, ...] = (0.9, 0.999)  # Adam's (beta1, beta2) (ignored by SGD)
    weight_decay: float = 0.0  # L2 coefficient applied by the optimizer to every parameter
    schedule: Literal["constant", "step", "cosine"] = "constant"  # learning-rate shape after warm-up
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr, in epochs (fractions allowed)
    lr_milestones: tuple[float, ...] = ()  # "step": epochs at which lr is multiplied by lr_decay; () = 50% and 75%
    lr_decay: float = 0.1  # "step": factor per milestone, in (0, 1]
    # -- length and batches
    epochs: int = 5  # passes over the training set (at most 1,000,000; bound longer runs with max_steps)
    batch_size: int = 64  # training examples per optimizer step
    drop_last: bool = True  # drop the last incomplete batch (a 1-example batch breaks BatchNorm)
    batch_order: Literal["shuffled", "class-sorted"] = "shuffled"  # batch composition (normlab.lab.data.Batches)
    max_steps: int | None = None  # stop after this many optimizer steps in total; None = no limit
    eval_batch_size: int = 1000  # examples per forward pass when evaluating (no effect on numbers)
    eval_train: bool = False  # also evaluate in eval mode on the whole training set each epoch
    # -- reproducibility and hardware
    seed: int = 0  # seed of initialisation, shuffling and dropout (0 <= seed < 2**63, as data_seed)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:<i>" | "mps"; auto = cuda if available, else cpu
    threads: int | None = None  # torch intra-op threads for this run (at most the CPU count); None = leave as is
    channels_last: bool = False  # 4-D inputs and the model in channels-last memory format
    compile: bool = False  # torch.compile the model (slow to start: tens of seconds)
    # -- divergence
    divergence_loss: float = 1e4  # a step loss above this (nats), or a non-finite one, ends the run as diverged
    sync_every: int = 32  # optimizer steps between host copies of the losses (divergence checks)
    # -- data parallelism (only under torch.distributed; see normlab.lab.launch)
    sync_bn: bool = True  # with several processes, BatchNorm layers use the statistics of the global batch

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        def number(name: str, lo: float, hi: float, *, lo_open: bool = False, value: Any = None) -> None:
            v = getattr(self, name) if value is None else value
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
            need(ok, f"{name} must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")

        need(1 <= self.epochs <= MAX_EPOCHS, f"epochs must be in [1, {MAX_EPOCHS}], got {self.epochs}")
        for name in ("batch_size", "eval_batch_size", "sync_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_train", "max_steps", "threads"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be >= 1 or None, got {v}")
        for name in ("seed", "data_seed"):
            v = getattr(self, name)
            need(0 <= v < 2**63, f"{name} must be in [0, 2**63 - 1], got {v}")
        need(self.optimizer in ("sgd", "adam"), f"optimizer={self.optimizer!r} is not one of: 'sgd', 'adam'")
        need(
            self.batch_order in ("shuffled", "class-sorted"),
            f"batch_order={self.batch_order!r} is not one of: 'shuffled', 'class-sorted'",
        )
        need(
            self.schedule in ("constant", "step", "cosine"),
            f"schedule={self.schedule!r} is not one of: 'constant', 'step', 'cosine'",
        )
        number("lr", 0, FLOAT32_MAX)
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(not (self.nesterov and self.momentum == 0), "nesterov=true needs momentum > 0")
        need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas}",
        )
        number("weight_decay", 0, FLOAT32_MAX)
        number("warmup_epochs", 0, MAX_EPOCHS)
        for m in self.lr_milestones:
            number("lr_milestones", 0, MAX_EPOCHS, value=m)
        number("lr_decay", 0, 1, lo_open=True)
        need(
            self.divergence_loss > 0,
            f"divergence_loss must be > 0 (inf: only non-finite losses), got {self.divergence_loss}",
        )
        need(
            bool(DEVICE_PATTERN.match(self.device)),
            f"device={self.device!r} is not one of: 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'",
        )
        for name in ("data_kwargs", "model_kwargs", "norm_kwargs"):
            need(isinstance(getattr(self, name), Mapping), f"{name} must be a dict, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):  # every integer must fit the 64-bit integers of torch and numpy
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool):
                need(-(2**63) <= v < 2**63, f"{f.name}={v} is too large (integers must fit in 64 bits)")

    def validate(self) -> TrainConfig:
        """Check the names against the registries (datasets, models, norms); return ``self``."""
        from normlab.lab.data import dataset_names
        from normlab.lab.models import model_names
        from normlab.registry import norm_names

        for key, name, known in (
            ("dataset", self.dataset, dataset_names()),
            ("model", self.model, model_names()),
            ("norm", self.norm, norm_names()),
        ):
            if name not in known:
                raise ConfigError(f"{key}={name!r} is not one of: {', '.join(known)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# --------------------------------------------------------------------------- overrides


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _default(cls, name: str) -> Any:
    """The class-level default of field ``name`` (None when it has none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "comma-separated " + _type_name(typing.get_args(tp)[0]) + "s"
    if origin in (dict, Mapping) or tp is dict:
        return "JSON object"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(key: str, text: Any, tp) -> Any:
    """Parse ``text`` (a string, or an already typed value) as type ``tp``; raise ConfigError."""

    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{key}={text!r} is not a valid {_type_name(tp)}{extra}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (text is None or (isinstance(text, str) and text.lower() in ("none", "null"))):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, text, a)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        choices = typing.get_args(tp)
        if text in choices:
            return text
        raise ConfigError(f"{key}={text!r} is not one of: {', '.join(repr(c) for c in choices)}")
    if tp is bool:
        if isinstance(text, bool):
            return text
        if isinstance(text, str) and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{key}={text!r} is not a valid bool (true/false)")
    if tp is int:
        if isinstance(text, bool):
            raise bad()
        if isinstance(text, int):
            return text
        try:
            return int(text)
        except (TypeError, ValueError):
            try:
                v = float(text)
            except (TypeError, ValueError):
                raise bad() from None
            if v.is_integer():
                return int(v)
            raise bad() from None
    if tp is float:
        if isinstance(text, bool):
            raise bad()
        try:
            return float(text)
        except (TypeError, ValueError):
            raise bad() from None
    if tp is str:
        if isinstance(text, str):
            return text
        raise bad()
    if origin is tuple:
        (item_tp, *rest) = typing.get_args(tp)
        if isinstance(text, str):
            parts = [p.strip() for p in text.strip().strip("()[]").split(",") if p.strip()]
        elif isinstance(text, (list, tuple)):
            parts = list(text)
        else:
            raise bad()
        return tuple(_coerce(key, p, item_tp) for p in parts)
    if origin in (dict, Mapping) or tp is dict:
        if isinstance(text, Mapping):
            return dict(text)
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            raise bad(' (e.g. {"width": 64})') from None
        if not isinstance(value, dict):
            raise bad(' (e.g. {"width": 64})')
        return value
    if tp is Any:
        return _literal(text)
    raise ConfigError(f"{key}: fields of type {tp} cannot be set from the command line")


def _literal(text: Any) -> Any:
    """A JSON literal if ``text`` is one (``64``, ``0.1``, ``true``, ``[1, 2]``), else the string itself."""
    if not isinstance(text, str):
        return text
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in _TRUE - {"1"} | _FALSE - {"0"}:
        return text.lower() in _TRUE
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(config, overrides: Sequence[str] | Mapping[str, Any] = ()):
    """Return a copy of the dataclass ``config`` with ``key=value`` overrides applied and type-checked.

    Works for any (frozen) dataclass, typically :class:`TrainConfig` or an
    experiment's config. Values are parsed according to the field's type:
    ``int``, ``float``, ``bool`` (true/false/yes/no/1/0), ``str``, a ``Literal``
    (one of its choices), ``X | None`` ("none" gives None), ``tuple[T, ...]``
    (comma-separated), ``dict`` (a JSON object). A dict field can also be set
    one key at a time: ``model_kwargs.width=64`` (value read as a JSON literal
    when it is one, else as a string). ``overrides`` may also be a mapping
    of keys to (typed or string) values.

    Raises :class:`ConfigError` with a one-line message naming the valid keys
    or choices.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"parse_overrides needs a dataclass instance, got {type(config).__name__}")
    cls = type(config)
    types_ = _field_types(cls)
    items: list[tuple[str, Any]]
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        if isinstance(overrides, str):
            overrides = [overrides]
        items = []
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value; valid keys: {', '.join(types_)}")
            key, _, value = item.partition("=")
            items.append((key.strip().lstrip("-").replace("-", "_"), value.strip()))
    changes: dict[str, Any] = {}
    for key, value in items:
        base, dot, sub = key.partition(".")
        if base not in types_:
            near = difflib.get_close_matches(base, list(types_), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown key {base!r} for {cls.__name__}{hint}; valid keys: {', '.join(types_)}")
        tp = types_[base]
        if dot:
            origin = typing.get_origin(tp)
            if not (origin in (dict, Mapping) or tp is dict) or not sub:
                raise ConfigError(f"{key!r}: only dict fields take dotted keys; {base} is a {_type_name(tp)}")
            current = dict(changes.get(base, getattr(config, base)))
            current[sub] = _literal(value)
            changes[base] = current
        else:
            changes[base] = _coerce(key, value, tp)
            if changes[base] == () and _default(cls, base):
                raise ConfigError(
                    f"{key}= is empty; give at least one value (comma-separated), e.g. "
                    f"{key}={','.join(str(x) for x in _default(cls, base))}"
                )
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None
