#!/usr/bin/env python3
"""Where the knots are: the longest functions and the deepest nestings in a Python source tree.

    python scripts/knots.py [src/normlab] [--top 10]

Length counts the lines of a function's body (decorators and docstring
excluded, blank lines and comments included, as a reader sees them). Nesting
counts the blocks a statement sits in inside its function (``if``, ``for``,
``while``, ``with``, ``try``, ``match`` and nested functions), so a function's
top-level statements are at depth 0. Standard library only, so it runs on any
checkout (old or new) without the project installed.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

_BLOCKS = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match,
           ast.FunctionDef, ast.AsyncFunctionDef)  # fmt: skip
_TRY_STAR = getattr(ast, "TryStar", None)


def _body_start(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    doc = body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
    first = body[1] if doc and len(body) > 1 else body[0]
    return first.lineno


def _depth(node: ast.AST, depth: int = 0) -> int:
    deepest = depth
    for child in ast.iter_child_nodes(node):
        nested = isinstance(child, _BLOCKS) or (_TRY_STAR is not None and isinstance(child, _TRY_STAR))
        deepest = max(deepest, _depth(child, depth + 1 if nested else depth))
    return deepest


def functions(root: Path):
    """``(qualified name, path:line, body lines, max nesting)`` for every function under ``root``."""
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    length = child.end_lineno - _body_start(child) + 1
                    yield name, f"{path.relative_to(root.parent)}:{child.lineno}", length, _depth(child)
                    stack.append((child, f"{name}."))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}."))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="src/normlab", help="source folder (default: src/normlab)")
    ap.add_argument("--top", type=int, default=10, help="rows per table (default: 10)")
    args = ap.parse_args(argv)
    rows = list(functions(Path(args.root)))
    for title, key in (("longest functions (body lines)", 2), ("deepest nesting (blocks)", 3)):
        print(f"{title}:")
        for name, where, length, depth in sorted(rows, key=lambda r: (-r[key], r[1]))[: args.top]:
            print(f"  {length if key == 2 else depth:>4}  {name}  ({where})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
