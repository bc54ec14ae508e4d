"""The behavioural checks: what a norm layer *does*, measured on a deep copy, not read from its attributes.

At the first call of every layer that looks like a norm layer (:func:`~normlab.audit.kinds.looks_like_norm`:
torch.nn's, normlab's, third-party and hand-written ones), on the first batch, a forward pre-hook
(:class:`Prober`) deep-copies the layer and runs the copy on the same input in training mode, in float64 when
the layer allows it (else in its own dtype):

* **EMA weight.** The copy's ``running_mean``/``running_var`` are set to known values (the batch mean minus
  one standard deviation plus one; twice the variance plus one) and the copy runs one training-mode forward.
  From the buffers before and after and the batch's own statistics (float64, over every axis but the feature
  axis): the weight ``w`` of the new batch in ``running_mean`` (per channel ``(after - before) / (batch mean -
  before)``; the median over channels is reported), and whether ``running_var`` received the biased (``/n``)
  or the unbiased (``/(n - 1)``) batch variance. ``w`` is compared with what the declared ``momentum`` means
  in PyTorch's convention, ``running = (1 - momentum) * running + momentum * batch`` (normlab's
  ``momentum_convention``/``debias`` and ``momentum=None``, a cumulative average, are honoured; a frozen
  layer must not move). A GhostBatchNorm is given one virtual batch, so that it updates once.
* **Autograd history.** The copy's input requires grad, as a training input does; a floating buffer that
  requires grad or has a ``grad_fn`` afterwards was updated outside ``torch.no_grad()``. The model's own
  buffers are read as they are too (that needs no batches).
* **Per-sample affine parameters.** A parameter of the layer whose first axis has the batch's size is
  perturbed at index 0: if only sample 0's output changes, it is indexed by the sample, not by a feature.
* **Eval output** (layers with running statistics). In eval mode a norm with running statistics is one
  per-feature map, the same for every sample and position: its output must move with its input when the
  samples are shuffled and the other non-feature axes rolled by one, must not change for the first half of
  the batch when the second half is left out, and must not raise on an input the training mode takes.

The model is not touched: the copy has its own parameters and buffers and none of the model's hooks, its RNG
draws happen inside :func:`torch.random.fork_rng`, and a copy that raises only skips these checks (a note
says so).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normlab import functional as NF
from normlab.audit.kinds import batches_tracked, feature_axis, is_frozen, is_ghost, norm_kind
from normlab.audit.recording import moments_along
from normlab.audit.state import AuditState

__all__ = ["Prober", "Probe", "Ema", "check_behaviour", "check_buffer_autograd"]

_GRAPH_NODES_MAX = 10_000  # autograd nodes counted behind a buffer, at most


@dataclass
class Ema:
    """The running-statistics update of one layer, measured on one batch."""

    weight: float  # the new batch's weight in running_mean: median over channels
    spread: float  # largest |per-channel weight - weight| (0 for one EMA step with one weight)
    variance: str  # what running_var received: "unbiased" | "biased" | "other" | "unmeasured"
    values: int  # values per channel in the batch (the n of n / (n - 1))
    channels: int
    declared: float | None  # the weight the layer's attributes declare (None: they declare none)
    momentum: Any  # the momentum attribute as declared
    convention: str  # "torch" | "decay" | "frozen" | "" (no momentum attribute)

    @property
    def mismatch(self) -> bool:
        """The measured weight is not the declared one (beyond float rounding and a 1 % margin)."""
        if self.declared is None:
            return False
        return abs(self.weight - self.declared) > 1e-3 + 1e-2 * max(self.declared, self.weight)


@dataclass
class Probe:
    """What one layer was seen to do on a copy (``skipped``: why it could not be measured)."""

    batch: int = 0
    ema: Ema | None = None
    autograd: dict[str, str] = field(default_factory=dict)  # buffer -> "grad_fn=..." / "requires_grad"
    graph_nodes: int = 0  # autograd nodes behind those buffers after the forward
    per_sample: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (parameter, shape)
    eval_moved: float | None = None  # eval output: relative change when samples and positions are moved
    eval_half: float | None = None  # eval output: relative change of the first half run without the rest
    eval_error: str | None = None  # the eval-mode forward raised this on the batch the training forward took
    float64: bool = True  # measured in float64 (else in the layer's own dtype)
    skipped: str | None = None

    @property
    def tolerance(self) -> float:
        """Relative differences below this are rounding: the same values computed in another order."""
        return 1e-9 if self.float64 else 1e-4


class Prober:
    """Forward pre-hooks on the given layers: at each one's first call, its copy is probed with the same inputs."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.probes: dict[nn.Module, Probe] = {}
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in layers]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module not in self.probes:
            self.probes[module] = probe(module, args, kwargs)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------- measuring a copy


