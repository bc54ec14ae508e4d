"""One way to write a file so that no reader ever sees half of it: :func:`atomic_write`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it, which races with other threads


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of the new one.

    ``data`` is bytes, text (written as UTF-8), or a function that writes into
    the binary file it is given (e.g. ``lambda f: fig.savefig(f, format="png")``).
    The content goes to a temporary file with a unique name in the same folder
    (so concurrent writers never share one), is flushed to disk, given the
    permissions a new file gets (``0666`` minus the umask, not ``mkstemp``'s
    ``0600``: a run store may be shared by a group), and renamed over ``path``.
    The temporary file is removed if anything fails. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
