"""A loopback HTTP/1.1 file server for tests that exercise byte-range clients.

This module owns ``RangeServer``: it serves a directory with Range support and
keep-alive, records every request and the body bytes actually written (so tests can
assert how much a client fetched), can throttle large or open-ended ranges the way
YouTube does (``ThrottlePolicy``), and can inject error statuses (``fail_next``).

It also accepts absolute-form request targets, which many origins refuse: the reference origin
for fetch tests is ``tests.support.strictorigin.StrictOrigin``, the standard library's server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit

_CHUNK = 16 * 1024
# A small send buffer makes the byte count track what the client really consumed:
# once a client stops reading or hangs up, writes stall or fail within ~64 KiB.
_SEND_BUFFER = 64 * 1024
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")

CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".m4a": "audio/mp4",
    ".m4s": "video/iso.segment",
    ".mpd": "application/dash+xml",
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
}


@dataclass(frozen=True)
class ThrottlePolicy:
    """Send open-ended ranges and ranges over ``max_fast_bytes`` at ``slow_rate`` bytes/s."""

    max_fast_bytes: int = 10 * 1024 * 1024
    slow_rate: int = 64 * 1024


@dataclass
class RequestRecord:
    """One request as received, and what the server did with it.

    ``path`` is the URL path relative to the served root, as passed to
    ``RangeServer.url``. Range fields hold what the client asked for, before clamping
    to the file size: ``bytes=a-b`` gives ``range_start=a, range_end=b``,
    ``bytes=a-`` gives ``range_end=None``, ``bytes=-n`` gives ``suffix_length=n``.
    ``requested_length`` is None when open-ended (no usable Range, or ``bytes=a-``).
    """

    method: str
    path: str
    range_header: str | None
    range_start: int | None
    range_end: int | None
    suffix_length: int | None
    requested_length: int | None
    # The client's port identifies its connection, so tests can see keep-alive reuse.
    client_port: int
    status: int = 0
    throttled: bool = False
    bytes_sent: int = 0
    # False while the body is being written, and forever if the client hung up.
    completed: bool = False


def _parse_range(header: str | None) -> tuple[int | None, int | None, int | None]:
    """(start, end, suffix length) of a single-range header; all None if unusable.

    Multi-range and malformed headers are ignored, as RFC 9110 allows, so such a
    request gets the whole file.
    """
    match = _RANGE_RE.fullmatch(header.strip()) if header else None
    if match is None:
        return None, None, None
    first, last = match.groups()
    if first:
        start, end = int(first), int(last) if last else None
        if end is not None and end < start:
            return None, None, None
        return start, end, None
    if last:
        return None, None, int(last)
    return None, None, None


class RecordingServer(ThreadingHTTPServer):
    """A threaded HTTP server on a free loopback port serving ``root``, with what its handler
    records: every request, injected faults, open connections, the throttle policy."""

    daemon_threads = True
    # Parallel downloaders open several connections at once.
    request_queue_size = 64

    def __init__(
        self,
        root: Path,
        handler: type[BaseHTTPRequestHandler],
        throttle: ThrottlePolicy | None = None,
    ) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.root = root.resolve()
        self.throttle = throttle
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.records: list[RequestRecord] = []
        self.faults: list[int] = []
        self.connections: set[socket.socket] = set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (even between keep-alive requests) is normal in tests.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class TrackedHandler(BaseHTTPRequestHandler):
    """An HTTP/1.1 handler whose open connection its ``RecordingServer`` knows, so stopping
    the server can end idle keep-alive and slow connections; it logs nothing."""

    protocol_version = "HTTP/1.1"
    server: RecordingServer

    def setup(self) -> None:
        with self.server.lock:
            self.server.connections.add(self.request)
        super().setup()

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.request)
        with contextlib.suppress(ConnectionError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        # Request logs would drown pytest output.
        pass


class _Handler(TrackedHandler):
    def setup(self) -> None:
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        super().setup()

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        header = self.headers.get("Range")
        start, end, suffix = _parse_range(header)
        if suffix is not None:
            requested: int | None = suffix
        elif start is not None and end is not None:
            requested = end - start + 1
        else:
            requested = None
        record = RequestRecord(
            method=self.command,
            path=unquote(urlsplit(self.path).path).lstrip("/"),
            range_header=header,
            range_start=start,
            range_end=end,
            suffix_length=suffix,
            requested_length=requested,
            client_port=self.client_address[1],
        )
        with self.server.lock:
            self.server.records.append(record)
            fault = self.server.faults.pop(0) if self.server.faults else None
        try:
            if fault is not None:
                self._empty(record, fault)
                return
            file = (self.server.root / record.path).resolve()
            if not file.is_relative_to(self.server.root) or not file.is_file():
                self._empty(record, 404)
                return
            size = file.stat().st_size
            if suffix is not None:
                first, last = max(0, size - suffix), size - 1
            elif start is not None:
                first, last = start, size - 1 if end is None else min(end, size - 1)
            else:
                first, last = 0, size - 1
            ranged = start is not None or suffix is not None
            if ranged and (first >= size or last < first):
                self._empty(record, 416, {"Content-Range": f"bytes */{size}"})
                return
            status = 206 if ranged else 200
            throttle = self.server.throttle
            throttled = throttle is not None and (
                requested is None or requested > throttle.max_fast_bytes
            )
            self.send_response(status)
            self.send_header(
                "Content-Type", CONTENT_TYPES.get(file.suffix, "application/octet-stream")
            )
            self.send_header("Content-Length", str(last - first + 1))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.end_headers()
            with self.server.lock:
                record.status, record.throttled = status, throttled
            if body:
                self._send_body(record, file, first, last - first + 1, throttle)
            with self.server.lock:
                record.completed = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _empty(
        self, record: RequestRecord, status: int, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()
        with self.server.lock:
            record.status, record.completed = status, True

    def _send_body(
        self,
        record: RequestRecord,
        file: Path,
        offset: int,
        length: int,
        throttle: ThrottlePolicy | None,
    ) -> None:
        began = time.monotonic()
        sent = 0
        with file.open("rb") as f:
            f.seek(offset)
            while sent < length:
                chunk = f.read(min(_CHUNK, length - sent))
                self.wfile.write(chunk)
                sent += len(chunk)
                with self.server.lock:
                    record.bytes_sent = sent
                if record.throttled and throttle is not None:
                    # Pace against the start time so sleep overshoot does not accumulate.
                    delay = began + sent / throttle.slow_rate - time.monotonic()
                    if delay > 0 and self.server.stopping.wait(delay):
                        raise ConnectionAbortedError("server stopping")


class ServedDirectory:
    """A ``RecordingServer`` run in a thread while used as a context manager, and what tests
    read of it: its URLs, the requests it recorded and the body bytes it wrote."""

    def __init__(self, server: RecordingServer, name: str, scheme: str = "http") -> None:
        self._server = server
        self._scheme = scheme
        self._thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        # Idle keep-alive and slow throttled connections would otherwise outlive us.
        with self._server.lock:
            connections = list(self._server.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (or https), without a trailing slash."""
        return f"{self._scheme}://127.0.0.1:{self.port}"

    def url(self, relpath: str) -> str:
        return f"{self.base_url}/{quote(relpath.lstrip('/'))}"

    @property
    def throttle(self) -> ThrottlePolicy | None:
        """Current policy; setting it applies to requests that arrive afterwards."""
        return self._server.throttle

    @throttle.setter
    def throttle(self, policy: ThrottlePolicy | None) -> None:
        self._server.throttle = policy

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of the requests so far; in-flight records keep their values of now."""
        with self._server.lock:
            return [dataclasses.replace(record) for record in self._server.records]

    def bytes_sent(self, path: str | None = None) -> int:
        """Body bytes written so far, for all requests or those for ``path`` (relative)."""
        with self._server.lock:
            return sum(
                record.bytes_sent
                for record in self._server.records
                if path is None or record.path == path.lstrip("/")
            )

    def reset(self) -> None:
        """Forget recorded requests (in-flight ones stop being counted too)."""
        with self._server.lock:
            self._server.records.clear()

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` requests with ``status`` and an empty body."""
        with self._server.lock:
            self._server.faults.extend([status] * count)


class RangeServer(ServedDirectory):
    """Serve ``root`` on 127.0.0.1 at a free port while used as a context manager."""

    def __init__(self, root: Path, *, throttle: ThrottlePolicy | None = None) -> None:
        super().__init__(RecordingServer(root, _Handler, throttle), "RangeServer")
