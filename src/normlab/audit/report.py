"""What an audit reports: the check ids (:data:`CHECKS`), the numbers they use (:class:`Thresholds`), one
:class:`Finding` per pitfall, and the :class:`AuditReport` with its table and JSON forms."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["SEVERITIES", "SEVERITY_RANK", "CHECKS", "Thresholds", "Finding", "AuditReport"]

SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}

CHECKS: dict[str, str] = {
    "bias-before-norm": "a conv/linear bias that the following norm layer removes",
    "dropout-before-bn": "dropout feeding a BatchNorm (variance shift between training and eval)",
    "dropout-always-on": "F.dropout with training=True in an eval-mode model",
    "momentum-convention": "a BN momentum that looks like another framework's convention",
    "momentum-range": "a BN momentum outside the usual range",
    "momentum-cumulative": "a BN with a cumulative-average running estimate (momentum=None)",
    "momentum-mismatch": "a measured running-statistics update that is not what the declared momentum means",
    "buffer-autograd": "buffers that carry autograd history (updated outside torch.no_grad())",
    "running-var-biased": "the biased batch variance stored under PyTorch's name running_var",
    "affine-per-sample": "norm parameters indexed by the sample instead of the normalised features",
    "eval-per-position": "an eval output that is not one per-feature map at every sample and position",
    "eval-batch-dependent": "an eval output of a layer with running statistics that depends on the batch",
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


@dataclass(frozen=True)
class Thresholds:
    """The numbers the checks compare against (the docstring of :mod:`normlab.audit` says why each is what it is)."""

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
