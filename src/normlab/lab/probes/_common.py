"""What every probe shares: the objective, the parameter selection, and leaving the model as found.

A probe never writes to the model it measures. It evaluates the model
*statelessly* with :func:`torch.func.functional_call`: the parameters it varies
or differentiates are passed in as fresh tensors (detached views of the
parameters, or perturbed copies), and every buffer is passed in as a *clone*
taken from the model at each evaluation, so a train-mode BatchNorm updates the
clone's running statistics and ``num_batches_tracked``, never the model's.
Gradients are taken with :func:`torch.autograd.grad`, so no ``.grad`` is
written and no ``requires_grad`` flag changes. The train/eval mode asked for is
set on every submodule for the duration of the probe and each submodule's own
flag is restored afterwards; the global RNG state is restored too (probes run
inside :func:`torch.random.fork_rng`). Hooks a probe registers are removed by
their handles, also when the probe fails.

Every evaluation of the objective starts from the same RNG state, the one found
when the probe started, so stochastic layers (dropout, noisy BN) draw the same
masks and noise at every point a probe visits: the probe measures a fixed
function of the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from normlab._feed import feed, model_device, unpack

__all__ = [
    "Batch",
    "LossSpec",
    "model_device",
    "objective",
    "forward_fn",
    "select_params",
    "select_layers",
    "probing",
    "Evaluator",
    "dot",
    "norm",
]

Batch = Tensor | Sequence[Tensor]
LossSpec = Callable[..., Tensor]
MODES = ("train", "eval")


def _check_mode(mode: str) -> bool:
    if mode not in MODES:
        raise ValueError(
            f"mode must be 'train' or 'eval' (BatchNorm's mode changes what is measured), got {mode!r}; "
            "pass mode='train' to use batch statistics or mode='eval' to use the running statistics"
        )
    return mode == "train"


def objective(model: nn.Module, loss: LossSpec, batch: Batch | None) -> Callable[[], Tensor]:
    """The scalar objective as a closure.

    ``batch is None``: ``loss`` is already a zero-argument closure that runs the
    model and returns a scalar loss. Otherwise ``loss`` is ``loss_fn(output,
    target)`` and ``batch`` is ``(x, y)`` or ``(x, y, mask)``: the objective is
    ``loss_fn(model(x), y)`` or ``loss_fn(model(x, mask=mask), y)``, with the
    tensors moved to the model's device.
    """
    if not callable(loss):
        raise TypeError(f"loss must be a callable (a closure, or loss_fn(output, target)), got {type(loss).__name__}")
    if batch is None:
        return loss
    fed = unpack(batch, model_device(model), who="probe")
    if fed.target is None:
        raise TypeError("with a loss_fn the batch must hold the targets: pass (x, y) or (x, y, mask)")
    return lambda: loss(model(*fed.args, **fed.kwargs), fed.target)


def forward_fn(forward: Callable[[nn.Module, Any], Any] | None, device: torch.device) -> Callable:
    """How to run one batch: ``forward(model, batch)`` if given, else :func:`normlab._feed.feed` on ``device``."""
    if forward is not None:
        return forward

    def run(model: nn.Module, batch: Batch):
        return feed(model, batch, device=device, who="probe")

    return run


def iter_batches(batches: Batch | Iterable[Batch]) -> Iterator[Batch]:
    """A bare tensor is one batch; anything else is an iterable of batches (wrap a single ``(x, y)`` in a list)."""
    if isinstance(batches, Tensor):
        yield batches
        return
    if isinstance(batches, tuple) and batches and all(isinstance(t, Tensor) for t in batches):
        raise TypeError(
            "ambiguous batches: a tuple of tensors could be one (x, y) batch or several input batches; "
            "pass a list of batches, e.g. [(x, y)] for one batch or [x1, x2] for two"
        )
    n = 0
    for b in batches:
        n += 1
        yield b
    if n == 0:
        raise ValueError("no batches given: pass an input tensor or a non-empty iterable of batches")


def select_params(model: nn.Module, params: Iterable[str | Tensor] | None) -> list[str]:
    """Names of the parameters a probe works on.

    ``None``: every parameter with ``requires_grad=True`` (in ``named_parameters``
    order). Otherwise names or the ``Parameter`` objects themselves; a parameter
    frozen with ``requires_grad=False`` may be named explicitly (the probe
    differentiates a detached copy, so the flag is never changed).
    """
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad and p.is_floating_point()]
        if not names:
            raise ValueError("the model has no trainable floating-point parameters; pass params= explicitly")
        return names
    by_id = {id(p): n for n, p in named.items()}
    names = []
    for p in params:
        if isinstance(p, str):
            if p not in named:
                raise KeyError(f"no parameter named {p!r}; the model has: {', '.join(named) or 'none'}")
            names.append(p)
        elif isinstance(p, Tensor):
            if id(p) not in by_id:
                raise KeyError(
                    "a tensor in params= is not a parameter of this model; pass its own Parameters or their names"
                )
            names.append(by_id[id(p)])
        else:
            raise TypeError(f"params= takes parameter names or Parameters, got {type(p).__name__}")
    if not names:
        raise ValueError("params= is empty")
    if len(set(names)) != len(names):
        raise ValueError("params= names a parameter twice")
    return names


def default_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


def select_layers(
    model: nn.Module,
    layers: Iterable[str | nn.Module] | None,
    default: Callable[[nn.Module], bool] = default_layer,
    what: str = "Linear/Conv",
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs: the named/given modules, or every module for which ``default`` holds."""
    named = list(model.named_modules())
    if layers is None:
        out = [(n, m) for n, m in named if default(m)]
        if not out:
            raise ValueError(f"the model has no {what} layers; pass layers= (module names or modules)")
        return out
    by_name = dict(named)
    by_id = {id(m): n for n, m in named}
    out = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in by_name:
                raise KeyError(f"no submodule named {layer!r}")
            out.append((layer, by_name[layer]))
        elif isinstance(layer, nn.Module):
            if id(layer) not in by_id:
                raise KeyError(f"{type(layer).__name__} given in layers= is not a submodule of this model")
            out.append((by_id[id(layer)], layer))
        else:
            raise TypeError(f"layers= takes module names or modules, got {type(layer).__name__}")
    if not out:
        raise ValueError("layers= is empty")
    return out


