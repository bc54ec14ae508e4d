"""``normlab``: the lab from the command line.

::

    normlab [--version] [--import MODULE ...] COMMAND ...
    normlab list                                   experiments, datasets, models, norms
    normlab run EXPERIMENT [--scale smoke|quick|full] [--seeds N] [--set key=value ...] [--device D] [--root runs]
                [--data-dir DIR] [--executor sequential|local|ray] [--workers N] [--ray-address ADDR] [--nproc N]
    normlab show RUN_DIR_OR_ID                     a run (config, environment, results) or an experiment's verdict
    normlab train --set key=value ... [--data-dir DIR] [--nproc N]   one stored training run (TrainConfig)
    normlab demo                                   the headline experiments at quick scale, then the report
    normlab report [--root runs] [--out PATH]      the HTML report (and report.md) from the run store alone
    normlab audit PATH_OR_MODULE:FACTORY [...]      normalisation pitfalls in any model (see normlab audit --help)

``normlab train --help`` and ``normlab run EXPERIMENT --help`` list every
config key with its type, default and unit, read from the config dataclass
(:class:`normlab.lab.config.TrainConfig`, the experiment's ``config``) and
the comment after each field in its source.

``--nproc N`` trains each model with DistributedDataParallel in N local
processes (what ``torchrun --standalone --nproc-per-node N -m normlab ...``
does; see :mod:`normlab.lab.launch`); ``--executor local|ray`` runs the runs of a
sweep in a process pool or on Ray (see :func:`normlab.lab.executors.sweep`).
``--import MODULE`` and the ``normlab.plugins`` entry points load the user's
own norms, models, datasets and experiments (see :mod:`normlab.lab.plugins`).

Progress goes to stderr: bars on a terminal, elsewhere a line per finished run
with the elapsed time and an ETA (see :mod:`normlab.lab.progress`);
``--no-progress`` gives those lines on a terminal too.

Every command has ``--help``. A user error (a bad key, value or name, missing
data files, a missing optional dependency, a plugin that does not import)
exits with status 2 and one line on stderr saying what to do (no traceback).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.metadata
import inspect
import io
import json
import math
import os
import re
import sys
import textwrap
import tokenize
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "HEADLINE_CLAIMS", "config_help", "field_comments"]

HEADLINE_CLAIMS = ("C1", "C4")  # what `normlab demo` runs: one training claim, one probe claim
_FALLBACK_DEMO = "smoke-example"


class _UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help) instead of usage + message."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- help from the typed configs


def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of the dataclass ``cls`` in its source (``{}`` when there is no source).

    ``lr: float = 0.05  # peak learning rate (per unit gradient)`` gives
    ``{"lr": "peak learning rate (per unit gradient)"}``; a field spanning
    several lines takes the comment on its last line. Base dataclasses come first.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined in a REPL, or in generated code
            continue
        comments: dict[int, str] = {}
        try:
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type == tokenize.COMMENT:
                    comments[tok.start[0]] = tok.string.lstrip("#").strip()
            tree = ast.parse(source)
        except (SyntaxError, tokenize.TokenError):
            continue
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = comments.get(node.end_lineno or node.lineno, "")
                out[node.target.id] = text
    return out


def _cli_value(v: Any) -> str:
    """A value as it is written after ``--set key=``."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return ",".join(_cli_value(x) for x in v) if v else "()"
    if isinstance(v, dict):
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def config_help(cls: type, defaults: Any | None = None, others: dict[str, Any] | None = None) -> str:
    """Every field of the config dataclass ``cls``: ``name: type = default``, then its unit/meaning.

    ``defaults`` is the instance whose values are shown as defaults (the
    dataclass's own defaults when None); ``others`` maps a label (e.g. a
    scale) to another instance whose differing values are shown in brackets.
    """
    from normlab.lab.config import _field_types, _type_name

    types_ = _field_types(cls)
    comments = field_comments(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if defaults is not None:
            value: Any = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        head = f"  {f.name}: {_type_name(types_[f.name])}"
        if value is not dataclasses.MISSING:
            head += f" = {_cli_value(value)}"
        diff = [
            f"{label} {_cli_value(getattr(o, f.name))}"
            for label, o in (others or {}).items()
            if value is dataclasses.MISSING or getattr(o, f.name) != value
        ]
        if diff:
            head += f"   [{'; '.join(diff)}]"
        lines.append(head)
        if comments.get(f.name):
            lines.append(f"      {comments[f.name]}")
    return "\n".join(lines)


def _train_keys() -> str:
    from normlab.lab.config import TrainConfig

    return (
        "TrainConfig keys (--set key=value; a dict field also key by key, e.g. model_kwargs.width=64):\n"
        + config_help(TrainConfig)
    )


def _experiment_keys(name: str) -> str:
    from normlab.lab.experiments import SCALES, get_experiment

    exp = get_experiment(name)
    default = "quick"
    others = {s: exp.scales[s] for s in SCALES if s != default}
    tag = f"{exp.claim} " if exp.claim else ""
    return (
        f"config keys of {tag}{exp.name} ({exp.config.__name__}; --set key=value). The default is the {default} "
        f"scale's value;\n[brackets] give the other scales' values where they differ.\n"
        + config_help(exp.config, exp.scales[default], others)
    )


class _HelpWithKeys(argparse.Action):
    """``--help`` that also lists the config keys (``train``: TrainConfig; ``run X``: experiment X's config)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        name = getattr(namespace, "experiment", None)
        if parser.prog.endswith(" train"):
            keys = _train_keys()
        elif name:
            keys = _experiment_keys(name)  # an unknown name: RegistryError, one line from main()
        else:
            keys = "`normlab run EXPERIMENT --help` lists that experiment's config keys (`normlab list` names them)."
        parser.print_help()
        print()
        print(keys)
        parser.exit()


class _Version(argparse.Action):
    """``--version``: normlab's version, and torch's and Python's (importing torch only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        import platform

        import torch

        import normlab

        print(f"normlab {normlab.__version__} (torch {torch.__version__}, Python {platform.python_version()})")
        parser.exit()


def _global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action=_Version, help="print the version and exit")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (repeatable): a plugin registering norms, models, datasets or experiments",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="normlab",
        description="Normalisation layers and a lab that tests what is claimed about them.",
        epilog="Installed plugins (entry point group normlab.plugins) are loaded before every command.",
    )
    _global_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser(
        "list", help="list experiments, datasets, models and norms", description="List what is registered."
    )
    s.add_argument("what", nargs="?", choices=("all", "experiments", "datasets", "models", "norms"), default="all")

    def common(sp) -> None:
        sp.add_argument("--root", default="runs", help="run store folder (default: runs)")
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i> | mps (default: auto)")
        _progress_arg(sp)

    s = sub.add_parser(
        "run",
        help="run an experiment (missing runs only), analyse it, draw its figures",
        description="Run an experiment: the runs not yet stored, then the verdict and the figures.",
        add_help=False,
    )
    s.add_argument("-h", "--help", action=_HelpWithKeys, help="show this help and the experiment's config keys")
    s.add_argument("experiment", nargs="?", help="experiment name or claim id (see `normlab list experiments`)")
    s.add_argument(
        "--all",
        action="store_true",
        help="every claim in turn (quick scale, on a local process pool unless --executor says otherwise), "
        "then the report",
    )
    s.add_argument(
        "--recheck",
        action="store_true",
        help="rerun the stored verdict's seeds from scratch with another thread count (1 <-> 2) and say whether "
        "every part reaches the same decision",
    )
    s.add_argument("--scale", choices=("smoke", "quick", "full"), default="quick", help="default: quick")
    s.add_argument("--seeds", type=_positive_int, default=None, help="number of seeds (default: the scale's)")
    _set_arg(s, "a field of the experiment's config (repeatable; `normlab run EXPERIMENT --help` lists them)")
    common(s)
    _data_dir_arg(s, "the experiment's data_dir key: the folder of the CIFAR batches (full scale)")
    s.add_argument(
        "--executor",
        choices=("sequential", "local", "ray"),
        default=None,
        help="where the runs run: one after the other here (default; with --all: local), a local process pool, or Ray",
    )
    s.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="processes of the local pool (default: CPUs / the runs' threads) or CPUs of a Ray instance started here",
    )
    s.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join, e.g. auto or ray://host:10001 (default: start a local instance)",
    )
    _nproc_arg(s)

    s = sub.add_parser(
        "show",
        help="show a stored run or an experiment's verdict",
        description="Show a run folder, <experiment>/<run id>, a run id (prefix), or an experiment's folder/name.",
    )
    s.add_argument("ref", metavar="RUN_DIR_OR_ID")
    s.add_argument("--root", default="runs", help="run store folder (default: runs)")
    s.add_argument("--epochs", action="store_true", help="also print the per-epoch table")

    s = sub.add_parser(
        "train",
        help="one training run from key=value settings, stored under <root>/<name>/",
        description="Train once with normlab.lab.config.TrainConfig fields set by --set key=value; store the run.",
        add_help=False,
    )
    s.add_argument("-h", "--help", action=_HelpWithKeys, help="show this help and every TrainConfig key")
    _set_arg(s, "a TrainConfig field, e.g. --set dataset=digits model=mlp norm=batchnorm lr=0.1 (keys: --help)")
    s.add_argument("--name", default="train", help="experiment folder for the run (default: train)")
    s.add_argument("--force", action="store_true", help="train again even if this config is stored")
    s.add_argument("--root", default="runs", help="run store folder (default: runs)")
    s.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:<i> | mps (default: the config's)")
    _data_dir_arg(s, "folder of the dataset's files (CIFAR batches): sets data_kwargs.data_dir")
    _progress_arg(s)
    _nproc_arg(s)

    for name, (_, _, text) in _DELEGATED.items():
        d = sub.add_parser(name, help=text, add_help=False)
        d.add_argument("args", nargs=argparse.REMAINDER)
    s = sub.add_parser(
        "demo",
        help="run the headline experiments at quick scale and say where the figures are",
        description=f"Run the headline experiments ({', '.join(HEADLINE_CLAIMS)} when registered) at quick scale.",
    )
    s.add_argument("--scale", choices=("smoke", "quick", "full"), default="quick", help="default: quick")
    common(s)
    return p


def _set_arg(sp, text: str) -> None:
    sp.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help=text)


