"""The real ``hermes-media serve clip`` process on a free loopback port, for tests and benches
that kill and restart it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.apps import free_port, wait_until

HERMES_MEDIA = Path(sys.executable).with_name("hermes-media")


@contextmanager
def serve_clip(env: dict[str, str], log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``hermes-media serve clip`` on a free port until it answers; killed on exit."""
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(HERMES_MEDIA), "serve", "clip", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=30)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