def probe(m: nn.Module, args: tuple, kwargs: dict) -> Probe:
    """Measure a copy of ``m`` on the inputs of one of its calls; a copy that raises gives ``skipped``."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        return Probe(skipped="its first argument is not a floating tensor with a batch axis")
    if not bool(torch.isfinite(x).all()):
        return Probe(skipped="its input holds NaN/inf")
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        try:
            return _probe_copy(m, args, kwargs, torch.float64)
        except Exception:  # noqa: BLE001 - a layer that cannot run in float64: measure it in its own dtype
            pass
        try:
            return _probe_copy(m, args, kwargs, None)
        except Exception as exc:  # noqa: BLE001 - any failure of the copy only skips these checks
            return Probe(skipped=f"its copy raised {_one_line(exc)}")


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def _probe_copy(m: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype | None) -> Probe:
    """The probe in ``dtype`` (None: the layer's own). In float64 any exception propagates (the caller then
    probes in the layer's dtype); in the layer's own dtype only the training forward may not fail."""
    layer = detached_copy(m).train()
    if dtype is not None:
        layer.to(dtype)
        args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
    x = args[0]
    out = Probe(batch=int(x.shape[0]), float64=x.dtype == torch.float64)
    axis = _statistics_axis(m, layer, x)
    out.ema = _measure_ema(m, layer, args, kwargs, axis)
    out.autograd, out.graph_nodes = buffers_with_history(layer)
    try:
        out.per_sample = _per_sample_parameters(layer, args, kwargs, out.batch)
    except Exception:
        if dtype is not None:
            raise
    if axis is not None and len(args) == 1 and not kwargs:
        try:
            out.eval_moved, out.eval_half = _eval_dependence(layer.eval(), x, axis)
        except Exception as exc:
            if dtype is not None:
                raise
            out.eval_error = _one_line(exc)
    return out


def _statistics_axis(m: nn.Module, layer: nn.Module, x: Tensor) -> int | None:
    """The axis of ``x`` the layer's ``running_mean`` describes, or None (no such buffer; an InstanceNorm's
    statistics are per sample and channel, not measured here)."""
    rm = layer._buffers.get("running_mean")
    if not isinstance(rm, Tensor) or not rm.is_floating_point() or rm.dim() != 1 or norm_kind(m) == "instance":
        return None
    return feature_axis(m, x, rm.numel())


def detached_copy(m: nn.Module) -> nn.Module:
    """A deep copy of ``m`` with none of its hooks, whose tensors carry no autograd history.

    ``copy.deepcopy`` refuses tensors with a ``grad_fn`` (a buffer assigned from a computation has one), and
    would copy every hook's owner; both are mapped in deepcopy's memo instead (to detached clones and to
    empty hook tables), so nothing of ``m`` is modified.
    """
    memo: dict[int, Any] = {}
    for sub in m.modules():
        for key, v in vars(sub).items():
            if "hook" in key and isinstance(v, dict):
                memo[id(v)] = type(v)()
        for t in [*sub._parameters.values(), *sub._buffers.values(), *vars(sub).values()]:
            if isinstance(t, Tensor) and not t.is_leaf:
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(m, memo)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _forward(layer: nn.Module, args: tuple, kwargs: dict, *, grad: bool) -> Any:
    """One call of ``layer`` with a fixed RNG seed (stochastic layers draw the same numbers every call); with
    ``grad`` the input requires grad, as a training input does."""
    x = args[0].detach().requires_grad_(grad)
    _seed(x.device)
    with torch.set_grad_enabled(grad):
        return layer(x, *args[1:], **kwargs)


def _seed(device: torch.device) -> None:
    """Seed the CPU generator and ``device``'s (only those: the probe's fork_rng restores only those)."""
    torch.default_generator.manual_seed(0)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(0)


def _measure_ema(m: nn.Module, layer: nn.Module, args: tuple, kwargs: dict, axis: int | None) -> Ema | None:
    """One training-mode forward of ``layer`` from known running statistics; None if it keeps none to measure."""
    rm, rv = (layer._buffers.get(k) for k in ("running_mean", "running_var"))
    x = args[0]
    if axis is None:
        _forward(layer, args, kwargs, grad=True)
        return None
    if is_ghost(m) and x.shape[0] > m.virtual_batch_size:  # one virtual batch: one update
        n, k = x.shape[0], m.virtual_batch_size
        args, kwargs = _first_samples(args, k, n), _first_samples(kwargs, k, n)
        x = args[0]
    mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
    moments = moments_along(x, axis, mask if isinstance(mask, Tensor) and mask.dtype == torch.bool else None)
    if moments is None:
        _forward(layer, args, kwargs, grad=True)
        return None
    n, mean, m2 = moments
    biased, unbiased = m2 / n, m2 / (n - 1).clamp(min=1)
    shift = unbiased.sqrt() + 1.0
    before_mean, before_var = mean - shift, 2.0 * unbiased + 1.0
    layer._buffers["running_mean"] = before_mean.to(rm.device, rm.dtype, copy=True)  # updated in place
    has_var = isinstance(rv, Tensor) and rv.is_floating_point() and rv.shape == rm.shape
    if has_var:
        layer._buffers["running_var"] = before_var.to(rv.device, rv.dtype, copy=True)
    tracked = batches_tracked(layer)
    _forward(layer, args, kwargs, grad=True)
    after_mean = getattr(layer, "running_mean", None)
    if not isinstance(after_mean, Tensor) or after_mean.numel() != before_mean.numel():
        return None
    after_mean = after_mean.detach().double().flatten().to(before_mean.device)
    weights = (after_mean - before_mean) / shift  # (C,)
    weight = float(weights.median())
    variance = "unmeasured"
    if has_var and isinstance(getattr(layer, "running_var", None), Tensor):
        after_var = layer.running_var.detach().double().flatten().to(before_var.device)
        variance = _which_variance(after_var, before_var, weight, biased, unbiased)
    declared, momentum, convention = expected_weight(m, tracked)
    return Ema(
        weight=weight,
        spread=float((weights - weight).abs().max()),
        variance=variance,
        values=int(n[0]),
        channels=int(n.numel()),
        declared=declared,
        momentum=momentum,
        convention=convention,
    )


def _first_samples(obj: tuple | dict, k: int, n: int) -> tuple | dict:
    """The first ``k`` samples of every tensor in ``obj`` with a batch axis of ``n`` samples."""
    cut = lambda t: t[:k] if isinstance(t, Tensor) and t.dim() and t.shape[0] == n else t  # noqa: E731
    return tuple(map(cut, obj)) if isinstance(obj, tuple) else {key: cut(v) for key, v in obj.items()}


def _which_variance(after: Tensor, before: Tensor, weight: float, biased: Tensor, unbiased: Tensor) -> str:
    """Whether ``after = (1 - weight) * before + weight * v`` holds for the biased or the unbiased variance ``v``.

    Decided only when one of them is within a tenth of their distance (n / (n - 1) - 1 of the variance)."""
    if weight <= 1e-6 or after.shape != before.shape:
        return "unmeasured"
    stored = before + (after - before) / weight  # (C,) the variance the update blended in
    apart = float((unbiased - biased).abs().sum())
    if apart == 0.0:
        return "unmeasured"
    if float((stored - unbiased).abs().sum()) <= 0.1 * apart:
        return "unbiased"
    if float((stored - biased).abs().sum()) <= 0.1 * apart:
        return "biased"
    return "other"


def expected_weight(m: nn.Module, tracked: int) -> tuple[float | None, Any, str]:
    """(the new batch's weight the attributes declare for the next update, the momentum attribute, its
    convention), by :func:`normlab.functional.ema_weight`, the library's definition of the conventions.

    ``tracked`` is ``num_batches_tracked`` before the update (-1: the layer keeps none)."""
    if is_frozen(m):
        return 0.0, getattr(m, "momentum", None), "frozen"
    if not hasattr(m, "momentum"):
        return None, None, ""
    momentum, convention = m.momentum, getattr(m, "momentum_convention", "torch")
    if momentum is None and tracked < 0:
        return None, None, convention
    try:
        value = None if momentum is None else float(momentum)
        step = max(tracked, 0) + 1
        w = NF.ema_weight(value, step, convention=convention, debias=bool(getattr(m, "debias", False)))
    except (TypeError, ValueError):
        return None, momentum, convention
    return float(w), momentum, convention


def buffers_with_history(m: nn.Module, *, recurse: bool = True) -> tuple[dict[str, str], int]:
    """The floating buffers of ``m`` (and of its submodules with ``recurse``) that require grad or carry a
    ``grad_fn``, each with which, and how many autograd nodes they hold alive (counted up to a limit)."""
    found = {k: h for k, b in m.named_buffers(recurse=recurse) if (h := _history(b))}
    roots = [b.grad_fn for k, b in m.named_buffers(recurse=recurse) if k in found and b.grad_fn is not None]
    return found, _count_nodes(roots)


def _history(b: Any) -> str | None:
    if not isinstance(b, Tensor) or not b.is_floating_point() or not (b.requires_grad or b.grad_fn is not None):
        return None
    return f"grad_fn={type(b.grad_fn).__name__}" if b.grad_fn is not None else "requires_grad"


def _count_nodes(roots: list[Any]) -> int:
    seen: set[int] = set()
    stack = list(roots)
    while stack and len(seen) < _GRAPH_NODES_MAX:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(fn for fn, _ in getattr(node, "next_functions", ()))
    return len(seen)


def _per_sample_parameters(
    layer: nn.Module, args: tuple, kwargs: dict, batch: int
) -> list[tuple[str, tuple[int, ...]]]:
    """The layer's own parameters indexed by the sample: the first axis has the batch's size and changing
    entry 0 changes sample 0's output only."""
    candidates = [(k, p) for k, p in layer.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == batch]
    if batch < 2 or not candidates:
        return []
    saved = {k: b.detach().clone() for k, b in layer.named_buffers()}
    found = []
    with torch.no_grad():
        base = _restored_forward(layer, saved, args, kwargs)
        for name, p in candidates:
            old = p[0].clone()
            p[0] += 1.0
            moved = _restored_forward(layer, saved, args, kwargs)
            p[0] = old
            if _changed_only_sample_0(base, moved, batch):
                found.append((name, tuple(p.shape)))
    return found