def _data_dir_arg(sp, text: str) -> None:
    sp.add_argument("--data-dir", default=None, metavar="DIR", help=text)


def _progress_arg(sp) -> None:
    sp.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars: a plain line per finished run instead (what a file or a pipe gets anyway)",
    )


def _nproc_arg(sp) -> None:
    sp.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        metavar="N",
        help="train each model with DDP in N local processes (gloo on CPU, nccl on CUDA; default: 1)",
    )


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive int: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


# --------------------------------------------------------------------------- commands


def _names(kind: str) -> list[str]:
    if kind == "datasets":
        from normlab.lab.data import dataset_names

        return dataset_names()
    if kind == "models":
        from normlab.lab.models import model_names

        return model_names()
    from normlab.registry import norm_names

    return norm_names()


def cmd_list(args) -> int:
    from normlab.lab.experiments import experiment_names, get_experiment

    if args.what in ("all", "experiments"):
        exps = [get_experiment(n) for n in experiment_names()]
        claims = [e for e in exps if e.claim is not None]
        examples = [e for e in exps if e.claim is None]
        print("experiments:")
        width = max((len(e.name) for e in exps), default=0)
        for e in claims:
            print(f"  {e.claim:<4} {e.name:<{width}}  {e.title}")
        if not claims:
            print("  (no claim experiments registered yet)")
        if examples:
            print("examples:")
            for e in examples:
                print(f"  {'':<4} {e.name:<{width}}  {e.title}")
    for kind in ("datasets", "models", "norms"):
        if args.what in ("all", kind):
            try:
                names = _names(kind)
            except ImportError as e:  # a lab module not installed / not written yet
                print(f"{kind}: (unavailable: {e})")
                continue
            print(f"{kind}: {', '.join(names)}")
    return 0


