"""Open a local HTML page in headless Chromium, collect its console and page errors, take a screenshot.

Talks the Chrome DevTools Protocol (CDP) over ``--remote-debugging-port`` with a minimal RFC 6455
websocket client written on the standard library, so the check needs no Python package beyond the
standard library and only Debian's ``chromium`` (``apt-get install -y chromium``). Why CDP rather than
chromium's own ``--screenshot --enable-logging``: the log only prints ``console.*`` calls, whereas a
failed resource load (a broken ``<img>``), a CSP violation or an uncaught exception arrives over CDP as a
structured event with its level: ``Runtime.consoleAPICalled``, ``Runtime.exceptionThrown``,
``Log.entryAdded`` and ``Network.loadingFailed``.

Usage::

    messages, png = check_page("out/card.html", "out/card_screenshot.png")
    assert not errors(messages)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.io import atomic_path

__all__ = ["APT_COMMAND", "ConsoleMessage", "check_page", "errors", "find_chromium", "main"]

APT_COMMAND = "apt-get install -y chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True)
class ConsoleMessage:
    """One message of the page: ``source`` is "console", "exception", "log" or "network"; ``level`` is
    CDP's ("error", "warning", "info", "log", "debug", "verbose")."""

    source: str
    level: str
    text: str
    url: str = ""


def errors(messages: list[ConsoleMessage]) -> list[ConsoleMessage]:
    """The messages that mean the page is broken: error level, uncaught exceptions, failed loads."""
    return [m for m in messages if m.level == "error" or m.source in ("exception", "network")]


