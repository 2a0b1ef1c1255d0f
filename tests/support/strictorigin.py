"""A strict origin: the standard library's file server with byte ranges added, nothing else.

This module owns ``StrictOrigin``, the reference origin for fetch tests. It is
``http.server.SimpleHTTPRequestHandler`` as shipped, which takes the request target literally
(an absolute-form target such as ``GET http://host/file`` names no file and gets 404, as
RFC 9112 lets an origin do), with single ``Range`` requests answered by 206 and HTTP/1.1
keep-alive. Its sockets keep the kernel's ordinary buffers, so ``bytes_sent`` counts every
body byte the server handed to its socket, including what a client abandoned unread. It has the
interface of ``RangeServer`` that tests use: ``base_url``, ``url``, ``requests``,
``bytes_sent``, ``reset``, ``throttle`` and ``fail_next``.
"""

from __future__ import annotations

import os
import ssl
import time
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from tests.support.rangeserver import (
    CONTENT_TYPES,
    RecordingServer,
    RequestRecord,
    ServedDirectory,
    TrackedHandler,
    _parse_range,
)

_CHUNK = 16 * 1024


class _Handler(TrackedHandler, SimpleHTTPRequestHandler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._record: RequestRecord | None = None
        self._span: tuple[int, int] | None = None
        super().__init__(*args, directory=str(args[2].root), **kwargs)

    def send_head(self) -> BinaryIO | None:
        """The stock handler, plus one byte range and the recording of the request."""
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
            # The target as received: an absolute-form one does not name a file here.
            path=unquote(
                urlsplit(self.path).path if self.path.startswith("/") else self.path
            ).lstrip("/"),
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
        self._record = record
        self._span = None
        if fault is not None:
            self._status(record, fault)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self._status(record, 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        file = open(path, "rb")  # noqa: SIM115 - the stock handler returns the open file
        size = os.fstat(file.fileno()).st_size
        ranged = start is not None or suffix is not None
        if suffix is not None:
            first, last = max(0, size - suffix), size - 1
        elif start is not None:
            first, last = start, size - 1 if end is None else min(end, size - 1)
        else:
            first, last = 0, size - 1
        if ranged and (first >= size or last < first):
            file.close()
            self._status(record, 416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self._status(record, 206 if ranged else 200)
        self.send_header(
            "Content-Type", CONTENT_TYPES.get(Path(path).suffix) or self.guess_type(path)
        )
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        throttle = self.server.throttle
        record.throttled = throttle is not None and (
            requested is None or requested > throttle.max_fast_bytes
        )
        self._span = (first, last - first + 1)
        return file

    def _status(self, record: RequestRecord, status: int) -> None:
        self.send_response(HTTPStatus(status))
        with self.server.lock:
            record.status = status
            record.completed = status >= 300

    def copyfile(self, source: Any, outputfile: Any) -> None:
        """Write the range, counting each chunk once the socket has taken it."""
        assert self._record is not None
        assert self._span is not None
        record, (offset, length) = self._record, self._span
        throttle = self.server.throttle
        began = time.monotonic()
        source.seek(offset)
        sent = 0
        try:
            while sent < length:
                chunk = source.read(min(_CHUNK, length - sent))
                outputfile.write(chunk)
                sent += len(chunk)
                with self.server.lock:
                    record.bytes_sent = sent
                if record.throttled and throttle is not None:
                    delay = began + sent / throttle.slow_rate - time.monotonic()
                    if delay > 0 and self.server.stopping.wait(delay):
                        raise ConnectionAbortedError("server stopping")
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            return
        with self.server.lock:
            record.completed = True


class StrictOrigin(ServedDirectory):
    """Serve ``root`` on 127.0.0.1 at a free port while used as a context manager; over https
    when given a server-side ``tls`` context."""

    def __init__(self, root: Path, tls: ssl.SSLContext | None = None) -> None:
        server = RecordingServer(root, _Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        super().__init__(server, "StrictOrigin", "http" if tls is None else "https")