def _print_verdict(result) -> None:
    v = result.verdict
    tag = f"{result.claim} " if result.claim else ""
    status = v.status.upper() if v.meaningful else f"{v.status} (smoke scale: plumbing only, not a verdict)"
    j = v.judgement
    print(f"{tag}{result.experiment} [{result.scale}, {j.seeds} seeds, {result.wall_time:.0f} s]: {status}")
    for line in _parts_table([r.to_dict() for r in j.parts]):
        print(f"  {line}")
    if v.finding:
        print(f"  finding: {v.finding}")
    print(f"  runs: {len(result.ran)} run now, {len(result.skipped)} found stored; verdict: {result.verdict_path}")
    for f in result.figures:
        print(f"  figure: {f}")


def _parts_table(parts: list[dict]) -> list[str]:
    """The parts of a verdict as aligned rows: effect, interval and its level, δ, n, decision."""
    from normlab.lab.experiments.verdicts import part_cells

    cols = ("part", "role", "effect", "interval", "level", "margin", "n", "decision")
    rows = [("part", "role", "effect", "interval", "level", "δ", "n", "decision")]
    rows += [tuple(part_cells(p)[c] for c in cols) for p in parts]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def _check_executor(args) -> None:
    if args.workers is not None and args.executor == "sequential":
        raise _UsageError("--workers needs --executor local or --executor ray")
    if args.ray_address is not None and args.executor != "ray":
        raise _UsageError("--ray-address needs --executor ray")
    if args.nproc > 1 and args.executor != "sequential":
        raise _UsageError("--nproc (one model on several processes) cannot be combined with --executor local/ray")
    if args.executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            msg = "--executor ray needs Ray: pip install 'normlab[dist]' (or pip install 'ray>=2')"
            raise _UsageError(msg) from None