def find_chromium(executable: str | os.PathLike | None = None) -> Path:
    """The Chromium binary: ``executable``, else ``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` on
    PATH; FileNotFoundError naming the apt command when there is none."""
    candidates = [
        executable,
        os.environ.get("CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise FileNotFoundError(
        f"chromium: no headless Chromium found (looked at {executable or '$CHROMIUM'}, chromium, "
        f"chromium-browser on PATH); install Debian's package with `{APT_COMMAND}` (as root)"
    )


class _WebSocket:
    """A blocking websocket client (RFC 6455): text frames out (masked), text/binary in, fragments
    reassembled, pings answered. Enough for CDP on the loopback interface."""

    def __init__(self, url: str, timeout: float):
        if not url.startswith("ws://"):
            raise ValueError(f"url: expected a ws:// URL, got {url!r}")
        hostport, _, path = url[len("ws://") :].partition("/")
        host, _, port = hostport.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket: connection closed during the handshake")
            head += chunk
        head, _, self._buf = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ConnectionError(f"websocket: handshake refused: {lines[0]}")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if fields.get("sec-websocket-accept") != accept:
            raise ConnectionError("websocket: bad Sec-WebSocket-Accept")

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise ConnectionError("websocket: connection closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        full_mask = (mask * (n // 4 + 1))[:n]
        masked = (
            (int.from_bytes(payload, "big") ^ int.from_bytes(full_mask, "big")).to_bytes(n, "big")
            if n
            else b""
        )
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode("utf-8"))

    def recv(self) -> str:
        """The next whole text (or binary) message, as text."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else b""
            payload = self._read(n)
            if mask:
                full = (mask * (n // 4 + 1))[:n]
                payload = (int.from_bytes(payload, "big") ^ int.from_bytes(full, "big")).to_bytes(n, "big")
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket: closed by the browser")
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode("utf-8")

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class _Session:
    """CDP commands (``call``) and the events that arrive meanwhile (``events``)."""

    def __init__(self, ws: _WebSocket):
        self.ws, self.events, self._id = ws, [], 0

    def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, method: str, deadline: float) -> None:
        """Collect events until ``method`` arrives (TimeoutError past ``deadline``, a time.monotonic())."""
        if any(e["method"] == method for e in self.events):
            return
        while time.monotonic() < deadline:
            self.ws.sock.settimeout(max(0.05, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return
        raise TimeoutError(f"chromium: no {method} before the deadline")

    def drain(self, quiet: float) -> None:
        """Collect events until none has arrived for ``quiet`` seconds (late errors after the load event)."""
        self.ws.sock.settimeout(quiet)
        try:
            while True:
                msg = json.loads(self.ws.recv())
                if "method" in msg:
                    self.events.append(msg)
        except TimeoutError:
            return


def _remote_object_text(arg: dict) -> str:
    if "value" in arg:
        return str(arg["value"])
    return str(arg.get("description", arg.get("unserializableValue", arg.get("type", ""))))


def _messages(events: list[dict]) -> list[ConsoleMessage]:
    urls = {
        e["params"]["requestId"]: e["params"]["request"]["url"]
        for e in events
        if e["method"] == "Network.requestWillBeSent"
    }
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.consoleAPICalled":
            level = {"error": "error", "assert": "error", "warning": "warning", "warn": "warning"}.get(
                p["type"], p["type"]
            )
            text = " ".join(_remote_object_text(a) for a in p.get("args", []))
            frames = p.get("stackTrace", {}).get("callFrames", [])
            out.append(ConsoleMessage("console", level, text, frames[0]["url"] if frames else ""))
        elif e["method"] == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text", "")
            out.append(ConsoleMessage("exception", "error", text, d.get("url", "")))
        elif e["method"] == "Log.entryAdded":
            entry = p["entry"]
            out.append(ConsoleMessage("log", entry["level"], entry["text"], entry.get("url", "")))
        elif e["method"] == "Network.loadingFailed" and not p.get("canceled"):
            out.append(
                ConsoleMessage(
                    "network",
                    "error",
                    f"{p.get('errorText', '')} {p.get('blockedReason', '')}".strip(),
                    urls.get(p.get("requestId"), p.get("requestId", "")),
                )
            )
    return out


def _devtools_port(user_dir: Path, proc: subprocess.Popen, deadline: float) -> int:
    """Chromium writes the port it bound (``--remote-debugging-port=0``) to DevToolsActivePort."""
    marker = user_dir / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium: exited with code {proc.returncode} before DevTools started")
        if marker.is_file():
            lines = marker.read_text().split("\n")
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
        time.sleep(0.05)
    raise TimeoutError("chromium: DevTools did not start before the deadline")


def check_page(
    html_path: str | os.PathLike,
    screenshot_path: str | os.PathLike,
    *,
    chromium: str | os.PathLike | None = None,
    width: int = 1200,
    height: int = 900,
    full_page: bool = True,
    timeout: float = 60.0,
) -> tuple[list[ConsoleMessage], Path]:
    """Open ``html_path`` (a local file) in headless Chromium and return (messages, screenshot path).

    Messages are every console call, uncaught exception, browser log entry (failed loads, CSP
    violations) and failed network request of the page until it has loaded and been quiet for 0.5 s;
    :func:`errors` keeps the ones that mean the page is broken. The screenshot (PNG, ``width`` CSS pixels
    wide, the whole page if ``full_page``) is written atomically to ``screenshot_path``. Chromium runs
    with a fresh profile in a temporary directory that is removed afterwards, and is always stopped.
    """
    page = Path(html_path).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"html_path: no such file: {page}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width, height: expected positive sizes, got {width}x{height}")
    binary = find_chromium(chromium)
    deadline = time.monotonic() + timeout
    user_dir = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    cmd = [
        str(binary),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={user_dir}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ws = None
    try:
        port = _devtools_port(user_dir, proc, deadline)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as resp:
            targets = json.load(resp)
        target = next((t for t in targets if t.get("type") == "page"), None)
        if target is None:
            raise RuntimeError("chromium: no page target to attach to")
        ws = _WebSocket(target["webSocketDebuggerUrl"], timeout=max(1.0, deadline - time.monotonic()))
        cdp = _Session(ws)
        for domain in ("Runtime", "Log", "Network", "Page"):
            cdp.call(f"{domain}.enable")
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        nav = cdp.call("Page.navigate", url=page.as_uri())
        if nav.get("errorText"):
            cdp.events.append(
                {
                    "method": "Network.loadingFailed",
                    "params": {"errorText": nav["errorText"], "requestId": page.as_uri()},
                }
            )
        cdp.wait_for("Page.loadEventFired", deadline)
        cdp.drain(quiet=0.5)
        ws.sock.settimeout(max(1.0, deadline - time.monotonic()))
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = cdp.call("Page.getLayoutMetrics")["cssContentSize"]
            params |= {
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": max(width, size["width"]),
                    "height": size["height"],
                    "scale": 1,
                },
            }
        png = base64.b64decode(cdp.call("Page.captureScreenshot", **params)["data"])
        messages = _messages(cdp.events)
    finally:
        if ws is not None:
            ws.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(user_dir, ignore_errors=True)
    out = Path(screenshot_path)
    with atomic_path(out) as tmp:
        tmp.write_bytes(png)
    return messages, out


def main(html_path: str, screenshot_path: str, chromium: str | None = None) -> int:
    """Command line: print every message, exit 1 if any is an error (``python -m tests.helpers.browser_check
    card.html shot.png``)."""
    messages, shot = check_page(html_path, screenshot_path, chromium=chromium)
    for m in messages:
        print(f"[{m.source}/{m.level}] {m.text} {m.url}".rstrip())
    bad = errors(messages)
    print(f"{len(messages)} messages, {len(bad)} errors; screenshot {shot}")
    return 1 if bad else 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: python -m tests.helpers.browser_check PAGE.html SCREENSHOT.png [CHROMIUM]")
    raise SystemExit(main(*sys.argv[1:]))
