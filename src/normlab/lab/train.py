"""One training loop for every experiment: ``train(TrainConfig(...)) -> RunResult``.

A run is fully described by a frozen, typed :class:`TrainConfig`; command-line
style ``key=value`` overrides are parsed into it, type-checked, by
:func:`parse_overrides`::

    from normlab.lab.train import TrainConfig, parse_overrides, train
    cfg = parse_overrides(TrainConfig(), ["dataset=digits", "model=mlp", "norm=none", "lr=0.05"])
    result = train(cfg)
    result.final["test_acc"], result.diverged

Conventions
-----------
* The loss is the mean cross-entropy of a batch (nats). ``step_loss[t]`` is
  the training-mode loss of optimizer step ``t`` (0-based), computed *before*
  that step's update.
* Per epoch: ``train_loss`` / ``train_acc`` are the means over that epoch's
  training batches in train mode (weighted by batch size, as seen while
  training); ``test_loss`` / ``test_acc`` are measured in eval mode on the
  whole test set after the epoch. ``eval_train=True`` adds ``train_eval_loss``
  / ``train_eval_acc``: eval mode over the whole training set. Accuracies are
  fractions in [0, 1]; times are seconds.
* Divergence: a step whose loss is not finite or exceeds
  ``config.divergence_loss`` marks the run diverged at that step. The run then
  ends cleanly (a diverged run is a result, not an error): ``step_loss`` stops
  at the diverging step, the model is evaluated once more in whatever state it
  is, and ``diverged`` / ``diverged_step`` record what happened. Losses are
  copied to the host every ``sync_every`` steps (not every step), so up to
  ``sync_every - 1`` further updates may have been applied to the model
  before the loop notices; the recorded step is exact.
* Determinism: the same config (seed included) gives the same numbers on the
  same machine with the same thread count. ``seed`` drives the model's
  initialisation, the shuffling and dropout (``train`` seeds torch's global
  generator with it before building the model); ``data_seed`` the dataset
  itself (generation of synthetic sets, the ``n_train`` subset). On CUDA a
  few kernels are non-deterministic; nothing here forces deterministic ones.
* Models reach norms only through ``norm_layer=`` (a registered name, or
  ``functools.partial(make_norm, name, **norm_kwargs)``); sequence datasets
  pass their padding mask as ``model(x, mask=mask)``.
* Several processes: launched by ``torchrun`` or ``normlab ... --nproc N``,
  ``train`` trains one model with DistributedDataParallel. ``batch_size`` is
  then the global batch (each process takes its slice), BN layers become
  synchronized BN unless ``sync_bn=False``, and the recorded numbers are those
  of the global batch; see :mod:`normlab.lab.launch`.

Speed on a CPU
--------------
Batches are slices of tensors held in memory (:class:`normlab.lab.data.Batches`),
gradients are freed with ``zero_grad(set_to_none=True)``, and the loop copies
losses to the host only every ``sync_every`` steps. Before training,
:func:`tune_allocator` asks glibc's ``malloc`` to keep large blocks instead of
returning them to the kernel: otherwise every fresh activation tensor of a few
megabytes is ``mmap``-ed and page-faulted anew on each step, which costs as
much as the arithmetic (a 32 MB clone takes ~19 ms by default, ~2 ms tuned).
The setting is process-wide, changes no number, and is skipped when the
environment variable ``NORMLAB_TUNE_MALLOC=0`` is set or ``train(...,
tune_malloc=False)`` is passed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import difflib
import functools
import json
import math
import os
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TrainConfig",
    "RunResult",
    "TrainState",
    "ConfigError",
    "parse_overrides",
    "train",
    "evaluate",
    "resolve_device",
    "lr_at",
    "tune_allocator",
    "load_data",
]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the valid keys or choices."""