def _run_overrides(args) -> list[str]:
    """``--set`` overrides, plus ``data_dir=DIR`` from ``--data-dir`` for experiments with a data_dir key."""
    overrides = list(args.overrides)
    if args.data_dir is not None:
        from normlab.lab.experiments import get_experiment

        exp = get_experiment(args.experiment)
        if "data_dir" not in {f.name for f in dataclasses.fields(exp.config)}:
            raise _UsageError(
                f"--data-dir: experiment {exp.name!r} reads no data files (its config has no data_dir key); drop it"
            )
        overrides.append(f"data_dir={args.data_dir}")
    return overrides


def cmd_run(args) -> int:
    from normlab.lab import launch
    from normlab.lab.experiments import recheck_experiment, run_experiment

    if args.all == (args.experiment is not None):
        raise _UsageError("name one experiment, or --all for every claim")
    if args.executor is None:
        args.executor = "local" if args.all else "sequential"
    _check_executor(args)
    if args.all:
        return _run_all(args)
    if args.recheck:
        if args.seeds is not None or args.overrides:
            raise _UsageError("--recheck reruns the stored verdict as it was: drop --seeds and --set")
        out = recheck_experiment(
            args.experiment, args.root, device=args.device,
            executor=args.executor, workers=args.workers,
        )  # fmt: skip
        _print_recheck(args.experiment, out)
        return 0
    result = run_experiment(
        args.experiment,
        scale=args.scale,
        seeds=args.seeds,
        overrides=_run_overrides(args),
        device=args.device,
        root=args.root,
        executor=args.executor,
        workers=args.workers,
        address=args.ray_address,
    )
    if launch.is_main_process():
        _print_verdict(result)
    return 0


def _print_recheck(name: str, out: dict) -> None:
    same = "the same decisions" if out["same_parts"] and out["same_claim"] else "DIFFERENT decisions"
    print(
        f"{name}: rerun from scratch with {out['threads']} thread(s) instead of {out['threads_before']}, "
        f"{out['seeds']} seeds: {same} ({out['status_before']} -> {out['status_after']}, {out['wall_time']:.0f} s)"
    )
    for part, (before, after) in out["parts"].items():
        print(f"  {part}: {before} -> {after}")


def _run_all(args) -> int:
    from normlab.lab.experiments import run_all
    from normlab.lab.report import build_report

    if args.seeds is not None or args.overrides:
        raise _UsageError("--all runs every claim at its scale's settings: drop --seeds and --set")
    suite = run_all(
        args.scale, args.root, device=args.device, executor=args.executor,
        workers=args.workers, recheck=args.recheck, on_result=_print_verdict, on_recheck=_print_recheck,
    )  # fmt: skip
    print(f"{len(suite['claims'])} claims in {suite['wall_time'] / 60:.1f} min: {suite['counts']}")
    print(f"report: {build_report(args.root)}")
    return 0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


