"""Find the normalisation pitfalls in any PyTorch model: ``normlab.audit(model, batches) -> AuditReport``.

Works on any ``torch.nn.Module``: ``torch.nn``'s norm layers, normlab's, and
third-party ("timm-style") classes recognised by name and attributes (a class
whose name contains ``BatchNorm`` and that has ``running_mean``/``num_features``,
``InstanceNorm``, ``GroupNorm`` with ``num_groups``, ``LayerNorm``, ``RMSNorm``;
a class with ``Frozen`` in its name, or normlab's ``frozen=True``, is a frozen
BN that always uses its running statistics).

Two kinds of checks:

* **Static** — from the modules, their attributes and the module graph. The
  graph is traced with :mod:`torch.fx` (norm, dropout, conv and linear layers
  as leaves); when the model cannot be traced it is recorded with forward hooks
  on the first batch (then only direct module-to-module connections are seen:
  a tensor passing through a plain function such as ``torch.relu`` breaks the
  link, so the hook graph can miss findings; and a second use of a conv's
  output by a plain function, as in ``bn(y) + y``, is invisible to it, so there
  ``bias-before-norm`` can be reported although the bias is not redundant).
* **Dynamic** — from the inputs the norm layers receive on a few ``batches``,
  measured by forward hooks while the model runs in the modes it is in.

Nothing in the model changes: during the forward passes every buffer of every
module is swapped for a copy (so train-mode BN, or any layer that updates a
buffer, updates the copy) and the originals are put back afterwards; the
passes run under ``torch.no_grad()`` with the RNG state forked (dropout draws
no numbers from the caller's generator); hooks are removed; no mode, flag,
parameter or gradient is touched — also when the model raises.

What the model is audited *for* (``expect``) is the mode of the root module
unless given: a model in ``eval()`` is checked as a model about to be
evaluated, one in ``train()`` as a model about to be trained.

Checks (id — severity — what is computed, threshold and why):

===========================  ========  ================================================================
``bias-before-norm``         info      a conv/linear with a bias whose output goes only into a BN or
                                       InstanceNorm (or GroupNorm with one channel per group) with as
                                       many features: the norm subtracts the per-channel mean, so the
                                       bias is removed (its gradient is 0; β does its job).
``dropout-before-bn``        warning   a dropout (module or ``F.dropout``, p > 0) from which a path
                                       reaches a BN's input without passing another norm layer:
                                       dropout scales the variance of what BN sees in training by up
                                       to 1/(1-p) relative to eval, so the running variance is wrong
                                       at eval ("variance shift", Li et al., CVPR 2019).
``dropout-always-on``        error     ``F.dropout`` called with ``training=True`` in a model traced in
                                       eval mode (``F.dropout``'s default; pass ``training=self.training``).
``momentum-convention``      error     BN whose weight of the new batch is >= 0.9 (0.9/0.99/0.999 are
                                       Keras/Flax/TF *decay* defaults), or a decay-convention layer with
                                       decay <= 0.1 (a PyTorch momentum read as a decay): the running
                                       statistics are >= 90 % the last (micro-)batch.
``momentum-range``           warning   weight of the new batch in (0.5, 0.9) (the last two batches
                                       carry > 75 %), or in (0, 1e-3) (3/w > 3000 batches to forget
                                       95 % of the start); error when it is 0 (statistics never move).
``momentum-cumulative``      info      ``momentum=None``: a cumulative average over every batch since
                                       the last reset, early training included.
``no-running-stats``         warning   eval expected, BN without running statistics
                                       (``track_running_stats=False``): it normalises with the statistics
                                       of each eval batch, so outputs depend on what else is in the batch.
``untrained-running-stats``  error     eval expected, running statistics still exactly their initial
                                       values (mean 0, variance 1, ``num_batches_tracked == 0``), and no
                                       batches to compare them with.
``frozen-affine-live-stats`` warning   train expected, a train-mode BN whose γ/β are all frozen
                                       (``requires_grad=False``; with ``affine=False``, the conv/linear
                                       feeding it) but which still updates and normalises with batch
                                       statistics: the classic frozen backbone whose BN keeps moving.
``mode-mismatch``            error/    eval expected: a norm layer using batch statistics because it is
                             warning   in train mode, or a dropout in train mode (error: eval outputs
                                       depend on the batch / are random). Train expected: a BN in eval
                                       mode whose γ/β still train (warning: trained against statistics
                                       that never move; say so with ``normlab.freeze`` if meant).
``groupnorm-groups``         error/    GroupNorm whose groups do not divide the channels (error), or with
                             warning   fewer than ``min_channels_per_group`` (2) channels per group, i.e.
                                       InstanceNorm (warning: the weakest variant against GN's 32 groups
                                       in Wu & He 2018, Table 1, ResNet-50 on ImageNet).
``nonfinite-buffers``        error     NaN/inf in running statistics, γ or β, or a negative running variance.
``dead-channels``            warning   channels with |γ| < 1e-3 x the layer's median |γ| (their output is
                                       the constant β), or a running variance below the layer's eps (the
                                       input was constant in training; eval divides any deviation by
                                       ~sqrt(eps)).
``zero-gamma``               info      every γ of a layer exactly 0 (a zero-initialised residual branch:
                                       fine at initialisation, a dead branch after training).
``exploding-channels``       warning   running variance > 1e6 (std > 1000): activations upstream have
                                       blown up, and values that large overflow float16 (max 65504).
``running-stats-mismatch``   warning/  (batches) the running statistics against the statistics of the
                             error     layer's inputs on the batches: per channel the standardised mean
                                       difference ``(mean_data - running_mean) / sqrt(running_var + eps)``
                                       (the mean of the eval-normalised activation; 0 when they agree)
                                       and the variance ratio ``(var_data + eps) / (running_var + eps)``
                                       (1 when they agree). Warning when the root-mean-square SMD over
                                       channels exceeds 0.5 or the rms |ln ratio| exceeds ln 2; error
                                       beyond 2 and ln 10. Needs >= 16 samples: a channel mean from n
                                       independent samples has a standard error of 1/sqrt(n) standard
                                       deviations, so with 16 the rms SMD of perfect running statistics is
                                       about 0.25 at most, half the threshold. Audited for training, only
                                       layers that normalise with their running statistics (frozen or in
                                       eval mode) are compared: the others do not use them yet.
``small-batch``              error/    (batches) a BN normalising with batch statistics on batches of
                             warning   <= 2 samples (error) or < 8 (warning): ResNet-50 with BN on
                                       ImageNet goes from 23.6 % error at 32 images per batch to 34.7 %
                                       at 2 (GN: 24.1 % at both; Wu & He 2018). The line at 8 is a
                                       judgement between those endpoints, not a measured optimum.
``nonfinite-activations``    error     (batches) the first norm layer (in call order) whose input holds NaN/inf.
``single-value-groups``      error     (batches) a GroupNorm/InstanceNorm group holding one value per sample:
                                       it normalises to 0 and the output is β, whatever the input.
===========================  ========  ================================================================

Not detected: statistics from the last micro-batch only. Under gradient
accumulation each micro-batch makes its own running-statistics update, so the
statistics weigh the last micro-batch most; nothing in a model's state says
whether that happened, and the batches an audit sees need not be the ones the
statistics came from. What *is* reported is the consequence for a large
momentum (``momentum-convention``: the statistics are essentially the last
(micro-)batch's), the small normalisation batch (``small-batch``, when the
audit is given micro-batches in train mode) and any gap the statistics leave
(``running-stats-mismatch``). The fix is :func:`normlab.accumulate_stats`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import shutil
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import is_lazy

from normlab import layers as L
from normlab._feed import batch_size, feed
from normlab.layers.batchnorm import _BatchNormBase
from normlab.layers.groupnorm import _InstanceNormBase

__all__ = ["audit", "AuditReport", "Finding", "Thresholds", "CHECKS", "SEVERITIES", "audit_main"]

SEVERITIES = ("error", "warning", "info")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}

CHECKS: dict[str, str] = {
    "bias-before-norm": "a conv/linear bias that the following norm layer removes",
    "dropout-before-bn": "dropout feeding a BatchNorm (variance shift between training and eval)",
    "dropout-always-on": "F.dropout with training=True in an eval-mode model",
    "momentum-convention": "a BN momentum that looks like another framework's convention",
    "momentum-range": "a BN momentum outside the usual range",
    "momentum-cumulative": "a BN with a cumulative-average running estimate (momentum=None)",
    "no-running-stats": "a BN without running statistics where eval is expected",
    "untrained-running-stats": "running statistics still at their initial values where eval is expected",
    "frozen-affine-live-stats": "a BN with frozen parameters whose running statistics still update",
    "mode-mismatch": "layers in a different train/eval mode from the one the model is used in",
    "groupnorm-groups": "GroupNorm groups that do not divide the channels, or too few channels per group",
    "nonfinite-buffers": "NaN/inf running statistics or affine parameters",
    "dead-channels": "channels with gamma ~ 0 or running variance ~ 0",
    "zero-gamma": "a layer whose gamma is exactly 0 everywhere (zero-initialised residual branch)",
    "exploding-channels": "channels with a huge running variance",
    "running-stats-mismatch": "running statistics far from the statistics of the data (train/test gap)",
    "small-batch": "batches too small for BatchNorm statistics",
    "nonfinite-activations": "NaN/inf reaching a norm layer's input",
    "single-value-groups": "GroupNorm/InstanceNorm groups holding a single value",
}


# =========================================================================== report


@dataclass(frozen=True)
class Thresholds:
    """The numbers the checks compare against (see the module docstring for why each is what it is)."""

    momentum_foreign: float = 0.9  # new-batch weight >= this: error, a Keras/Flax decay read as a PyTorch momentum
    momentum_high: float = 0.5  # new-batch weight > this: warning, the last two batches carry > 75 %
    momentum_low: float = 1e-3  # new-batch weight < this (and > 0): warning, > 3000 batches to forget the start
    gap_smd: float = 0.5  # rms standardised mean difference over channels: warning above (units: running std)
    gap_smd_error: float = 2.0  # ... error above
    gap_log_var: float = math.log(2.0)  # rms |ln variance ratio| over channels: warning above (factor 2)
    gap_log_var_error: float = math.log(10.0)  # ... error above (factor 10)
    min_samples: int = 16  # samples needed before running statistics are compared with the data
    small_batch: int = 8  # BN batch-statistics batches smaller than this: warning
    tiny_batch: int = 2  # ... this small or smaller: error
    dead_gamma: float = 1e-3  # |gamma_c| below this times the layer's median |gamma|: dead channel
    exploding_var: float = 1e6  # running variance above this: exploding channel (std > 1000)
    min_channels_per_group: int = 2  # GroupNorm with fewer channels per group: warning (1 = InstanceNorm)


@dataclass(frozen=True)
class Finding:
    """One pitfall: ``check`` (an id of :data:`CHECKS`), ``severity`` ("error" | "warning" | "info"),
    ``module`` (qualified name from ``model.named_modules()``; ``""`` is the model itself),
    ``message`` (what it means), ``fix`` (what to do), ``related`` (other modules involved)
    and ``details`` (the numbers behind it, JSON-serialisable)."""

    check: str
    severity: str
    module: str
    message: str
    fix: str
    related: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding: severity must be one of {SEVERITIES}, got {self.severity!r}")
        if self.check not in CHECKS:
            raise ValueError(f"Finding: unknown check {self.check!r}; known checks: {', '.join(CHECKS)}")
        object.__setattr__(self, "related", tuple(self.related))
        object.__setattr__(self, "details", _jsonable(dict(self.details)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["related"] = list(self.related)
        return d


@dataclass(frozen=True)
class AuditReport:
    """What :func:`audit` found. ``str(report)`` is a table; ``to_json()`` / ``to_dict()`` for tools and reports.

    ``findings`` are sorted by severity, then by module order in the model.
    ``expect`` is the mode the model was audited for; ``graph`` how the module
    graph was obtained (``"torch.fx"``, ``"forward hooks"`` or ``"none"``);
    ``batches``/``samples`` how much data the dynamic checks saw; ``notes``
    say which checks were skipped and why.
    """

    model: str
    expect: str
    graph: str
    batches: int
    samples: int
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "findings", tuple(self.findings))
        object.__setattr__(self, "notes", tuple(self.notes))

    # -- access
    def __len__(self) -> int:
        return len(self.findings)

    def __iter__(self):
        return iter(self.findings)

    def count(self, severity: str) -> int:
        """Number of findings of one severity."""
        return sum(f.severity == severity for f in self.findings)

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warning")

    def select(self, check: str | None = None, module: str | None = None) -> tuple[Finding, ...]:
        """The findings of one check and/or about one module (qualified name)."""
        if check is not None and check not in CHECKS:
            raise KeyError(f"unknown check {check!r}; known checks: {', '.join(CHECKS)}")
        return tuple(
            f for f in self.findings if (check is None or f.check == check) and (module is None or f.module == module)
        )

    # -- output
    def summary(self) -> str:
        """``"3 findings: 1 error, 1 warning, 1 info"`` (or ``"no findings"``)."""
        if not self.findings:
            return "no findings"
        parts = [f"{n} {s}{'s' if n > 1 and s != 'info' else ''}" for s in SEVERITIES if (n := self.count(s))]
        return f"{len(self.findings)} finding{'s' if len(self.findings) > 1 else ''}: " + ", ".join(parts)

    def to_table(self, width: int | None = None) -> str:
        """The report as a table for the terminal, wrapped to ``width`` columns (default: the terminal's, >= 80).

        One row per finding: severity, module (``(model)`` for the model itself), check id, then what it
        means and the fix; notes (checks skipped and why) at the end.
        """
        width = width or max(80, min(140, shutil.get_terminal_size((100, 24)).columns))
        data = "no batches"
        if self.batches:
            data = f"{self.batches} batch{'es' if self.batches != 1 else ''}, {self.samples} samples"
        lines = [f"normlab audit: {self.model} audited for {self.expect} (graph: {self.graph}; {data})", self.summary()]
        if self.findings:
            mods = [f.module or "(model)" for f in self.findings]
            ws = len("severity")
            wm = min(32, max(len("module"), *map(len, mods)))
            wc = max(len("check"), *(len(f.check) for f in self.findings))
            wt = max(30, width - (ws + wm + wc + 6))
            head = f"{'severity':<{ws}}  {'module':<{wm}}  {'check':<{wc}}  finding"
            lines += ["", head, "-" * (ws + wm + wc + 6 + wt)]
            for f, mod in zip(self.findings, mods):
                text = _wrap(f.message, wt) + _wrap("fix: " + f.fix, wt)
                mod_lines = [mod[i : i + wm] for i in range(0, len(mod), wm)]
                for i in range(max(len(text), len(mod_lines))):
                    sev, check = (f.severity, f.check) if i == 0 else ("", "")
                    m = mod_lines[i] if i < len(mod_lines) else ""
                    t = text[i] if i < len(text) else ""
                    lines.append(f"{sev:<{ws}}  {m:<{wm}}  {check:<{wc}}  {t}".rstrip())
                lines.append("")
        else:
            lines.append("")
        lines += [w for n in self.notes for w in _wrap("note: " + n, width)]
        return "\n".join(lines).rstrip() + "\n"

    def __str__(self) -> str:
        return self.to_table()

    def to_dict(self) -> dict:
        """A plain dict (JSON types only): the report page and :meth:`from_dict` read it."""
        return {
            "normlab_audit": 1,
            "model": self.model,
            "expect": self.expect,
            "graph": self.graph,
            "batches": self.batches,
            "samples": self.samples,
            "summary": {s: self.count(s) for s in SEVERITIES},
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON text (strict JSON: no NaN/Infinity)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> AuditReport:
        """Rebuild a report from :meth:`to_dict` output."""
        if d.get("normlab_audit") != 1:
            raise ValueError("AuditReport.from_dict: not a normlab audit report (missing 'normlab_audit': 1)")
        findings = [Finding(**{**f, "related": tuple(f.get("related", ()))}) for f in d["findings"]]
        return cls(
            model=d["model"],
            expect=d["expect"],
            graph=d["graph"],
            batches=d["batches"],
            samples=d["samples"],
            findings=tuple(findings),
            notes=tuple(d.get("notes", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> AuditReport:
        """Rebuild a report from :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False, subsequent_indent="  ") or [""]


