"""Progress of long work: a live bar on a terminal, complete log lines anywhere else.

A bar (tqdm) redraws itself with carriage returns; in a file or a pipe that is
a stream of bar fragments. So the display depends on where stderr goes:

* ``"bar"``: stderr is a terminal (and tqdm is installed): tqdm bars;
* ``"lines"``: anywhere else: whole lines, each with the count, the elapsed
  time and an estimate of the time left (ETA), at most one every
  ``interval`` seconds (a sweep also prints its first and its last line);
* ``"off"``: nothing.

``progress=True`` means ``"auto"`` (bar or lines as above), ``False`` means
``"off"``, and a mode name forces that mode. The environment variable
``NORMLAB_PROGRESS`` (``auto`` | ``bar`` | ``lines`` | ``off``) replaces
``"auto"``; the ``normlab`` command's ``--no-progress`` sets it to ``lines``
(no bars, but still a line per finished run), and it is inherited by worker
processes. Progress goes to stderr; results go to stdout.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["MODES", "Progress", "resolve_mode", "format_duration", "ENV_VAR"]

MODES = ("auto", "bar", "lines", "off")
ENV_VAR = "NORMLAB_PROGRESS"
SWEEP_INTERVAL = 5.0  # seconds between two lines of a sweep (one line per finished run, at most this often)
TRAIN_INTERVAL = 30.0  # seconds without any progress line before a training run prints where it is

_last_line = [-math.inf]  # time.monotonic() of the last line printed by any Progress in this process


def resolve_mode(progress: bool | str, stream: TextIO | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for ``progress`` (a bool or a mode name) and the ``stream`` (stderr)."""
    if progress is False or progress is None:
        return "off"
    mode = "auto" if progress is True else str(progress)
    if mode == "auto":
        mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r} (argument or ${ENV_VAR}) is not one of: {', '.join(MODES)}")
    if mode == "auto":
        stream = sys.stderr if stream is None else stream
        isatty = getattr(stream, "isatty", None)
        mode = "bar" if callable(isatty) and isatty() else "lines"
    if mode == "bar":
        try:
            import tqdm  # noqa: F401
        except ImportError:  # the lab extra is not installed: lines work without it
            mode = "lines"
    return mode


def format_duration(seconds: float) -> str:
    """``"42s"``, ``"3m05s"``, ``"2h07m"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Progress over ``total`` units of work (runs of a sweep, steps of a training run).

    ``update(n, timed=..., **postfix)`` after each unit: ``timed=False`` for
    units that took no time (a run found stored), so they do not shorten the
    ETA; ``postfix`` values are shown after the count. ``close()`` at the end.

    In ``"lines"`` mode a line is printed when ``interval`` seconds have passed
    since the last line of this object (``own=True``) or of any object in this
    process (``own=False``: a training run inside a sweep stays quiet unless
    it runs long); ``first`` / ``last`` also print the first and the final update.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "run",
        progress: bool | str = True,
        interval: float = SWEEP_INTERVAL,
        own: bool = True,
        first: bool = True,
        last: bool = True,
        leave: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.stream = stream
        self.mode = resolve_mode(progress, self._stream())
        self.interval, self.own, self.first, self.last = interval, own, first, last
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.timed = 0  # units that took time (the ETA's rate)
        self.timed_elapsed = 0.0  # time spent on them
        self._mark = self.start
        self._printed = -math.inf if first else self.start  # without `first`, the first line waits `interval`
        self.postfix: dict[str, Any] = {}
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=leave, file=self._stream())

    def _stream(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def update(self, n: int = 1, *, timed: bool = True, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` (e.g. ``loss=...``) is kept and shown until replaced."""
        if self.mode == "off":
            return
        now = self.clock()
        self.postfix.update(postfix)
        self.done += n
        if timed:
            self.timed += n
            self.timed_elapsed += now - self._mark
        self._mark = now
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(**self.postfix)
        elif self.mode == "lines":
            since = now - (self._printed if self.own else max(self._printed, _last_line[0]))
            forced = (self.first and self._printed == -math.inf) or (self.last and self.done >= self.total)
            if forced or since >= self.interval:
                self._line(now)

    def set_postfix(self, **postfix: Any) -> None:
        """Show ``postfix`` (e.g. ``loss=...``) from now on, without counting a unit."""
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.set_postfix(**self.postfix)

    def eta(self) -> float:
        """Seconds left at the rate of the timed units so far (``nan`` before the first one)."""
        left = max(self.total - self.done, 0)
        if left == 0:
            return 0.0
        return self.timed_elapsed / self.timed * left if self.timed else math.nan

    def _line(self, now: float) -> None:
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        text = (
            f"{self.desc}: {self.done}/{self.total} {self.unit}s{extra}, "
            f"elapsed {format_duration(now - self.start)}, ETA {format_duration(self.eta())}"
        )
        stream = self._stream()
        print(text, file=stream, flush=True)
        self._printed = _last_line[0] = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
