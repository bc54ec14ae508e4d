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
"""

from __future__ import annotations

import atexit
import datetime
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
    timeout = datetime.timedelta(seconds=float(os.environ.get("NORMLAB_DIST_TIMEOUT", "600")))
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    atexit.register(_destroy)


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
    Rank 0's output passes through; the others' standard output is discarded
    (their errors are shown). If a process fails, the others are terminated.
    Returns the first non-zero exit status, else 0.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    port = _free_port()
    procs: list[subprocess.Popen] = []
    for i in range(nproc):
        env = dict(os.environ)
        env.update(
            RANK=str(i),
            LOCAL_RANK=str(i),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        out = None if i == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env, stdout=out))
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                status = failed[0]
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        status = 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if status == 130 else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return 128 - status if status < 0 else status  # killed by signal s: 128 + s, as a shell reports it
