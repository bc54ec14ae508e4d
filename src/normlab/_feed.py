"""How a batch is fed to a model: one rule for every tool that runs a model on the user's batches.

A *batch* is what a data loader yields. It is fed to ``model`` as:

==========================================  ==========================================
batch                                        call
==========================================  ==========================================
a tensor ``x``                               ``model(x)``
a tuple/list ``(x, y, ...)``                 ``model(x)``; ``y`` is the target
``(x, y, mask)`` with a **bool** ``mask``    ``model(x, mask=mask)`` (normlab's padded sequences)
a dict                                       ``model(**batch)`` (keyword arguments)
==========================================  ==========================================

Every tensor of the model's input (and the target) is moved to the model's
device first (``.to`` is free when it is already there). Anything else is a
``TypeError`` that says what a batch may be and that ``forward=lambda model,
batch: ...`` is the way out: each tool that takes batches also takes a
``forward(model, batch)`` for inputs this rule does not cover.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Fed", "model_device", "unpack", "feed", "batch_size"]


class Fed(NamedTuple):
    """One batch taken apart: ``model(*args, **kwargs)`` runs it; ``target`` is ``y`` (None when absent)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: Tensor | None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _to(t: Any, device: torch.device | None) -> Any:
    return t.to(device) if isinstance(t, Tensor) and device is not None else t


def unpack(batch: Any, device: torch.device | str | None = None, *, who: str = "feed") -> Fed:
    """The model's inputs and the target of ``batch`` (see the module docstring), moved to ``device`` if given.

    ``who`` names the caller in the error message, e.g. ``"audit"``.
    """
    device = torch.device(device) if device is not None else None
    if isinstance(batch, Tensor):
        return Fed((_to(batch, device),), {}, None)
    if isinstance(batch, dict):
        return Fed((), {k: _to(v, device) for k, v in batch.items()}, None)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x = _to(batch[0], device)
        y = _to(batch[1], device) if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        mask = batch[2] if len(batch) == 3 else None
        if isinstance(mask, Tensor) and mask.dtype == torch.bool:
            return Fed((x,), {"mask": _to(mask, device)}, y)
        return Fed((x,), {}, y)
    what = type(batch).__name__ + (" of length 0" if isinstance(batch, (tuple, list)) and not batch else "")
    raise TypeError(
        f"{who}: cannot feed a batch of type {what} to the model; a batch is a tensor x, (x, y), (x, y, mask) with "
        "a bool mask, or a dict of keyword arguments; otherwise pass forward=lambda model, batch: model(...)"
    )


def feed(model: nn.Module, batch: Any, *, device: torch.device | str | None = None, who: str = "feed") -> Any:
    """Run ``model`` on one batch (inputs moved to ``device``, by default the model's); returns its output."""
    fed = unpack(batch, model_device(model) if device is None else device, who=who)
    return model(*fed.args, **fed.kwargs)


def batch_size(batch: Any) -> int:
    """Samples in a batch: axis 0 of its first tensor (depth first, as ``x`` of ``(x, y)``); 0 when it holds none."""
    x = _first_tensor(batch)
    return int(x.shape[0]) if x is not None and x.dim() else 0


def _first_tensor(obj: Any, depth: int = 0) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for o in items if depth < 2 else ():
        t = _first_tensor(o, depth + 1)
        if t is not None:
            return t
    return None
