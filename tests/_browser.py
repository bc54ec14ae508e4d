"""Headless Chromium driven over the DevTools protocol on a pipe — standard library only.

Chromium started with ``--remote-debugging-pipe`` reads protocol commands
from file descriptor 3 and writes replies and events to descriptor 4, each
message a JSON text ended by a NUL byte. That is all this needs: no
websocket library, no port, nothing listening.

``chromium()`` finds the browser, installing Debian's ``chromium`` package
with ``scripts/ensure_chromium.sh`` when it is missing; ``load(url)`` opens a
page and returns what a test checks: every request the page made, the
console/log errors, each image's load state, and screenshots.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ChromiumUnavailable", "chromium", "DevTools", "PageLoad", "load", "FLAGS", "LOCAL_SCHEMES"]

REPO = Path(__file__).resolve().parents[1]
ENSURE = REPO / "scripts" / "ensure_chromium.sh"

# What the browser needs here (root, no GPU, no network): no sandbox (root), no background traffic of its own,
# and every host name resolving to nothing, so that even a bad page cannot reach the network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")  # a request to any other scheme is a network request


class ChromiumUnavailable(RuntimeError):
    """Chromium is missing and cannot be installed here (not root, no apt-get): a reason to skip."""


def chromium() -> str:
    """The Chromium executable; installs Debian's package when missing.

    Raises :class:`ChromiumUnavailable` when installation is impossible here
    (the ensure script exits 2), ``RuntimeError`` when it was possible but failed.
    """
    env = os.environ.get("CHROMIUM")
    for cand in (env, "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and os.access(cand, os.X_OK):
            return cand
    proc = subprocess.run(["sh", str(ENSURE)], capture_output=True, text=True, timeout=900)
    if proc.returncode == 0 and proc.stdout.strip() and os.access(proc.stdout.strip().splitlines()[-1], os.X_OK):
        return proc.stdout.strip().splitlines()[-1]
    last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
    if proc.returncode == 2:
        raise ChromiumUnavailable(f"Chromium is not installed and cannot be installed here: {last}")
    raise RuntimeError(f"{ENSURE.name} failed (exit {proc.returncode}): {last}")


class DevTools:
    """One Chromium process and its DevTools pipe: ``call`` a method, collect events."""

    def __init__(
        self, exe: str, *, user_data_dir: str | os.PathLike, flags: tuple[str, ...] = FLAGS, timeout: float = 60
    ):
        self.timeout = timeout
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # move the child's ends above 10 so that dup2 onto 3 and 4 cannot clobber one another
        child_in = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def wire() -> None:  # in the child, before exec
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [exe, *flags, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=wire, pass_fds=(3, 4),
        )  # fmt: skip
        os.close(child_in)
        os.close(child_out)
        self._w = to_child_w
        self._r = from_child_r
        self._next = 0
        self._replies: dict[int, dict] = {}
        self._inbox: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._inbox.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._inbox.put(json.loads(msg))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, b""):
            self._stderr.append(line.decode(errors="replace").rstrip())

    def _pump(self, deadline: float) -> None:
        try:
            msg = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return
        if msg is None:
            tail = "\n".join(self._stderr[-15:])
            raise RuntimeError(f"Chromium closed the DevTools pipe (exit {self.proc.poll()}); its stderr ends:\n{tail}")
        if "id" in msg:
            self._replies[msg["id"]] = msg
        else:
            self.events.append(msg)

    def call(
        self, method: str, params: dict | None = None, session: str | None = None, timeout: float | None = None
    ) -> dict:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._next not in self._replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {method} within {timeout or self.timeout} s")
            self._pump(deadline)
        reply = self._replies.pop(self._next)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str | None = None, timeout: float | None = None, start: int = 0) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = start
        while True:
            for ev in self.events[seen:]:
                if ev.get("method") == method and (session is None or ev.get("sessionId") == session):
                    return ev
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} event within {timeout or self.timeout} s")
            self._pump(deadline)

    def drain(self, seconds: float) -> None:
        """Keep collecting events for ``seconds`` (late requests, console messages)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._pump(deadline)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class PageLoad:
    """What loading one page showed."""

    url: str
    requests: list[str] = field(default_factory=list)  # every URL the page asked for (document, images, ...)
    failed: list[dict] = field(default_factory=list)  # Network.loadingFailed events
    errors: list[str] = field(default_factory=list)  # console / log messages at level error, uncaught exceptions
    images: list[dict] = field(default_factory=list)  # per <img>: alt, complete, naturalWidth/Height, decoded, rect
    text: str = ""  # document.body.innerText
    html: str = ""  # the DOM after load, serialised
    screenshot: bytes = b""  # the first screen (viewport)
    full_screenshot: bytes = b""  # the whole page
    figure_shots: list[bytes] = field(default_factory=list)  # each image's own area of the rendered page
    element_shots: dict[str, bytes] = field(default_factory=dict)  # CSS selector -> its first match, rendered
    sort_check: dict | None = None  # what clicking the overview's sort buttons did (JavaScript on only)

    @property
    def network_requests(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(LOCAL_SCHEMES)]

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not (i["complete"] and i["naturalWidth"] > 0 and i["decoded"])]


