"""Distributed-training plumbing: ``torch.distributed`` set-up, data sharding, DDP, and a local launcher.

One code path for every launch:

* under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``),
  :func:`normlab.lab.train.train` calls :func:`setup`, which joins the process
  group (``init_method="env://"``) once per process; the backend is ``nccl``
  when the run's device is CUDA (each process then uses ``cuda:<LOCAL_RANK>``)
  and ``gloo`` otherwise;
* ``normlab train ... --nproc N`` / ``normlab run ... --nproc N`` re-run the
  same command in ``N`` local processes with exactly those variables set
  (:func:`run_local`), i.e. what ``torchrun --standalone --nproc-per-node N``
  does.

Conventions
-----------
* ``batch_size`` is the **global** batch: every process draws the same
  seeded global batch and keeps its contiguous slice, rows
  ``[r*B//W, (r+1)*B//W)`` for rank ``r`` of ``W`` (so ``B`` need not be a
  multiple of ``W``; the slices then differ by one row). Every process holds
  the whole (in-memory) dataset.
* The loss a process back-propagates is ``sum(local CE) * W / B``; DDP
  averages gradients over the ``W`` processes, so the update is the gradient
  of the mean cross-entropy over the global batch, exactly as in one
  process, even for uneven slices. BatchNorm layers become
  :class:`normlab.layers.sync.SyncBatchNorm` (statistics of the global batch)
  unless ``TrainConfig.sync_bn=False``, in which case each process normalises
  with the statistics of its own slice (and DDP broadcasts rank 0's running
  statistics at each forward).
* Recorded numbers are global: ``step_loss`` is the mean loss over the global
  batch, train accuracy counts over the global batch (the per-step pairs are
  all-reduced every ``sync_every`` steps, so every process sees the same
  numbers and stops at the same step). Evaluation runs on every process over
  the whole test set (the replicas are identical).
* Only rank 0 writes the run store (:func:`is_main_process`).
* A ``callback`` passed to ``train`` runs on every process, and its
  ``state.loss`` is that process's back-propagated loss (``sum(local CE) *
  W / B``, not the global mean); if it stops a run, it must decide
  identically on every process.

Failures
--------
* **Timeout**: a collective (the gradient all-reduce of every step, the loss
  all-reduce every ``sync_every`` steps, a barrier) that waits longer than
  ``NORMLAB_DIST_TIMEOUT`` seconds fails the run on the processes still
  alive: that is how a hung or stopped peer ends a run. The default is
  proportionate to what a process waits for in a healthy run (the skew of
  one step or one evaluation between processes): **120 s with gloo** (CPU)
  and 600 s with nccl (GPUs, where a first step may also compile kernels).
  Raise it for models whose single step takes minutes.
* **The local launcher** (``--nproc``, :func:`run_local`) watches its
  processes every 0.2 s. When one fails it stops the others and prints one
  line naming every failed rank, its pid and how it ended (``rank 1 (pid
  4242) was killed by signal SIGKILL``, ``... exited with status 1``, ``...
  is stopped``); its exit status is the first failed rank's (128 + signal
  for a signal, as a shell reports it). On Linux each process is started
  with ``PR_SET_PDEATHSIG``: if the launcher itself dies (even by ``kill
  -9``), the kernel sends its processes ``SIGTERM``, so none is orphaned.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DistContext",
    "setup",
    "join_from_env",
    "env_world_size",
    "is_main_process",
    "rank",
    "run_local",
    "timeout",
    "DEFAULT_TIMEOUT",
    "broadcast_object",
    "barrier",
]

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): the number of processes a launcher started."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group if one is active, else ``RANK`` from the environment, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """True on rank 0 (and in every single-process run): the process that writes the run store."""
    return rank() == 0


def _want_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _init_group(device: str) -> None:
    """Join the process group from the environment (once per process); ``nccl`` for CUDA, ``gloo`` otherwise."""
    if dist.is_initialized() or env_world_size() <= 1:
        return
    missing = [k for k in _ENV_KEYS if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set; launch with torchrun or normlab --nproc"
        )
    backend = "nccl" if _want_cuda(device) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, init_method="env://", timeout=timeout(backend))
    atexit.register(_destroy)


DEFAULT_TIMEOUT = {"gloo": 120.0, "nccl": 600.0}  # seconds a collective may wait; see "Failures" above


def timeout(backend: str) -> datetime.timedelta:
    """How long a collective may wait: ``NORMLAB_DIST_TIMEOUT`` seconds, else the backend's default."""
    text = os.environ.get("NORMLAB_DIST_TIMEOUT")
    if text is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT.get(backend, 600.0))
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        from normlab.lab.config import ConfigError

        raise ConfigError(f"NORMLAB_DIST_TIMEOUT={text!r} must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every process (returned unchanged without an active process group)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every process (no-op without an active process group)."""
    if _active():
        dist.barrier()


def join_from_env(device: str = "auto") -> bool:
    """Join the process group if a launcher set ``WORLD_SIZE > 1``; return whether one is active."""
    _init_group(device)
    return _active()


@dataclass
class DistContext:
    """One process's view of a data-parallel run (see the module docstring for the conventions)."""

    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: nn.Module, *, sync_bn: bool) -> nn.Module:
        """Convert BN to SyncBatchNorm (``sync_bn``) in place, then wrap in DDP; returns the DDP module.

        The BN conversion shares the parameter tensors, so ``model`` (possibly
        with converted children) stays the module to evaluate and return.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        if sync_bn:
            from normlab.layers.sync import convert_sync_batchnorm

            converted = convert_sync_batchnorm(model)
            if converted is not model:
                raise ValueError("sync_bn: the model itself is a BatchNorm layer; wrap it in a container module")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def shard(self, x: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, int]:
        """This rank's slice of a global batch: rows ``[r*B//W, (r+1)*B//W)``; also returns ``B``."""
        n = y.shape[0]
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        return x[lo:hi], y[lo:hi], None if mask is None else mask[lo:hi], n

    def loss(self, out: Tensor, y: Tensor, n_global: int) -> tuple[Tensor, Tensor]:
        """``(loss to back-propagate, this rank's share of the global mean loss)``.

        The first is ``sum(CE) * W / B`` (DDP's gradient average then gives the
        global mean's gradient); the second, ``sum(CE) / B``, sums over the
        ranks to the global mean loss.
        """
        share = F.cross_entropy(out, y, reduction="sum") / n_global
        return share * self.world_size, share

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the processes, in place (on CPU for ``gloo``); returns it."""
        if self.device.type == "cuda":
            dist.all_reduce(t)
            return t
        cpu = t.cpu()
        dist.all_reduce(cpu)
        t.copy_(cpu)
        return t


def setup(device: str = "auto") -> DistContext | None:
    """The :class:`DistContext` of this process, or None for a single-process run.

    Joins the process group from the environment when a launcher set
    ``WORLD_SIZE > 1`` (or uses one the caller initialised). The device is
    ``cuda:<LOCAL_RANK>`` when ``device`` asks for CUDA (``"auto"`` with CUDA
    available, ``"cuda"``); an explicit ``"cuda:<i>"`` is refused (each
    process takes the GPU of its local rank). Other devices are used as given.
    """
    from normlab.lab.config import ConfigError
    from normlab.lab.runtime import resolve_device

    _init_group(device)
    if not _active():
        return None
    if _want_cuda(device):
        if device.startswith("cuda:"):
            raise ConfigError(
                f"device={device!r}: under torch.distributed use device=cuda (or auto); "
                "each process takes cuda:<LOCAL_RANK>"
            )
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        dev = resolve_device(device)
    return DistContext(dist.get_rank(), dist.get_world_size(), dev)


# --------------------------------------------------------------------------- local launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(argv: Sequence[str], nproc: int, *, module: str = "normlab", poll: float = 0.2) -> int:
    """Run ``python -m <module> <argv>`` in ``nproc`` local processes, as ``torchrun --standalone`` would.

    Each process gets ``RANK = LOCAL_RANK = i``, ``WORLD_SIZE = nproc``,
    ``LOCAL_WORLD_SIZE = nproc``, ``MASTER_ADDR=127.0.0.1`` and a free
    ``MASTER_PORT``; ``OMP_NUM_THREADS`` defaults to ``cpu_count // nproc``.
    ``nproc`` is at most the CPU count (a ConfigError otherwise). Rank 0's
    output passes through; the others' standard output is discarded (their
    errors are shown). If a process fails, the others are stopped and one
    line on standard error names each failed rank and how it ended (see
    "Failures" in the module docstring). Returns the first non-zero exit
    status (128 + signal for a signal), else 0.
    """
    from normlab.lab.runtime import check_cpus

    check_cpus("nproc", nproc)
    port = _free_port()
    procs = [_start_rank(i, nproc, port, argv, module) for i in range(nproc)]
    failed: list[tuple[int, int]] = []
    interrupted = False
    try:
        failed = _wait_for_failure(procs, poll)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if failed or interrupted:
            stopped = [i for i, p in enumerate(procs) if p.poll() is None and _is_stopped(p.pid)]
            if failed:
                print(f"normlab: {_describe(procs, failed, stopped)}; stopping the other processes", file=sys.stderr)
        _stop(procs, signal.SIGINT if interrupted else signal.SIGTERM)
    if interrupted:
        return 130
    status = failed[0][1] if failed else next((p.returncode for p in procs if p.returncode != 0), 0)
    return 128 - status if status < 0 else status  # killed by signal s: 128 + s, as a shell reports it


def _start_rank(rank: int, nproc: int, port: int, argv: Sequence[str], module: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    out = None if rank == 0 else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", module, *argv], env=env, stdout=out, preexec_fn=_die_with_parent())


def _die_with_parent():
    """A ``preexec_fn`` that makes the child receive SIGTERM when this process dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before the line above ran
            os._exit(1)

    return preexec


def _wait_for_failure(procs: Sequence[subprocess.Popen], poll: float) -> list[tuple[int, int]]:
    """Wait until every process has exited (returns ``[]`` if all exited 0) or one failed: ``[(rank, code)]``."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed or all(c is not None for c in codes):
            return failed
        time.sleep(poll)


def _is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, a debugger); False where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _describe(procs: Sequence[subprocess.Popen], failed: list[tuple[int, int]], stopped: list[int]) -> str:
    """``rank 1 (pid 4242) was killed by signal SIGKILL; rank 0 (pid 4241) exited with status 1``."""
    parts = []
    for rank, code in failed:
        if code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        parts.append(f"rank {rank} (pid {procs[rank].pid}) {how}")
    parts += [f"rank {r} (pid {procs[r].pid}) is stopped (SIGSTOP or a debugger)" for r in stopped]
    return "; ".join(parts)


def _stop(procs: Sequence[subprocess.Popen], sig: int, grace: float = 10.0) -> None:
    """Send ``sig`` to the processes still running (and SIGCONT, so stopped ones act on it); kill after ``grace`` s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
            p.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