def _restored_forward(layer: nn.Module, saved: dict[str, Tensor], args: tuple, kwargs: dict) -> Any:
    """A forward from the same buffers every time (a train-mode call updates them)."""
    for key, value in saved.items():
        owner, _, name = key.rpartition(".")
        layer.get_submodule(owner)._buffers[name] = value.clone()
    return _forward(layer, args, kwargs, grad=False)


def _changed_only_sample_0(base: Any, moved: Any, batch: int) -> bool:
    if not (isinstance(base, Tensor) and isinstance(moved, Tensor)) or base.shape != moved.shape:
        return False
    if base.dim() < 1 or base.shape[0] != batch:
        return False
    changed = (moved - base).reshape(batch, -1).abs().amax(1) > 0  # (N,)
    return bool(changed[0]) and not bool(changed[1:].any())


def _eval_dependence(layer: nn.Module, x: Tensor, axis: int) -> tuple[float | None, float | None]:
    """How far the eval-mode output is from what a norm with running statistics gives: the same per-feature map
    at every sample and position. (relative change when the samples are shuffled and every other non-feature
    axis is rolled by one, relative change of the first half of the batch run on its own); None: not measured.
    """
    n = x.shape[0]
    axes = [a for a in range(1, x.dim()) if a != axis]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(x.device)
    move = lambda t: torch.roll(t[order], shifts=[1] * len(axes), dims=axes) if axes else t[order]  # noqa: E731
    with torch.no_grad():
        y = _forward(layer, (x,), {}, grad=False)
        if not isinstance(y, Tensor) or y.shape != x.shape:
            return None, None
        moved = _relative_change(_forward(layer, (move(x),), {}, grad=False), move(y))
        try:
            half = _relative_change(_forward(layer, (x[: n // 2],), {}, grad=False), y[: n // 2])
        except Exception:  # noqa: BLE001 - a layer that refuses a smaller batch in eval: not measured
            half = None
    return moved, half


def _relative_change(a: Any, b: Tensor) -> float | None:
    if not isinstance(a, Tensor) or a.shape != b.shape:
        return None
    return float((a - b).abs().max()) / (float(b.abs().max()) + 1e-30)


# --------------------------------------------------------------------------- the checks


def check_behaviour(state: AuditState) -> None:
    """Every check on what the probed layers did (run before the static momentum checks, which skip a layer
    whose measured update contradicts its momentum attribute)."""
    check_measured_momentum(state)
    check_biased_running_var(state)
    check_per_sample_affine(state)
    check_eval_output(state)
    _note_skipped_probes(state)


def check_measured_momentum(state: AuditState) -> None:
    """The measured weight of the new batch against the one the momentum attribute declares."""
    for m, p in state.probes.items():
        ema = p.ema
        if ema is None or not ema.mismatch:
            continue
        state.momentum_contradicted.add(m)
        cause, fix = _mismatch_cause(ema)
        declared = (
            "is frozen, so its running statistics should not move"
            if ema.convention == "frozen"
            else f"declares momentum={_g(ema.momentum)}, which in PyTorch's convention gives each new batch a weight "
            f"of {ema.declared:.3g} (running = {1 - ema.declared:.3g}·running + {ema.declared:.3g}·batch)"
            if ema.convention == "torch"
            else f"declares momentum={_g(ema.momentum)} ({ema.convention} convention), a new-batch weight of "
            f"{ema.declared:.3g}"
        )
        state.add(
            "momentum-mismatch",
            "error",
            m,
            f"it {declared}; one training-mode forward on a copy gave the new batch a weight of {ema.weight:.3f} "
            f"(measured on running_mean over {ema.channels} channels)." + cause,
            fix,
            momentum=ema.momentum,
            convention=ema.convention,
            declared_weight=ema.declared,
            measured_weight=ema.weight,
            weight_spread=ema.spread,
            channels=ema.channels,
        )


def _mismatch_cause(ema: Ema) -> tuple[str, str]:
    w, declared = ema.weight, ema.declared
    close = lambda a, b: abs(a - b) <= 1e-3 + 1e-2 * max(a, b)  # noqa: E731
    lerp = "with torch.no_grad(): self.running_mean.lerp_(mean, self.momentum) (and the same for the variance)"
    if ema.spread > 1e-3 + 1e-2 * abs(w):
        return (
            f" The weight differs between channels (by up to {ema.spread:.3g}): the update is not one EMA step.",
            f"update the running statistics once per training forward, as PyTorch does: {lerp}",
        )
    if ema.convention == "torch" and isinstance(ema.momentum, (int, float)) and close(w, 1.0 - float(ema.momentum)):
        return (
            " The update is written in the decay convention, running = momentum·running + (1 - momentum)·batch, "
            f"under a PyTorch-style momentum attribute: the running statistics are {w:.0%} the last batch.",
            f"update as PyTorch does, running = (1 - momentum)·running + momentum·batch: {lerp}",
        )
    if close(w, 0.0):
        return (
            " The running statistics did not move in a training-mode forward.",
            f"update them in forward when training: {lerp}",
        )
    if close(w, 1.0):
        return (
            " Each batch overwrites the running statistics.",
            f"blend the batch in with the declared weight: {lerp}",
        )
    if declared is not None and 0.0 < declared < 1.0 and 0.0 < w < 1.0:
        k = math.log(1.0 - w) / math.log(1.0 - declared)
        if round(k) >= 2 and abs(k - round(k)) < 0.02:
            return (
                f" That is {round(k)} updates with the declared weight in one forward.",
                f"update once per training forward: {lerp}",
            )
    return (
        " The update does not follow running = (1 - momentum)·running + momentum·batch.",
        f"update as PyTorch does: {lerp}",
    )


def check_biased_running_var(state: AuditState) -> None:
    """A layer that stores the biased batch variance under PyTorch's name ``running_var`` (PyTorch stores the
    unbiased one); normlab's ``unbiased_running_var=False`` says so itself and is not reported."""
    for m, p in state.probes.items():
        ema = p.ema
        if ema is None or ema.variance != "biased" or getattr(m, "unbiased_running_var", True) is False:
            continue
        n = ema.values
        state.add(
            "running-var-biased",
            "info",
            m,
            f"its running_var receives the biased batch variance (sum of squares / n), where PyTorch's BatchNorm "
            f"stores the unbiased one (/ (n - 1)): with the {n} values per channel of this batch, a factor "
            f"n / (n - 1) = {n / (n - 1):.4g} less. A convention, not a bug; it matters when these statistics are "
            "loaded into a torch.nn layer (or the reverse), and for small batches.",
            "for PyTorch's convention, blend x.var(dims, unbiased=True) into running_var (and keep normalising "
            "with the biased one); otherwise nothing",
            values_per_channel=n,
            factor=n / (n - 1),
        )


def check_per_sample_affine(state: AuditState) -> None:
    """Parameters indexed by the sample instead of the normalised features."""
    for m, p in state.probes.items():
        for name, shape in p.per_sample:
            state.add(
                "affine-per-sample",
                "error",
                m,
                f"its parameter {name} of shape {shape} is indexed by the sample: changing {name}[0] changed "
                f"the output of sample 0 only, on a batch of {p.batch}. A norm's scale and shift belong to the "
                "normalised features (γ, β of shape (D,) for a LayerNorm over D); per-sample parameters tie "
                "the layer to one batch size and make a sample's output depend on its place in the batch.",
                f"give {name} the shape of the normalised features, e.g. torch.nn.Parameter(torch.ones(D)) "
                "broadcast over the last axis, as torch.nn.LayerNorm(D) does",
                parameter=name,
                shape=list(shape),
                batch_size=p.batch,
            )


def check_eval_output(state: AuditState) -> None:
    """A layer with running statistics whose eval output is not one per-feature map for every sample and
    position, or depends on the other samples of the batch."""
    for m, p in state.probes.items():
        moved = p.eval_moved is not None and p.eval_moved > p.tolerance
        if p.eval_error is not None or moved:
            symptom = (
                f"in eval mode it raises on the batch its training mode takes ({p.eval_error})."
                if p.eval_error is not None
                else "in eval mode its output is not the same per-feature map at every sample and position: with "
                "the samples shuffled and the other axes rolled by one, the outputs did not move with their inputs "
                f"(they changed by up to {p.eval_moved:.3g} of the largest output)."
            )
            state.add(
                "eval-per-position",
                "error",
                m,
                symptom + " With running statistics, a norm applies one scale and shift per feature; these "
                "statistics (one value per feature) are likely broadcast against the input's last axis instead of "
                "its feature axis: a (C,) tensor against (N, C, H, W) lines up with W, and runs without error only "
                "when W == C (or 1).",
                "put the running statistics on the feature axis before using them, e.g. "
                "self.running_mean.view(1, -1, 1, 1) for (N, C, H, W) input",
                **({"error": p.eval_error} if p.eval_error is not None else {"relative_change": p.eval_moved}),
            )
        if p.eval_half is not None and p.eval_half > p.tolerance:
            state.add(
                "eval-batch-dependent",
                "error",
                m,
                "in eval mode a sample's output depends on the other samples of the batch: the first half of the "
                f"batch run on its own gave outputs different by up to {p.eval_half:.3g} of the largest output. "
                "In eval a norm with running statistics normalises with them, so each sample's output is its "
                "own; this one still uses statistics of the batch in eval mode.",
                "normalise with running_mean/running_var when not self.training",
                relative_change=p.eval_half,
            )


def check_buffer_autograd(state: AuditState) -> None:
    """Buffers that carry autograd history: in the model now, or in a copy after a training-mode forward."""
    for m in state.names:
        now, nodes = buffers_with_history(m, recurse=False)
        probed = state.probes.get(m)
        after = probed.autograd if probed is not None else {}
        if not now and not after:
            continue
        buffers = sorted({*now, *after})
        what = ", ".join(f"{k} ({now.get(k) or after[k]})" for k in buffers)
        size = []
        if now:
            size.append(f"they hold {nodes} autograd node{'s' if nodes != 1 else ''} in the model now")
        if after:
            size.append(f"one training-mode forward of a copy adds {probed.graph_nodes}")
        state.add(
            "buffer-autograd",
            "error",
            m,
            f"its buffers {what} carry autograd history: the running-statistics update is recorded by autograd "
            f"({'; '.join(size)}). The graph grows with every training step and keeps what it references alive, "
            "copy.deepcopy(model) fails on it, and a backward through an eval-mode output, which uses the "
            "buffers, runs into graphs already freed.",
            "update the buffers under torch.no_grad(), in place on detached values: with torch.no_grad(): "
            "self.running_mean.lerp_(mean, self.momentum), or self.running_mean.copy_(new.detach())",
            buffers=buffers,
            in_model=bool(now),
            after_training_forward=bool(after),
            graph_nodes=nodes,
            graph_nodes_per_forward=probed.graph_nodes if after else 0,
        )


def _note_skipped_probes(state: AuditState) -> None:
    skipped = [(state.names[m], p.skipped) for m, p in state.probes.items() if p.skipped]
    if skipped:
        names = ", ".join(n for n, _ in skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        state.notes.append(
            f"the behavioural checks (measured EMA weight, buffer autograd history, per-sample parameters) did not "
            f"run for {len(skipped)} layer(s) ({names}): {skipped[0][1]}"
        )


def _g(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else repr(v)