_IMAGES_JS = """
(async () => {
  const imgs = Array.from(document.images);
  const decoded = await Promise.all(imgs.map(i => i.decode().then(() => true, () => false)));
  return imgs.map((i, k) => {
    const r = i.getBoundingClientRect();
    return {alt: i.alt, src: i.getAttribute('src').slice(0, 40), complete: i.complete,
            naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight, decoded: decoded[k],
            x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height};
  });
})()
"""

_SORT_JS = """
(() => {
  const table = document.querySelector('table.overview');
  if (!table) return {error: 'no overview table'};
  const claims = () => Array.from(table.tBodies[0].rows).map(r => r.cells[0].textContent.trim());
  const verdicts = () => Array.from(table.tBodies[0].rows).map(r => r.cells[2].textContent.trim());
  const buttons = table.tHead.querySelectorAll('button.sort');
  const before = claims();
  if (buttons.length < 3) return {buttons: buttons.length, before};
  buttons[2].click();
  const byVerdict = verdicts();
  buttons[0].click();
  const byClaim = claims();
  buttons[0].click();
  const byClaimDesc = claims();
  return {buttons: buttons.length, before, byVerdict, byClaim, byClaimDesc};
})()
"""


def _eval(dt: DevTools, session: str, expr: str, *, await_promise: bool = False) -> Any:
    res = dt.call(
        "Runtime.evaluate",
        {"expression": expr, "returnByValue": True, "awaitPromise": await_promise},
        session,
    )
    if "exceptionDetails" in res:
        raise RuntimeError(f"page script failed: {res['exceptionDetails'].get('text')}: {res['exceptionDetails']}")
    return res["result"].get("value")


def load(
    exe: str,
    url: str,
    *,
    width: int = 1366,
    height: int = 860,
    javascript: bool = True,
    full_page_max: int = 16000,
    settle: float = 0.5,
    screenshots: bool = True,
    elements: tuple[str, ...] = (),
) -> PageLoad:
    """Open ``url`` in a fresh headless Chromium (laptop-sized window) and report what happened.

    ``elements``: CSS selectors whose first match is also captured on its own (``element_shots``).
    """
    out = PageLoad(url=url)
    with tempfile.TemporaryDirectory(prefix="normlab-chromium-") as profile, DevTools(exe, user_data_dir=profile) as dt:
        target = dt.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            dt.call(f"{domain}.enable", {}, s)
        dt.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            s,
        )
        if not javascript:
            dt.call("Emulation.setScriptExecutionDisabled", {"value": True}, s)
        start = len(dt.events)
        dt.call("Page.navigate", {"url": url}, s)
        dt.wait_event("Page.loadEventFired", s, start=start)
        dt.drain(settle)

        out.images = _eval(dt, s, _IMAGES_JS, await_promise=True) or []
        out.text = _eval(dt, s, "document.body ? document.body.innerText : ''") or ""
        out.html = _eval(dt, s, "document.documentElement.outerHTML") or ""
        if screenshots:
            out.screenshot = _shot(dt, s, None)
            metrics = dt.call("Page.getLayoutMetrics", {}, s)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            full_h = min(int(size["height"]), full_page_max)
            out.full_screenshot = _shot(dt, s, {"x": 0, "y": 0, "width": width, "height": full_h, "scale": 1})
            for img in out.images:
                if img["width"] > 0 and img["height"] > 0:
                    clip = {"x": img["x"], "y": img["y"], "width": img["width"], "height": img["height"], "scale": 1}
                    out.figure_shots.append(_shot(dt, s, clip))
            for sel in elements:
                box = _eval(
                    dt, s,
                    f"(() => {{ const e = document.querySelector({json.dumps(sel)}); if (!e) return null;"
                    " const r = e.getBoundingClientRect();"
                    " return {x: r.left + window.scrollX, y: r.top + window.scrollY,"
                    " width: r.width, height: r.height}; })()",
                )  # fmt: skip
                if box and box["width"] > 0 and box["height"] > 0:
                    box["height"] = min(box["height"], full_page_max)
                    out.element_shots[sel] = _shot(dt, s, {**box, "scale": 1})
        if javascript:
            out.sort_check = _eval(dt, s, _SORT_JS)
        dt.drain(0.2)

        for ev in dt.events:
            if ev.get("sessionId") != s:
                continue
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Network.requestWillBeSent":
                out.requests.append(p["request"]["url"])
            elif m == "Network.loadingFailed":
                out.failed.append(p)
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.errors.append(
                    f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip()
                )
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.errors.append(
                    "console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                )
            elif m == "Runtime.exceptionThrown":
                out.errors.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
    return out


def _shot(dt: DevTools, session: str, clip: dict | None) -> bytes:
    import base64

    params: dict[str, Any] = {"format": "png"}
    if clip is not None:
        params.update(clip=clip, captureBeyondViewport=True)
    return base64.b64decode(dt.call("Page.captureScreenshot", params, session, timeout=120)["data"])