def _jsonable(x: Any) -> Any:
    """JSON types only: tensors and numpy scalars to numbers, tuples to lists, non-finite floats to strings."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float) or hasattr(x, "__float__"):
        v = float(x)
        return v if math.isfinite(v) else str(v)
    return str(x)


# =========================================================================== what a layer is


def _class_names(m: nn.Module) -> list[str]:
    return [c.__name__ for c in type(m).__mro__]


def _norm_kind(m: nn.Module) -> str | None:
    """ "batch" | "instance" | "group" | "layer" | "rms" for norm layers (torch, normlab, timm-style), else None."""
    if isinstance(m, (_BatchNorm, _BatchNormBase)):
        return "batch"
    if isinstance(m, (_InstanceNorm, _InstanceNormBase)):
        return "instance"
    if isinstance(m, (nn.GroupNorm, L.GroupNorm)):
        return "group"
    if isinstance(m, (nn.LayerNorm, L.LayerNorm)):
        return "layer"
    if isinstance(m, (nn.RMSNorm, L.RMSNorm)):
        return "rms"
    names = _class_names(m)

    def has(s: str) -> bool:
        return any(s in n for n in names)

    if has("InstanceNorm") and hasattr(m, "num_features"):
        return "instance"
    if (has("BatchNorm") or has("BatchRenorm")) and (hasattr(m, "running_mean") or hasattr(m, "num_features")):
        return "batch"
    if has("GroupNorm") and hasattr(m, "num_groups"):
        return "group"
    if has("LayerNorm") and (hasattr(m, "normalized_shape") or hasattr(m, "weight")):
        return "layer"
    if has("RMSNorm") and (hasattr(m, "normalized_shape") or hasattr(m, "weight")):
        return "rms"
    return None


def _real(t: Any) -> bool:
    """A tensor with storage (not None, not a lazy module's uninitialised placeholder)."""
    return isinstance(t, Tensor) and not is_lazy(t)


def _running(m: nn.Module) -> tuple[Tensor, Tensor] | None:
    rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    return (rm, rv) if _real(rm) and _real(rv) else None


def _is_frozen(m: nn.Module) -> bool:
    """normlab's ``frozen=True``, or a class named ``*Frozen*`` (torchvision/timm FrozenBatchNorm2d)."""
    return bool(getattr(m, "frozen", False)) or any("Frozen" in n for n in _class_names(m))


def _uses_batch_stats(m: nn.Module) -> bool:
    """Whether a BN/InstanceNorm normalises with the statistics of its input right now."""
    if _running(m) is None:
        return True
    if _norm_kind(m) == "instance" and not getattr(m, "track_running_stats", True):
        return True
    return m.training and not _is_frozen(m)


def _is_ghost(m: nn.Module) -> bool:
    return hasattr(m, "virtual_batch_size")


def _dropout_p(m: nn.Module) -> float | None:
    """The drop probability of a dropout module (``nn.Dropout*``, or a class named ``*Dropout`` with ``p``)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return float(m.p)
    if type(m).__name__.endswith("Dropout") and isinstance(getattr(m, "p", None), (int, float)):
        return float(m.p)
    return None


def _is_affine_map(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


def _out_features(m: nn.Module) -> int | None:
    return getattr(m, "out_channels", getattr(m, "out_features", None))


def _num_features(m: nn.Module) -> int | None:
    for a in ("num_features", "num_channels"):
        if isinstance(getattr(m, a, None), int):
            return getattr(m, a)
    w = getattr(m, "weight", None)
    return w.numel() if isinstance(w, Tensor) and w.dim() == 1 else None


def _affine_params(m: nn.Module) -> list[Tensor]:
    return [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]


def _ema_weight(m: nn.Module) -> tuple[str, float | None] | None:
    """(convention, weight of the new batch) of a BN's running estimate; weight None = cumulative average."""
    if not hasattr(m, "momentum"):
        return None
    mom = m.momentum
    conv = getattr(m, "momentum_convention", "torch")
    if mom is None:
        return conv, None
    mom = float(mom)
    return conv, (mom if conv == "torch" else 1.0 - mom)


def _removes_channel_mean(norm: nn.Module) -> bool:
    """Whether the norm subtracts a per-channel mean, which removes any per-channel bias before it."""
    kind = _norm_kind(norm)
    if kind == "batch":
        return not (_is_frozen(norm) and getattr(norm, "bias", None) is None)
    if kind == "instance":
        return True
    if kind == "group":
        return getattr(norm, "num_groups", None) == getattr(norm, "num_channels", 0)
    return False


# =========================================================================== the module graph


class _Node:
    """A call in the module graph: a module call, a function call, or the model's input."""

    __slots__ = ("name", "module", "kind", "inputs", "data_input", "users", "dropout", "always_on")

    def __init__(self, name: str, module: nn.Module | None, kind: str) -> None:
        self.name = name  # the module's qualified name, or the qualified name of the module whose forward calls it
        self.module = module
        self.kind = kind  # "module" | "function" | "input" | "other"
        self.inputs: list[_Node] = []
        self.data_input: _Node | None = None  # the node producing the first argument
        self.users = 0
        self.dropout: float | None = None  # drop probability if a dropout (function calls: None p -> 0.5 assumed)
        self.always_on = False  # a functional dropout called with training=True


_DROPOUT_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
}