_ABSENT = "-"  # a key a run's config does not have (e.g. world_size of a single-process `normlab train` run)


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows of cells as lines with aligned columns (text left, numbers right)."""
    width = [max(len(c) for c in col) for col in zip(header, *rows)]
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, width, numeric)]
        return (indent + "  ".join(out)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == _ABSENT
    return True


def _show_experiment(folder: Path) -> int:
    from normlab.lab.store import RunStore, read_json

    verdict = folder / "verdict.json"
    n = sum(1 for _ in RunStore(folder.parent).runs(folder.name))
    print(f"experiment {folder.name}: {folder}  ({n} complete runs stored)")
    if verdict.is_file():
        v = read_json(verdict)
        tag = f"{v.get('claim')} " if v.get("claim") else ""
        print(f"  {tag}{v.get('title', '')}")
        if v.get("preregistration"):
            print("pre-registration:")
            for line in str(v["preregistration"]).splitlines():
                print(f"  {line}")
        where = f"{v.get('scale')}, {v.get('seeds')} seeds"
        status = (
            str(v.get("status")).upper()
            if v.get("meaningful", True)
            else f"{v.get('status')} (smoke scale: not a verdict)"
        )
        print(f"verdict [{where}]: {status}")
        for line in _parts_table(v.get("parts") or []):
            print(f"  {line}")
        if v.get("finding"):
            print(f"  finding: {v['finding']}")
        if v.get("recheck"):
            r = v["recheck"]
            same = "same decisions" if r["same_parts"] and r["same_claim"] else "DIFFERENT decisions"
            print(f"  recheck with {r['threads']} thread(s): {same} ({r['status_before']} -> {r['status_after']})")
        print(f"  rule: {v.get('rule')} (v{v.get('rule_version')}), looks {v.get('looks')}, alpha {v.get('alpha')}")
        print(f"  reproduce: {v.get('command')}")
        for f in v.get("figures", []):
            print(f"  figure: {folder / f}")
    elif n:
        print("  no verdict.json (runs stored by `normlab train`, or an experiment not analysed yet)")
    _print_run_table(list(RunStore(folder.parent).runs(folder.name)))
    return 0


_HEADLINE_RESULTS = ("final_test_acc", "final_test_loss", "diverged", "diverged_step")


def _print_run_table(runs: list, limit: int = 30) -> None:
    """One line per run: its id, every config key whose value differs between the runs, and the headline results.

    Keys are the config's own (a dict such as ``model_kwargs`` is one column, shown as JSON); a key
    that some runs lack (``world_size`` of a multi-process run) shows ``-`` where it is missing.
    """
    if not runs:
        return
    configs = [r.config() for r in runs]
    results = [r.result() for r in runs]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    missing = object()
    varying = [k for k in keys if len({json.dumps(c.get(k, missing), sort_keys=True, default=id) for c in configs}) > 1]
    shown = [k for k in _HEADLINE_RESULTS if any(k in r for r in results)]
    cell = lambda d, k: _fmt(d[k]) if k in d else _ABSENT  # noqa: E731
    rows = [
        [r.run_id, *(cell(c, k) for k in varying), *(cell(res, k) for k in shown)]
        for r, c, res in zip(runs, configs, results)
    ]
    for line in _table(["run_id", *varying, *shown], rows[:limit]):
        print(line)
    if len(runs) > limit:
        print(f"  ... {len(runs) - limit} more")


def _is_experiment_folder(folder: Path) -> bool:
    if (folder / "verdict.json").is_file():
        return True
    return any(p.is_dir() and (p / "config.json").is_file() for p in folder.iterdir())


def _print_mapping(d: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    items = [(k, v) for k, v in d.items() if k not in skip]
    width = max((len(k) for k, _ in items), default=0)
    for k, v in items:
        print(f"  {k:<{width}} = {_fmt(v)}")


_ENV_KEYS = ("device", "world_size", "threads", "seed", "python", "torch", "numpy", "git_revision", "hostname", "time")


def cmd_show(args) -> int:
    from normlab.lab.store import RunStore

    store = RunStore(args.root)
    ref = Path(args.ref)
    candidates = [ref, store.root / ref]
    try:
        from normlab.lab.experiments import EXPERIMENTS

        if args.ref in EXPERIMENTS:  # a claim id such as C4, or a name in any case
            candidates.append(store.root / EXPERIMENTS.canonical(args.ref))
    except (ImportError, TypeError):
        pass
    for folder in candidates:
        try:
            experiment = folder.is_dir() and not (folder / "config.json").is_file() and _is_experiment_folder(folder)
        except OSError:  # a name the file system refuses (too long, ...): not a folder
            experiment = False
        if experiment:
            return _show_experiment(folder)
    try:
        run = store.find(args.ref)
    except FileNotFoundError as e:
        raise _UsageError(str(e)) from None
    state = "complete" if run.complete else "INCOMPLETE (no result.json: interrupted; it will be run again)"
    print(f"run {run.experiment}/{run.run_id}: {run.path}  [{state}]")
    print("config:")
    _print_mapping(run.config())
    env = run.env()
    if env:
        print("environment: " + ", ".join(f"{k}={env.get(k)}" for k in _ENV_KEYS if k in env))
    if run.complete:
        print("result:")
        _print_mapping(run.result(), skip=("run_id",))
        epochs = run.metrics().get("per_epoch")
        if args.epochs and isinstance(epochs, list) and epochs:
            wanted = ("epoch", "steps", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "time")
            cols = [c for c in wanted if c in epochs[0]]
            print("epochs:")
            for line in _table(cols, [[_fmt(e.get(c)) for c in cols] for e in epochs]):
                print(line)
    return 0


def cmd_train(args) -> int:
    from normlab.lab import launch
    from normlab.lab.config import TrainConfig, parse_overrides
    from normlab.lab.provenance import environment
    from normlab.lab.store import RunStore
    from normlab.lab.train import train

    cfg = parse_overrides(TrainConfig(), list(args.overrides))
    if args.device is not None:
        cfg = parse_overrides(cfg, [f"device={args.device}"])
    if args.data_dir is not None:
        cfg = parse_overrides(cfg, {"data_kwargs": {**cfg.data_kwargs, "data_dir": args.data_dir}})
    cfg.validate()
    store = RunStore(args.root).ensure_writable()
    world = launch.env_world_size()
    # a run on several processes is stored apart from the single-process run (numbers agree only to rounding,
    # and not at all with sync_bn=false)
    stored_config = {**cfg.to_dict(), "world_size": world} if world > 1 else cfg.to_dict()
    stored = store.run(args.name, stored_config)
    main = launch.is_main_process()
    launch.join_from_env(cfg.device)
    if launch.broadcast_object(store.complete_or_quarantine(stored) if main else None) and not args.force:
        if main:
            print(f"already stored (use --force to train again): {stored.path}")
    else:
        result = train(cfg, progress=main)  # bars, lines or off: see _progress_env
        if main:
            env = environment(device=result.device, seed=cfg.seed, threads=result.threads)
            env["world_size"] = result.world_size
            stored = store.save(args.name, stored_config, result.to_metrics(), env=env)
    launch.barrier()
    if not main:
        return 0
    r = stored.result()
    status = f"DIVERGED at step {r['diverged_step']}" if r.get("diverged") else "finished"
    print(
        f"{status}: {r.get('steps')} steps, final test_acc={_fmt(r.get('final_test_acc'))}, "
        f"test_loss={_fmt(r.get('final_test_loss'))}, {_fmt(r.get('wall_time'))} s"
    )
    print(f"stored: {stored.path}")
    return 0


def cmd_demo(args) -> int:
    from normlab.lab.experiments import experiment_names, get_experiment, run_experiment

    registered = {get_experiment(n).claim: n for n in experiment_names(include_examples=False)}
    names = [registered[c] for c in HEADLINE_CLAIMS if c in registered]
    if not names:
        print(f"(no headline experiment {'/'.join(HEADLINE_CLAIMS)} registered yet: running {_FALLBACK_DEMO!r})")
        names = [_FALLBACK_DEMO]
    results = []
    for name in names:
        result = run_experiment(name, scale=args.scale, device=args.device, root=args.root)
        _print_verdict(result)
        results.append(result)
    print(f"figures and verdicts are under {Path(args.root).resolve()}/<experiment>/ (figures/*.png, verdict.json)")
    from normlab.lab.report import build_report

    print(f"report: {build_report(args.root)}")
    return 0


# commands with parsers of their own: `normlab report ...` and `normlab audit ...` are handed over whole
_DELEGATED = {
    "report": (
        "normlab.lab.report",
        "report_main",
        "build the HTML report from the run store (see normlab report --help)",
    ),
    "audit": ("normlab.audit.cli", "audit_main", "find normalisation pitfalls in a model (see normlab audit --help)"),
}


_COMMANDS = {"list": cmd_list, "run": cmd_run, "show": cmd_show, "train": cmd_train, "demo": cmd_demo}


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the launched processes read WORLD_SIZE instead)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _command_index(argv: Sequence[str]) -> int:
    """Index of the command in ``argv``: past the global options ``--version`` and ``--import MODULE``."""
    i = 0
    while i < len(argv):
        if argv[i] == "--import":
            i += 2
        elif argv[i].startswith("--import=") or argv[i] == "--version":
            i += 1
        else:
            break
    return min(i, len(argv))


def _global_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the global options before the command (``--version`` prints and exits here)."""
    p = _Parser(prog="normlab", add_help=False)
    _global_options(p)
    return p.parse_args(list(argv))


