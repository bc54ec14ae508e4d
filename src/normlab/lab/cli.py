"""``normlab``: the lab from the command line.

::

    normlab list                                   experiments, datasets, models, norms
    normlab run EXPERIMENT [--scale smoke|quick|full] [--seeds N] [--set key=value ...] [--device D] [--root runs]
                [--executor sequential|local|ray] [--workers N] [--ray-address ADDR] [--nproc N]
    normlab show RUN_DIR_OR_ID                     a run (config, environment, results) or an experiment's verdict
    normlab train --set key=value ... [--nproc N]  one training run (normlab.lab.config.TrainConfig), stored
    normlab demo                                   the headline experiments at quick scale, then the report
    normlab report [--root runs] [--out PATH]      the HTML report (and report.md) from the run store alone
    normlab audit PATH_OR_MODULE:FACTORY [...]      normalisation pitfalls in any model (see normlab audit --help)

``--nproc N`` trains each model with DistributedDataParallel in N local
processes (what ``torchrun --standalone --nproc-per-node N -m normlab ...``
does; see :mod:`normlab.lab.launch`); ``--executor local|ray`` runs the runs of a
sweep in a process pool or on Ray (see :func:`normlab.lab.executors.sweep`).

Every command has ``--help``. A bad key, value or name exits with status 2
and one line on stderr naming the valid choices (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "HEADLINE_CLAIMS"]

HEADLINE_CLAIMS = ("C1", "C4")  # what `normlab demo` runs: one training claim, one probe claim
_FALLBACK_DEMO = "smoke-example"


class _UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help) instead of usage + message."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="normlab", description="Normalisation layers and a lab that tests what is claimed about them.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser(
        "list", help="list experiments, datasets, models and norms", description="List what is registered."
    )
    s.add_argument("what", nargs="?", choices=("all", "experiments", "datasets", "models", "norms"), default="all")

    def common(sp, *, seeds: bool = True) -> None:
        sp.add_argument("--root", default="runs", help="run store folder (default: runs)")
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i> | mps (default: auto)")
        sp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    s = sub.add_parser(
        "run",
        help="run an experiment (missing runs only), analyse it, draw its figures",
        description="Run an experiment: the runs not yet stored, then the verdict and the figures.",
    )
    s.add_argument("experiment", help="experiment name or claim id (see `normlab list experiments`)")
    s.add_argument("--scale", choices=("smoke", "quick", "full"), default="quick", help="default: quick")
    s.add_argument("--seeds", type=_positive_int, default=None, help="number of seeds (default: the scale's)")
    s.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the experiment's config (repeatable)",
    )
    common(s)
    s.add_argument(
        "--executor",
        choices=("sequential", "local", "ray"),
        default="sequential",
        help="where the runs run: one after the other here (default), a local process pool, or Ray",
    )
    s.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="processes of the local pool (default: CPU count) or CPUs of a Ray instance started here",
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
    )
    s.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig field, e.g. --set dataset=digits model=mlp norm=batchnorm lr=0.1",
    )
    s.add_argument("--name", default="train", help="experiment folder for the run (default: train)")
    s.add_argument("--force", action="store_true", help="train again even if this config is stored")
    s.add_argument("--root", default="runs", help="run store folder (default: runs)")
    s.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:<i> | mps (default: the config's)")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
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
    print(f"{tag}{result.experiment} [{result.scale}]: {v.status.upper()} — {v.summary}")
    print(f"  runs: {len(result.ran)} run now, {len(result.skipped)} found stored; verdict: {result.verdict_path}")
    for f in result.figures:
        print(f"  figure: {f}")


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


def cmd_run(args) -> int:
    from normlab.lab import launch
    from normlab.lab.experiments import run_experiment

    _check_executor(args)
    result = run_experiment(
        args.experiment,
        scale=args.scale,
        seeds=args.seeds,
        overrides=list(args.overrides),
        device=args.device,
        root=args.root,
        progress=args.progress,
        executor=args.executor,
        workers=args.workers,
        address=args.ray_address,
    )
    if launch.is_main_process():
        _print_verdict(result)
    return 0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _show_experiment(folder: Path) -> int:
    from normlab.lab.store import RunStore, read_json

    verdict = folder / "verdict.json"
    n = sum(1 for _ in RunStore(folder.parent).runs(folder.name))
    print(f"experiment {folder.name}: {folder}  ({n} complete runs stored)")
    if verdict.is_file():
        v = read_json(verdict)
        tag = f"{v.get('claim')} " if v.get("claim") else ""
        print(f"  {tag}{v.get('title', '')}")
        where = f"{v.get('scale')}, {v.get('seeds')} seeds"
        print(f"  verdict [{where}]: {str(v.get('status')).upper()} — {v.get('summary')}")
        print(f"  reproduce: {v.get('command')}")
        for f in v.get("figures", []):
            print(f"  figure: {folder / f}")
    elif n:
        print("  no verdict.json (runs stored by `normlab train`, or an experiment not analysed yet)")
    _print_run_table(list(RunStore(folder.parent).runs(folder.name)))
    return 0


def _print_run_table(runs: list, limit: int = 30) -> None:
    """One line per run: its id, the config keys that differ between runs, and the headline results."""
    from normlab.lab.store import flatten

    if not runs:
        return
    configs = [flatten(r.config()) for r in runs]
    results = [r.result() for r in runs]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1][:6]
    shown = [k for k in ("final_test_acc", "final_test_loss", "diverged", "diverged_step") if k in results[0]]
    print("  " + "  ".join(["run_id", *varying, *shown]))
    for r, c, res in list(zip(runs, configs, results))[:limit]:
        print("  " + "  ".join([r.run_id, *(_fmt(c.get(k)) for k in varying), *(_fmt(res.get(k)) for k in shown)]))
    if len(runs) > limit:
        print(f"  ... {len(runs) - limit} more")


def _is_experiment_folder(folder: Path) -> bool:
    if (folder / "verdict.json").is_file():
        return True
    return any(p.is_dir() and (p / "config.json").is_file() for p in folder.iterdir())


def cmd_show(args) -> int:
    from normlab.lab.store import RunStore

    store = RunStore(args.root)
    ref = Path(args.ref)
    for folder in (ref, store.root / ref):
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
    for k, v in run.config().items():
        print(f"  {k} = {_fmt(v)}")
    env = run.env()
    if env:
        keys = ("device", "threads", "seed", "python", "torch", "numpy", "git_revision", "hostname", "time")
        print("environment: " + ", ".join(f"{k}={env.get(k)}" for k in keys if k in env))
    if run.complete:
        print("result:")
        for k, v in run.result().items():
            if k != "run_id":
                print(f"  {k} = {_fmt(v)}")
        epochs = run.metrics().get("per_epoch")
        if args.epochs and isinstance(epochs, list) and epochs:
            wanted = ("epoch", "steps", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "time")
            cols = [c for c in wanted if c in epochs[0]]
            print("epochs:")
            print("  " + "  ".join(f"{c:>10}" for c in cols))
            for e in epochs:
                print("  " + "  ".join(f"{_fmt(e.get(c)):>10}" for c in cols))
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
        result = train(cfg, progress=args.progress and main)
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
        result = run_experiment(name, scale=args.scale, device=args.device, root=args.root, progress=args.progress)
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
    "audit": ("normlab._audit", "audit_main", "find normalisation pitfalls in a model (see normlab audit --help)"),
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
    """Entry point: returns the exit status (0 ok, 2 for a usage error)."""
    from normlab.lab.config import ConfigError
    from normlab.lab.store import StoreError
    from normlab.registry import RegistryError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        module, func, _ = _DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), func)(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "nproc", 1) > 1:
            from normlab.lab import launch

            if args.command == "run":
                _check_executor(args)
            if launch.env_world_size() > 1:
                raise _UsageError("--nproc inside an already distributed launch (torchrun); drop --nproc")
            _check_before_launch(args)
            return launch.run_local(_without_nproc(argv), args.nproc)
        return _COMMANDS[args.command](args)
    except (ConfigError, RegistryError, StoreError, _UsageError) as e:
        print(f"normlab {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"normlab {args.command}: interrupted (finished runs are stored; run again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
