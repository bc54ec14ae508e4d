"""``normlab.audit(model, batches)``: the steps of one audit, from the arguments to the report."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from normlab._feed import batch_size, feed
from normlab.audit import behaviour, dynamic, static
from normlab.audit.graph import HookGraph, fx_graph
from normlab.audit.recording import Recorder, SwappedBuffers
from normlab.audit.report import CHECKS, SEVERITY_RANK, AuditReport, Thresholds
from normlab.audit.state import AuditState

__all__ = ["audit"]


def audit(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    *,
    num_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    expect: str | None = None,
    input_shape: Sequence[int] | None = None,
    thresholds: Thresholds | None = None,
    ignore: Iterable[str] = (),
) -> AuditReport:
    """Audit ``model`` for normalisation pitfalls; returns an :class:`AuditReport` (``print(report)`` for a table).

    Args:
        model: any ``torch.nn.Module``. It is not changed in any way (see :mod:`normlab.audit`).
        batches: optional model inputs for the dynamic checks, like the data the model will see: a tensor
            ``x``, ``(x, y)``, ``(x, y, mask)`` (called as ``model(x, mask=mask)``), a dict of keyword
            arguments, or anything ``forward`` understands; moved to the model's device. The model runs on them
            in the modes it is in, so in train mode they are taken as training batches (their size is checked).
        num_batches: use at most this many batches (default: all of them; give a number for an endless loader).
        forward: ``forward(model, batch)`` runs the model on one batch.
        expect: ``"eval"`` or ``"train"``: what the model is about to be used for; default the root
            module's current mode.
        input_shape: the shape of one sample, e.g. ``(3, 32, 32)``: when there are no batches and the model
            cannot be traced by torch.fx, a random batch of two such samples is run to record the module
            graph (it is not used for any statistic).
        thresholds: the numbers the checks use (:class:`Thresholds`).
        ignore: check ids (see :data:`CHECKS`) to leave out.
    """
    expect, ignore, input_shape = _check_arguments(model, expect, num_batches, ignore, input_shape)
    state = AuditState(model, expect, thresholds or Thresholds())
    state.graph, why_not_traced = fx_graph(model)
    graph_source = "torch.fx" if state.graph is not None else "none"
    if batches is not None:
        _run_batches(state, batches, num_batches, forward, record=True)
    elif state.graph is None and input_shape is not None:
        _run_batches(state, [_random_batch(model, input_shape)], None, forward, record=False)
    if state.hook_graph:
        graph_source = "forward hooks"
    _note_what_was_not_checked(state, why_not_traced, have_batches=batches is not None)
    _run_checks(state)
    return _report(state, graph_source, ignore)


def _check_arguments(
    model: Any, expect: str | None, num_batches: Any, ignore: Iterable[str], input_shape: Sequence[int] | None
) -> tuple[str, set[str], tuple[int, ...] | None]:
    """(expect, ignore, input_shape) checked and normalised; a one-line error for anything wrong."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit: model must be a torch.nn.Module, got {type(model).__name__}")
    if expect is None:
        expect = "train" if model.training else "eval"
    if expect not in ("eval", "train"):
        raise ValueError(f"audit: expect must be 'eval', 'train' or None (the model's own mode), got {expect!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches <= 0):
        raise ValueError(f"audit: num_batches must be a positive int or None, got {num_batches!r}")
    ignore = set(ignore)
    unknown = ignore - set(CHECKS)
    if unknown:
        raise ValueError(f"audit: unknown check(s) in ignore: {sorted(unknown)}; known checks: {', '.join(CHECKS)}")
    if input_shape is not None:
        input_shape = tuple(int(s) for s in input_shape)
        if not input_shape or any(s <= 0 for s in input_shape):
            raise ValueError(f"audit: input_shape must be the positive sizes of one sample, got {input_shape!r}")
    return expect, ignore, input_shape


def _random_batch(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Two random samples of ``input_shape`` in the model's dtype and device: only to record the graph with hooks."""
    ref = next(iter([*model.parameters(), *model.buffers()]), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0), dtype=dtype)
    return x.to(ref.device if ref is not None else "cpu")


def _run_batches(
    state: AuditState,
    data: Iterable[Any],
    num_batches: int | None,
    forward: Callable[[nn.Module, Any], Any] | None,
    *,
    record: bool,
) -> None:
    """Run the model on ``data`` without changing it, recording the norm layers' inputs (``record``) and, when
    torch.fx could not trace the model, the module graph on the first batch."""
    model = state.model
    _refuse_uninitialised_lazy_modules(model)
    run = forward or _feed
    recorder = Recorder(state.norms) if record else None
    prober = behaviour.Prober(state.norm_like) if record else None
    hook_graph = HookGraph(model, state.names) if state.graph is None else None
    seen = samples = 0
    try:
        with SwappedBuffers(model), torch.random.fork_rng(devices=_cuda_devices(model)), torch.no_grad():
            for batch in data:
                if num_batches is not None and seen >= num_batches:
                    break
                _run_one(run, model, batch, seen)
                samples += batch_size(batch)
                seen += 1
                if hook_graph is not None:
                    hook_graph.stop()
    finally:
        for hooks in (recorder, prober, hook_graph):
            if hooks is not None:
                hooks.remove()
    if hook_graph is not None and seen:
        state.graph = hook_graph.nodes
        state.hook_graph = True
    if record:
        if seen == 0:
            raise ValueError("audit: `batches` yielded no batch; pass an iterable of model inputs, or None")
        state.calls, state.probes, state.batches, state.samples = recorder.calls, prober.probes, seen, samples


def _refuse_uninitialised_lazy_modules(model: nn.Module) -> None:
    lazy = [n for n, m in model.named_modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(
            f"audit: {lazy[0] or 'the model'!r} is a lazy module that is not initialised yet; run one forward pass "
            "first (the audit's own passes must not initialise it: that would change the model)"
        )


def _run_one(run: Callable[[nn.Module, Any], Any], model: nn.Module, batch: Any, index: int) -> None:
    """One forward pass; an exception from the model gets a note saying which batch and that nothing changed."""
    try:
        run(model, batch)
    except Exception as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(
                f"normlab.audit: raised by the model on batch {index}; the model is unchanged. Check "
                "that the batches fit the model, or pass forward=lambda model, batch: ..."
            )
        raise


def _feed(model: nn.Module, batch: Any) -> Any:
    return feed(model, batch, who="audit")


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"})


def _note_what_was_not_checked(state: AuditState, why_not_traced: str, *, have_batches: bool) -> None:
    if state.hook_graph:
        state.notes.append(
            f"torch.fx could not trace the model ({why_not_traced}); the graph was recorded with forward hooks on "
            "one batch, which see only direct module-to-module connections"
        )
    if state.graph is None:
        state.notes.append(
            f"torch.fx could not trace the model ({why_not_traced}) and there were no batches (or input_shape) to "
            "record the graph with hooks: bias-before-norm, dropout-before-bn and dropout-always-on were not checked"
        )
    if not have_batches:
        state.notes.append(
            "no batches: the dynamic checks (statistics gap, batch size, activations) and the behavioural checks "
            "(measured EMA weight, buffers' autograd history after a training forward, per-sample parameters) "
            "were not run"
        )


def _run_checks(state: AuditState) -> None:
    """Every check; ``check_untrained`` last, as it skips the layers the dynamic checks compared with data."""
    static.check_modes(state)
    behaviour.check_buffer_autograd(state)
    if state.batches:
        behaviour.check_behaviour(state)  # before check_momentum: a measured contradiction replaces its findings
    static.check_momentum(state)
    static.check_buffers(state)
    static.check_groups(state)
    static.check_running_stats_off(state)
    static.check_frozen_affine(state)
    static.check_graph(state)
    if state.batches:
        dynamic.check_dynamic(state)
    static.check_untrained(state)


def _report(state: AuditState, graph_source: str, ignore: set[str]) -> AuditReport:
    """The findings not ignored, sorted by severity and then by module order in the model."""
    findings = [f for f in state.findings if f.check not in ignore]
    findings.sort(key=lambda f: (SEVERITY_RANK[f.severity], state.order.get(f.module, len(state.order)), f.check))
    return AuditReport(
        model=type(state.model).__name__,
        expect=state.expect,
        graph=graph_source,
        batches=state.batches,
        samples=state.samples,
        findings=tuple(findings),
        notes=tuple(state.notes),
    )