# the `lab` extra's distributions whose import name differs from the distribution name
_IMPORT_NAMES = {"scikit-learn": "sklearn"}


def _extra_for(module: str | None) -> str | None:
    """The optional extra of normlab (``"lab"``, ``"dist"``) that provides the top-level ``module``, if any."""
    top = (module or "").split(".")[0]
    if not top or top == "normlab":
        return None
    try:
        requires = importlib.metadata.requires("normlab") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "lab"
    for req in requires:
        extra = re.search(r"""extra\s*==\s*["']([\w.-]+)["']""", req)
        dist = re.match(r"[A-Za-z0-9._-]+", req)
        if extra and dist:
            name = dist.group(0).lower()
            if _IMPORT_NAMES.get(name, name.replace("-", "_")) == top:
                return extra.group(1)
    return None


_SCOPED_ENV = (
    "NORMLAB_PROGRESS",
    "NORMLAB_IMPORT",
)  # progress.ENV_VAR, plugins.ENV_VAR  # set for this command (and its child processes) only


def _check_before_launch(args) -> None:
    """Refuse bad settings once, here, before ``--nproc`` starts processes that would each print the error."""
    from normlab.lab.runtime import check_cpus
    from normlab.lab.store import RunStore

    check_cpus("--nproc", args.nproc)
    if args.command == "train":
        from normlab.lab.config import TrainConfig, parse_overrides

        cfg = parse_overrides(TrainConfig(), list(args.overrides))
        if args.device is not None:
            cfg = parse_overrides(cfg, [f"device={args.device}"])
        check_cpus("threads", cfg.validate().threads)
        RunStore(args.root).run(args.name, cfg.to_dict())
    elif args.command == "run":
        from normlab.lab.experiments import get_experiment

        get_experiment(args.experiment).config_for(args.scale, list(args.overrides), args.seeds)
    RunStore(args.root).ensure_writable()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit status (0 ok, 2 for a user error, 130 interrupted, 141 closed pipe)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    saved = {k: os.environ.get(k) for k in _SCOPED_ENV}
    i = _command_index(argv)
    command = argv[i] if i < len(argv) and not argv[i].startswith("-") else ""
    prog = f"normlab {command}".strip()
    try:
        code = _main(argv, i)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # `normlab show ... | head`: the reader has gone; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, as a program killed by the closed pipe would report
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (finished runs are stored; run again to resume)", file=sys.stderr)
        return 130
    except Exception as e:
        message = _user_error(e)
        if message is None:
            raise
        print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _user_error(e: Exception) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    from normlab.lab.config import ConfigError
    from normlab.lab.plugins import PluginError
    from normlab.lab.store import StoreError
    from normlab.registry import RegistryError

    if isinstance(e, (ConfigError, RegistryError, PluginError, StoreError, _UsageError)):
        return str(e)
    if isinstance(e, FileNotFoundError):  # data files, a run store, a file named on the command line
        return str(e)
    if isinstance(e, ModuleNotFoundError):
        extra = _extra_for(e.name)
        if extra is not None:
            return f"this needs normlab's {extra!r} extra ({e}): pip install 'normlab[{extra}]'"
    return None


def _main(argv: list[str], i: int) -> int:
    from normlab.lab import plugins, progress

    imports = _global_args(argv[:i]).imports
    mode = os.environ.get(progress.ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in progress.MODES:
        raise _UsageError(f"${progress.ENV_VAR}={mode!r} is not one of: {', '.join(progress.MODES)}")
    plugins.load_plugins(imports)
    if i < len(argv) and argv[i] in _DELEGATED:
        module, func, _ = _DELEGATED[argv[i]]
        return getattr(importlib.import_module(module), func)(argv[i + 1 :])
    args = build_parser().parse_args(argv)
    if not getattr(args, "progress", True):
        os.environ["NORMLAB_PROGRESS"] = "lines"  # --no-progress: lines, not bars (inherited by workers)
    if getattr(args, "nproc", 1) > 1:
        from normlab.lab import launch

        if args.command == "run":
            _check_executor(args)
        if launch.env_world_size() > 1:
            raise _UsageError("--nproc inside an already distributed launch (torchrun); drop --nproc")
        _check_before_launch(args)
        return launch.run_local(_without_nproc(argv), args.nproc)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
