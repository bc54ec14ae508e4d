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
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab._io import atomic_write

__all__ = [
    "RunStore",
    "StoredRun",
    "SweepReport",
    "run_id",
    "canonical_json",
    "write_json_atomic",
    "read_json",
    "environment",
    "git_revision",
    "source_hash",
    "scalars",
    "flatten",
    "load_table",
    "sweep",
    "claim_run",
    "EXECUTORS",
]

EXECUTORS = ("sequential", "local", "ray")  # where sweep() runs the runs; see sweep()
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


_GIT: dict[str, str | None] = {}


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    """The git commit of the source tree (``+dirty`` if it has uncommitted changes), or None outside git.

    Read-only: runs ``git rev-parse HEAD`` and ``git status --porcelain``.
    """
    where = str(Path(path) if path is not None else Path(__file__).resolve().parents[1])
    if where not in _GIT:
        try:
            rev = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=where,
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            _GIT[where] = rev + ("+dirty" if dirty else "") if rev else None
        except (OSError, subprocess.SubprocessError):
            _GIT[where] = None
    return _GIT[where]


_SOURCE_HASH: str | None = None


def source_hash() -> str:
    """A short hash of normlab's own source files (``*.py`` and ``*.c`` under the package).

    Stored with every run so that runs made by different code are told apart
    even when the git revision is not (uncommitted or untracked changes).
    """
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        import hashlib

        pkg = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for f in sorted(p for p in pkg.rglob("*") if p.suffix in (".py", ".c") and "__pycache__" not in p.parts):
            h.update(str(f.relative_to(pkg)).encode())
            h.update(f.read_bytes())
        _SOURCE_HASH = h.hexdigest()[:12]
    return _SOURCE_HASH


def environment(*, device: str | None = None, seed: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """What a run ran on: versions, device, threads, seed, git revision, host and time (UTC, ISO 8601)."""
    import numpy
    import torch

    try:
        from normlab import __version__ as normlab_version
    except ImportError:  # pragma: no cover - partial installs
        normlab_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "normlab": normlab_version,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if device and str(device).startswith("cuda") else None,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "seed": seed,
        "git_revision": git_revision(),
        "source_hash": source_hash(),
        "hostname": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": list(sys.argv),
    }


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
        write_json_atomic(stored.path / ENV, env if env is not None else environment())
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


class _Claim:
    """An exclusive, non-blocking ``flock`` on ``<run folder>/.claim``, held while a worker runs that run.

    The kernel releases the lock when the holder exits, however it exits
    (a crash, ``kill -9``), so a claim never goes stale on one machine: a run
    claimed by a live worker is never started by another, and a dead worker's
    run can be claimed at once. The file records ``pid``, ``host`` and ``time``
    of the holder, for people; the lock, not the content, is the claim.
    Across machines this relies on the shared file system's locks (NFSv4
    emulates ``flock`` with byte-range locks).
    """

    def __init__(self, stored: StoredRun) -> None:
        self.stored = stored
        self.fd: int | None = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): no cross-process claims; sequential sweeps are unaffected
            fcntl = None
        self.stored.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.stored.path / CLAIM, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, info)
        return True

    def release(self, *, done: bool) -> None:
        """Drop the lock; ``done`` (the run is complete) also removes the file (a later holder sees it complete)."""
        if self.fd is None:
            return
        if done:
            try:
                os.unlink(self.stored.path / CLAIM)
            except FileNotFoundError:
                pass
        os.close(self.fd)  # releases the flock
        self.fd = None


def claim_run(stored: StoredRun) -> _Claim | None:
    """Claim a run for this process: the held claim (call ``release(done=...)``), or None if a live worker holds it."""
    c = _Claim(stored)
    return c if c.acquire() else None


