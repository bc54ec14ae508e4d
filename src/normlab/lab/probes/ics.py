"""Internal covariate shift in the gradient sense (Santurkar et al. 2018, §2.2, Definition 2.1).

For layer ``i`` with parameters ``W_i`` and a batch ``(x, y)``::

    G_i  = grad_{W_i} L(W_1,     ..., W_{i-1},     W_i, ..., W_k; x, y)
    G'_i = grad_{W_i} L(W_1^+,   ..., W_{i-1}^+,   W_i, ..., W_k; x, y)

where ``W^+`` are the parameters after one step of the optimizer on the same
batch. ICS of layer ``i`` is ``|G_i - G'_i|_2``; ``cos(G_i, G'_i)`` measures
whether the direction survives the preceding layers' update. "Preceding" is
decided by execution order: a parameter precedes layer ``i`` if the module that
owns it (``named_parameters(recurse=False)``) finished its first forward call
before layer ``i``'s first forward call began (recorded by hooks during the
``G`` pass). So a BN layer's scale and shift between layers ``i-1`` and ``i``
precede layer ``i``, and a block's SkipInit ``alpha`` (owned by the block,
which finishes after its branch) precedes only the layers of later blocks.

The step ``W -> W^+`` is the optimizer's own: the optimizer is deep-copied
(a copy of its parameters and state, e.g. momentum buffers or Adam moments),
the copy's parameters are given the gradients ``G`` of the whole model and
the copy steps once. The model, its ``.grad`` and the optimizer given are
never written. Parameters the optimizer does not hold do not move.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from normlab.lab.probes._common import Batch, Evaluator, LossSpec, dot, norm, objective, probing, select_layers

__all__ = ["internal_covariate_shift", "LayerICS"]


@dataclass(frozen=True)
class LayerICS:
    """ICS of one layer: ``l2 = |G - G'|``, ``relative = l2 / |G|``, ``cosine = cos(G, G')``; ``grad_norm = |G|``,
    ``shifted_grad_norm = |G'|``; ``preceding`` = the number of parameter tensors moved to their stepped values."""

    name: str
    l2: float
    relative: float
    cosine: float
    grad_norm: float
    shifted_grad_norm: float
    preceding: int

    def as_dict(self) -> dict:
        return asdict(self)


def _own_params(model: nn.Module) -> dict[str, str]:
    """parameter name -> name of the module that owns it (first owner for shared parameters)."""
    owner: dict[str, str] = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            owner.setdefault(full, mname)
    return owner


def internal_covariate_shift(
    model: nn.Module,
    loss: LossSpec,
    batch: Batch | None = None,
    *,
    optimizer: torch.optim.Optimizer,
    mode: str,
    layers: Iterable[str | nn.Module] | None = None,
) -> list[LayerICS]:
    """ICS per layer (default: every Linear/Conv, in execution order) for one batch and the optimizer's next step.

    Each layer's ``G`` is the gradient of its own parameters (weight and bias
    together). All gradients use the same batch, mode, buffers-as-found and RNG
    state; see the module docstring for "preceding" and for the step.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    fn = objective(model, loss, batch)
    chosen = select_layers(model, layers)
    named = dict(model.named_parameters())
    owner = _own_params(model)
    names = [n for n, p in named.items() if p.requires_grad and p.is_floating_point()]
    model_ids = {id(q) for q in named.values()}
    foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in model_ids]
    if foreign:
        raise ValueError(f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of this model")

    start: dict[str, int] = {}
    finish: dict[str, int] = {}
    tick = [0]

    def on_start(name):
        def hook(mod, args):
            start.setdefault(name, tick[0])
            tick[0] += 1

        return hook

    def on_finish(name):
        def hook(mod, args, out):
            finish.setdefault(name, tick[0])
            tick[0] += 1

        return hook

    with probing(model, mode):
        ev = Evaluator(model, fn)
        handles = []
        try:
            for mname, m in model.named_modules():
                handles.append(m.register_forward_pre_hook(on_start(mname)))
                handles.append(m.register_forward_hook(on_finish(mname)))
            _, grads, _ = ev.gradient(names)
        finally:
            for h in handles:
                h.remove()
        g_all = dict(zip(names, (g.detach() for g in grads)))
        stepped = _optimizer_step(optimizer, named, g_all)  # name -> W^+ for parameters the optimizer moves

        out = []
        for lname, _layer in sorted(chosen, key=lambda nm: start.get(nm[0], math.inf)):
            if lname not in start:
                continue  # not run by this objective
            own = [n for n in names if owner[n] == lname]
            if not own:
                raise ValueError(f"layer {lname!r} has no trainable parameters of its own")
            before = [n for n in stepped if owner[n] in finish and finish[owner[n]] < start[lname]]
            _, gp, _ = ev.gradient(own, {n: stepped[n] for n in before})
            g = [g_all[n] for n in own]
            gp = [t.detach() for t in gp]
            diff = norm([a - b for a, b in zip(g, gp)])
            gn, gpn = norm(g), norm(gp)
            cos = dot(g, gp) / (gn * gpn) if gn > 0 and gpn > 0 else float("nan")
            out.append(LayerICS(lname, diff, diff / gn if gn > 0 else float("nan"), cos, gn, gpn, len(before)))
    return out


def _optimizer_step(
    optimizer: torch.optim.Optimizer, named: dict[str, Tensor], grads: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The parameter values after one step of a deep copy of ``optimizer`` with gradients ``grads`` (by name)."""
    by_id = {id(p): n for n, p in named.items()}
    shadow = copy.deepcopy(optimizer)  # copies the parameters and the state consistently (one memo)
    pairs = []
    for g_orig, g_copy in zip(optimizer.param_groups, shadow.param_groups):
        for p, q in zip(g_orig["params"], g_copy["params"]):
            name = by_id[id(p)]
            with torch.no_grad():
                q.grad = grads[name].clone().to(q) if name in grads else None
            pairs.append((name, q))
    with torch.no_grad():
        shadow.step()
    return {n: q.detach() for n, q in pairs if n in grads}  # parameters without a gradient do not move
