"""Headless Chromium driven over the DevTools protocol (CDP) through ``--remote-debugging-pipe``.

Chromium reads JSON commands from file descriptor 3 and writes answers and events to file
descriptor 4, one message per NUL-terminated chunk. :class:`Chromium` starts the browser with
software WebGL (ANGLE on SwiftShader), opens one page and records its console messages,
uncaught exceptions and log entries in :attr:`Chromium.console`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if Path(path).exists():
            return path
    return shutil.which("chromium")


class CDPError(RuntimeError):
    pass


@dataclass
class ConsoleMessage:
    level: str  # log, info, warning, error, exception, ...
    text: str

    def __str__(self) -> str:
        return f"[{self.level}] {self.text}"


class Chromium:
    """One headless Chromium with one page of ``width`` × ``height`` CSS pixels (scale factor 1)."""

    def __init__(self, profile_dir: Path, width: int = 1400, height: int = 900, binary: str | None = None):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise RuntimeError("Chromium is not installed (Debian package chromium)")
        self.profile_dir = Path(profile_dir)
        self.width, self.height = width, height
        self.console: list[ConsoleMessage] = []
        self._next_id = 0
        self._pending: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._events: list[dict] = []
        self.session_id: str | None = None
        self.process: subprocess.Popen | None = None

    # -- process and transport ---------------------------------------------------------------
    def start(self) -> Chromium:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Keep the browser's ends above 4, so that moving them onto 3 and 4 cannot overwrite one.
        high_r = os.dup2(to_browser_r, 100, inheritable=False)
        high_w = os.dup2(from_browser_w, 101, inheritable=False)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def browser_fds() -> None:  # runs in the child between fork and exec
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [
            self.binary,
            "--headless",
            "--no-sandbox",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile_dir}",
            "--use-gl=angle",
            "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader",
            "--ignore-gpu-blocklist",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            "--force-color-profile=srgb",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        log = (self.profile_dir / "chromium.log").open("ab")
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=False,
            preexec_fn=browser_fds, start_new_session=True,
        )
        log.close()
        os.close(high_r)
        os.close(high_w)
        self._writer = os.fdopen(to_browser_w, "wb", buffering=0)
        self._reader_fd = from_browser_r
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session_id = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        return self

    def _read_loop(self) -> None:
        buffer = b""
        with os.fdopen(self._reader_fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(1 << 20)
                if not chunk:
                    break
                buffer += chunk
                while b"\0" in buffer:
                    raw, buffer = buffer.split(b"\0", 1)
                    self._dispatch(json.loads(raw))
        with self._cond:
            self._cond.notify_all()

    def _dispatch(self, message: dict) -> None:
        if "id" in message:
            with self._cond:
                self._pending[message["id"]] = message
                self._cond.notify_all()
            return
        method, params = message.get("method", ""), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_text(arg) for arg in params.get("args", []))
            self.console.append(ConsoleMessage(params.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception", {})
            text = exception.get("description") or details.get("text", "")
            self.console.append(ConsoleMessage("exception", text))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append(ConsoleMessage(f"log-{entry.get('level', '')}", entry.get("text", "")))
        with self._cond:
            self._events.append(message)
            del self._events[:-200]

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        """One CDP command; its result, or :class:`CDPError` with the protocol's error."""
        with self._cond:
            self._next_id += 1
            message_id = self._next_id
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._writer.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while message_id not in self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not self.running:
                    raise CDPError(f"{method}: no answer from Chromium")
                self._cond.wait(min(left, 1.0))
            answer = self._pending.pop(message_id)
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def call(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        """A CDP command to the page."""
        return self.send(method, params, session=self.session_id, timeout=timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            self.send("Browser.close", timeout=5)
        except (CDPError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        try:
            self._writer.close()
        except OSError:
            pass
        self.process = None

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- page ------------------------------------------------------------------------------------
    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """Value of a JavaScript expression in the page (promises awaited, result as JSON)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True, "timeout": timeout * 1000},
            timeout=timeout + 5,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"evaluation failed: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what or expression}")
            time.sleep(interval)

    def screenshot(self, clip: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """The page, or its ``clip`` (x, y, width, height), as an RGB array (rows × columns × 3, uint8)."""
        params: dict[str, Any] = {"format": "png", "optimizeForSpeed": True}
        if clip is not None:
            x, y, width, height = clip
            params["clip"] = {"x": x, "y": y, "width": width, "height": height, "scale": 1}
        data = self.call("Page.captureScreenshot", params)["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def save_screenshot(self, path: Path) -> Path:
        Image.fromarray(self.screenshot()).save(path)
        return path

    def click(self, x: float, y: float, count: int = 1) -> None:
        """Mouse click (``count`` 2: double click) at page coordinates, as real input events."""
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for n in range(1, count + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.call(
                    "Input.dispatchMouseEvent",
                    {"type": kind, "x": x, "y": y, "button": "left", "clickCount": n},
                )

    def errors(self) -> list[ConsoleMessage]:
        """Console errors that mean broken code: uncaught exceptions and ``TypeError`` anywhere."""
        return [
            m for m in self.console
            if m.level == "exception" or "TypeError" in m.text or "Uncaught" in m.text
        ]


def _remote_text(obj: dict) -> str:
    if "value" in obj:
        return str(obj["value"])
    return str(obj.get("description") or obj.get("unserializableValue") or obj.get("type", ""))
