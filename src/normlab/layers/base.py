"""What every normlab layer shares: it *is* the ``torch.nn`` layer it replaces, with normlab's forward.

Each layer subclasses its ``torch.nn`` counterpart (``normlab.BatchNorm2d`` is an
``nn.BatchNorm2d``, hence a ``_BatchNorm`` and a ``_NormBase``; ``normlab.LayerNorm``
an ``nn.LayerNorm``; ...), so the parameters, buffers, their initialisation,
``reset_parameters``/``reset_running_stats``, the state-dict format and its
version handling are PyTorch's own, and every tool that looks for norms by
``isinstance`` finds normlab's (``swa_utils.update_bn``,
``nn.SyncBatchNorm.convert_sync_batchnorm``, fine-tuning helpers that freeze
BatchNorm, ...). The constructors are PyTorch's, so the affine parameters
(``weight``/``bias``, ``bias=False``) are made in one place: theirs.

What normlab adds here:

* :class:`NormLayer` — ``forward`` goes through one module-level function,
  :func:`_forward`, that ``torch.fx`` records as a single call (a layer's
  checks and kernels are Python that a symbolic tracer cannot follow), and
  ``__prepare_scriptable__`` hands ``torch.jit.script`` the equivalent
  ``torch.nn`` layer (same tensors), which TorchScript can compile.
* :func:`add_nonfinite_counter` — the non-persistent ``num_nonfinite_batches``
  buffer of the layers that keep running statistics (state dicts stay
  identical to PyTorch's).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["NormLayer", "MaskedNormLayer", "add_nonfinite_counter", "swap", "replace_modules"]


def _forward(module: nn.Module, input: Tensor, *args) -> Tensor:
    """Every normlab layer's forward: ``module._forward(input, ...)``; one opaque call to ``torch.fx``."""
    return module._forward(input, *args)


torch.fx.wrap("_forward")


class NormLayer:
    """Mixin (listed before the ``torch.nn`` base): fx- and TorchScript-friendly ``forward(input)``."""

    def forward(self, input: Tensor) -> Tensor:
        return _forward(self, input)

    def _forward(self, input: Tensor) -> Tensor:
        raise NotImplementedError

    def __prepare_scriptable__(self) -> nn.Module:
        """The ``torch.nn`` equivalent (same parameter and buffer tensors) for ``torch.jit.script``."""
        from normlab.convert import scriptable

        return scriptable(self)


class MaskedNormLayer(NormLayer):
    """:class:`NormLayer` whose forward also takes ``mask`` (the BatchNorm family)."""

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        return _forward(self, input, mask)

    def _forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError


def add_nonfinite_counter(module: nn.Module, device=None) -> None:
    """Register ``num_nonfinite_batches``: batches kept out of the running statistics (not in state dicts)."""
    module.register_buffer("num_nonfinite_batches", torch.tensor(0, dtype=torch.long, device=device), persistent=False)


def swap(module: nn.Module, target: type, **kwargs) -> nn.Module:
    """A ``target(**kwargs)`` that takes over ``module``'s very ``Parameter`` and buffer tensors and its mode.

    The one module-swap helper (``normlab.convert``, ``convert_sync_batchnorm``,
    ``freeze``): an optimizer built on the old module keeps working, and
    training continues identically. Buffers only the target has (normlab's
    counters) start at zero on the module's device. Hooks are not carried over.
    """
    new = target(**kwargs, device="meta")  # placeholder storage, replaced below
    for name in list(new._parameters):
        new._parameters[name] = module._parameters.get(name)  # the same Parameter objects (or None)
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    device = tensors[0].device if tensors else torch.device("cpu")
    for name, b in list(new._buffers.items()):
        if name in module._buffers:
            new._buffers[name] = module._buffers[name]
        elif b is not None:
            new._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    new.train(module.training)
    return new


def replace_modules(model: nn.Module, replace) -> nn.Module:
    """Apply ``replace(module) -> module | None`` top-down; a returned module takes the place of the old one.

    Returns the model, or its replacement when the model itself is replaced.
    """
    new = replace(model)
    if new is not None:
        return new
    for name, child in model.named_children():
        setattr(model, name, replace_modules(child, replace))
    return model
