"""The module graph the static checks walk: which call feeds which.

Traced with :mod:`torch.fx`, norm, dropout, conv and linear layers (of any library) kept as single calls; when
the model cannot be traced, recorded with forward hooks on one batch (then only direct module-to-module
connections are seen: a tensor passing through a plain function such as ``torch.relu`` breaks the link).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.audit.kinds import dropout_p, is_affine_map, norm_kind


class Node:
    """A call in the module graph: a module call, a function call, or the model's input."""

    __slots__ = ("name", "module", "kind", "inputs", "data_input", "users", "dropout", "always_on")

    def __init__(self, name: str, module: nn.Module | None, kind: str) -> None:
        self.name = name  # the module's qualified name, or the qualified name of the module whose forward calls it
        self.module = module
        self.kind = kind  # "module" | "function" | "input" | "other"
        self.inputs: list[Node] = []
        self.data_input: Node | None = None  # the node producing the first argument
        self.users = 0
        self.dropout: float | None = None  # drop probability if a dropout (function calls: None p -> 0.5 assumed)
        self.always_on = False  # a functional dropout called with training=True


DROPOUT_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
}


class LeafTracer(fx.Tracer):
    """torch.fx tracer that keeps norm, dropout, conv and linear layers (of any library) as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if norm_kind(m) is not None or dropout_p(m) is not None or is_affine_map(m):
            return True
        return super().is_leaf_module(m, qualname)


def fx_graph(model: nn.Module) -> tuple[list[Node] | None, str]:
    """The model's graph by symbolic tracing, or (None, why not)."""
    attrs = set(model.__dict__)  # the tracer stows tensor constants as new attributes of the root: removed below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = LeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: fall back to hooks
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    finally:
        for key in set(model.__dict__) - attrs:
            del model.__dict__[key]
    nodes: dict[fx.Node, Node] = {}
    out: list[Node] = []
    for n in graph.nodes:
        if n.op == "call_module":
            node = Node(str(n.target), model.get_submodule(str(n.target)), "module")
            node.dropout = dropout_p(node.module)
        elif n.op == "call_function":
            stack = n.meta.get("nn_module_stack") or {}
            owner = list(stack.values())[-1][0] if stack else ""
            node = Node(owner, None, "function")
            if n.target in DROPOUT_FUNCTIONS:
                p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
                training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
                node.dropout = float(p) if isinstance(p, (int, float)) else 0.5
                node.always_on = training is True
        elif n.op == "placeholder":
            node = Node("", None, "input")
        else:
            node = Node("", None, "other")
        node.inputs = [nodes[i] for i in n.all_input_nodes if i in nodes]
        first = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
        node.data_input = nodes.get(first) if isinstance(first, fx.Node) else None
        node.users = len(n.users)
        nodes[n] = node
        out.append(node)
    return out, ""


def tensors(obj: Any, depth: int = 0) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if depth < 2 and isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors(o, depth + 1)]
    if depth < 2 and isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors(o, depth + 1)]
    return []


class HookGraph:
    """The module graph as seen by forward hooks on one forward pass: module A feeds B when B's input *is* A's output.

    Hooks go on leaf modules and on every norm, dropout, conv and linear layer;
    the output tensors are kept alive while recording so their ids stay unique.
    """

    def __init__(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        self.nodes: list[Node] = []
        self.active = True
        self._made: dict[int, tuple[Node, Tensor]] = {}
        targets = [
            m
            for m in model.modules()
            if not any(True for _ in m.children()) or norm_kind(m) or dropout_p(m) is not None or is_affine_map(m)
        ]
        self._names = names
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in targets]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.active:
            return
        node = Node(self._names.get(module, type(module).__name__), module, "module")
        node.dropout = dropout_p(module)
        for i, t in enumerate(tensors(args) + tensors(kwargs)):
            made = self._made.get(id(t))
            if made is not None and made[1] is t:
                if made[0] not in node.inputs:
                    node.inputs.append(made[0])
                    made[0].users += 1
                if i == 0:
                    node.data_input = made[0]
        for t in tensors(output):
            self._made[id(t)] = (node, t)
        self.nodes.append(node)

    def stop(self) -> None:
        self.active = False
        self._made.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def dropouts_feeding(node: Node) -> list[Node]:
    """Dropout calls (p > 0) from which a path reaches ``node``'s input without passing another norm layer."""
    found, seen, stack = [], set(), list(node.inputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.module is not None and norm_kind(n.module) is not None:
            continue  # renormalised here
        if n.dropout:
            found.append(n)
            continue
        stack.extend(n.inputs)
    return found