_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


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
    lr_decay: float = 0.1  # "step": factor per milestone
    # -- length and batches
    epochs: int = 5  # passes over the training set
    batch_size: int = 64  # training examples per optimizer step
    drop_last: bool = True  # drop the last incomplete batch (a 1-example batch breaks BatchNorm)
    max_steps: int | None = None  # stop after this many optimizer steps in total; None = no limit
    eval_batch_size: int = 1000  # examples per forward pass when evaluating (no effect on numbers)
    eval_train: bool = False  # also evaluate in eval mode on the whole training set each epoch
    # -- reproducibility and hardware
    seed: int = 0  # seed of initialisation, shuffling and dropout
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:<i>" | "mps"; auto = cuda if available, else cpu
    threads: int | None = None  # torch intra-op threads for this run; None = leave as is
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

        for name in ("epochs", "batch_size", "eval_batch_size", "sync_every"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_train", "max_steps", "threads"):
            v = getattr(self, name)
            need(v is None or v >= 1, f"{name} must be >= 1 or None, got {v}")
        need(self.optimizer in ("sgd", "adam"), f"optimizer={self.optimizer!r} is not one of: 'sgd', 'adam'")
        need(
            self.schedule in ("constant", "step", "cosine"),
            f"schedule={self.schedule!r} is not one of: 'constant', 'step', 'cosine'",
        )
        need(self.lr >= 0 and math.isfinite(self.lr), f"lr must be finite and >= 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(not (self.nesterov and self.momentum == 0), "nesterov=true needs momentum > 0")
        need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {self.betas}",
        )
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(self.lr_decay > 0, f"lr_decay must be > 0, got {self.lr_decay}")
        need(self.divergence_loss > 0, f"divergence_loss must be > 0, got {self.divergence_loss}")
        need(
            bool(_DEVICE_RE.match(self.device)),
            f"device={self.device!r} is not one of: 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'",
        )
        for name in ("data_kwargs", "model_kwargs", "norm_kwargs"):
            need(isinstance(getattr(self, name), Mapping), f"{name} must be a dict, got {getattr(self, name)!r}")

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
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


# --------------------------------------------------------------------------- environment


_ALLOCATOR_TUNED: bool | None = None
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3


def tune_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Tell glibc's malloc to keep blocks up to ``threshold_bytes`` (default 1 GiB) instead of mapping them anew.

    Sets ``M_MMAP_THRESHOLD`` (allocations below it come from the heap, not a
    fresh ``mmap``) and ``M_TRIM_THRESHOLD`` (free memory at the heap top is
    kept up to this size) with ``mallopt``, which is what the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do.
    Activations of a few megabytes are then reused from the heap on every step
    instead of being page-faulted anew. The cost is that up to
    ``threshold_bytes`` of freed memory stays with the process.

    Process-wide and idempotent; returns whether the setting is in effect.
    Does nothing (returns False) on a non-glibc platform or when
    ``NORMLAB_TUNE_MALLOC=0`` is set.
    """
    global _ALLOCATOR_TUNED
    if os.environ.get("NORMLAB_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            value = ctypes.c_int(min(int(threshold_bytes), 2**31 - 1))  # mallopt takes a C int
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, value)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, value))
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            ok = False
    _ALLOCATOR_TUNED = ok
    return ok


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; any other name is checked and returned as a ``torch.device``."""
    name = str(device)
    if not _DEVICE_RE.match(name):
        raise ConfigError(f"device={name!r} is not one of: 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available here; use device=cpu or device=auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device='mps' requested but MPS is not available here; use device=cpu or device=auto")
    return torch.device(name)


# --------------------------------------------------------------------------- schedule


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    Warm-up: ``lr * (step + 1) / warmup_steps`` for the first
    ``warmup_steps = round(warmup_epochs * steps_per_epoch)`` steps. Then
    "constant" keeps ``lr``; "cosine" decays from ``lr`` to 0 over the
    remaining steps, ``lr * (1 + cos(pi * t / T)) / 2``; "step" multiplies by
    ``lr_decay`` at each epoch in ``lr_milestones`` (default: half and three
    quarters of ``epochs``).
    """
    warm = round(config.warmup_epochs * steps_per_epoch)
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        span = max(1, total_steps - warm)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))
    milestones = config.lr_milestones or (0.5 * config.epochs, 0.75 * config.epochs)
    epoch = step / steps_per_epoch
    return config.lr * config.lr_decay ** sum(epoch >= m for m in milestones)


# --------------------------------------------------------------------------- results


@dataclass
class TrainState:
    """What a ``callback`` sees.

    It is called after every optimizer step (``event="step"``) and every epoch's evaluation (``"epoch"``).

    ``loss`` is the step's loss as a 0-d tensor still on the device (reading it
    with ``.item()`` forces a host sync); ``metrics`` is the epoch record. A
    callback that returns ``True`` stops the run cleanly (``stopped_early``).
    """

    event: str  # "step" | "epoch"
    step: int  # optimizer steps taken so far
    epoch: int  # 0-based epoch index
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    loss: Tensor | None = None
    metrics: dict[str, Any] | None = None


@dataclass
class RunResult:
    """The outcome of :func:`train`: curves, final numbers and what happened.

    ``step_loss``: per optimizer step, nats. ``epochs``: one dict per epoch
    (also for a last partial epoch after divergence, ``max_steps`` or an early
    stop) with ``epoch``, ``steps``, ``lr``, ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` (+ ``train_eval_*``), ``time`` (training
    seconds) and ``eval_time``. ``wall_time``: seconds for the whole call.
    ``model`` (the trained module) is kept for probes and not serialised.
    """

    config: TrainConfig
    step_loss: list[float]
    epochs: list[dict[str, Any]]
    wall_time: float
    diverged: bool
    diverged_step: int | None
    steps: int
    stopped_early: bool
    num_params: int
    device: str
    threads: int
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    world_size: int = 1  # processes that trained the model together (torch.distributed)

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record (empty if no epoch ran)."""
        return dict(self.epochs[-1]) if self.epochs else {}

    def summary(self) -> dict[str, Any]:
        """Scalar results: ``final_*`` from the last epoch, divergence, steps, times."""
        out: dict[str, Any] = {
            "diverged": self.diverged,
            "diverged_step": self.diverged_step,
            "steps": self.steps,
            "stopped_early": self.stopped_early,
            "epochs_run": len(self.epochs),
            "wall_time": self.wall_time,
            "num_params": self.num_params,
        }
        if self.world_size > 1:
            out["world_size"] = self.world_size
        for k, v in self.final.items():
            if k not in ("epoch", "steps"):
                out[f"final_{k}"] = v
        finite = [v for v in self.step_loss if math.isfinite(v)]
        out["min_step_loss"] = min(finite) if finite else None
        return out

    def to_metrics(self) -> dict[str, Any]:
        """Everything recorded: ``summary()`` plus ``step_loss`` and ``epochs``."""
        return {**self.summary(), "step_loss": list(self.step_loss), "epochs": [dict(e) for e in self.epochs]}


# --------------------------------------------------------------------------- the loop


def _message(e: BaseException) -> str:
    """An exception's message on one line (KeyError's repr quotes stripped)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


def _forward(model: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    return model(x) if mask is None else model(x, mask=mask)


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, *, mask: Tensor | None = None, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy (fraction) of ``model`` in eval mode over ``(x, y)``.

    The model's train/eval mode is restored afterwards. One host sync at the end.
    """
    was_training = model.training
    model.eval()
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                out = _forward(model, x[i : i + batch_size], None if mask is None else mask[i : i + batch_size])
                total += F.cross_entropy(out.float(), y[i : i + batch_size], reduction="sum").double()
                correct += (out.argmax(-1) == y[i : i + batch_size]).sum()
    finally:
        model.train(was_training)
    return (total / max(n, 1)).item(), correct.item() / max(n, 1)


def _to_device(t: Tensor | None, device: torch.device, channels_last: bool) -> Tensor | None:
    if t is None:
        return None
    t = t.to(device)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


@dataclass(frozen=True)
class _Data:
    """The dataset's tensors on the run's device (images in the requested memory format)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mask_train: Tensor | None
    mask_test: Tensor | None
    input_shape: tuple[int, ...]
    num_classes: int


def load_data(config: TrainConfig):
    """The dataset :func:`train` trains on for ``config`` (in memory, on the CPU): a ``normlab.lab.data.Dataset``.

    Experiments that probe or evaluate beside training call this, so they see exactly the same data.
    """
    from normlab.lab.data import load_dataset

    kw = dict(config.data_kwargs)
    if config.n_train is not None:
        if kw.get("n_train", config.n_train) != config.n_train:
            raise ConfigError("n_train is set twice (n_train and data_kwargs.n_train); set it once")
        kw["n_train"] = config.n_train
    try:
        return load_dataset(config.dataset, seed=config.data_seed, **kw)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"dataset={config.dataset!r}: {_message(e)}") from e


def _load_data(config: TrainConfig, device: torch.device) -> _Data:
    ds = load_data(config)
    cl = config.channels_last
    return _Data(
        x_train=_to_device(ds.x_train, device, cl),
        y_train=ds.y_train.to(device),
        x_test=_to_device(ds.x_test, device, cl),
        y_test=ds.y_test.to(device),
        mask_train=_to_device(ds.mask_train, device, False),
        mask_test=_to_device(ds.mask_test, device, False),
        input_shape=tuple(ds.input_shape),
        num_classes=ds.num_classes,
    )


def _build_model(config: TrainConfig, data: _Data, device: torch.device) -> nn.Module:
    """``build_model`` with the norm given only as ``norm_layer`` (a name, or a partial of ``make_norm``)."""
    from normlab.lab.models import build_model
    from normlab.registry import make_norm

    norm_layer: Any = config.norm
    if config.norm_kwargs:
        norm_layer = functools.partial(make_norm, config.norm, **config.norm_kwargs)
    torch.manual_seed(config.seed)
    try:
        model = build_model(
            config.model,
            in_shape=data.input_shape,
            num_classes=data.num_classes,
            norm_layer=norm_layer,
            **config.model_kwargs,
        )
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"model={config.model!r} with norm={config.norm!r}: {_message(e)}") from e
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    return torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
    )


class _StepLog:
    """Per-step losses and correct counts, kept on the device and copied to the host in blocks.

    ``add`` costs no host sync; ``flush`` copies the pending steps at once and
    scans them for divergence: it records the first step whose loss is
    non-finite or above ``bound``, drops whatever came after it, and returns
    True once the run has diverged.
    """

    def __init__(self, bound: float, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.bound = bound
        self.reduce = reduce  # several processes: sums the stacked per-step pairs over them at each flush
        self.step_loss: list[float] = []
        self.diverged_step: int | None = None
        self.pending: list[Tensor] = []  # per step: (loss, correct), 0-d pairs on the device
        self.sizes: list[int] = []
        self.start_epoch()

    def start_epoch(self) -> None:
        self.loss_sum, self.correct, self.seen = 0.0, 0.0, 0

    def add(self, loss: Tensor, out: Tensor, y: Tensor, n: int | None = None) -> None:
        with torch.no_grad():
            self.pending.append(torch.stack((loss.detach().float(), (out.argmax(-1) == y).sum().float())))
        self.sizes.append(y.shape[0] if n is None else n)

    def flush(self) -> bool:
        if self.pending and self.diverged_step is None:
            table = torch.stack(self.pending)
            if self.reduce is not None:
                table = self.reduce(table)
            for (loss, correct), n in zip(table.tolist(), self.sizes):
                self.step_loss.append(loss)
                self.loss_sum += loss * n
                self.correct += correct
                self.seen += n
                if not math.isfinite(loss) or loss > self.bound:
                    self.diverged_step = len(self.step_loss) - 1
                    break
        self.pending.clear()
        self.sizes.clear()
        return self.diverged_step is not None

    def epoch_means(self) -> dict[str, float]:
        """Size-weighted mean loss and accuracy of this epoch's recorded steps (train mode)."""
        return {"train_loss": self.loss_sum / max(self.seen, 1), "train_acc": self.correct / max(self.seen, 1)}


def train(
    config: TrainConfig,
    *,
    progress: bool = False,
    callback: Callable[[TrainState], bool | None] | None = None,
    tune_malloc: bool = True,
) -> RunResult:
    """Train ``config.model`` with ``config.norm`` on ``config.dataset``; return a :class:`RunResult`.

    See the module docstring for the conventions (losses, accuracies,
    divergence, determinism). ``progress`` shows a tqdm bar over the steps;
    ``callback(state)`` is called after every step and every epoch (return
    ``True`` to stop). ``tune_malloc=False`` leaves the C allocator alone (see
    :func:`tune_allocator`).
    """
    from normlab.lab import launch
    from normlab.lab.data import Batches

    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(config).__name__}")
    config.validate()
    start = time.perf_counter()
    if tune_malloc:
        tune_allocator()
    dctx = launch.setup(config.device)  # None unless several processes were launched
    device = dctx.device if dctx is not None else resolve_device(config.device)
    if dctx is not None and config.batch_size < dctx.world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} is the global batch: it must be >= {dctx.world_size} processes"
        )
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        data = _load_data(config, device)
        model = _build_model(config, data, device)
        num_params = sum(p.numel() for p in model.parameters())
        opt = _make_optimizer(config, model)
        net = dctx.wrap(model, sync_bn=config.sync_bn) if dctx is not None else model
        fwd = torch.compile(net) if config.compile else net
        try:
            batches = Batches(
                data.x_train,
                data.y_train,
                config.batch_size,
                mask=data.mask_train,
                shuffle=True,
                seed=config.seed,
                drop_last=config.drop_last,
                augment=config.augment,
                device=device,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"batches: {_message(e)}") from e
        steps_per_epoch = len(batches)
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)

        log = _StepLog(config.divergence_loss, reduce=dctx.all_reduce_sum if dctx is not None else None)
        epochs: list[dict[str, Any]] = []
        stopped = False
        step = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total_steps, desc=f"{config.model}/{config.norm} lr={config.lr:g}", unit="step", leave=False
            )

        for epoch in range(config.epochs):
            if step >= total_steps:
                break
            model.train()
            log.start_epoch()
            t0 = time.perf_counter()
            lr = config.lr
            for batch in batches:
                if step >= total_steps:
                    break
                x, y = batch[0], batch[1]
                mask = batch[2] if len(batch) > 2 else None
                n = y.shape[0]
                if dctx is not None:  # this process's slice of the global batch
                    x, y, mask, n = dctx.shard(x, y, mask)
                lr = lr_at(config, step, steps_per_epoch, total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                out = _forward(fwd, x, mask)  # (N, num_classes)
                if dctx is None:
                    loss = logged = F.cross_entropy(out, y)
                else:
                    loss, logged = dctx.loss(out, y, n)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                log.add(logged, out, y, n)
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    stopped = bool(callback(TrainState("step", step, epoch, model, opt, config, loss=loss.detach())))
                if (len(log.pending) >= config.sync_every and log.flush()) or stopped:
                    break
            log.flush()
            train_time = time.perf_counter() - t0

            t1 = time.perf_counter()
            test_loss, test_acc = evaluate(
                model, data.x_test, data.y_test, mask=data.mask_test, batch_size=config.eval_batch_size
            )
            record: dict[str, Any] = {
                "epoch": epoch,
                "steps": len(log.step_loss),
                "lr": lr,
                **log.epoch_means(),
                "test_loss": test_loss,
                "test_acc": test_acc,
            }
            if config.eval_train:
                tl, ta = evaluate(
                    model, data.x_train, data.y_train, mask=data.mask_train, batch_size=config.eval_batch_size
                )
                record["train_eval_loss"], record["train_eval_acc"] = tl, ta
            record["time"] = train_time
            record["eval_time"] = time.perf_counter() - t1
            epochs.append(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['train_loss']:.3g}", test_acc=f"{test_acc:.3f}")
            if callback is not None and callback(TrainState("epoch", step, epoch, model, opt, config, metrics=record)):
                stopped = True
            if stopped or log.diverged_step is not None:
                break
        if bar is not None:
            bar.close()
        return RunResult(
            config=config,
            step_loss=log.step_loss,
            epochs=epochs,
            wall_time=time.perf_counter() - start,
            diverged=log.diverged_step is not None,
            diverged_step=log.diverged_step,
            steps=len(log.step_loss),
            stopped_early=stopped,
            num_params=num_params,
            device=str(device),
            threads=torch.get_num_threads(),
            model=model,
            world_size=dctx.world_size if dctx is not None else 1,
        )
    finally:
        torch.set_num_threads(old_threads)
