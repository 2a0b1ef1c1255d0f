"""Running a real app over real HTTP on a free loopback port, for the length of a test, and
waiting on what it does."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yield its base URL; stop it on exit."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the app did not start")
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def client(app: FastAPI, timeout: float = 60) -> Iterator[httpx.Client]:
    with serve(app) as base, httpx.Client(base_url=base, timeout=timeout) as http:
        yield http


def wait_until(check: Any, timeout: float = 60, every: float = 0.05) -> Any:
    """``check()``'s first truthy answer, asked every ``every`` s; TimeoutError past ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def finished_job(api: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """The clip job's view once it has ended and its webhook is no longer pending."""

    def ended() -> dict[str, Any] | None:
        view: dict[str, Any] = api.get(f"/jobs/{job_id}").json()
        done = view["status"] in ("succeeded", "failed") and view["webhook"] != "pending"
        return view if done else None

    found: dict[str, Any] = wait_until(ended, timeout)
    return found
