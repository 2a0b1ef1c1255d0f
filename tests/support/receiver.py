"""A real webhook receiver on loopback: records every POST and answers from a script."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Delivery:
    at: float
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    url: str
    statuses: list[int] = field(default_factory=list)
    """Statuses to answer, in order; 200 once they run out."""
    deliveries: list[Delivery] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    """Seconds to stall before answering, in order; none once they run out."""
    location: str | None = None
    _arrived: threading.Condition = field(default_factory=threading.Condition)

    def record(self, delivery: Delivery) -> int:
        with self._arrived:
            self.deliveries.append(delivery)
            self._arrived.notify_all()
            return self.statuses.pop(0) if self.statuses else 200

    def next_delay(self) -> float:
        with self._arrived:
            return self.delays.pop(0) if self.delays else 0.0

    def wait(self, count: int = 1, timeout: float = 60) -> list[Delivery]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.deliveries) >= count, timeout):
                raise TimeoutError(f"{len(self.deliveries)} of {count} webhooks arrived")
            return list(self.deliveries)


@contextmanager
def receiver() -> Iterator[Receiver]:
    state: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            raw = self.rfile.read(length)
            target = state[0]
            status = target.record(
                Delivery(
                    at=time.monotonic(),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=json.loads(raw) if raw else {},
                )
            )
            time.sleep(target.next_delay())
            self.send_response(status)
            if target.location is not None:
                self.send_header("location", target.location)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.append(Receiver(url=f"http://127.0.0.1:{server.server_address[1]}/hook"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state[0]
    finally:
        server.shutdown()
        server.server_close()