class _LeafTracer(fx.Tracer):
    """torch.fx tracer that keeps norm, dropout, conv and linear layers (of any library) as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _norm_kind(m) is not None or _dropout_p(m) is not None or _is_affine_map(m):
            return True
        return super().is_leaf_module(m, qualname)


def _fx_graph(model: nn.Module) -> tuple[list[_Node] | None, str]:
    """The model's graph by symbolic tracing, or (None, why not)."""
    import warnings

    attrs = set(model.__dict__)  # the tracer stows tensor constants as new attributes of the root: removed below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: fall back to hooks
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    finally:
        for key in set(model.__dict__) - attrs:
            del model.__dict__[key]
    nodes: dict[fx.Node, _Node] = {}
    out: list[_Node] = []
    for n in graph.nodes:
        if n.op == "call_module":
            node = _Node(str(n.target), model.get_submodule(str(n.target)), "module")
            node.dropout = _dropout_p(node.module)
        elif n.op == "call_function":
            stack = n.meta.get("nn_module_stack") or {}
            owner = list(stack.values())[-1][0] if stack else ""
            node = _Node(owner, None, "function")
            if n.target in _DROPOUT_FUNCTIONS:
                p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
                training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
                node.dropout = float(p) if isinstance(p, (int, float)) else 0.5
                node.always_on = training is True
        elif n.op == "placeholder":
            node = _Node("", None, "input")
        else:
            node = _Node("", None, "other")
        node.inputs = [nodes[i] for i in n.all_input_nodes if i in nodes]
        first = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
        node.data_input = nodes.get(first) if isinstance(first, fx.Node) else None
        node.users = len(n.users)
        nodes[n] = node
        out.append(node)
    return out, ""


