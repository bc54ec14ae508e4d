"""The run store: every run's evidence on disk, written atomically, found again by its config.

Layout::

    <root>/<experiment>/<run id>/
        config.json    the resolved run configuration (what the id is computed from)
        env.json       python/torch/numpy versions, device used, threads, seed, git revision, host, time
        metrics.json   everything the run returned: per-step and per-epoch curves and the scalars
        result.json    the scalar part of the metrics; written last: its presence marks the run complete
    <root>/.quarantine/<experiment>/<run id>-<UTC time>/
        the files of a run found corrupt (never deleted), and reason.txt saying what was wrong

* **Atomic**: each file is written to a temporary file with a unique name in
  the same folder, flushed, fsync-ed and moved into place with ``os.replace``
  (:func:`normlab._io.atomic_write`), so a killed process leaves either the
  old file or the new one, never half of one. ``result.json`` is written last,
  so a run folder without it is incomplete and is simply run again. Files get
  the permissions a new file gets (``0644`` under the usual umask ``022``), so
  a store can be shared by a group.
* **Run ids** are the first 16 hex digits of the SHA-256 of the canonical JSON
  of the run configuration (sorted keys, no whitespace): the same configuration
  always maps to the same folder. A sweep (grid × seeds) therefore resumes
  after an interruption by skipping the ids whose ``result.json`` exists.
* **Strict JSON**: every file parses with any JSON parser (jq, JavaScript,
  databases). Tuples become lists. Non-finite numbers (a diverged loss) are
  written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the
  convention of the protobuf JSON mapping; ``float()`` in Python and
  ``Number()`` in JavaScript read them) and :func:`read_json` turns them back
  into floats, so the three strings cannot be stored as text. Files written by
  older versions with bare ``NaN``/``Infinity`` tokens still read.
* **Corrupt runs**: a complete run whose files do not parse (a truncated
  ``config.json``, garbage in ``metrics.json``, ...) is named in the error of
  whatever reads it (:class:`CorruptRunError`). A sweep or ``normlab train``
  that meets one moves its files to ``<root>/.quarantine/`` (never deleting
  them), warns, and runs it again; the report lists it as corrupt.

``metrics.json`` of a training run (what :meth:`normlab.lab.train.RunResult.to_metrics` returns;
``normlab train`` and every training experiment store it), units in brackets:

* ``step_loss``: list, one per optimizer step: the training-mode loss of the
  batch before that step's update [nats];
* ``per_epoch``: list, one record per epoch (also a last partial one after
  divergence, ``max_steps`` or an early stop) with ``epoch`` (0-based),
  ``steps`` (optimizer steps so far), ``lr`` (the learning rate of the
  epoch's last step), ``train_loss`` / ``train_acc`` (train mode, mean over
  the epoch's batches [nats] / [fraction]), ``test_loss`` / ``test_acc`` (eval
  mode, whole test set), ``train_eval_loss`` / ``train_eval_acc`` (with
  ``eval_train``), ``time`` (training) and ``eval_time`` [s];
* the scalars, also in ``result.json``: ``diverged``, ``diverged_step``
  (step index or null), ``steps``, ``stopped_early``, ``epochs_run``,
  ``wall_time`` [s], ``num_params``, ``min_step_loss`` [nats, finite steps
  only, null if none], ``world_size`` (only when > 1), and ``final_<key>`` for
  every key of the last ``per_epoch`` record but ``epoch`` and ``steps``
  (``final_test_acc``, ``final_train_loss``, ...).

Experiments may add their own entries (probe results, curves), described in
their module. Stores written before the per-epoch records were renamed hold
them under ``epochs``; :meth:`StoredRun.metrics` reads them as ``per_epoch``.

Reading it back::

    from normlab.lab.store import load_table, load_curves
    runs = load_table("runs", "smoke-example", as_frame=True)      # one row per run: config + scalars
    curves = load_curves("runs", "smoke-example", as_frame=True)   # one row per run and epoch

``load_table`` flattens each complete run into one row (``experiment``,
``run_id``, the config with nested keys joined by dots, then the scalar
results; a result named like a config key becomes ``result.<key>``).
``load_curves`` gives a curve in long format for plotting (seaborn's
``x="epoch", y="test_acc", hue="norm"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from normlab._io import atomic_write

__all__ = [
    "RunStore",
    "StoredRun",
    "StoreError",
    "CorruptRunError",
    "run_id",
    "canonical_json",
    "write_json_atomic",
    "read_json",
    "scalars",
    "flatten",
    "load_table",
    "load_curves",
]

CLAIM = ".claim"  # inside a run folder: locked (flock) by the worker running it
QUARANTINE = ".quarantine"  # under the root: the files of corrupt runs, moved aside (never deleted)

CONFIG, ENV, METRICS, RESULT = "config.json", "env.json", "metrics.json", "result.json"
PER_EPOCH = "per_epoch"  # metrics key of the per-epoch records (stores before the rename: "epochs")

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class StoreError(ValueError):
    """A run store cannot be used as asked (a bad name, a root that is not a writable folder): one line."""


class CorruptRunError(StoreError):
    """A file of a stored run does not parse or holds the wrong kind of value; the message names the file."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def _nonfinite_text(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _jsonable(obj: Any) -> Any:
    """Dataclasses, tuples, paths, numpy and torch scalars → plain JSON types; non-finite floats → strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else _nonfinite_text(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return _jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    raise TypeError(f"cannot store a {type(obj).__name__} as JSON; convert it to numbers, strings, lists or dicts")


def _restore(obj: Any) -> Any:
    """The inverse of the non-finite encoding: ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` → floats."""
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    return obj


def canonical_json(obj: Any) -> str:
    """Strict JSON with sorted keys and no whitespace: equal configurations give equal strings."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def run_id(config: Any) -> str:
    """The run id of a configuration (dict or dataclass): 16 hex digits of the SHA-256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (:func:`normlab._io.atomic_write`)."""
    return atomic_write(path, json.dumps(_jsonable(obj), indent=1, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path`` with non-finite numbers restored; :class:`CorruptRunError` (naming it) if it is not JSON.

    A missing file raises :class:`FileNotFoundError`.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CorruptRunError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", Path(path)) from None
    try:
        return _restore(json.loads(text))
    except ValueError as e:  # json.JSONDecodeError, RecursionError is not a ValueError
        raise CorruptRunError(f"{path} is not valid JSON ({e})", Path(path)) from None
    except RecursionError:
        raise CorruptRunError(f"{path} is nested too deeply to be a run file", Path(path)) from None


def scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``metrics`` that are numbers, strings, booleans or None (curves and tables dropped)."""
    return {k: v for k, v in metrics.items() if v is None or isinstance(v, (bool, int, float, str))}


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → one level, keys joined by dots (``{"a": {"b": 1}}`` → ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclasses.dataclass(frozen=True)
class StoredRun:
    """One run folder. ``complete`` when its ``result.json`` exists.

    The readers raise :class:`CorruptRunError` (naming the file) when a file
    does not parse or does not hold a JSON object; :meth:`problem` says
    whether any file of the run is corrupt without raising.
    """

    path: Path
    experiment: str
    run_id: str

    @property
    def complete(self) -> bool:
        return (self.path / RESULT).is_file()

    def _read(self, name: str, *, missing_ok: bool = False) -> dict[str, Any]:
        p = self.path / name
        if missing_ok and not p.is_file():
            return {}
        try:
            obj = read_json(p)
        except CorruptRunError as e:
            raise CorruptRunError(self._corrupt(str(e)), p) from None
        if not isinstance(obj, dict):
            raise CorruptRunError(self._corrupt(f"{p} holds a JSON {type(obj).__name__}, not an object"), p)
        return obj

    def _corrupt(self, problem: str) -> str:
        quarantine = self.path.parent.parent / QUARANTINE
        return (
            f"run {self.experiment}/{self.run_id} is corrupt: {problem}; running it again (normlab run or train) "
            f"moves its files to {quarantine}/ and redoes it"
        )

    def config(self) -> dict[str, Any]:
        return self._read(CONFIG)

    def env(self) -> dict[str, Any]:
        return self._read(ENV, missing_ok=True)

    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` (per-epoch records under ``per_epoch``, also when an older store has them as ``epochs``)."""
        m = self._read(METRICS, missing_ok=True)
        if PER_EPOCH not in m and isinstance(m.get("epochs"), list):
            m[PER_EPOCH] = m.pop("epochs")
        return m

    def result(self) -> dict[str, Any]:
        return self._read(RESULT)

    def problem(self) -> str | None:
        """None if every file of the run that exists reads as a JSON object; else what is wrong, naming the file."""
        for name in (CONFIG, ENV, METRICS, RESULT):
            if (self.path / name).is_file():
                try:
                    obj = read_json(self.path / name)
                except CorruptRunError as e:
                    return str(e)
                if not isinstance(obj, dict):
                    return f"{self.path / name} holds a JSON {type(obj).__name__}, not an object"
            elif name == CONFIG:
                return f"{self.path / CONFIG} is missing"
        return None

    def row(self, *, with_metrics: bool = False) -> dict[str, Any]:
        """A flat dict: experiment, run_id, the config (dotted keys), then the scalar results.

        A result key that collides with a config key is stored as ``result.<key>``.
        ``with_metrics=True`` adds the non-scalar metrics (curves) under their own names.
        """
        row: dict[str, Any] = {"experiment": self.experiment, "run_id": self.run_id}
        row.update(flatten(self.config()))
        extra = self.metrics() if with_metrics else {}
        extra.update(self.result())
        for k, v in extra.items():
            if k == "run_id":
                continue
            row[f"result.{k}" if k in row else k] = v
        return row


class RunStore:
    """The folder ``root`` holding ``<experiment>/<run id>/`` run folders."""

    def __init__(self, root: str | os.PathLike = "runs") -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def run(self, experiment: str, config: Any) -> StoredRun:
        """The (possibly not yet existing) folder of the run with this configuration."""
        _check_name(experiment)
        rid = run_id(config)
        return StoredRun(self.root / experiment / rid, experiment, rid)

    def is_complete(self, experiment: str, config: Any) -> bool:
        return self.run(experiment, config).complete

    def ensure_writable(self) -> RunStore:
        """Create the root folder if needed and check that runs can be written there; :class:`StoreError` if not.

        Called before any run starts (a sweep, ``normlab train``), so that a bad
        ``--root`` fails at once with one line rather than after the training.
        """
        where = _short(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"run store {where} is not a folder; pass --root a folder (it is created if missing)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot create the run store {where}: {e.strerror or e}; pass --root a writable folder"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"run store {where} is not writable; pass --root a writable folder")
        return self

    def looks_like_store(self) -> bool:
        """Whether ``root`` is an (empty or missing) folder or holds what a run store holds.

        A store holds ``<experiment>/<run id>/config.json`` run folders,
        ``<experiment>/verdict.json`` files or a quarantine folder; any other
        non-empty folder (``/etc``, a home folder) is not one, and the report
        refuses to write into it.
        """
        if not self.root.exists():
            return True
        if not self.root.is_dir():
            return False
        try:
            entries = list(self.root.iterdir())
            if not entries or (self.root / QUARANTINE).is_dir():
                return True
            for folder in entries:
                if not folder.is_dir() or folder.name.startswith("."):
                    continue
                if (folder / "verdict.json").is_file():
                    return True
                if any(p.is_dir() and (p / CONFIG).is_file() for p in folder.iterdir()):
                    return True
        except OSError:
            return False
        return False

    def save(
        self,
        experiment: str,
        config: Any,
        metrics: Mapping[str, Any],
        *,
        env: Mapping[str, Any] | None = None,
    ) -> StoredRun:
        """Store one finished run; ``result.json`` (the scalars of ``metrics``) is written last."""
        stored = self.run(experiment, config)
        stored.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stored.path / CONFIG, config)
        if env is None:
            from normlab.lab.provenance import environment

            env = environment()
        write_json_atomic(stored.path / ENV, env)
        write_json_atomic(stored.path / METRICS, metrics)
        write_json_atomic(stored.path / RESULT, {"run_id": stored.run_id, **scalars(metrics)})
        return stored

    def quarantine(self, stored: StoredRun, reason: str) -> Path:
        """Move the files of ``stored`` (not its claim) to ``<root>/.quarantine/<experiment>/<id>-<time>/``.

        Nothing is deleted: the folder also gets ``reason.txt``. The run folder
        is left without files, so the run counts as not run. Returns the
        quarantine folder.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.root / QUARANTINE / stored.experiment / f"{stored.run_id}-{stamp}"
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{stored.run_id}-{stamp}-{n}")
        dest.mkdir(parents=True)
        for p in sorted(stored.path.iterdir()):
            if p.name != CLAIM:
                try:
                    os.replace(p, dest / p.name)
                except FileNotFoundError:  # moved meanwhile by another process quarantining the same run
                    pass
        atomic_write(dest / "reason.txt", f"{stored.experiment}/{stored.run_id}: {reason}\n")
        return dest

    def complete_or_quarantine(self, stored: StoredRun) -> bool:
        """Whether ``stored`` is complete and readable; a complete but corrupt run is quarantined (with a warning).

        What resuming calls before skipping a run: a corrupt run is then run again.
        """
        if not stored.complete:
            return False
        problem = stored.problem()
        if problem is None:
            return True
        dest = self.quarantine(stored, problem)
        warnings.warn(
            f"run {stored.experiment}/{stored.run_id} is corrupt ({problem}); its files were moved to {dest} "
            "and it is run again",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    def quarantined(self, experiment: str | None = None) -> list[Path]:
        """The quarantine folders (of one experiment, or of all), sorted."""
        base = self.root / QUARANTINE
        folders = [base / experiment] if experiment is not None else sorted(base.iterdir()) if base.is_dir() else []
        return sorted(p for f in folders if f.is_dir() for p in f.iterdir() if p.is_dir())

    def experiments(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def runs(self, experiment: str | None = None, *, complete_only: bool = True) -> Iterator[StoredRun]:
        """The stored runs of one experiment (or of all), sorted by experiment then run id."""
        names = [experiment] if experiment is not None else self.experiments()
        for name in names:
            folder = self.root / name
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if p.is_dir() and (p / CONFIG).is_file():
                    r = StoredRun(p, name, p.name)
                    if r.complete or not complete_only:
                        yield r

    def find(self, ref: str | os.PathLike) -> StoredRun:
        """A run from its folder path, ``<experiment>/<run id>``, or a run id (or a unique prefix of one).

        Raises :class:`FileNotFoundError` (with a one-line message) when no run or several match.
        """
        p = Path(ref)
        for cand in (p, self.root / p):
            try:
                if (cand / CONFIG).is_file():
                    return StoredRun(cand, cand.parent.name, cand.name)
            except OSError:  # a name too long for the file system, ...: not a path to a run
                pass
        ref = str(ref)
        hits = [r for r in self.runs(complete_only=False) if r.run_id.startswith(ref)] if ref else []
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise FileNotFoundError(
                f"no run {_short(ref)} under {self.root}/ (give a run folder, <experiment>/<id> or an id)"
            )
        raise FileNotFoundError(
            f"run id prefix {ref!r} is ambiguous under {self.root}/: {', '.join(r.run_id for r in hits[:5])}"
        )

    def table(self, experiment: str | None = None, *, with_metrics: bool = False, ids: Iterable[str] | None = None):
        """The complete runs as flat rows (see :meth:`StoredRun.row`).

        Optionally only the given run ids, in that order.
        """
        if ids is not None:
            want = list(ids)
            by_id = {r.run_id: r for r in self.runs(experiment)}
            return [by_id[i].row(with_metrics=with_metrics) for i in want if i in by_id]
        return [r.row(with_metrics=with_metrics) for r in self.runs(experiment)]


def _short(text: Any, limit: int = 80) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters (a 5000-character argument stays a one-line message)."""
    s = str(text)
    return repr(s) if len(s) <= limit else repr(s[:limit]) + f"... ({len(s)} characters)"


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name or len(name) > 200:
        raise StoreError(
            f"experiment name {_short(name)} must be a folder name: not empty, no slashes, not starting with '.'"
        )


def _frame(rows: list[dict[str, Any]], who: str):
    try:
        import pandas as pd
    except ImportError:
        msg = f"{who}(as_frame=True) needs pandas: pip install 'normlab[lab]' or pip install pandas"
        raise ImportError(msg) from None
    return pd.DataFrame(rows)


def load_table(
    root: str | os.PathLike = "runs",
    experiment: str | None = None,
    *,
    with_metrics: bool = False,
    as_frame: bool = False,
):
    """All complete runs under ``root`` (of one ``experiment``, or all): one flat dict per run.

    Each row holds ``experiment``, ``run_id``, the run's config (nested keys
    joined by dots: ``model_kwargs.width``) and its scalar results
    (``final_test_acc``, ``diverged``, ...; see the module docstring for
    ``metrics.json``); a result named like a config key becomes
    ``result.<key>``. ``with_metrics=True`` adds the curves (``step_loss``,
    ``per_epoch``, ...) as lists in their cells; for plotting use
    :func:`load_curves`, which gives them in long format.

    ``as_frame=True`` returns a pandas DataFrame instead (pandas is optional;
    without it this raises ImportError saying how to install it). A corrupt
    run file raises :class:`CorruptRunError` naming it.
    """
    rows = RunStore(root).table(experiment, with_metrics=with_metrics)
    return _frame(rows, "load_table") if as_frame else rows


def load_curves(
    root: str | os.PathLike = "runs",
    experiment: str | None = None,
    curve: str = PER_EPOCH,
    *,
    as_frame: bool = False,
):
    """A curve of every complete run in long format: one row per run and point, ready for pandas/seaborn.

    Every row starts with ``experiment``, ``run_id`` and the run's config
    (dotted keys, as in :func:`load_table`), then the point:

    * ``curve="per_epoch"`` (default): the epoch's record, one row per epoch:
      ``epoch``, ``steps``, ``train_loss``, ``test_acc``, ... (a record key
      named like a config key, such as the epoch's ``lr``, becomes
      ``per_epoch.lr``);
    * a list of numbers such as ``curve="step_loss"``: one row per element,
      with its index (``step`` for ``step_loss``, else ``index``) and the
      value under the curve's name.

    Runs without the curve are left out; if no run has it, :class:`KeyError`
    lists the curves that exist. ``as_frame=True`` returns a DataFrame, e.g.
    ``seaborn.lineplot(data=frame, x="epoch", y="test_acc", hue="norm")``.
    """
    store = RunStore(root)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    index_name = "step" if curve == "step_loss" else "index"
    for r in store.runs(experiment):
        metrics = r.metrics()
        seen.update(k for k, v in metrics.items() if isinstance(v, list))
        points = metrics.get(curve)
        if not isinstance(points, list):
            continue
        head = {"experiment": r.experiment, "run_id": r.run_id, **flatten(r.config())}
        for i, point in enumerate(points):
            row = dict(head)
            if isinstance(point, Mapping):
                for k, v in point.items():
                    row[f"{curve}.{k}" if k in head else k] = v
            else:
                row[index_name] = i
                row[curve] = point
            rows.append(row)
    if not rows and seen and curve not in seen:
        raise KeyError(f"no stored run has a curve {curve!r}; curves stored: {', '.join(sorted(seen))}")
    return _frame(rows, "load_curves") if as_frame else rows