def _rng_state(device: torch.device):
    if device.type == "cpu":
        return torch.get_rng_state(), None
    mod = getattr(torch, device.type, None)
    dev_state = mod.get_rng_state(device) if mod is not None and hasattr(mod, "get_rng_state") else None
    return torch.get_rng_state(), dev_state


def _set_rng_state(device: torch.device, state) -> None:
    cpu, dev = state
    torch.set_rng_state(cpu)
    if dev is not None:
        getattr(torch, device.type).set_rng_state(dev, device)


@contextmanager
def probing(model: nn.Module, mode: str):
    """Run a probe: set ``mode`` on every submodule; afterwards restore each module's flag, grad mode and RNG state."""
    train = _check_mode(mode)
    device = model_device(model)
    flags = [(m, m.training) for m in model.modules()]
    grad_mode = torch.is_grad_enabled()
    fork_kw = {"devices": []} if device.type == "cpu" else {"devices": [device], "device_type": device.type}
    try:
        with torch.random.fork_rng(**fork_kw):
            model.train(train)
            yield
    finally:
        for m, t in flags:
            m.training = t
        torch.set_grad_enabled(grad_mode)


class _Call(nn.Module):
    """Holds the model as its child so ``functional_call`` can swap its tensors while ``fn`` runs it."""

    def __init__(self, model: nn.Module, fn: Callable[[], Any]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self):
        return self._fn()


class Evaluator:
    """Evaluate ``fn()`` (which runs ``model``) at given parameter values, touching none of the model's tensors.

    ``values`` maps parameter names to the tensors to use in their place; all
    other parameters keep their values. Buffers are cloned from the model at
    every call (so each evaluation sees the buffers as found, and a train-mode
    forward updates only the clones). Each call starts from the RNG state found
    when the evaluator was built. Use inside :func:`probing`.
    """

    def __init__(self, model: nn.Module, fn: Callable[[], Any]) -> None:
        self.model = model
        self.device = model_device(model)
        self._call = _Call(model, fn)
        self._buffers = list(model.named_buffers())
        self._rng = _rng_state(self.device)
        self.params = dict(model.named_parameters())

    def __call__(self, values: dict[str, Tensor] | None = None) -> Any:
        state = {"model." + n: v for n, v in (values or {}).items()}
        for n, b in self._buffers:
            state["model." + n] = b.clone()
        _set_rng_state(self.device, self._rng)
        return torch.func.functional_call(self._call, state, ())

    def loss(self, values: dict[str, Tensor] | None = None) -> Tensor:
        out = self(values)
        if not isinstance(out, Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the loss must be a scalar tensor, got {shape}; reduce it (e.g. .mean()) in the loss")
        return out.reshape(())

    def leaves(self, names: Sequence[str], values: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Fresh differentiable leaves for ``names`` (detached views of the parameters, or of ``values``)."""
        src = values or {}
        return {n: (src[n] if n in src else self.params[n]).detach().requires_grad_(True) for n in names}

    def gradient(self, names: Sequence[str], values: dict[str, Tensor] | None = None, *, create_graph: bool = False):
        """``(loss, [dL/dp for p in names], leaves)`` at ``values``; unused parameters get zero gradients."""
        with torch.enable_grad():
            leaves = self.leaves(names, values)
            full = dict(values or {})
            full.update(leaves)
            loss = self.loss(full)
            grads = torch.autograd.grad(
                loss, list(leaves.values()), create_graph=create_graph, allow_unused=True, materialize_grads=True
            )
        return loss, list(grads), leaves


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Inner product of two lists of tensors (one vector split over parameters), accumulated in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def norm(a: Sequence[Tensor]) -> float:
    return dot(a, a) ** 0.5