def _tensors(obj: Any, depth: int = 0) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if depth < 2 and isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o, depth + 1)]
    if depth < 2 and isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o, depth + 1)]
    return []


class _HookGraph:
    """The module graph as seen by forward hooks on one forward pass: module A feeds B when B's input *is* A's output.

    Hooks go on leaf modules and on every norm, dropout, conv and linear layer;
    the output tensors are kept alive while recording so their ids stay unique.
    """

    def __init__(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        self.nodes: list[_Node] = []
        self.active = True
        self._made: dict[int, tuple[_Node, Tensor]] = {}
        targets = [
            m
            for m in model.modules()
            if not any(True for _ in m.children()) or _norm_kind(m) or _dropout_p(m) is not None or _is_affine_map(m)
        ]
        self._names = names
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in targets]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.active:
            return
        node = _Node(self._names.get(module, type(module).__name__), module, "module")
        node.dropout = _dropout_p(module)
        for i, t in enumerate(_tensors(args) + _tensors(kwargs)):
            made = self._made.get(id(t))
            if made is not None and made[1] is t:
                if made[0] not in node.inputs:
                    node.inputs.append(made[0])
                    made[0].users += 1
                if i == 0:
                    node.data_input = made[0]
        for t in _tensors(output):
            self._made[id(t)] = (node, t)
        self.nodes.append(node)

    def stop(self) -> None:
        self.active = False
        self._made.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# =========================================================================== dynamic measurements


class _Calls:
    """Everything recorded about one norm layer's calls: batch sizes, shapes, pooled per-feature moments."""

    __slots__ = ("first", "batches", "shapes", "batch_stat_sizes", "n", "mean", "m2", "nonfinite", "features")

    def __init__(self, first: int) -> None:
        self.first = first  # the global call index of the first call (call order)
        self.batches: list[int] = []  # x.shape[0] per call
        self.shapes: list[tuple[int, ...]] = []
        self.batch_stat_sizes: list[int] = []  # x.shape[0] of calls that normalised with batch statistics
        self.n: Tensor | None = None  # (C,) float64 values per feature
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None  # sum of squared deviations from the mean
        self.nonfinite = 0  # calls whose input held NaN/inf
        self.features: int | None = None