def _run_task(root: str, experiment: str, config: Any, run_fn: Callable, env_fn: Callable | None) -> tuple[str, str]:
    """Run one configuration into the store unless it is complete or claimed: ``(status, run id)``.

    ``status`` is ``"ran"``, ``"stored"`` (found complete) or ``"busy"`` (a
    live worker holds its claim). The worker writes the run folder itself
    (each file atomically, ``result.json`` last). Module-level, so that
    process pools and Ray can ship it.
    """
    store = RunStore(root)
    stored = store.run(experiment, config)
    if stored.complete:
        return "stored", stored.run_id
    claim = claim_run(stored)
    if claim is None:
        return "busy", stored.run_id
    done = False
    try:
        if stored.complete:  # finished by another worker between the check and the claim
            done = True
            return "stored", stored.run_id
        metrics = run_fn(config)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"the run function must return a dict of metrics, got {type(metrics).__name__}")
        env = env_fn(config) if env_fn is not None else environment()
        store.save(experiment, config, metrics, env=env)
        done = True
        return "ran", stored.run_id
    finally:
        claim.release(done=done)


@dataclasses.dataclass
class SweepReport:
    """What :func:`sweep` did: the runs in grid order, and which were run now or found stored."""

    runs: list[StoredRun]
    ran: list[str]  # run ids executed by this call
    skipped: list[str]  # run ids already complete in the store (or completed meanwhile by another worker)

    def rows(self, *, with_metrics: bool = False) -> list[dict[str, Any]]:
        return [r.row(with_metrics=with_metrics) for r in self.runs]


