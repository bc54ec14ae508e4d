"""``normlab audit PATH_OR_MODULE:FACTORY``: the audit from the command line (dispatched by ``normlab.lab.cli``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from normlab.audit.report import SEVERITIES, SEVERITY_RANK
from normlab.audit.run import audit

__all__ = ["audit_main"]


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
        if spec is None or spec.loader is None:  # e.g. /etc/passwd: not a file Python can import
            raise _UsageError(f"{where} is not a Python file (name the .py file that defines {name})")
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
    worst = min((SEVERITY_RANK[f.severity] for f in report.findings), default=len(SEVERITIES))
    return 1 if worst <= SEVERITY_RANK[args.fail_on] else 0
