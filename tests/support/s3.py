"""A real S3 protocol endpoint on a free loopback port (moto in server mode), for one test."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.apps import free_port

ACCESS_KEY = "hermes-test"
SECRET_KEY = "hermes-test-secret"
REGION = "us-east-1"


@dataclass
class S3Server:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The usual AWS variables a client reads, pointing at this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def create_bucket(self) -> str:
        """A new empty bucket; moto accepts unsigned requests."""
        name = f"hermes-{uuid.uuid4().hex[:12]}"
        httpx.put(f"{self.endpoint}/{name}").raise_for_status()
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket`` (moto answers ListObjectsV2 unsigned)."""
        answer = httpx.get(f"{self.endpoint}/{bucket}?list-type=2")
        answer.raise_for_status()
        text = answer.text
        return [part.split("</Key>")[0] for part in text.split("<Key>")[1:]]


@contextmanager
def s3_server() -> Iterator[S3Server]:
    beside = Path(sys.executable).parent / "moto_server"
    executable = str(beside) if beside.exists() else shutil.which("moto_server")
    assert executable, "moto_server is not installed (pip install 'moto[server]')"
    port = free_port()
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = S3Server(port=port, process=process)
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{server.endpoint}/moto-api/", timeout=1)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.05)
    try:
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)
