"""The run store: every run's evidence on disk, written atomically, found again by its config.

Layout::

    <root>/<experiment>/<run id>/
        config.json    the resolved run configuration (what the id is computed from)
        env.json       python/torch/numpy versions, device, threads, seed, git revision, host, time
        metrics.json   everything the run returned: per-step and per-epoch curves and the scalars
        result.json    the scalar part of the metrics; written last: its presence marks the run complete

* **Atomic**: each file is written to a temporary file in the same folder,
  flushed, fsync-ed and moved into place with ``os.replace``, so a killed
  process leaves either the old file or the new one, never half of one.
  ``result.json`` is written last, so a run folder without it is incomplete
  and is simply run again.
* **Run ids** are the first 16 hex digits of the SHA-256 of the canonical JSON
  of the run configuration (sorted keys, no whitespace): the same configuration
  always maps to the same folder. A sweep (grid × seeds) therefore resumes
  after an interruption by skipping the ids whose ``result.json`` exists.
* JSON follows Python's ``json`` module: tuples become lists; non-finite
  floats (a diverged loss) are written as ``NaN`` / ``Infinity`` and read back
  as such.

``load_table(root, experiment)`` flattens the runs into one dict per run
(``experiment``, ``run_id``, the config with nested keys joined by dots, then
the scalar results) — or a pandas DataFrame with ``as_frame=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from normlab._io import atomic_write

__all__ = [
    "RunStore",
    "StoredRun",
    "run_id",
    "canonical_json",
    "write_json_atomic",
    "read_json",
    "scalars",
    "flatten",
    "load_table",
]

CLAIM = ".claim"  # inside a run folder: locked (flock) by the worker running it

CONFIG, ENV, METRICS, RESULT = "config.json", "env.json", "metrics.json", "result.json"


def _jsonable(obj: Any) -> Any:
    """Dataclasses, tuples, paths, numpy and torch scalars → plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return _jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} as JSON; convert it to numbers, strings, lists or dicts")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configurations give equal strings."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"))


def run_id(config: Any) -> str:
    """The run id of a configuration (dict or dataclass): 16 hex digits of the SHA-256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`normlab._io.atomic_write`)."""
    return atomic_write(path, json.dumps(_jsonable(obj), indent=1, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
    """One run folder. ``complete`` when its ``result.json`` exists."""

    path: Path
    experiment: str
    run_id: str

    @property
    def complete(self) -> bool:
        return (self.path / RESULT).is_file()

    def config(self) -> dict[str, Any]:
        return read_json(self.path / CONFIG)

    def env(self) -> dict[str, Any]:
        p = self.path / ENV
        return read_json(p) if p.is_file() else {}

    def metrics(self) -> dict[str, Any]:
        p = self.path / METRICS
        return read_json(p) if p.is_file() else {}

    def result(self) -> dict[str, Any]:
        return read_json(self.path / RESULT)

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
        """A run from its folder path, ``<experiment>/<run id>``, or a run id (or a unique prefix of one)."""
        p = Path(ref)
        for cand in (p, self.root / p):
            if (cand / CONFIG).is_file():
                return StoredRun(cand, cand.parent.name, cand.name)
        ref = str(ref)
        hits = [r for r in self.runs(complete_only=False) if r.run_id.startswith(ref)] if ref else []
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise FileNotFoundError(
                f"no run {ref!r} under {self.root}/ (give a run folder, <experiment>/<id> or an id)"
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


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"experiment name {name!r} must be a non-empty folder name without slashes")


def load_table(
    root: str | os.PathLike = "runs",
    experiment: str | None = None,
    *,
    with_metrics: bool = False,
    as_frame: bool = False,
):
    """All complete runs under ``root`` (of one ``experiment``, or all) as a list of flat dicts.

    ``as_frame=True`` returns a pandas DataFrame instead (pandas is optional;
    without it this raises ImportError saying how to install it).
    """
    rows = RunStore(root).table(experiment, with_metrics=with_metrics)
    if not as_frame:
        return rows
    try:
        import pandas as pd
    except ImportError:
        msg = "load_table(as_frame=True) needs pandas: pip install 'normlab[lab]' or pip install pandas"
        raise ImportError(msg) from None
    return pd.DataFrame(rows)