def sweep(
    store: RunStore | str | os.PathLike,
    experiment: str,
    configs: Sequence[Any],
    run_fn: Callable[[Any], Mapping[str, Any]],
    *,
    env_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    progress: bool = False,
    desc: str | None = None,
    executor: str = "sequential",
    workers: int | None = None,
    address: str | None = None,
    poll: float = 1.0,
) -> SweepReport:
    """Run every configuration whose result is not stored yet; skip the others.

    ``run_fn(config) -> metrics`` runs one configuration; its metrics are
    stored under ``run_id(config)`` (``config`` must be JSON-able: a dict or
    a dataclass). ``env_fn(config)`` gives ``env.json`` (default:
    :func:`environment`).

    Where the runs run (``executor``):

    * ``"sequential"`` (default): one after the other in this process, in the
      given order; an exception in one stops the sweep (earlier runs stay
      stored) and propagates, so calling ``sweep`` again resumes with the
      first unfinished run. Under ``torch.distributed`` (``torchrun``) every
      process runs every run together and only rank 0 writes the store.
    * ``"local"``: a pool of ``workers`` processes (default: the CPU count;
      ``spawn`` start method), one task per run. ``run_fn`` and ``env_fn``
      must be picklable (module-level functions or ``functools.partial`` of
      them). On the first failure no new run starts, the running ones finish,
      and the error propagates (a killed worker gives
      ``concurrent.futures.process.BrokenProcessPool``).
    * ``"ray"``: one Ray task per run (``num_cpus=1``) on the cluster at
      ``address`` (``"auto"`` for the one this machine belongs to), or on a
      local instance started here (``workers`` CPUs) when ``address`` is None
      and Ray is not initialised yet. Needs ``pip install 'normlab[dist]'``;
      every node must see the store's folder (a shared file system).

    The store is the single source of truth: before running a run a worker
    claims it (an exclusive ``flock`` on ``<run folder>/.claim``, released
    by the kernel when the worker dies), re-checks that it is not complete,
    then writes its folder atomically (``result.json`` last). A finished run
    is never run twice; a run claimed by a live worker (another sweep over
    the same store) is not started: this call waits for it (checking every
    ``poll`` seconds) and runs it itself if that worker dies first.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not one of: {', '.join(map(repr, EXECUTORS))}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not isinstance(store, RunStore):
        store = RunStore(store)
    ids = [run_id(c) for c in configs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"sweep {experiment!r}: the configurations are not all different (duplicate run ids)")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(configs), desc=desc or experiment, unit="run")
    status: dict[str, str] = {}

    def note(st: str, rid: str) -> None:
        if st == "busy":
            return
        status[rid] = st
        if bar is not None:
            bar.update(1)
            ran = sum(v == "ran" for v in status.values())
            bar.set_postfix(ran=ran, stored=len(status) - ran)

    try:
        if executor == "sequential":
            _sweep_sequential(store, experiment, configs, run_fn, env_fn, note, poll)
        else:
            todo = [c for c in configs if not store.run(experiment, c).complete]
            for c in configs:
                if store.run(experiment, c).complete:
                    note("stored", run_id(c))
            if todo:
                run = _pool_map if executor == "local" else _ray_map
                run(
                    str(store.root), experiment, todo, run_fn, env_fn, note, workers=workers, address=address, poll=poll
                )
    finally:
        if bar is not None:
            bar.close()
    runs = [store.run(experiment, c) for c in configs]
    return SweepReport(
        runs,
        [r.run_id for r in runs if status.get(r.run_id) == "ran"],
        [r.run_id for r in runs if status.get(r.run_id) == "stored"],
    )


def _sweep_sequential(store, experiment, configs, run_fn, env_fn, note, poll) -> None:
    from normlab.lab import launch

    if launch.join_from_env():  # torchrun: all processes run each run together; rank 0 decides and writes
        for config in configs:
            stored = store.run(experiment, config)
            skip = launch.broadcast_object(stored.complete)
            if skip:
                note("stored", stored.run_id)
                continue
            metrics = run_fn(config)
            if launch.is_main_process():
                if not isinstance(metrics, Mapping):
                    raise TypeError(f"the run function must return a dict of metrics, got {type(metrics).__name__}")
                store.save(experiment, config, metrics, env=env_fn(config) if env_fn is not None else environment())
            launch.barrier()
            note("ran", stored.run_id)
        return
    busy = list(configs)
    while busy:
        waiting = []
        for config in busy:
            st, rid = _run_task(str(store.root), experiment, config, run_fn, env_fn)
            note(st, rid)
            if st == "busy":
                waiting.append(config)
        busy = waiting
        if busy:
            time.sleep(poll)


def _pool_map(root, experiment, todo, run_fn, env_fn, note, *, workers, address, poll) -> None:
    import concurrent.futures as cf
    import multiprocessing
    import pickle

    try:
        pickle.dumps((run_fn, env_fn))
    except Exception as e:
        raise TypeError(
            "executor='local' needs a picklable run function and env function (module-level functions or "
            f"functools.partial of them): {e}"
        ) from None
    n = workers or os.cpu_count() or 1
    with cf.ProcessPoolExecutor(max_workers=min(n, len(todo)), mp_context=multiprocessing.get_context("spawn")) as ex:
        pending = list(todo)
        while pending:
            futures = {ex.submit(_run_task, root, experiment, c, run_fn, env_fn): c for c in pending}
            busy, error = [], None
            for fut in cf.as_completed(futures):
                try:
                    st, rid = fut.result()
                except BaseException as e:  # stop submitting; let the running ones finish
                    if error is None:
                        error = e
                        for f in futures:
                            f.cancel()
                    continue
                note(st, rid)
                if st == "busy":
                    busy.append(futures[fut])
            if error is not None:
                raise error
            pending = busy
            if pending:
                time.sleep(poll)


def _ray_map(root, experiment, todo, run_fn, env_fn, note, *, workers, address, poll) -> None:
    try:
        import ray
    except ImportError:
        raise ImportError("executor='ray' needs Ray: pip install 'normlab[dist]' (or pip install 'ray>=2')") from None
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    task = ray.remote(num_cpus=1)(_run_task)
    root = str(Path(root).resolve())
    pending = list(todo)
    while pending:
        refs = {task.remote(root, experiment, c, run_fn, env_fn): c for c in pending}
        busy, error = [], None
        left = list(refs)
        while left:
            ready, left = ray.wait(left, num_returns=1)
            try:
                st, rid = ray.get(ready[0])
            except BaseException as e:
                if error is None:
                    error = e
                    for r in left:
                        ray.cancel(r)
                continue
            note(st, rid)
            if st == "busy":
                busy.append(refs[ready[0]])
        if error is not None:
            raise error
        pending = busy
        if pending:
            time.sleep(poll)
