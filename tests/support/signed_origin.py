"""A loopback origin that behaves like YouTube where the clip job meets its limits.

This module owns ``SignedOrigin``: a watch page (``/watch``) whose ``og:video`` points at a media
file with a fresh signature on every visit, as each extraction of a YouTube video yields new
signed media URLs. The media answers byte ranges (206), except for the signatures told to
fail (403, as YouTube answers a spent or expired URL). The page can answer 429 (rate limit).
Every request is recorded.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_CHUNK = 64 * 1024


@dataclass
class Hit:
    path: str
    signature: str | None
    status: int
    referer: str | None
    at: float = field(default_factory=time.monotonic)


@dataclass
class _State:
    root: Path
    media: str
    refused: set[str] = field(default_factory=set)
    page_status: int = 200
    page_failures: int | None = None
    hits: list[Hit] = field(default_factory=list)
    signatures: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        state = self.server.state
        parts = urlsplit(self.path)
        signature = parse_qs(parts.query).get("sig", [None])[0]
        if parts.path == "/watch":
            with state.lock:
                status = state.page_status
                if state.page_failures is not None:
                    state.page_failures -= 1
                    if state.page_failures <= 0:
                        state.page_status, state.page_failures = 200, None
                number = next(state.signatures)
            media = f"http://{self.headers['Host']}/media/{state.media}?sig={number}"
            body = (
                "<html><head><title>Signed video</title>"
                f'<meta property="og:video" content="{media}">'
                '<meta property="og:video:type" content="video/mp4">'
                "</head><body></body></html>"
            ).encode()
            self._record(parts.path, None, status)
            self._send(status, body if status == 200 else b"", "text/html")
            return
        if parts.path != f"/media/{state.media}":
            self._record(parts.path, signature, 404)
            self._send(404, b"", "text/plain")
            return
        if signature is None or signature in state.refused:
            self._record(parts.path, signature, 403)
            self._send(403, b"", "text/plain")
            return
        self._serve_range(state.root / state.media, parts.path, signature)

    def _serve_range(self, file: Path, path: str, signature: str) -> None:
        size = file.stat().st_size
        match = _RANGE.fullmatch(self.headers.get("Range", ""))
        start, end = 0, size - 1
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        status = 206 if match else 200
        self._record(path, signature, status)
        self.send_response(status)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with file.open("rb") as f:
            f.seek(start)
            left = end - start + 1
            try:
                while left > 0 and (chunk := f.read(min(_CHUNK, left))):
                    self.wfile.write(chunk)
                    left -= len(chunk)
            except OSError:
                self.close_connection = True

    def _record(self, path: str, signature: str | None, status: int) -> None:
        with self.server.state.lock:
            hit = Hit(path, signature, status, self.headers.get("Referer"))
            self.server.state.hits.append(hit)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: _State) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class SignedOrigin:
    """``with SignedOrigin(root, "s60.mp4") as origin: origin.page_url``"""

    def __init__(self, root: Path, media: str) -> None:
        self._state = _State(root=root, media=media)
        self._server = _Server(self._state)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> SignedOrigin:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def page_url(self) -> str:
        return f"http://{self.host}/watch"

    def refuse(self, *signatures: str) -> None:
        """Answer 403 to media requests carrying these signatures."""
        self._state.refused.update(signatures)

    def answer_page_with(self, status: int, times: int | None = None) -> None:
        """Answer the page with ``status``: ``times`` times, then 200 again, or until told."""
        with self._state.lock:
            self._state.page_status, self._state.page_failures = status, times

    def hits(self, path: str | None = None) -> list[Hit]:
        with self._state.lock:
            return [h for h in self._state.hits if path is None or h.path == path]

    def page_visits(self) -> int:
        return len(self.hits("/watch"))

    def media_hits(self) -> list[Hit]:
        return [h for h in self.hits() if h.path.startswith("/media/")]
