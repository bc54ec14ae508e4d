"""The experiment framework: a claim becomes config + grid + ``run_one`` + declared parts + ``plot``.

An :class:`Experiment` is data plus code:

* ``config``: a frozen dataclass type whose fields (each commented with its
  unit) describe the whole experiment, with ``seeds: int`` (seeds per round:
  the first look, and each later round) and ``max_seeds: int`` (the budget);
  ``scales`` maps ``"smoke"``, ``"quick"`` and ``"full"`` to instances of it.
  ``key=value`` overrides are parsed into it, type-checked
  (:func:`normlab.lab.config.parse_overrides`).
* ``grid(config) -> [params, ...]``: the runs, each a JSON-able dict of
  everything that run depends on (no ``"seed"`` key: the framework adds the
  seeds). The run id is the hash of ``{**params, "seed": seed}``, so a run is
  reused by any scale or override that asks for exactly the same thing, and a
  larger seed budget only runs the new seeds.
* ``run_one(run: Run) -> metrics``: runs one configuration (training with
  :func:`normlab.lab.train.train`, via ``run.train_config()``, or a probe) and
  returns a dict of metrics: scalars and curves. The framework sets torch's
  thread count to ``config.threads`` around it (threads are not part of the run id).
* ``parts(config) -> [Part, ...]``: the claim's declared parts
  (:class:`~normlab.lab.experiments.verdicts.Part`): metric, arms, direction,
  margin and its reason, scale, pairing, deciding or reported. The module
  docstring opens with the same parts in words, as a **pre-registration**.
* ``measure(rows, config) -> per-seed rows`` (optional): turns the stored runs
  into the rows the parts select from, when a part's value is computed across
  runs (e.g. the accuracy drop from batch 32 to batch 2 of one seed). Default:
  the stored rows themselves (params, ``seed``, ``run_id``, scalars, curves).
* ``explain(rows, config, judgement) -> (sentence, numbers)`` (optional): the
  experiment's own words on what was found (a finding the parts do not say,
  e.g. "gradients vanish although no unit saturates") and extra numbers.
* ``plot(rows, out_dir, config) -> [png paths]``.

:func:`run_experiment` runs seeds in rounds — the missing runs into the run
store (``<root>/<name>/<run id>/``), skipping stored ones — and after each
round judges the claim with :func:`~normlab.lab.experiments.verdicts.judge`;
it stops as soon as every deciding part is decided, or at the budget. It then
plots and writes ``<root>/<name>/verdict.json`` (with every part's interval,
the rule's name and version, the seeds and the machine) and
``<root>/<name>/figures/*.png`` (the experiment's figures and ``parts.png``, a
forest plot of the parts against their margins). The statistics and the
decision rule are in :mod:`normlab.lab.experiments.verdicts`.

A ``smoke`` run checks the plumbing: its verdict is recorded with
``"meaningful": false`` and printed as such. A claim that does not hold at our
scale is a result, not a bug.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import pkgutil
import re
import shlex
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab._io import atomic_write
from normlab.lab.config import ConfigError, TrainConfig, parse_overrides
from normlab.lab.executors import sweep
from normlab.lab.experiments.verdicts import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    RULE_VERSION,
    STATUSES,
    Judgement,
    Part,
    SeedPlan,
    judge,
)
from normlab.lab.provenance import environment, git_revision, source_hash
from normlab.lab.store import RunStore, read_json, write_json_atomic
from normlab.registry import Registry

__all__ = [
    "EXPERIMENTS",
    "SCALES",
    "STATUSES",
    "SMOKE_NOTE",
    "Part",
    "SeedPlan",
    "Verdict",
    "Run",
    "Experiment",
    "ExperimentResult",
    "register_experiment",
    "get_experiment",
    "experiment_names",
    "run_experiment",
    "recheck_experiment",
    "run_all",
    "analyse_stored",
    "judge_rows",
    "forest_plot",
    "preregistration",
    "split_preregistration",
    "mean_std",
    "fmt_mean_std",
    "values",
    "group",
    "pyplot",
    "save_figure",
]

SCALES = ("smoke", "quick", "full")


def mean_std(xs: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def fmt_mean_std(xs: Iterable[float], digits: int = 3) -> str:
    """``"0.912 ± 0.0131 (n=3)"``: mean ± sample std over seeds (for descriptions; verdicts use intervals)."""
    m, s, n = mean_std(xs)
    return f"{m:.{digits}g} ± {s:.{digits}g} (n={n})"


def values(rows: Iterable[Mapping[str, Any]], metric: str, **where: Any) -> list[float]:
    """``metric`` from every row whose entries equal ``where``.

    For example ``values(rows, "final_test_acc", norm="none")``.
    """
    out = []
    for r in rows:
        if all(r.get(k) == v for k, v in where.items()):
            if metric not in r:
                raise KeyError(f"metric {metric!r} not in the rows; available: {', '.join(sorted(r))}")
            out.append(r[metric])
    return out


def group(rows: Iterable[Mapping[str, Any]], *keys: str) -> dict[tuple, list[Mapping[str, Any]]]:
    """Rows grouped by the values of ``keys`` (insertion-ordered)."""
    out: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures go to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_dir: str | Path, name: str, *, dpi: int = 120) -> Path:
    """Save ``fig`` as ``<out_dir>/<name>.png`` (atomically: concurrent writers never see half a file) and close it."""
    path = atomic_write(
        Path(out_dir) / f"{name}.png", lambda f: fig.savefig(f, dpi=dpi, bbox_inches="tight", format="png")
    )
    pyplot().close(fig)
    return path


# --------------------------------------------------------------------------- experiments


@dataclass(frozen=True)
class Run:
    """One run of an experiment as ``run_one`` sees it.

    ``params`` is the grid point (``run["lr"]`` reads it), ``seed`` the run's
    seed, ``device`` where to run ("auto", "cpu", "cuda:0", ...), ``config``
    the experiment's config at this scale (not part of the run id: put what
    the run depends on into ``params``), ``progress`` whether to show bars.
    """

    experiment: str
    scale: str
    params: Mapping[str, Any]
    seed: int
    device: str = "auto"
    config: Any = None
    progress: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def train_config(self, **extra: Any) -> TrainConfig:
        """A :class:`TrainConfig` from the params that are its fields, this run's seed and device, then ``extra``.

        An experiment config's ``data_dir`` (where the CIFAR batches are; not part of the run id) is
        passed on to the dataset as ``data_kwargs["data_dir"]``.
        """
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        kw = {k: v for k, v in self.params.items() if k in names}
        kw.update(seed=self.seed, device=self.device)
        data_dir = getattr(self.config, "data_dir", None)
        if data_dir:
            kw["data_kwargs"] = {**kw.get("data_kwargs", {}), "data_dir": data_dir}
        kw.update(extra)
        for key in ("betas", "lr_milestones"):
            if key in kw and isinstance(kw[key], list):
                kw[key] = tuple(kw[key])
        return TrainConfig(**kw)


@dataclass(frozen=True)
class Experiment:
    """A claim as a runnable experiment (see the module docstring for each part's contract).

    ``description`` is the module docstring: it opens with the claim's
    pre-registration (a section headed "Pre-registration"), and states,
    big_vision style, the command, the expected runtime per scale and the
    expected result.
    """

    name: str  # registry key and folder name, e.g. "high-lr"
    claim: str | None  # claim id, e.g. "C1"; None for examples (kept out of the claims list)
    title: str  # one line
    config: type  # the frozen config dataclass (with `seeds`, `max_seeds` and `threads` fields)
    scales: Mapping[str, Any]  # "smoke" | "quick" | "full" -> an instance of `config`
    grid: Callable[[Any], Iterable[Mapping[str, Any]]]
    run_one: Callable[[Run], Mapping[str, Any]]
    parts: Callable[[Any], Sequence[Part]]
    plot: Callable[[list[dict[str, Any]], Path, Any], list[Path]] | None = None
    measure: Callable[[list[dict[str, Any]], Any], list[dict[str, Any]]] | None = None
    explain: Callable[[list[dict[str, Any]], Any, Judgement], tuple[str, Mapping[str, Any]]] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", self.name or ""):
            raise ValueError(f"experiment name {self.name!r} must be lowercase letters, digits, '-', '_' or '.'")
        if self.claim is not None and not re.fullmatch(r"C\d+", self.claim):
            raise ValueError(f"experiment {self.name!r}: claim id {self.claim!r} must look like 'C1' (or be None)")
        if not (dataclasses.is_dataclass(self.config) and isinstance(self.config, type)):
            raise TypeError(f"experiment {self.name!r}: config must be a dataclass type")
        if not self.config.__dataclass_params__.frozen:
            raise TypeError(
                f"experiment {self.name!r}: config {self.config.__name__} must be frozen (@dataclass(frozen=True))"
            )
        names = {f.name for f in dataclasses.fields(self.config)}
        for need in ("seeds", "max_seeds", "threads"):
            if need not in names:
                raise TypeError(f"experiment {self.name!r}: config {self.config.__name__} needs a `{need}: int` field")
        if set(self.scales) != set(SCALES):
            raise ValueError(f"experiment {self.name!r}: scales must be exactly {SCALES}, got {tuple(self.scales)}")
        for s, c in self.scales.items():
            if not isinstance(c, self.config):
                raise TypeError(
                    f"experiment {self.name!r}: scale {s!r} is a {type(c).__name__}, not a {self.config.__name__}"
                )

    def config_for(
        self, scale: str = "quick", overrides: Sequence[str] | Mapping[str, Any] = (), seeds: int | None = None
    ):
        """The config at ``scale`` with ``overrides`` (``key=value``) and ``seeds`` applied; raises ConfigError.

        ``seeds`` forces a fixed number of seeds: one look, no rounds.
        """
        if scale not in self.scales:
            raise ConfigError(f"scale {scale!r} is not one of: {', '.join(SCALES)}")
        cfg = parse_overrides(self.scales[scale], overrides)
        if seeds is not None:
            if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
                raise ConfigError(f"seeds must be a positive int, got {seeds!r}")
            cfg = dataclasses.replace(cfg, seeds=seeds, max_seeds=seeds)
        if cfg.seeds < 1 or cfg.max_seeds < cfg.seeds:
            raise ConfigError(f"need 1 <= seeds <= max_seeds, got seeds={cfg.seeds}, max_seeds={cfg.max_seeds}")
        return cfg

    def plan(self, cfg) -> SeedPlan:
        """Seeds in rounds of ``cfg.seeds`` up to ``cfg.max_seeds``."""
        return SeedPlan.rounds(cfg.seeds, cfg.max_seeds)

    def declared_parts(self, cfg) -> list[Part]:
        """The parts declared for ``cfg``, checked: unique names and at least one deciding part."""
        parts = list(self.parts(cfg))
        if not parts or not any(p.decides for p in parts):
            raise ValueError(f"experiment {self.name!r} declares no deciding part")
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: part names must be unique, got {names}")
        return parts

    def runs(self, cfg, n_seeds: int | None = None) -> list[dict[str, Any]]:
        """The runs: every grid point × seeds ``0 .. n_seeds-1`` (default: the first look), seeds inner."""
        n = cfg.seeds if n_seeds is None else n_seeds
        out = []
        for params in self.grid(cfg):
            params = dict(params)
            if "seed" in params:
                raise ValueError(
                    f"experiment {self.name!r}: grid points must not contain 'seed' (the framework adds the seeds)"
                )
            out.extend({**params, "seed": seed} for seed in range(n))
        return out

    @property
    def preregistration(self) -> str:
        """The module docstring's "Pre-registration" section ("" if it has none)."""
        return preregistration(self.description)


def preregistration(doc: str) -> str:
    """The section of ``doc`` headed "Pre-registration" (a line of dashes under it), up to the next heading."""
    return split_preregistration(doc)[0]


def split_preregistration(doc: str) -> tuple[str, str]:
    """``(the Pre-registration section's text, the rest of doc)``; ``("", doc)`` when there is none."""
    lines = (doc or "").splitlines()

    def heading(i: int) -> bool:
        return i + 1 < len(lines) and bool(lines[i].strip()) and set(lines[i + 1].strip()) == {"-"}

    start = next((i for i in range(len(lines)) if heading(i) and lines[i].strip().lower() == "pre-registration"), None)
    if start is None:
        return "", doc or ""
    end = next((i for i in range(start + 2, len(lines)) if heading(i)), len(lines))
    return "\n".join(lines[start + 2 : end]).strip(), "\n".join(lines[:start] + lines[end:])


def _discover() -> None:
    """Import every module of ``normlab.lab.experiments``, then the plugins, so that each registers its experiment."""
    import normlab.lab.experiments as pkg
    from normlab.lab.plugins import load_plugins

    for info in pkgutil.iter_modules(pkg.__path__):
        if not (info.name.startswith("_") or info.name in ("framework", "verdicts")):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    load_plugins()  # entry points of `normlab.plugins` and NORMLAB_IMPORT modules (pool and Ray workers too)


EXPERIMENTS: Registry[Experiment] = Registry("experiment", discover=_discover)


def register_experiment(experiment: Experiment) -> Experiment:
    """Add ``experiment`` to the registry (also under its claim id); a name or claim id taken raises RegistryError."""
    if not isinstance(experiment, Experiment):
        raise TypeError(f"register_experiment needs an Experiment, got {type(experiment).__name__}")
    aliases = (experiment.claim,) if experiment.claim is not None else ()
    return EXPERIMENTS.register(experiment.name, experiment, aliases=aliases)


def _claim_key(e: Experiment) -> tuple:
    return (e.claim is None, int(e.claim[1:]) if e.claim else 0, e.name)


def experiment_names(*, include_examples: bool = True) -> list[str]:
    """Registered experiment names, in claim order (C1, C2, ...), then examples (no claim id)."""
    exps = sorted((e for _, e in EXPERIMENTS.items()), key=_claim_key)
    return [e.name for e in exps if include_examples or e.claim is not None]


def get_experiment(name: str) -> Experiment:
    """The experiment registered as ``name`` or by its claim id (``"C1"``); unknown names raise RegistryError."""
    return EXPERIMENTS.get(name)


# --------------------------------------------------------------------------- verdicts


SMOKE_NOTE = "smoke scale checks the plumbing only: this verdict means nothing about the claim"


@dataclass(frozen=True)
class Verdict:
    """A claim's outcome: the judgement of its parts, the experiment's own finding, and at which scale."""

    judgement: Judgement
    scale: str
    finding: str = ""  # the experiment's own sentence (explain), may be ""
    numbers: Mapping[str, Any] = field(default_factory=dict)  # extra JSON-able numbers from explain

    @property
    def status(self) -> str:
        return self.judgement.status

    @property
    def meaningful(self) -> bool:
        return self.scale != "smoke"

    @property
    def summary(self) -> str:
        text = self.judgement.summary()
        if self.finding:
            text += f". {self.finding}"
        return text if self.meaningful else f"[{SMOKE_NOTE}] {text}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "meaningful": self.meaningful,
            "summary": self.summary,
            "finding": self.finding,
            **self.judgement.to_dict(),
            "numbers": dict(self.numbers),
        }


