"""The process a run lives in: the C allocator's policy, the device and how many CPUs it may ask for.

:func:`tune_allocator` asks glibc's ``malloc`` to keep large blocks (a fresh
activation of a few megabytes is otherwise ``mmap``-ed and page-faulted anew on
every step); :func:`resolve_device` turns ``"auto"``/``"cuda:1"``/... into a
``torch.device`` that exists here, or a :class:`~normlab.lab.config.ConfigError`;
:func:`check_cpus` refuses a thread or process count above the machine's CPU
count (``threads=100000`` would otherwise crash the process mapping thread stacks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from normlab.lab.config import DEVICE_PATTERN, ConfigError

__all__ = ["tune_allocator", "resolve_device", "check_cpus"]


_ALLOCATOR_TUNED: bool | None = None
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3


def tune_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Tell glibc's malloc to keep blocks up to ``threshold_bytes`` (default 1 GiB) instead of mapping them anew.

    Sets ``M_MMAP_THRESHOLD`` (allocations below it come from the heap, not a
    fresh ``mmap``) and ``M_TRIM_THRESHOLD`` (free memory at the heap top is
    kept up to this size) with ``mallopt``, which is what the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do.
    Activations of a few megabytes are then reused from the heap on every step
    instead of being page-faulted anew. The cost is that up to
    ``threshold_bytes`` of freed memory stays with the process.

    Process-wide and idempotent; returns whether the setting is in effect.
    Does nothing (returns False) on a non-glibc platform or when
    ``NORMLAB_TUNE_MALLOC=0`` is set.
    """
    global _ALLOCATOR_TUNED
    if os.environ.get("NORMLAB_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            value = ctypes.c_int(min(int(threshold_bytes), 2**31 - 1))  # mallopt takes a C int
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, value)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, value))
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            ok = False
    _ALLOCATOR_TUNED = ok
    return ok


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; any other name is checked and returned as a ``torch.device``."""
    name = str(device)
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"device={name!r} is not one of: 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} requested but CUDA is not available here; use device=cpu or device=auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device='mps' requested but MPS is not available here; use device=cpu or device=auto")
    return torch.device(name)


def check_cpus(what: str, n: int | None) -> int | None:
    """Return ``n`` if it is None or in ``[1, os.cpu_count()]``; else raise a one-line ConfigError.

    ``what`` names the setting in the message (``"threads"``, ``"--workers"``,
    ``"--nproc"``). Threads, pool workers and DDP processes beyond the CPUs
    of the machine only oversubscribe it, and a count in the tens of thousands
    kills the process (thread stacks cannot be mapped), so they are refused.
    """
    if n is None:
        return None
    cpus = os.cpu_count() or 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cpus:
        raise ConfigError(f"{what}={n!r} must be between 1 and {cpus} (the CPUs of this machine)")
    return n
