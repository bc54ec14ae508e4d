"""The experiment framework: a claim becomes config + grid + ``run_one`` + ``analyse`` + ``plot``.

An :class:`Experiment` is data plus code:

* ``config``: a frozen dataclass type whose fields (each commented with its
  unit) describe the whole experiment, with a ``seeds: int`` field (the
  number of seeds per grid point); ``scales`` maps ``"smoke"``, ``"quick"``
  and ``"full"`` to instances of it. ``key=value`` overrides are parsed into
  it, type-checked (:func:`normlab.lab.config.parse_overrides`).
* ``grid(config) -> [params, ...]``: the runs, each a JSON-able dict of
  everything that run depends on (no ``"seed"`` key: seeds ``0 .. seeds-1``
  are added by the framework). The run id is the hash of ``{**params,
  "seed": seed}``, so a run is reused by any scale or override that asks for
  exactly the same thing, and raising ``seeds`` only runs the new seeds.
* ``run_one(run: Run) -> metrics``: runs one configuration (training with
  :func:`normlab.lab.train.train`, via ``run.train_config()``, or a probe) and
  returns a dict of metrics: scalars and curves.
* ``analyse(rows) -> Verdict`` (or ``analyse(rows, config)``): ``rows`` are
  the stored runs of this sweep, one flat dict each: the params, ``seed``,
  ``run_id``, the scalar results and the curves. It must only read rows
  (re-analysing never retrains).
* ``plot(rows, out_dir) -> [png paths]`` (or ``plot(rows, out_dir, config)``).

:func:`run_experiment` runs the missing runs into the run store
(``<root>/<name>/<run id>/``), skips stored ones, then analyses, plots and
writes ``<root>/<name>/verdict.json`` and ``<root>/<name>/figures/*.png``.

Verdicts are **holds**, **does not hold** or **inconclusive**, decided by the
helpers below from the mean and spread over seeds; see :func:`compare` for the
rule. A claim that does not hold at our scale is a result, not a bug.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
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
from normlab.lab.provenance import environment, git_revision, source_hash
from normlab.lab.store import RunStore, write_json_atomic
from normlab.registry import Registry

__all__ = [
    "SCALES",
    "STATUSES",
    "Verdict",
    "Run",
    "Experiment",
    "ExperimentResult",
    "register_experiment",
    "get_experiment",
    "experiment_names",
    "run_experiment",
    "analyse_stored",
    "mean_std",
    "fmt_mean_std",
    "compare",
    "threshold",
    "combine",
    "values",
    "group",
    "pyplot",
    "save_figure",
]

SCALES = ("smoke", "quick", "full")
STATUSES = ("holds", "does not hold", "inconclusive")


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """The outcome of an analysis: a status, a one-line summary with mean ± spread, and the numbers behind it."""

    status: str  # "holds" | "does not hold" | "inconclusive"
    summary: str  # one line, e.g. "BN 0.93 ± 0.01 vs none 0.88 ± 0.02 (n=3 each): higher with BN, as claimed"
    numbers: dict[str, Any] = field(default_factory=dict)  # JSON-able numbers behind the summary

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Verdict status {self.status!r} is not one of: {', '.join(map(repr, STATUSES))}")
        if "\n" in self.summary:
            raise ValueError("Verdict summary must be one line")

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "summary": self.summary, "numbers": dict(self.numbers)}


def mean_std(xs: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _g(x: float, digits: int) -> str:
    return f"{x:.{digits}g}"


def fmt_mean_std(xs: Iterable[float], digits: int = 3) -> str:
    """``"0.912 ± 0.0131 (n=3)"``: mean ± sample std over seeds."""
    m, s, n = mean_std(xs)
    return f"{_g(m, digits)} ± {_g(s, digits)} (n={n})"


def _check_values(xs: Sequence[float], name: str, who: str) -> list[float]:
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError(f"{who}: no values for {name!r}; did the grid produce runs for it?")
    bad = [x for x in xs if not math.isfinite(x)]
    if bad:
        raise ValueError(
            f"{who}: values for {name!r} include non-finite numbers ({bad[0]}); "
            "map diverged runs to a number first (e.g. chance accuracy) or compare another metric"
        )
    return xs


def compare(
    a: Sequence[float],
    b: Sequence[float],
    direction: str = "greater",
    *,
    name_a: str = "A",
    name_b: str = "B",
    metric: str = "value",
    k: float = 1.0,
    margin: float = 0.0,
    min_seeds: int = 2,
    digits: int = 3,
) -> Verdict:
    """Decide whether the claim "``a`` is ``direction`` than ``b``" holds, from values over seeds.

    The rule: with means ``m`` and sample standard deviations ``s`` over
    seeds, each side's interval is ``m ± k·s`` (``k = 1`` by default).

    * **inconclusive** when either side has fewer than ``min_seeds`` values,
      when the two intervals overlap (touching counts as overlap), or when the
      means differ by no more than ``margin`` (the smallest difference that
      matters, in the metric's unit);
    * otherwise **holds** when the means are ordered as claimed
      (``direction="greater"``: mean(a) > mean(b); ``"less"``: mean(a) <
      mean(b)) and **does not hold** when they are ordered the other way.

    Non-finite values raise ``ValueError`` (decide first what a diverged run
    counts as). ``numbers`` holds each side's mean, std and n and the difference.
    """
    if direction not in ("greater", "less"):
        raise ValueError(f"direction={direction!r} is not one of: 'greater', 'less'")
    a = _check_values(a, name_a, "compare")
    b = _check_values(b, name_b, "compare")
    ma, sa, na = mean_std(a)
    mb, sb, nb = mean_std(b)
    diff = ma - mb
    numbers = {
        "metric": metric,
        name_a: {"mean": ma, "std": sa, "n": na},
        name_b: {"mean": mb, "std": sb, "n": nb},
        "difference": diff,
        "k": k,
        "margin": margin,
    }
    rel = ">" if direction == "greater" else "<"
    sides = (
        f"{metric}: {name_a} {_g(ma, digits)} ± {_g(sa, digits)} (n={na}) "
        f"vs {name_b} {_g(mb, digits)} ± {_g(sb, digits)} (n={nb})"
    )
    if min(na, nb) < min_seeds:
        return Verdict("inconclusive", f"{sides}; fewer than {min_seeds} seeds per side, no verdict", numbers)
    overlap = (ma - k * sa) <= (mb + k * sb) and (mb - k * sb) <= (ma + k * sa)
    if overlap:
        return Verdict("inconclusive", f"{sides}; the mean ± {k:g}·std intervals overlap", numbers)
    if abs(diff) <= margin:
        text = f"{sides}; the difference {_g(diff, digits)} is within the margin {margin:g}"
        return Verdict("inconclusive", text, numbers)
    as_claimed = diff > 0 if direction == "greater" else diff < 0
    if as_claimed:
        return Verdict("holds", f"{sides}; {name_a} {rel} {name_b} as claimed", numbers)
    return Verdict("does not hold", f"{sides}; {name_a} is not {rel} {name_b}: the opposite of the claim", numbers)


def threshold(
    xs: Sequence[float],
    bound: float,
    direction: str = "greater",
    *,
    name: str = "value",
    k: float = 1.0,
    min_seeds: int = 2,
    digits: int = 3,
) -> Verdict:
    """Decide whether values over seeds lie above (``"greater"``) or below (``"less"``) ``bound``.

    Same rule as :func:`compare` with a fixed bound: holds when the whole
    interval ``m ± k·s`` is on the claimed side of ``bound``, does not hold
    when it is wholly on the other side, inconclusive when it contains
    ``bound`` or there are fewer than ``min_seeds`` values.
    """
    if direction not in ("greater", "less"):
        raise ValueError(f"direction={direction!r} is not one of: 'greater', 'less'")
    xs = _check_values(xs, name, "threshold")
    m, s, n = mean_std(xs)
    lo, hi = m - k * s, m + k * s
    numbers = {"metric": name, "mean": m, "std": s, "n": n, "bound": bound, "k": k}
    rel = ">" if direction == "greater" else "<"
    head = f"{name} {_g(m, digits)} ± {_g(s, digits)} (n={n})"
    if n < min_seeds:
        return Verdict("inconclusive", f"{head}; fewer than {min_seeds} seeds, no verdict", numbers)
    above, below = lo > bound, hi < bound
    if not (above or below):
        return Verdict("inconclusive", f"{head}; the interval contains the bound {bound:g}", numbers)
    if above == (direction == "greater"):
        return Verdict("holds", f"{head} {rel} {bound:g} as claimed", numbers)
    return Verdict("does not hold", f"{head} is not {rel} {bound:g}", numbers)


def combine(verdicts: Sequence[Verdict] | Mapping[str, Verdict], summary: str | None = None) -> Verdict:
    """A claim made of parts: holds if every part holds, does not hold if any part does not, else inconclusive.

    ``numbers`` holds each part's numbers (by name for a mapping, by index for a list);
    the summary joins the parts' summaries with " | " unless given.
    """
    items = list(verdicts.items()) if isinstance(verdicts, Mapping) else [(str(i), v) for i, v in enumerate(verdicts)]
    if not items:
        raise ValueError("combine needs at least one verdict")
    statuses = [v.status for _, v in items]
    if all(s == "holds" for s in statuses):
        status = "holds"
    elif any(s == "does not hold" for s in statuses):
        status = "does not hold"
    else:
        status = "inconclusive"
    if summary is None:
        named = isinstance(verdicts, Mapping)
        summary = " | ".join(f"{k}: {v.summary}" if named else v.summary for k, v in items)
    return Verdict(status, summary, {k: {"status": v.status, **v.numbers} for k, v in items})


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


def _accepts(fn: Callable, n: int) -> bool:
    """Whether ``fn`` takes at least ``n`` positional arguments."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= n or any(p.kind == p.VAR_POSITIONAL for p in params)


@dataclass(frozen=True)
class Experiment:
    """A claim as a runnable experiment (see the module docstring for each part's contract).

    ``description`` should state, big_vision style, the command, the expected
    runtime per scale and the expected result.
    """

    name: str  # registry key and folder name, e.g. "high-lr"
    claim: str | None  # claim id from CLAIMS.md, e.g. "C1"; None for examples (kept out of the claims list)
    title: str  # one line
    config: type  # the frozen config dataclass (with a `seeds: int` field)
    scales: Mapping[str, Any]  # "smoke" | "quick" | "full" -> an instance of `config`
    grid: Callable[[Any], Iterable[Mapping[str, Any]]]
    run_one: Callable[[Run], Mapping[str, Any]]
    analyse: Callable[..., Verdict]
    plot: Callable[..., list[Path]] | None = None
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
        if "seeds" not in {f.name for f in dataclasses.fields(self.config)}:
            raise TypeError(f"experiment {self.name!r}: config {self.config.__name__} needs a `seeds: int` field")
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
        """The config at ``scale`` with ``overrides`` (``key=value``) and ``seeds`` applied; raises ConfigError."""
        if scale not in self.scales:
            raise ConfigError(f"scale {scale!r} is not one of: {', '.join(SCALES)}")
        cfg = parse_overrides(self.scales[scale], overrides)
        if seeds is not None:
            if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
                raise ConfigError(f"seeds must be a positive int, got {seeds!r}")
            cfg = dataclasses.replace(cfg, seeds=seeds)
        if cfg.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {cfg.seeds}")
        return cfg

    def runs(self, cfg) -> list[dict[str, Any]]:
        """The run configurations of the sweep: every grid point × seeds 0..seeds-1, grid order, seeds inner."""
        out = []
        for params in self.grid(cfg):
            params = dict(params)
            if "seed" in params:
                raise ValueError(
                    f"experiment {self.name!r}: grid points must not contain 'seed' (the framework adds the seeds)"
                )
            for seed in range(cfg.seeds):
                out.append({**params, "seed": seed})
        return out

    def call_analyse(self, rows: list[dict[str, Any]], cfg) -> Verdict:
        verdict = self.analyse(rows, cfg) if _accepts(self.analyse, 2) else self.analyse(rows)
        if not isinstance(verdict, Verdict):
            raise TypeError(f"experiment {self.name!r}: analyse must return a Verdict, got {type(verdict).__name__}")
        return verdict

    def call_plot(self, rows: list[dict[str, Any]], out_dir: Path, cfg) -> list[Path]:
        if self.plot is None:
            return []
        paths = self.plot(rows, out_dir, cfg) if _accepts(self.plot, 3) else self.plot(rows, out_dir)
        return [Path(p) for p in (paths or [])]


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


def _command(name: str, scale: str, seeds: int | None, overrides: Sequence[str] | Mapping[str, Any]) -> str:
    """The shell command that reproduces the sweep, every word quoted (``shlex.join``): safe to paste."""
    parts = ["normlab", "run", name, "--scale", scale]
    if seeds is not None:
        parts += ["--seeds", str(seeds)]
    items = overrides.items() if isinstance(overrides, Mapping) else [tuple(o.split("=", 1)) for o in overrides]
    for kv in items:
        parts += ["--set", "=".join(str(x) for x in kv)]
    return shlex.join(parts)


def analyse_stored(
    name: str,
    scale: str = "quick",
    seeds: int | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    root: str | Path = "runs",
    *,
    plot: bool = True,
) -> tuple[Verdict, list[dict[str, Any]], list[Path]]:
    """Re-analyse (and re-plot) a sweep from the run store only — never trains. Missing runs raise."""
    exp = get_experiment(name)
    cfg = exp.config_for(scale, overrides, seeds)
    store = RunStore(root)
    configs = exp.runs(cfg)
    missing = [c for c in configs if not store.is_complete(exp.name, c)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(configs)} runs of {exp.name!r} ({scale}) are not in {root}/; run them with "
            f"{_command(exp.name, scale, seeds, overrides)}"
        )
    rows = [store.run(exp.name, c).row(with_metrics=True) for c in configs]
    verdict = exp.call_analyse(rows, cfg)
    figures = exp.call_plot(rows, Path(root) / exp.name / "figures", cfg) if plot else []
    return verdict, rows, figures


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
    """One run of experiment ``name`` (module-level: a process pool or Ray can ship it by name)."""
    exp = get_experiment(name)
    params = {k: v for k, v in run_config.items() if k != "seed"}
    return exp.run_one(Run(exp.name, scale, params, run_config["seed"], device, cfg, progress))


