"""The state one audit builds up and the checks read: module names and order, the graph, the recorded calls,
and the findings and notes so far."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from normlab.audit.graph import Node
from normlab.audit.kinds import looks_like_norm, norm_kind
from normlab.audit.recording import Calls
from normlab.audit.report import Finding, Thresholds

if TYPE_CHECKING:
    from normlab.audit.behaviour import Probe


class AuditState:
    """The state of one audit: names, modes, graph, recorded calls; every ``check_*`` function adds findings."""

    def __init__(self, model: nn.Module, expect: str, th: Thresholds) -> None:
        self.model = model
        self.expect = expect
        self.th = th
        self.names: dict[nn.Module, str] = {}
        for name, m in model.named_modules():
            self.names.setdefault(m, name)
        self.order = {name: i for i, name in enumerate(self.names.values())}
        self.norms = [m for m in self.names if norm_kind(m) is not None]
        self.bns = [m for m in self.norms if norm_kind(m) == "batch"]
        self.norm_like = [m for m in self.names if looks_like_norm(m)]  # what the behavioural checks probe
        self.graph: list[Node] | None = None
        self.hook_graph = False  # the graph was recorded with forward hooks (torch.fx could not trace the model)
        self.calls: dict[nn.Module, Calls] = {}
        self.batches = 0  # batches the model ran on (0: no dynamic checks)
        self.samples = 0
        self.findings: list[Finding] = []
        self.notes: list[str] = []
        self.compared: set[nn.Module] = set()  # BN layers whose running statistics were compared with data
        self.probes: dict[nn.Module, Probe] = {}  # what the behavioural checks measured, per layer
        self.momentum_contradicted: set[nn.Module] = set()  # measured EMA weight != the declared momentum's

    def add(
        self, check: str, severity: str, module: nn.Module | str, message: str, fix: str, related=(), **details
    ) -> None:
        name = module if isinstance(module, str) else self.names.get(module, type(module).__name__)
        rel = tuple(r if isinstance(r, str) else self.names.get(r, type(r).__name__) for r in related)
        self.findings.append(Finding(check, severity, name, message, fix, rel, details))

    def label(self, m: nn.Module) -> str:
        return f"{self.names.get(m) or '(model)'} ({type(m).__name__})"
