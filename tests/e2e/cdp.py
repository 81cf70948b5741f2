"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol on a pipe.

``--remote-debugging-pipe``: Chromium reads commands on its fd 3 and writes answers and
events on its fd 4, each a JSON object ended by a NUL byte. Standard library only, no
browser download: a page is opened in a fresh profile, scripts are evaluated in it, real
mouse events are dispatched, and screenshots are taken.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium with one page (``open``), stopped by ``close``."""

    def __init__(self, width: int = 1400, height: int = 900) -> None:
        exe = chromium()
        if exe is None:
            raise RuntimeError("no chromium on PATH (apt-get install chromium)")
        self._profile = tempfile.mkdtemp(prefix="na-chromium-")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def child_fds() -> None:  # in the child: its fd 3 is what we write, fd 4 what we read
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)  # clear of 3 and 4 first
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-sync",
             "--no-default-browser-check", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={self._profile}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds,
        )
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)
        self._next = 0
        self._buf = b""
        self.session = ""

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = True,
             timeout: float = 30.0) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for raw in self._messages(deadline, method):
                doc = json.loads(raw)
                if doc.get("id") == self._next:
                    if "error" in doc:
                        raise RuntimeError(f"{method}: {doc['error']}")
                    result: dict[str, Any] = doc.get("result", {})
                    return result

    def _messages(self, deadline: float, method: str) -> list[bytes]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"chromium did not answer {method}")
        ready, _, _ = select.select([self._r], [], [], left)
        if ready:
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe during {method}")
            self._buf += chunk
        *done, self._buf = self._buf.split(b"\0")
        return done

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.call(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]

    def eval(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """The expression's value once truthy (an exception counts as not yet: the page
        may still be loading)."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                value = self.eval(expression)
            except RuntimeError as e:
                value, last = None, str(e)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"never true in the page: {expression} {last}")
            time.sleep(0.2)

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y,
                                                   "button": "left", "clickCount": 1})

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", session=False, timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for fd in (self._w, self._r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)