def _feature_moments(m: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """Per-feature (count, mean, sum of squared deviations) of a BN input, in float64, or None if unusable."""
    if x.dim() < 2:
        return None
    dim = getattr(m, "_feature_dim", 1) % x.dim()
    xf = x.detach().movedim(dim, -1)  # (..., C)
    if mask is not None and mask.dtype == torch.bool and mask.shape == xf.shape[:-1]:
        xf = xf[mask]
    xf = xf.reshape(-1, xf.shape[-1]).double()  # (M, C)
    if xf.shape[0] == 0:
        return None
    mean = xf.mean(0)
    m2 = (xf - mean).square().sum(0)
    return torch.full_like(mean, float(xf.shape[0])), mean, m2


class _Recorder:
    """Forward hooks on the norm layers recording what :class:`_Calls` holds."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.calls: dict[nn.Module, _Calls] = {}
        self._count = 0
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in layers]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return
        rec = self.calls.get(module)
        if rec is None:
            rec = self.calls[module] = _Calls(self._count)
        self._count += 1
        with torch.no_grad():
            batch = int(x.shape[0]) if x.dim() else 1
            rec.batches.append(batch)
            rec.shapes.append(tuple(x.shape))
            finite = bool(torch.isfinite(x).all())
            if not finite:
                rec.nonfinite += 1
            if _norm_kind(module) != "batch":
                return
            if _uses_batch_stats(module) and not _is_ghost(module):
                rec.batch_stat_sizes.append(batch)
            mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
            moments = _feature_moments(module, x, mask if isinstance(mask, Tensor) else None) if finite else None
            if moments is None:
                return
            n, mean, m2 = moments
            if rec.n is None or rec.n.shape != n.shape:
                rec.n, rec.mean, rec.m2 = n, mean, m2
                return
            total = rec.n + n  # Chan et al.'s parallel combination of (count, mean, M2)
            delta = mean - rec.mean
            rec.mean = rec.mean + delta * (n / total)
            rec.m2 = rec.m2 + m2 + delta.square() * (rec.n * n / total)
            rec.n = total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _SwappedBuffers:
    """Every buffer of every module replaced by a copy while the model runs; the originals put back on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[tuple[nn.Module, str, Tensor]] = []
        for m in model.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    self.saved.append((m, name, b))

    def __enter__(self) -> _SwappedBuffers:
        with torch.no_grad():
            for m, name, b in self.saved:
                m._buffers[name] = b.clone()
        return self

    def __exit__(self, *exc) -> None:
        for m, name, b in self.saved:
            m._buffers[name] = b


def _feed_audit(model: nn.Module, batch: Any) -> Any:
    return feed(model, batch, who="audit")


def _devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"})


# =========================================================================== the checks


class _Audit:
    """The state of one audit: names, modes, graph, recorded calls; each ``check_*`` appends findings."""

    def __init__(self, model: nn.Module, expect: str, th: Thresholds) -> None:
        self.model = model
        self.expect = expect
        self.th = th
        self.names: dict[nn.Module, str] = {}
        for name, m in model.named_modules():
            self.names.setdefault(m, name)
        self.order = {name: i for i, name in enumerate(self.names.values())}
        self.norms = [m for m in self.names if _norm_kind(m) is not None]
        self.bns = [m for m in self.norms if _norm_kind(m) == "batch"]
        self.graph: list[_Node] | None = None
        self.calls: dict[nn.Module, _Calls] = {}
        self.samples = 0
        self.findings: list[Finding] = []
        self.notes: list[str] = []
        self.compared: set[nn.Module] = set()  # BN layers whose running statistics were compared with data

    def add(
        self, check: str, severity: str, module: nn.Module | str, message: str, fix: str, related=(), **details
    ) -> None:
        name = module if isinstance(module, str) else self.names.get(module, type(module).__name__)
        rel = tuple(r if isinstance(r, str) else self.names.get(r, type(r).__name__) for r in related)
        self.findings.append(Finding(check, severity, name, message, fix, rel, details))

    def label(self, m: nn.Module) -> str:
        return f"{self.names.get(m) or '(model)'} ({type(m).__name__})"

    # ------------------------------------------------------------------ static: attributes
    def check_momentum(self) -> None:
        th = self.th
        for m in self.bns:
            if getattr(m, "running_mean", None) is None:  # no running statistics (lazy ones count)
                continue
            ew = _ema_weight(m)
            if ew is None:
                continue
            conv, w = ew
            if w is None:
                self.add(
                    "momentum-cumulative",
                    "info",
                    m,
                    f"momentum=None: the running statistics are the plain average of every batch since the last "
                    f"reset ({_tracked(m)} so far), early-training batches weighing as much as the latest ones.",
                    "fine for a one-off pass over data after training (that is normlab.recalibrate's job); for "
                    "training, use an EMA, e.g. momentum=0.1",
                    momentum=None,
                )
                continue
            mom = float(m.momentum)
            if conv == "torch" and w >= th.momentum_foreign:
                self.add(
                    "momentum-convention",
                    "error",
                    m,
                    f"momentum={mom:g} in PyTorch's convention gives the newest batch a weight of {w:.0%}: the "
                    f"running statistics are essentially the last (micro-)batch's. {mom:g} is a Keras/Flax/TF "
                    "*decay* (the weight of the old value) carried over as a PyTorch momentum.",
                    f"momentum=normlab.functional.convert_momentum({mom:g}, to='torch')  # = {1 - mom:.3g}",
                    momentum=mom,
                    convention=conv,
                    new_batch_weight=w,
                )
            elif conv == "decay" and w >= th.momentum_foreign:
                self.add(
                    "momentum-convention",
                    "error",
                    m,
                    f"momentum={mom:g} with momentum_convention='decay' keeps only {mom:.0%} of the old value, so "
                    f"the newest batch weighs {w:.0%}: {mom:g} is a PyTorch momentum read as a decay.",
                    f"momentum=normlab.functional.convert_momentum({mom:g}, to='decay')  # = {1 - mom:.3g}, "
                    "or momentum_convention='torch'",
                    momentum=mom,
                    convention=conv,
                    new_batch_weight=w,
                )
            elif w <= 0.0:
                self.add(
                    "momentum-range",
                    "error",
                    m,
                    f"momentum={mom:g} ({conv} convention): the newest batch has weight 0, so the running "
                    "statistics never move from their current values.",
                    "a weight of the new batch between 0.001 and 0.1 (PyTorch's default is momentum=0.1); "
                    f"model = normlab.freeze(model, ['{self.names[m]}']) if fixed statistics are what you want",
                    momentum=mom,
                    convention=conv,
                    new_batch_weight=w,
                )
            elif w > th.momentum_high:
                self.add(
                    "momentum-range",
                    "warning",
                    m,
                    f"momentum={mom:g} ({conv} convention) gives the newest batch a weight of {w:.0%}: the last "
                    f"two batches carry {1 - (1 - w) ** 2:.0%} of the running statistics, which are then noisy.",
                    "a weight of the new batch between 0.001 and 0.1 (PyTorch's default momentum=0.1)",
                    momentum=mom,
                    convention=conv,
                    new_batch_weight=w,
                )
            elif w < th.momentum_low:
                self.add(
                    "momentum-range",
                    "warning",
                    m,
                    f"momentum={mom:g} ({conv} convention) gives the newest batch a weight of {w:.2g}: it takes "
                    f"about {math.log(20) / w:,.0f} batches to forget 95% of the starting values, so after a short "
                    "run (or fine-tuning) the statistics still describe the old weights or data.",
                    "a larger momentum, or normlab.recalibrate(model, loader) after training",
                    momentum=mom,
                    convention=conv,
                    new_batch_weight=w,
                )

    def check_buffers(self) -> None:
        th = self.th
        for m in self.norms:
            run = _running(m)
            gamma = getattr(m, "weight", None)
            beta = getattr(m, "bias", None)
            bad = {}
            for key, t in (
                ("running_mean", run and run[0]),
                ("running_var", run and run[1]),
                ("weight", gamma),
                ("bias", beta),
            ):
                if _real(t) and t.is_floating_point():
                    k = int((~torch.isfinite(t.detach())).sum())
                    if k:
                        bad[key] = k
            negative = int((run[1].detach() < 0).sum()) if run is not None else 0
            if bad or negative:
                what = ", ".join(f"{k} ({v} of {_numel(m, k)} non-finite)" for k, v in bad.items())
                if negative:
                    what += (", " if what else "") + f"running_var ({negative} negative)"
                self.add(
                    "nonfinite-buffers",
                    "error",
                    m,
                    f"{what}: every eval output of the affected channels is NaN/inf or meaningless. A NaN batch "
                    "in training (or an overflow in float16) entered the running statistics.",
                    "find the non-finite batch (normlab's BN layers skip such batches and count them in "
                    "num_nonfinite_batches); then normlab.recalibrate(model, loader) to rebuild the statistics",
                    nonfinite=bad,
                    negative_running_var=negative,
                )
                continue
            per_channel = _norm_kind(m) in ("batch", "group", "instance")
            if per_channel and _real(gamma) and gamma.dim() >= 1 and gamma.numel() > 1:
                g = gamma.detach().abs().double().flatten()
                if bool((g == 0).all()):
                    self.add(
                        "zero-gamma",
                        "info",
                        m,
                        "every γ of this layer is exactly 0, so it outputs β whatever its input: a zero-initialised "
                        "residual branch (fine at initialisation; a dead branch if still so after training).",
                        "nothing at initialisation; after training, check the layer's γ receives gradients",
                        channels=g.numel(),
                    )
                else:
                    med = float(g.median())
                    dead = (g < th.dead_gamma * med).nonzero().flatten().tolist() if med > 0 else []
                    if dead:
                        self.add(
                            "dead-channels",
                            "warning",
                            m,
                            f"{len(dead)} of {g.numel()} channels have |γ| below {th.dead_gamma:g} x the layer's "
                            f"median |γ| ({med:.3g}): they output the constant β and pass no signal or gradient.",
                            "intended if channels were pruned on purpose; otherwise look for too strong weight decay "
                            "on γ or a saturated input, and consider re-initialising these channels",
                            channels=dead[:32],
                            count=len(dead),
                            median_abs_gamma=med,
                        )
            if run is not None and run[1].is_floating_point():
                rv = run[1].detach().double().flatten()
                eps = float(getattr(m, "eps", 1e-5) or 0.0)
                low = (rv < eps).nonzero().flatten().tolist()
                if low:
                    self.add(
                        "dead-channels",
                        "warning",
                        m,
                        f"{len(low)} of {rv.numel()} channels have a running variance below eps={eps:g}: their input "
                        "was constant in training, and in eval any deviation from the running mean is multiplied "
                        f"by up to 1/sqrt(eps) = {1 / math.sqrt(eps) if eps > 0 else float('inf'):.3g}.",
                        "look for dead ReLUs or a constant input before this layer; normlab.recalibrate(model, "
                        "loader) if the statistics are stale",
                        channels=low[:32],
                        count=len(low),
                        eps=eps,
                    )
                huge = (rv > th.exploding_var).nonzero().flatten().tolist()
                if huge:
                    self.add(
                        "exploding-channels",
                        "warning",
                        m,
                        f"{len(huge)} of {rv.numel()} channels have a running variance above {th.exploding_var:g} "
                        f"(largest {float(rv.max()):.3g}): the activations before this layer have blown up, and "
                        "values that large overflow float16 (max 65504).",
                        "lower the learning rate or clip gradients (normlab.adaptive_grad_clip_); check the input "
                        "scaling",
                        channels=huge[:32],
                        count=len(huge),
                        max_running_var=float(rv.max()),
                    )

    def check_groups(self) -> None:
        for m in self.norms:
            if _norm_kind(m) != "group":
                continue
            g, c = getattr(m, "num_groups", None), getattr(m, "num_channels", None)
            if not isinstance(g, int) or not isinstance(c, int) or g <= 0:
                continue
            if c % g:
                divisors = [d for d in range(1, c + 1) if c % d == 0]
                self.add(
                    "groupnorm-groups",
                    "error",
                    m,
                    f"num_groups={g} does not divide num_channels={c}: the groups cannot be formed evenly "
                    "(torch.nn.GroupNorm refuses this; this layer either fails or mixes channels unevenly).",
                    f"num_groups one of {divisors}, e.g. normlab.make_norm('groupnorm', {c})",
                    num_groups=g,
                    num_channels=c,
                )
            elif c // g < self.th.min_channels_per_group and g > 1:
                self.add(
                    "groupnorm-groups",
                    "warning",
                    m,
                    f"num_groups={g} for {c} channels leaves {c // g} channel(s) per group"
                    + (
                        ": this is InstanceNorm, the weakest of the variants Wu & He (2018, Table 1) compared with "
                        "GroupNorm's 32 groups on ImageNet."
                        if c == g
                        else ", too few for stable group statistics."
                    ),
                    f"fewer groups, e.g. normlab.make_norm('groupnorm', {c}) (32 groups or the largest divisor "
                    "below), or InstanceNorm if per-channel statistics are what you want",
                    num_groups=g,
                    num_channels=c,
                    channels_per_group=c // g,
                )

    def check_modes(self) -> None:
        if self.expect == "eval" and self.model.training:
            self.add(
                "mode-mismatch",
                "error",
                self.model,
                "the model is in train mode but is audited for evaluation: every BN normalises with the statistics "
                "of the eval batch and updates its running statistics with it; dropout is on.",
                "model.eval() before evaluating (and model.train() before training again)",
            )
            return
        if self.expect == "train" and not self.model.training:
            self.add(
                "mode-mismatch",
                "warning",
                self.model,
                "the model is in eval mode but is audited for training: BN layers will normalise with running "
                "statistics that never update, and dropout is off.",
                "model.train() before training",
            )
            return
        for m, name in self.names.items():
            kind = _norm_kind(m)
            if self.expect == "eval" and m.training and m is not self.model:
                if kind in ("batch", "instance") and _running(m) is not None and _uses_batch_stats(m):
                    self.add(
                        "mode-mismatch",
                        "error",
                        m,
                        "in train mode inside a model in eval mode: it normalises with the statistics of each eval "
                        "batch instead of its running statistics, and updates those with every eval batch.",
                        "call model.eval() after any .train() on a submodule (model.eval() sets every submodule)",
                    )
                elif _dropout_p(m):
                    self.add(
                        "mode-mismatch",
                        "error",
                        m,
                        "dropout in train mode inside a model in eval mode: eval outputs are random.",
                        "call model.eval() after any .train() on a submodule",
                    )
            elif self.expect == "train" and kind == "batch" and not m.training and not _is_frozen(m):
                trainable = [p for p in _affine_params(m) if p.requires_grad]
                if _running(m) is not None and (trainable or not _affine_params(m)) and m is not self.model:
                    self.add(
                        "mode-mismatch",
                        "warning",
                        m,
                        "in eval mode inside a model in train mode: it normalises with running statistics that "
                        "never update, while the layers around it (and its own γ/β) keep training; the next "
                        "model.train() silently undoes it.",
                        f"if fixed statistics are meant: model = normlab.freeze(model, ['{name}']) (explicit, and "
                        "survives model.train()); otherwise model.train()",
                    )

    def check_running_stats_off(self) -> None:
        if self.expect != "eval":
            return
        for m in self.bns:
            if _running(m) is None:
                self.add(
                    "no-running-stats",
                    "warning",
                    m,
                    "no running statistics (track_running_stats=False): in eval it normalises with the statistics of "
                    "each eval batch, so a sample's output depends on the rest of the batch, and batches of one "
                    "sample fail or are normalised against themselves.",
                    "build it with track_running_stats=True and fill the statistics with normlab.recalibrate(model, "
                    "loader); or, if batch independence is the point, a per-sample norm "
                    "(normlab.make_norm('groupnorm', C))",
                )

    def check_frozen_affine(self) -> None:
        if self.expect != "train":
            return
        producers = self._producers()
        for m in self.bns:
            if not m.training or _is_frozen(m) or _running(m) is None:
                continue
            params = _affine_params(m)
            if params:
                frozen = not any(p.requires_grad for p in params)
            else:
                prod = producers.get(m)
                pp = list(prod.parameters()) if prod is not None else []
                frozen = bool(pp) and not any(p.requires_grad for p in pp)
            if frozen:
                name = self.names[m]
                self.add(
                    "frozen-affine-live-stats",
                    "warning",
                    m,
                    "its parameters are frozen (requires_grad=False) but it is in train mode, so it still normalises "
                    "with batch statistics and updates its running statistics at every step: the 'frozen' part "
                    "keeps changing, away from the statistics its weights were trained with.",
                    f"model = normlab.freeze(model, ['{name}'], affine_trainable=False) (statistics fixed even in "
                    "model.train()), or call .eval() on the frozen part after every model.train()",
                )

    def check_untrained(self) -> None:
        if self.expect != "eval":
            return
        for m in self.bns:
            run = _running(m)
            if run is None or m in self.compared or _uses_batch_stats(m):
                continue
            if _tracked(m) == 0 and bool((run[0] == 0).all()) and bool((run[1] == 1).all()):
                self.add(
                    "untrained-running-stats",
                    "error",
                    m,
                    "the running statistics are still their initial values (mean 0, variance 1, no batch tracked): "
                    "eval normalises as if every channel had mean 0 and variance 1.",
                    "train the model, or normlab.recalibrate(model, loader) on data like the eval data",
                )

    # ------------------------------------------------------------------ static: graph
    def _producers(self) -> dict[nn.Module, nn.Module]:
        out: dict[nn.Module, nn.Module] = {}
        for node in self.graph or ():
            if node.module is not None and node.data_input is not None and node.data_input.module is not None:
                out.setdefault(node.module, node.data_input.module)
        return out

    def check_graph(self) -> None:
        if self.graph is None:
            return
        seen: set[tuple] = set()
        for node in self.graph:
            evaluating = self.expect == "eval" and not self.model.training
            if node.kind == "function" and node.always_on and node.dropout and evaluating:
                key = ("dropout-always-on", node.name)
                if key not in seen:
                    seen.add(key)
                    self.add(
                        "dropout-always-on",
                        "error",
                        node.name,
                        f"the forward of {node.name or 'the model'} calls F.dropout(..., p={node.dropout:g}) with "
                        "training=True (F.dropout's default), so dropout stays on in eval mode.",
                        "F.dropout(x, p, training=self.training), or an nn.Dropout module",
                    )
            m = node.module
            if m is None or _norm_kind(m) is None:
                continue
            prod = node.data_input
            if (
                prod is not None
                and prod.module is not None
                and _is_affine_map(prod.module)
                and isinstance(getattr(prod.module, "bias", None), Tensor)
                and prod.users == 1
                and _removes_channel_mean(m)
                and _out_features(prod.module) == _num_features(m)
            ):
                key = ("bias", prod.module, m)
                if key not in seen:
                    seen.add(key)
                    self.add(
                        "bias-before-norm",
                        "info",
                        prod.module,
                        f"its bias is removed by {self.label(m)}, which subtracts each channel's mean right after: "
                        "the bias gets zero gradient and only costs parameters (β already shifts each channel).",
                        "bias=False on this layer",
                        related=(m,),
                    )
            if _norm_kind(m) == "batch":
                for d in _dropouts_feeding(node):
                    key = ("dropout", d.module or d.name, m)
                    if key in seen:
                        continue
                    seen.add(key)
                    where = self.label(d.module) if d.module is not None else f"F.dropout in {d.name or 'the model'}"
                    p = d.dropout
                    self.add(
                        "dropout-before-bn",
                        "warning",
                        d.module if d.module is not None else d.name,
                        f"{where} (p={p:g}) feeds {self.label(m)} with no norm layer between: in training the "
                        f"dropout scales the variance of what BN sees by up to 1/(1-p) = {_inv1m(p):.3g}, "
                        "so the running variance is too large for eval inputs (variance shift, Li et al. 2019).",
                        "move the dropout after the last BN (e.g. just before the classifier), or after training "
                        "run normlab.recalibrate(model, loader), which measures the statistics with dropout off",
                        related=(m,),
                        p=p,
                    )

    # ------------------------------------------------------------------ dynamic
    def check_dynamic(self, batches_seen: int) -> None:
        th = self.th
        ordered = sorted(self.calls.items(), key=lambda kv: kv[1].first)
        # non-finite inputs: the first layer they reach
        bad = [m for m, c in ordered if c.nonfinite]
        if bad:
            first = bad[0]
            self.add(
                "nonfinite-activations",
                "error",
                first,
                f"its input held NaN/inf in {self.calls[first].nonfinite} of {len(self.calls[first].batches)} "
                f"calls; it is the first norm layer (in call order) they reach, {len(bad)} norm layers in all.",
                "look at the layers before it (and at the input data); normlab's BN layers keep non-finite batches "
                "out of the running statistics",
                related=tuple(bad[1:6]),
                layers_affected=len(bad),
            )
        # groups of a single value
        for m, c in ordered:
            kind = _norm_kind(m)
            if kind not in ("group", "instance") or not c.shapes:
                continue
            shape = c.shapes[0]
            if len(shape) < 2:
                continue
            spatial = math.prod(shape[2:]) if len(shape) > 2 else 1
            per_group = spatial
            if kind == "group":
                per_group *= shape[1] // max(1, getattr(m, "num_groups", shape[1]))
            if per_group <= 1 and _uses_batch_stats(m):
                self.add(
                    "single-value-groups",
                    "error",
                    m,
                    f"on input {tuple(shape)} each group holds {per_group} value per sample: it is normalised to 0 "
                    "and the output is β, whatever the input.",
                    "fewer groups (GroupNorm), or a norm over more values at this point (BatchNorm, LayerNorm over "
                    "the features)",
                    input_shape=list(shape),
                    values_per_group=per_group,
                )
        # batch size for BN batch statistics
        small = [(m, min(c.batch_stat_sizes)) for m, c in ordered if c.batch_stat_sizes]
        small = [(m, n) for m, n in small if n < th.small_batch]
        if small:
            n = min(n for _, n in small)
            sev = "error" if n <= th.tiny_batch else "warning"
            layers = [m for m, _ in small]
            self.add(
                "small-batch",
                sev,
                "",
                f"{len(layers)} BatchNorm layer(s) ({_names_list([self.names[m] for m in layers])}) normalise "
                f"with the statistics of batches of {n} sample(s): the "
                "statistics are noisy and each sample's output depends on the few others. With BN, ResNet-50 on "
                "ImageNet goes from 23.6% error at 32 images per batch to 34.7% at 2 (GroupNorm: 24.1% at both; "
                "Wu & He 2018). Under gradient accumulation BN sees the micro-batch, not the accumulated batch.",
                "larger batches, or a norm that does not depend on the batch in place of each BN: "
                "normlab.make_norm('groupnorm', C) (norm_layer='groupnorm' for normlab's models); with "
                "micro-batches, normlab.accumulate_stats(model) at least gives the running statistics of the "
                "whole batch (each micro-batch is still normalised on its own)",
                related=tuple(layers),
                batch_size=n,
                layers=len(layers),
            )
        # running statistics against the data
        few, live, earlier = [], 0, []
        for m, c in ordered:
            if _norm_kind(m) != "batch" or c.n is None or _running(m) is None:
                continue
            if self.expect == "train" and _uses_batch_stats(m):
                live += 1  # training normalises with batch statistics; its running ones are not used yet
                continue
            rm, rv = (t.detach().double().flatten() for t in _running(m))
            if not (torch.isfinite(rm).all() and torch.isfinite(rv).all()) or bool((rv < 0).any()):
                continue  # reported by nonfinite-buffers
            if rm.numel() != c.mean.numel():
                continue
            samples = sum(c.batches)
            if samples < th.min_samples:
                few.append(self.names[m])
                continue
            self.compared.add(m)
            eps = float(getattr(m, "eps", 1e-5) or 0.0)
            n = c.n
            var = c.m2 / (n - 1).clamp(min=1)  # unbiased, as the running variance stores it
            smd = (c.mean - rm) / (rv + eps).sqrt()
            ratio = (var + eps) / (rv + eps)
            smd_rms = float(smd.square().mean().sqrt())
            lr_rms = float(ratio.log().square().mean().sqrt())
            if smd_rms <= th.gap_smd and lr_rms <= th.gap_log_var:
                continue
            sev = "error" if smd_rms > th.gap_smd_error or lr_rms > th.gap_log_var_error else "warning"
            worst = int(smd.abs().argmax())
            initial = _tracked(m) == 0 and bool((rm == 0).all()) and bool((rv == 1).all())
            frozen = _is_frozen(m) or (self.expect == "train" and not m.training)
            name = self.names[m]
            gap = (
                f"on these {samples} samples the eval-normalised output is off by {smd_rms:.2f} standard deviations "
                f"in its mean (rms over {rm.numel()} channels; channel {worst}: {float(smd[worst]):+.2f}) and its "
                f"variance is {float(ratio.quantile(0.5)):.3g}x what it should be (median; range "
                f"{float(ratio.min()):.3g}-{float(ratio.max()):.3g})."
            )
            if initial:
                cause = " The running statistics are still their initial values (mean 0, variance 1): never updated."
                fix = "train the model, or normlab.recalibrate(model, loader) on data like this"
            elif frozen:
                cause = (
                    " These statistics are frozen (the layer keeps its running statistics while the model trains): "
                    "fine-tuning changed the layers before it, or the data, so they no longer describe what it sees."
                )
                fix = (
                    f"normlab.recalibrate(model, loader, modules=['{name}']) on the fine-tuning data (frozen layers "
                    "are recalibrated only when listed), or normlab.unfreeze"
                )
            elif earlier:
                cause = (
                    f" Layer {earlier[0]}, called earlier in the forward pass, is off too, and this gap may be "
                    "inherited from it (its eval output is what this layer sees)."
                )
                fix = "normlab.recalibrate(model, loader) on data like this (it fixes all the layers together)"
            else:
                cause = (
                    " Train/test inconsistency: the running statistics were gathered on other data or by other "
                    "weights (a new domain, weights changed after the last statistics update, a large momentum, "
                    "dropout before BN)."
                )
                fix = "normlab.recalibrate(model, loader) on data like this (precise BN statistics)"
            earlier.append(name)
            self.add(
                "running-stats-mismatch",
                sev,
                m,
                "running statistics do not describe the data: " + gap + cause,
                fix,
                smd_rms=smd_rms,
                smd_max=float(smd.abs().max()),
                worst_channel=worst,
                log_var_ratio_rms=lr_rms,
                var_ratio_median=float(ratio.quantile(0.5)),
                var_ratio_min=float(ratio.min()),
                var_ratio_max=float(ratio.max()),
                samples=samples,
                batches=batches_seen,
                frozen=frozen,
            )
        if few:
            self.notes.append(
                f"running statistics not compared with the data for {len(few)} BN layer(s) ({', '.join(few[:4])}"
                f"{', ...' if len(few) > 4 else ''}): fewer than {th.min_samples} samples"
            )
        if live:
            self.notes.append(
                f"audited for training: the running statistics of {live} train-mode BN layer(s) were not compared "
                "with the data (training does not use them); audit the model in eval mode after training for that"
            )


def _dropouts_feeding(node: _Node) -> list[_Node]:
    """Dropout calls (p > 0) from which a path reaches ``node``'s input without passing another norm layer."""
    found, seen, stack = [], set(), list(node.inputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.module is not None and _norm_kind(n.module) is not None:
            continue  # renormalised here
        if n.dropout:
            found.append(n)
            continue
        stack.extend(n.inputs)
    return found


def _inv1m(p: float) -> float:
    return 1.0 / (1.0 - p) if p < 1 else float("inf")


def _names_list(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def _tracked(m: nn.Module) -> int:
    t = getattr(m, "num_batches_tracked", None)
    return int(t) if isinstance(t, Tensor) else -1


def _numel(m: nn.Module, key: str) -> int:
    t = getattr(m, key, None)
    return t.numel() if isinstance(t, Tensor) else 0


# =========================================================================== entry point


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
        model: any ``torch.nn.Module``. It is not changed in any way (see the module docstring).
        batches: optional model inputs for the dynamic checks, like the data the model will see: a tensor
            ``x``, ``(x, y)``, ``(x, y, mask)`` (called as ``model(x, mask=mask)``), a dict of keyword
            arguments, or anything ``forward`` understands; on the model's device. The model runs on them in
            the modes it is in, so in train mode they are taken as training batches (their size is checked).
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
    state = _Audit(model, expect, thresholds or Thresholds())

    graph, why = _fx_graph(model)
    graph_source = "torch.fx" if graph is not None else "none"
    state.graph = graph
    probe = None
    if batches is None and graph is None and input_shape is not None:
        ref = next(iter([*model.parameters(), *model.buffers()]), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        probe = [
            torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0), dtype=dtype).to(
                ref.device if ref is not None else "cpu"
            )
        ]
    seen = samples = 0
    data = batches if batches is not None else probe
    if data is not None:
        lazy = [n for n, m in model.named_modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
        if lazy:
            raise ValueError(
                f"audit: {lazy[0] or 'the model'!r} is a lazy module that is not initialised yet; run one forward pass "
                "first (the audit's own passes must not initialise it: that would change the model)"
            )
        run = forward or _feed_audit
        recorder = _Recorder(state.norms) if batches is not None else None
        hook_graph = _HookGraph(model, state.names) if graph is None else None
        try:
            with _SwappedBuffers(model), torch.random.fork_rng(devices=_devices(model)), torch.no_grad():
                for batch in data:
                    if num_batches is not None and seen >= num_batches:
                        break
                    try:
                        run(model, batch)
                    except Exception as exc:
                        if hasattr(exc, "add_note"):  # Python >= 3.11
                            exc.add_note(
                                f"normlab.audit: raised by the model on batch {seen}; the model is unchanged. Check "
                                "that the batches fit the model, or pass forward=lambda model, batch: ..."
                            )
                        raise
                    samples += batch_size(batch)
                    seen += 1
                    if hook_graph is not None:
                        hook_graph.stop()
        finally:
            if recorder is not None:
                recorder.remove()
            if hook_graph is not None:
                hook_graph.remove()
        if hook_graph is not None and seen:
            state.graph = hook_graph.nodes
            graph_source = "forward hooks"
            state.notes.append(
                f"torch.fx could not trace the model ({why}); the graph was recorded with forward hooks on one "
                "batch, which see only direct module-to-module connections"
            )
        if batches is not None:
            if seen == 0:
                raise ValueError("audit: `batches` yielded no batch; pass an iterable of model inputs, or None")
            state.calls = recorder.calls
            state.samples = samples
    if state.graph is None:
        state.notes.append(
            f"torch.fx could not trace the model ({why}) and there were no batches (or input_shape) to record the "
            "graph with hooks: bias-before-norm, dropout-before-bn and dropout-always-on were not checked"
        )
    if batches is None:
        state.notes.append("no batches: the dynamic checks (statistics gap, batch size, activations) were not run")

    state.check_modes()
    state.check_momentum()
    state.check_buffers()
    state.check_groups()
    state.check_running_stats_off()
    state.check_frozen_affine()
    state.check_graph()
    if batches is not None:
        state.check_dynamic(seen)
    state.check_untrained()

    findings = [f for f in state.findings if f.check not in ignore]
    findings.sort(key=lambda f: (_RANK[f.severity], state.order.get(f.module, len(state.order)), f.check))
    return AuditReport(
        model=type(model).__name__,
        expect=expect,
        graph=graph_source,
        batches=seen if batches is not None else 0,
        samples=state.samples,
        findings=tuple(findings),
        notes=tuple(state.notes),
    )


# =========================================================================== command line


def _load_target(target: str) -> Callable[[], Any]:
    """``path/to/file.py:factory`` or ``package.module:factory`` -> the factory."""
    if ":" not in target:
        raise _UsageError(
            f"target {target!r} must be PATH_OR_MODULE:FACTORY, e.g. models.py:build or mypkg.nets:resnet"
        )
    where, name = target.rsplit(":", 1)
    if not name.isidentifier():
        raise _UsageError(f"{name!r} is not a valid factory name in {target!r}")
    path = Path(where)
    if where.endswith(".py") or path.is_file():
        if not path.is_file():
            raise _UsageError(f"no such Python file: {where}")
        modname = f"_normlab_audit_target_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(modname, None)
            raise _UsageError(f"importing {where} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise _UsageError(f"cannot import module {where!r}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise _UsageError(f"{where} has no callable {name!r}; callables there: {', '.join(found[:12]) or 'none'}")
    return factory


class _UsageError(Exception):
    """A mistake on the command line: one line on stderr, exit status 2."""


def _shape(values: list[str]) -> tuple[int, ...]:
    parts = [p for v in values for p in v.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise _UsageError(
            f"--input-shape must be integers such as '3 32 32' or 3,32,32; got {' '.join(values)!r}"
        ) from None
    if not shape or any(s <= 0 for s in shape):
        raise _UsageError(f"--input-shape must be positive sizes of one sample; got {' '.join(values)!r}")
    return shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="normlab audit",
        description="Find the normalisation pitfalls in a model built by a factory function. The factory takes no "
        "arguments and returns a model, or (model, example_batches).",
    )
    p.add_argument("target", metavar="PATH_OR_MODULE:FACTORY", help="e.g. models.py:build or mypkg.nets:resnet18")
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        metavar="N",
        help="use at most N of the factory's example batches (default: all)",
    )
    p.add_argument(
        "--input-shape",
        nargs="+",
        default=None,
        metavar="SIZE",
        help="shape of one sample, e.g. 3 32 32: used to record the graph when torch.fx cannot trace",
    )
    p.add_argument(
        "--expect",
        choices=("eval", "train"),
        default=None,
        help="audit for evaluation or training (default: the mode the factory's model is in)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--fail-on",
        choices=("error", "warning", "info", "never"),
        default="error",
        help="exit with status 1 when a finding this severe or worse is found (default: error)",
    )
    return p


def audit_main(argv: Sequence[str] | None = None) -> int:
    """``normlab audit PATH_OR_MODULE:FACTORY [--batches N] [--input-shape ...] [--expect M] [--json] [--fail-on S]``.

    Prints the report (a table, or JSON with ``--json``) to stdout. Returns 0 when
    nothing at or above ``--fail-on`` (default ``error``) was found, 1 when
    something was, 2 for a usage error (bad target, factory or option; one line
    on stderr).
    """
    parser = _parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        if args.batches is not None and args.batches <= 0:
            raise _UsageError(f"--batches must be a positive integer, got {args.batches}")
        shape = _shape(args.input_shape) if args.input_shape else None
        factory = _load_target(args.target)
        try:
            built = factory()
        except Exception as exc:
            raise _UsageError(f"{args.target}() raised {type(exc).__name__}: {exc}") from exc
        batches = None
        if isinstance(built, (tuple, list)) and len(built) == 2 and isinstance(built[0], nn.Module):
            built, batches = built
        if not isinstance(built, nn.Module):
            raise _UsageError(
                f"{args.target}() returned {type(built).__name__}; it must return a torch.nn.Module or "
                "(model, example_batches)"
            )
        try:
            report = audit(built, batches, num_batches=args.batches, expect=args.expect, input_shape=shape)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise _UsageError(str(exc)) from exc
    except _UsageError as exc:
        print(f"normlab audit: error: {exc}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.to_table(), end="" if not args.json else "\n")
    if args.fail_on == "never":
        return 0
    worst = min((_RANK[f.severity] for f in report.findings), default=len(SEVERITIES))
    return 1 if worst <= _RANK[args.fail_on] else 0
