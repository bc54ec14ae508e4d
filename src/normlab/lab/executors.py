"""Where the runs of a sweep run: in this process, on a local process pool, or on Ray.

:func:`sweep` runs every configuration that is not yet complete in the run
store and skips the others. Before running a run, a worker claims it with an
exclusive ``flock`` on ``<run folder>/.claim`` and checks again that it is not
complete, so a finished run is never run twice and a run claimed by a live
worker (another sweep over the same store) is not started by another; the
kernel releases a dead worker's lock, so there are no stale claims. A run
found complete but corrupt (a file that does not parse) is moved to the
store's quarantine folder and run again (:meth:`RunStore.complete_or_quarantine`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from normlab.lab.config import ConfigError
from normlab.lab.progress import Progress
from normlab.lab.provenance import environment
from normlab.lab.runtime import check_cpus
from normlab.lab.store import CLAIM, RunStore, StoredRun, run_id

__all__ = ["EXECUTORS", "SweepReport", "sweep", "claim_run"]

EXECUTORS = ("sequential", "local", "ray")  # where sweep() runs the runs; see sweep()


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
    if stored.complete and stored.problem() is None:
        return "stored", stored.run_id
    claim = claim_run(stored)
    if claim is None:
        return "busy", stored.run_id
    done = False
    try:
        if store.complete_or_quarantine(stored):  # finished by another worker between the check and the claim
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
    progress: bool | str = False,
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
    :func:`environment`). ``progress`` (True, or a mode of
    :mod:`normlab.lab.progress`) shows a bar on a terminal and, anywhere else,
    a line per finished run with the elapsed time and an ETA.

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
    store = _check_sweep(store, configs, experiment, executor, workers, address)
    bar = Progress(len(configs), desc or experiment, unit="run", progress=progress)
    status: dict[str, str] = {}

    def note(st: str, rid: str) -> None:
        if st == "busy":
            return
        status[rid] = st
        ran = sum(v == "ran" for v in status.values())
        bar.update(1, timed=st == "ran", ran=ran, stored=len(status) - ran)

    try:
        if executor == "sequential":
            _sweep_sequential(store, experiment, configs, run_fn, env_fn, note, poll)
        else:
            _sweep_parallel(store, experiment, configs, run_fn, env_fn, note, executor, workers, address, poll)
    finally:
        bar.close()
    return _report(store, experiment, configs, status)


def _check_sweep(store, configs, experiment, executor, workers, address) -> RunStore:
    """The store, writable, after checking the executor, the worker count and that the configs differ."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r} is not one of: {', '.join(map(repr, EXECUTORS))}")
    if workers is not None and not (executor == "ray" and address is not None):  # CPUs of this machine
        check_cpus("workers", workers)
    if not isinstance(store, RunStore):
        store = RunStore(store)
    ids = [run_id(c) for c in configs]
    if len(set(ids)) != len(ids):
        raise ConfigError(
            f"sweep {experiment!r}: the configurations are not all different (duplicate run ids); "
            "a list override probably names a value twice"
        )
    return store.ensure_writable()


def _sweep_parallel(store, experiment, configs, run_fn, env_fn, note, executor, workers, address, poll) -> None:
    """The runs not yet complete, on a local process pool or on Ray; the complete ones noted as stored.

    A corrupt run goes to the workers too: the one that claims it quarantines it and runs it again.
    """
    todo = []
    for c in configs:
        stored = store.run(experiment, c)
        if stored.complete and stored.problem() is None:
            note("stored", stored.run_id)
        else:
            todo.append(c)
    if todo:
        run = _pool_map if executor == "local" else _ray_map
        run(str(store.root), experiment, todo, run_fn, env_fn, note, workers=workers, address=address, poll=poll)


def _report(store: RunStore, experiment: str, configs: Sequence[Any], status: Mapping[str, str]) -> SweepReport:
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
            skip = launch.broadcast_object(store.complete_or_quarantine(stored) if launch.is_main_process() else None)
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


class _Results:
    """One round of parallel tasks: each outcome noted, the busy ones kept for the next round, the first error."""

    def __init__(self, note) -> None:
        self.note = note
        self.busy: list = []
        self.error: BaseException | None = None

    def take(self, config, get) -> bool:
        """Note ``get()``'s (status, run id); returns True on the first failure (the caller cancels the rest)."""
        try:
            st, rid = get()
        except BaseException as e:  # stop submitting; let the running ones finish
            first = self.error is None
            self.error = self.error or e
            return first
        self.note(st, rid)
        if st == "busy":
            self.busy.append(config)
        return False

    def next_round(self, poll: float) -> list:
        """The configs to submit again (claimed by a live worker elsewhere), after ``poll`` seconds; raises an error."""
        if self.error is not None:
            raise self.error
        if self.busy:
            time.sleep(poll)
        return self.busy


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
    n = workers or os.cpu_count() or 1  # workers is at most the CPU count (checked by sweep)
    with cf.ProcessPoolExecutor(max_workers=min(n, len(todo)), mp_context=multiprocessing.get_context("spawn")) as ex:
        pending = list(todo)
        while pending:
            futures = {ex.submit(_run_task, root, experiment, c, run_fn, env_fn): c for c in pending}
            results = _Results(note)
            for fut in cf.as_completed(futures):
                if results.take(futures[fut], fut.result):
                    for f in futures:
                        f.cancel()
            pending = results.next_round(poll)


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
        results = _Results(note)
        left = list(refs)
        while left:
            ready, left = ray.wait(left, num_returns=1)
            if results.take(refs[ready[0]], lambda: ray.get(ready[0])):  # noqa: B023 - called right here
                for r in left:
                    ray.cancel(r)
        pending = results.next_round(poll)
