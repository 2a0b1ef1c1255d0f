"""Headless Chromium (Debian's ``chromium`` package) driven over the Chrome DevTools Protocol.

``chromium`` starts it on a pipe with a fresh profile and every host but 127.0.0.1 made
unresolvable; ``open_page`` opens a tab whose requests and failures are recorded.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1280,1600",
    "--remote-debugging-pipe",
)
# Chromium talks CDP on its fds 3 (commands in) and 4 (replies out); bash puts our pipe ends
# there (dash takes no fd number above 9).
PIPE_TRAMPOLINE = 'exec "$0" "$@" 3<&"$CDP_IN" 4>&"$CDP_OUT"'

VIEWPORT = {"width": 1280, "height": 1600, "mobile": False}


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "chromium is not installed; these tests need it (CI installs it in .ci/run): "
            "apt-get update && apt-get install -y chromium"
        )
    return found


class DevTools:
    """A Chrome DevTools Protocol client: JSON messages, each ending in a NUL byte."""

    def __init__(self, process: subprocess.Popen[bytes], send_fd: int, receive_fd: int) -> None:
        self.process = process
        self.send_fd = send_fd
        self.receive_fd = receive_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.receive_fd], [], [], left)
            if ready:
                chunk = os.read(self.receive_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe (exit {self.process.poll()})")
                self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        decoded: dict[str, Any] = json.loads(message)
        return decoded

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """Send one command and return its result; events that come first are kept."""
        self.next_id += 1
        command: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        os.write(self.send_fd, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") != self.next_id:
                self.events.append(message)
                continue
            if "error" in message:
                raise RuntimeError(f"{method} failed: {message['error']}")
            result: dict[str, Any] = message.get("result", {})
            return result


@contextmanager
def chromium(profile: Path, log: Path) -> Iterator[DevTools]:
    """Start headless Chromium with a fresh profile; close it on exit."""
    executable = chromium_path()
    commands_read, commands_write = os.pipe()
    replies_read, replies_write = os.pipe()
    env = {**os.environ, "CDP_IN": str(commands_read), "CDP_OUT": str(replies_write)}
    command = ["/bin/bash", "-c", PIPE_TRAMPOLINE, executable, *CHROMIUM_FLAGS]
    command += [f"--user-data-dir={profile}", "about:blank"]
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env=env,
            pass_fds=(commands_read, replies_write),
        )
    os.close(commands_read)
    os.close(replies_write)
    devtools = DevTools(process, commands_write, replies_read)
    try:
        devtools.call("Browser.getVersion")
        yield devtools
    finally:
        try:
            devtools.call("Browser.close", timeout=10)
            process.wait(timeout=15)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            process.kill()
            process.wait(timeout=15)
        finally:
            os.close(commands_write)
            os.close(replies_read)


@dataclass
class Page:
    """One tab: what it requested and how to read it."""

    devtools: DevTools
    session: str
    requests: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        result = self.devtools.call(method, params, session=self.session)
        self._drain_events()
        return result

    def _drain_events(self) -> None:
        kept = []
        for event in self.devtools.events:
            if event.get("sessionId") != self.session:
                kept.append(event)
            elif event.get("method") == "Network.requestWillBeSent":
                self.requests.append(event["params"]["request"]["url"])
            elif event.get("method") == "Network.loadingFailed":
                params = event["params"]
                self.failures.append(f"{params.get('errorText')} ({params['requestId']})")
        self.devtools.events = kept

    def text(self) -> str:
        result = self.call(
            "Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True}
        )
        return str(result["result"].get("value", ""))

    def wait_for_text(self, done: Callable[[str], bool], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        text = self.text()
        while not done(text):
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed what was expected; it shows:\n{text}")
            time.sleep(0.2)
            text = self.text()
        return text

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])


def open_page(devtools: DevTools, url: str) -> Page:
    target = devtools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})
    page = Page(devtools, session["sessionId"])
    page.call("Network.enable")
    page.call("Page.enable")
    page.call("Emulation.setDeviceMetricsOverride", {**VIEWPORT, "deviceScaleFactor": 1})
    page.call("Page.navigate", {"url": url})
    return page