def judge_rows(exp: Experiment, cfg, rows: list[dict[str, Any]], scale: str, plan: SeedPlan | None = None) -> Verdict:
    """Judge ``exp``'s claim from its stored rows: measure, the parts under the plan, then the experiment's words."""
    per_seed = exp.measure(rows, cfg) if exp.measure is not None else rows
    judgement = judge(exp.declared_parts(cfg), per_seed, plan or exp.plan(cfg))
    finding, numbers = exp.explain(rows, cfg, judgement) if exp.explain is not None else ("", {})
    return Verdict(judgement, scale, " ".join(str(finding).split()), dict(numbers))


# --------------------------------------------------------------------------- running


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` did and found."""

    experiment: str
    claim: str | None
    scale: str
    config: Any
    verdict: Verdict
    rows: list[dict[str, Any]]
    figures: list[Path]
    folder: Path
    verdict_path: Path
    ran: list[str]  # run ids executed by this call
    skipped: list[str]  # run ids found complete in the store
    wall_time: float = 0.0  # seconds for the whole call


def _command(name: str, scale: str, seeds: int | None, overrides: Sequence[str] | Mapping[str, Any]) -> str:
    """The shell command that reproduces the sweep, every word quoted (``shlex.join``): safe to paste."""
    parts = ["normlab", "run", name, "--scale", scale]
    if seeds is not None:
        parts += ["--seeds", str(seeds)]
    items = overrides.items() if isinstance(overrides, Mapping) else [tuple(o.split("=", 1)) for o in overrides]
    for kv in items:
        parts += ["--set", "=".join(str(x) for x in kv)]
    return shlex.join(parts)


def _stale_runs(runs) -> list:
    """The stored runs whose recorded source hash differs from this code's (runs without one count as stale)."""
    current = source_hash()
    stale = []
    for r in runs:
        try:
            env = r.env()
        except (OSError, ValueError):
            continue
        if env.get("source_hash") != current:
            stale.append(r)
    return stale


def _run_grid_point(
    name: str, scale: str, device: str, cfg: Any, progress: bool, run_config: dict[str, Any]
) -> Mapping[str, Any]:
    """One run of experiment ``name`` with ``cfg.threads`` torch threads (module-level: pools and Ray ship it)."""
    import torch

    exp = get_experiment(name)
    params = {k: v for k, v in run_config.items() if k != "seed"}
    before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        return exp.run_one(Run(exp.name, scale, params, run_config["seed"], device, cfg, progress))
    finally:
        torch.set_num_threads(before)


def _run_env(
    name: str, claim: str | None, scale: str, device: str, threads: int | None, run_config: dict[str, Any]
) -> dict[str, Any]:
    from normlab.lab import launch

    env = environment(device=device, seed=run_config["seed"], threads=threads)
    env.update(experiment=name, claim=claim, scale=scale)
    if launch.env_world_size() > 1:
        env["world_size"] = launch.env_world_size()
    return env


def _machine() -> dict[str, Any]:
    import os
    import platform

    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def run_experiment(
    name: str,
    scale: str = "quick",
    seeds: int | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    device: str = "auto",
    root: str | Path = "runs",
    progress: bool = True,
    *,
    executor: str = "sequential",
    workers: int | None = None,
    address: str | None = None,
    write: bool = True,
) -> ExperimentResult:
    """Run the experiment ``name`` at ``scale`` in rounds of seeds until its claim is decided or the budget is spent.

    Each round runs the missing runs of the next look (grid × seeds ``0 ..
    n-1``; stored runs are reused, so a second call with a larger budget only
    adds seeds) and judges the claim; the call stops at the first look where
    every deciding part is decided. ``seeds`` forces a fixed number of seeds
    (one look). ``overrides`` are ``key=value`` strings for the experiment's
    config; ``device`` is passed to every run (recorded in ``env.json``, not
    part of the run id). Writes ``<root>/<name>/verdict.json`` and the figures
    under ``<root>/<name>/figures/`` (unless ``write=False``).

    ``executor`` / ``workers`` / ``address`` choose where the runs run
    (``"sequential"``, a ``"local"`` process pool, or ``"ray"``); see
    :func:`normlab.lab.executors.sweep`. A local pool has, unless ``workers``
    says otherwise, the CPU count divided by the config's ``threads``. Under ``torchrun`` only rank 0 writes
    the verdict and the figures.
    """
    from normlab.lab import launch

    t0 = time.time()
    exp = get_experiment(name)
    cfg = exp.config_for(scale, overrides, seeds)
    launch.join_from_env(device)  # torchrun: join once, with the backend of this device (nccl for CUDA)
    main = launch.is_main_process()
    store = RunStore(root)
    if executor == "local" and workers is None:
        workers = _pool_size(cfg.threads)
    rounds = _run_rounds(
        exp, cfg, scale, device, store, progress and main, executor=executor, workers=workers, address=address
    )
    stale = _stale_runs(rounds.runs)
    if stale and main:
        _warn_stale(exp.name, len(stale), len(rounds.runs), store.root / exp.name)
    result = ExperimentResult(
        exp.name, exp.claim, scale, cfg, rounds.verdict, rounds.rows, [], store.root / exp.name,
        store.root / exp.name / "verdict.json", rounds.ran, rounds.skipped,
    )  # fmt: skip
    if main and write:  # under torchrun, rank 0 draws and writes
        result.figures = _draw(exp, cfg, rounds.verdict, rounds.rows, result.folder)
        result.wall_time = time.time() - t0
        _write_verdict(result, exp, overrides, seeds, device, rounds, len(stale))
    result.wall_time = time.time() - t0
    return result


def _pool_size(threads: int | None) -> int:
    """Processes of a local pool whose runs use ``threads`` torch threads each: the CPU count divided by it.

    Two 2-thread runs on a 2-core machine do not run twice as fast as one: their
    OpenMP threads spin against each other and every run is several times
    slower than alone.
    """
    return max(1, (os.cpu_count() or 1) // max(1, int(threads or 1)))


@dataclass
class _Rounds:
    """What the rounds of seeds left: the verdict at the last look taken, its runs and rows, what ran."""

    verdict: Verdict
    runs: list  # StoredRun of the last look, grid order
    rows: list[dict[str, Any]]
    ran: list[str]
    skipped: list[str]


def _run_rounds(exp: Experiment, cfg, scale, device, store, progress, **where) -> _Rounds:
    """Seeds in rounds: run each look's missing runs, judge, stop once every deciding part is decided."""
    plan = exp.plan(cfg)
    run_fn = functools.partial(_run_grid_point, exp.name, scale, device, cfg, progress)
    env_fn = functools.partial(_run_env, exp.name, exp.claim, scale, device, cfg.threads)
    ran: list[str] = []
    skipped: list[str] = []
    for n in plan.looks:
        desc = f"{exp.claim or ''} {exp.name} [{n} seeds]".strip()
        report = sweep(store, exp.name, exp.runs(cfg, n), run_fn, env_fn=env_fn, progress=progress, desc=desc, **where)
        ran += report.ran
        skipped += [r for r in report.skipped if r not in skipped and r not in ran]  # earlier rounds' are not "stored"
        rows = report.rows(with_metrics=True)
        verdict = judge_rows(exp, cfg, rows, scale, plan)
        if all(r.status != INCONCLUSIVE for r in verdict.judgement.deciding):
            break  # every deciding part is decided: no more seeds
    return _Rounds(verdict, report.runs, rows, ran, skipped)


def _warn_stale(name: str, n_stale: int, n_runs: int, folder: Path) -> None:
    warnings.warn(
        f"{name}: {n_stale} of {n_runs} stored runs were made by other normlab source code "
        f"(source hash differs from {source_hash()}); their numbers may not be what this code gives. "
        f"Delete {folder} (or those run folders) to run them again.",
        RuntimeWarning,
        stacklevel=3,
    )


def _draw(exp: Experiment, cfg, verdict: Verdict, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """The experiment's own figures, then the forest plot of its parts."""
    figures = [Path(p) for p in (exp.plot(rows, folder / "figures", cfg) if exp.plot is not None else [])]
    figures.append(forest_plot(verdict, folder / "figures", f"{exp.claim or ''} {exp.name}".strip()))
    return figures


def _write_verdict(result: ExperimentResult, exp: Experiment, overrides, seeds, device, rounds: _Rounds, stale: int):
    """``verdict.json``: the verdict with every part, how it was reached, and what it ran on."""
    j = result.verdict.judgement
    folder = result.folder
    write_json_atomic(
        result.verdict_path,
        {
            "experiment": exp.name,
            "claim": exp.claim,
            "title": exp.title,
            **result.verdict.to_dict(),
            "preregistration": exp.preregistration,
            "scale": result.scale,
            "seeds_used": sorted({int(r["seed"]) for r in rounds.rows})[: j.seeds],
            "config": dataclasses.asdict(result.config),
            "overrides": list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides),
            "device": device,
            "runs": [r.run_id for r in rounds.runs if int(r.config()["seed"]) < j.seeds],
            "figures": [str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in result.figures],
            "command": _command(exp.name, result.scale, seeds, overrides),
            "git_revision": git_revision(),
            "source_hash": source_hash(),
            "stale_runs": stale,
            "machine": {**_machine(), "threads_per_run": result.config.threads},
            "wall_time": result.wall_time,
            "ran": len(result.ran),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def analyse_stored(name: str, root: str | Path = "runs") -> Verdict:
    """Re-judge a stored verdict from the run store only — never trains: the same config, seeds and plan."""
    exp = get_experiment(name)
    stored = read_json(Path(root) / exp.name / "verdict.json")
    cfg = exp.config_for(stored["scale"], stored.get("overrides") or ())
    cfg = dataclasses.replace(cfg, seeds=stored["config"]["seeds"], max_seeds=stored["config"]["max_seeds"])
    store = RunStore(root)
    configs = exp.runs(cfg, stored["seeds"])
    missing = [c for c in configs if not store.is_complete(exp.name, c)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(configs)} runs of {exp.name!r} are not in {root}/")
    rows = [store.run(exp.name, c).row(with_metrics=True) for c in configs]
    return judge_rows(exp, cfg, rows, stored["scale"], SeedPlan(tuple(stored["looks"]), stored["alpha"]))


def recheck_experiment(
    name: str,
    root: str | Path = "runs",
    *,
    threads: int | None = None,
    device: str = "auto",
    progress: bool = True,
    executor: str = "sequential",
    workers: int | None = None,
) -> dict[str, Any]:
    """Rerun a stored verdict's seeds from scratch with another thread count; say whether every part decides alike.

    The runs go to ``<root>/.recheck/<name>/`` (a separate store: threads are
    not part of the run id), with the stored verdict's config and overrides,
    its seeds and its plan up to those seeds, and ``threads`` (default: 2 if the
    verdict used 1, else 1). The comparison is written into the stored
    ``verdict.json`` under ``"recheck"`` and returned.
    """
    exp = get_experiment(name)
    path = Path(root) / exp.name / "verdict.json"
    stored = read_json(path)
    used = int(stored["config"].get("threads") or 1)
    threads = threads if threads is not None else (2 if used == 1 else 1)
    pairs = [tuple(o) if isinstance(o, list) else tuple(str(o).split("=", 1)) for o in stored.get("overrides") or []]
    overrides = {**dict(pairs), "threads": threads}
    n = int(stored["seeds"])
    t0 = time.time()
    res = run_experiment(
        exp.name, stored["scale"], n, overrides, device, Path(root) / ".recheck", progress,
        executor=executor, workers=workers, write=False,
    )  # fmt: skip
    # the same procedure as the stored verdict: its config's rounds and alpha split, looks up to its seeds
    cfg = dataclasses.replace(res.config, seeds=stored["config"]["seeds"], max_seeds=stored["config"]["max_seeds"])
    again = judge_rows(exp, cfg, res.rows, stored["scale"], SeedPlan(tuple(stored["looks"]), stored["alpha"]))
    before = {p["name"]: p["status"] for p in stored["parts"]}
    after = {r.part.name: r.status for r in again.judgement.parts}
    out = {
        "threads": threads,
        "threads_before": used,
        "seeds": n,
        "status_before": stored["status"],
        "status_after": again.status,
        "parts": {k: [before.get(k), after.get(k)] for k in before},
        "same_claim": stored["status"] == again.status,
        "same_parts": all(before.get(k) == after.get(k) for k in before),
        "wall_time": time.time() - t0,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary_after": again.summary,
    }
    write_json_atomic(path, {**stored, "recheck": out})
    return out


def run_all(
    scale: str = "quick",
    root: str | Path = "runs",
    *,
    device: str = "auto",
    progress: bool = True,
    executor: str = "local",
    workers: int | None = None,
    recheck: bool = False,
    on_result: Callable[[ExperimentResult], None] | None = None,
    on_recheck: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every registered claim at ``scale``, one after the other (each on ``executor``), then ``<root>/suite.json``.

    With ``recheck=True`` each claim is also rechecked (:func:`recheck_experiment`)
    right after its run; the recheck's time is counted apart from the suite's.
    ``on_result`` is called with each :class:`ExperimentResult` as it is ready,
    ``on_recheck`` with each claim's name and its recheck (what
    :func:`recheck_experiment` returns).
    Returns what ``suite.json`` holds: per claim its status, seeds and wall time,
    the counts of each status, and the total wall time of the runs.
    """
    t0 = time.time()
    claims, recheck_time = [], 0.0
    for name in experiment_names(include_examples=False):
        res = run_experiment(
            name, scale, root=root, device=device, progress=progress, executor=executor, workers=workers
        )  # fmt: skip
        if on_result is not None:
            on_result(res)
        entry = {
            "experiment": res.experiment,
            "claim": res.claim,
            "status": res.verdict.status,
            "seeds": res.verdict.judgement.seeds,
            "wall_time": res.wall_time,
            "ran": len(res.ran),
        }
        if recheck:
            r0 = time.time()
            out = recheck_experiment(name, root, device=device, progress=progress, executor=executor, workers=workers)
            recheck_time += time.time() - r0
            if on_recheck is not None:
                on_recheck(name, out)
            entry["recheck_same"] = bool(out["same_parts"] and out["same_claim"])
        claims.append(entry)
    wall = time.time() - t0 - recheck_time
    counts = {s: sum(c["status"] == s for c in claims) for s in STATUSES}
    suite = {
        "scale": scale,
        "claims": claims,
        "counts": counts,
        "wall_time": wall,
        "recheck_wall_time": recheck_time if recheck else None,
        "executor": executor,
        "workers": workers,
        "machine": _machine(),
        "git_revision": git_revision(),
        "source_hash": source_hash(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(Path(root) / "suite.json", suite)
    return suite


# --------------------------------------------------------------------------- the forest plot


def forest_plot(verdict: Verdict, out_dir: str | Path, title: str) -> Path:
    """Every part's interval against its margin band, in units of δ, oriented so the claimed side is to the right.

    Deciding parts show the interval their decision used (its level in the
    label), reported-only parts their 95 % interval. The band ``(−1, 1)`` is
    "too small to matter"; a directional part holds when its interval lies right
    of 0 and reaches 1, an "≈" part when it lies inside the band.
    """
    plt = pyplot()
    rows = list(verdict.judgement.parts)
    fig, ax = plt.subplots(figsize=(8.2, 0.55 * len(rows) + 1.5))
    colours = {HOLDS: "#1a7f37", DOES_NOT_HOLD: "#c62828", INCONCLUSIVE: "#8a6d00"}
    ax.axvspan(-1, 1, color="#d5d9df", alpha=0.5, lw=0, label="|effect| < δ (too small to matter)")
    ax.axvline(0, color="k", lw=0.8)
    for i, r in enumerate(reversed(rows)):
        sign = -1.0 if r.part.direction == "less" else 1.0
        lo, hi = sorted((sign * r.ci[0] / r.part.delta, sign * r.ci[1] / r.part.delta))
        mid = sign * r.effect / r.part.delta
        c = colours[r.status]
        ax.plot([lo, hi], [i, i], color=c, lw=2.2 if r.part.decides else 1.2, ls="-" if r.part.decides else "--")
        ax.plot([mid], [i], "o", color=c, ms=6 if r.part.decides else 4)
        ax.text(1.01, i, f" {r.status}", transform=ax.get_yaxis_transform(), va="center", color=c, fontsize=8)
    labels = [
        f"{r.part.name} ({'decides' if r.part.decides else 'reported'}, {100 * r.level:.3g} %, n {r.n_a})"
        for r in reversed(rows)
    ]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("effect / δ   (claimed side →; '≈' parts: inside the band)")
    ax.set_ylim(-0.7, len(rows) - 0.3)
    xs = [abs(v) for r in rows for v in (r.ci[0] / r.part.delta, r.ci[1] / r.part.delta) if math.isfinite(v)]
    lim = min(max([2.0, *xs]) * 1.1, 50)
    ax.set_xlim(-lim, lim)
    ax.legend(loc="lower left", fontsize=7, frameon=False)
    ax.set_title(f"{title}: {verdict.status} ({verdict.judgement.seeds} seeds; rule v{RULE_VERSION})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_dir, "parts")
