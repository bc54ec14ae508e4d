"""What a run ran on, so that its numbers can be traced: versions, device, threads, seed, git revision, source hash."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["environment", "git_revision", "source_hash"]


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
_SOURCE_SUFFIXES = (
    ".py",
    ".c",
    ".inc",
    ".cpp",
)  # the kernels' bodies are in csrc/norm_kernels.inc, the C++ operators in .cpp


def source_hash() -> str:
    """A short hash of normlab's own source files (``*.py``, ``*.c``, ``*.inc`` and ``*.cpp`` under the package).

    Stored with every run so that runs made by different code are told apart
    even when the git revision is not (uncommitted or untracked changes).
    """
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        _SOURCE_HASH = tree_hash(Path(__file__).resolve().parents[1])
    return _SOURCE_HASH


def tree_hash(folder: Path) -> str:
    """12 hex digits of a SHA-256 over the names and bytes of the source files under ``folder``, in sorted order."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.suffix in _SOURCE_SUFFIXES and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _device_used(device: Any) -> str | None:
    """The device a run with ``device`` runs on: ``"auto"`` resolved (``"cpu"``, ``"cuda"``, ...), others as given."""
    if device is None or str(device) != "auto":
        return None if device is None else str(device)
    from normlab.lab.runtime import resolve_device

    return str(resolve_device("auto"))


def environment(*, device: str | None = None, seed: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """What a run ran on: versions, device, threads, seed, git revision, host and time (UTC, ISO 8601).

    ``device`` is recorded as the device used: ``"auto"`` is resolved to what it
    means on this machine (``"cpu"``, ``"cuda"``), and the request is kept as
    ``device_requested`` when it differs.
    """
    import numpy
    import torch

    used = _device_used(device)

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
        "device": used,
        **({"device_requested": str(device)} if used != (None if device is None else str(device)) else {}),
        "cuda": torch.cuda.get_device_name(torch.device(used)) if used and used.startswith("cuda") else None,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "seed": seed,
        "git_revision": git_revision(),
        "source_hash": source_hash(),
        "hostname": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": list(sys.argv),
    }