def _run_env(name: str, claim: str | None, scale: str, device: str, run_config: dict[str, Any]) -> dict[str, Any]:
    from normlab.lab import launch

    env = environment(device=device, seed=run_config["seed"], threads=run_config.get("threads"))
    env.update(experiment=name, claim=claim, scale=scale)
    if launch.env_world_size() > 1:
        env["world_size"] = launch.env_world_size()
    return env


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
) -> ExperimentResult:
    """Run the experiment ``name`` at ``scale``: the missing runs, then analysis, figures and ``verdict.json``.

    ``seeds`` replaces the config's number of seeds; ``overrides`` are
    ``key=value`` strings for the experiment's config; ``device`` is passed to
    every run (it is recorded in ``env.json`` but is not part of the run id).
    Runs already complete under ``<root>/<name>/`` are skipped, so an
    interrupted call resumes. Writes ``<root>/<name>/verdict.json`` (status,
    summary, numbers, scale, seeds, config, run ids, figures, command,
    environment) and the figures under ``<root>/<name>/figures/``.

    ``executor`` / ``workers`` / ``address`` choose where the runs run
    (``"sequential"``, a ``"local"`` process pool, or ``"ray"``); see
    :func:`normlab.lab.executors.sweep`. Pool and Ray workers find the experiment by
    name, so it must be registered in a module of ``normlab.lab.experiments``
    (or imported by the workers). Under ``torchrun`` (several processes, one
    training per run) only rank 0 writes the verdict and the figures.
    """
    from normlab.lab import launch

    exp = get_experiment(name)
    cfg = exp.config_for(scale, overrides, seeds)
    store = RunStore(root)
    folder = store.root / exp.name
    configs = exp.runs(cfg)

    run_fn = functools.partial(_run_grid_point, exp.name, scale, device, cfg, progress)
    env_fn = functools.partial(_run_env, exp.name, exp.claim, scale, device)
    desc = f"{exp.claim or ''} {exp.name}".strip()
    launch.join_from_env(device)  # torchrun: join once, with the backend of this device (nccl for CUDA)
    main = launch.is_main_process()
    report = sweep(
        store,
        exp.name,
        configs,
        run_fn,
        env_fn=env_fn,
        progress=progress and main,
        desc=desc,
        executor=executor,
        workers=workers,
        address=address,
    )
    stale = _stale_runs(report.runs)
    if stale and main:
        warnings.warn(
            f"{exp.name}: {len(stale)} of {len(report.runs)} stored runs were made by other normlab source code "
            f"(source hash differs from {source_hash()}); their numbers may not be what this code gives. "
            f"Delete {folder} (or those run folders) to run them again.",
            RuntimeWarning,
            stacklevel=2,
        )
    rows = report.rows(with_metrics=True)
    verdict = exp.call_analyse(rows, cfg)
    verdict_path = folder / "verdict.json"
    if not main:  # several processes (torchrun): rank 0 writes the figures and the verdict
        return ExperimentResult(
            exp.name, exp.claim, scale, cfg, verdict, rows, [], folder, verdict_path, report.ran, report.skipped
        )
    figures = exp.call_plot(rows, folder / "figures", cfg)
    verdict_path = write_json_atomic(
        verdict_path,
        {
            "experiment": exp.name,
            "claim": exp.claim,
            "title": exp.title,
            **verdict.to_dict(),
            "scale": scale,
            "seeds": cfg.seeds,
            "config": dataclasses.asdict(cfg),
            "overrides": list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides),
            "device": device,
            "runs": [r.run_id for r in report.runs],
            "figures": [
                str(Path(p).relative_to(folder)) if Path(p).is_relative_to(folder) else str(p) for p in figures
            ],
            "command": _command(exp.name, scale, seeds, overrides),
            "git_revision": git_revision(),
            "source_hash": source_hash(),
            "stale_runs": len(stale),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return ExperimentResult(
        experiment=exp.name,
        claim=exp.claim,
        scale=scale,
        config=cfg,
        verdict=verdict,
        rows=rows,
        figures=figures,
        folder=folder,
        verdict_path=verdict_path,
        ran=report.ran,
        skipped=report.skipped,
    )
