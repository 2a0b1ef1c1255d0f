"""The egress proxy: yt-dlp and ffmpeg reach media sources only through the address guard."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.client
import ipaddress
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.clip import pipeline
from services.clip.errors import ClipFailed
from services.clip.fetch.egress import EgressProxy
from services.clip.request import build_spec
from services.clip.settings import ClipSettings
from services.common.http import AddressGuard, IPAddress
from tests.conftest import ORIGINS, Media


class Listener:
    """A TCP listener that answers one tiny HTTP response per connection and counts them."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listeners() -> Iterator[tuple[Listener, Listener]]:
    first = Listener("127.0.0.1")
    second = Listener("127.0.0.2")
    yield first, second
    first.close()
    second.close()


def only_127_0_0_1(ip: IPAddress) -> bool:
    return ip != ipaddress.ip_address("127.0.0.1")


async def fetch_through(proxy: EgressProxy, url: str) -> int:
    async with httpx.AsyncClient(proxy=proxy.url, trust_env=False, timeout=5) as http:
        return (await http.get(url)).status_code


def test_rebinding_reaches_only_the_checked_address(
    listeners: tuple[Listener, Listener],
) -> None:
    first, second = listeners
    answers = iter([["127.0.0.1"], ["127.0.0.2"]])

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    async def run() -> tuple[int, int]:
        guard = AddressGuard(allow_private=False, resolver=rebinding, refused=only_127_0_0_1)
        proxy = EgressProxy(guard)
        await proxy.start()
        try:
            url = f"http://media.test:{first.port}/segment"
            return await fetch_through(proxy, url), await fetch_through(proxy, url)
        finally:
            await proxy.close()

    allowed, refused = asyncio.run(run())
    assert (allowed, refused) == (200, 403)
    assert first.accepted == 1
    assert second.accepted == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "10.0.0.1", "169.254.169.254", "[::1]"])
def test_private_addresses_are_refused(listeners: tuple[Listener, Listener], host: str) -> None:
    first, _ = listeners

    async def run() -> int:
        proxy = EgressProxy(AddressGuard(allow_private=False))
        await proxy.start()
        try:
            return await fetch_through(proxy, f"http://{host}:{first.port}/x")
        finally:
            await proxy.close()

    # httpx writes an IPv6 target without brackets, which the proxy refuses as malformed.
    assert asyncio.run(run()) in (400, 403)
    assert first.accepted == 0


@pytest.mark.parametrize("media", ORIGINS, indirect=True)
def test_the_pipeline_fetches_only_through_the_proxy(
    media: Media, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Let the early check pass but make the proxy refuse loopback: nothing reaches the source."""

    async def refusing_proxy(allow_private: bool, buffer_bytes: int) -> str:
        proxy = EgressProxy(AddressGuard(allow_private=False), buffer_bytes)
        return await proxy.start()

    monkeypatch.setattr(pipeline, "egress_url", refusing_proxy)
    settings = ClipSettings(
        allow_private_networks=True, clip_extra_source_hosts=media.host, clip_work_dir=tmp_path
    )
    spec = build_spec(
        youtube_url=media.url("s60.mp4"), start_time="1", end_time="2", name=None,
        extra_hosts=settings.clip_extra_source_hosts, max_seconds=60, max_name_length=10,
        max_bytes=settings.clip_max_output_bytes,
    )  # fmt: skip
    media.server.reset()
    with pytest.raises(ClipFailed):
        asyncio.run(pipeline.make_clip(spec, tmp_path, settings, lambda stage, share: None))
    assert media.server.requests == []


class Origin:
    """A raw HTTP/1.1 origin that records each request head as received, per connection.

    ``/chunked`` answers with a chunked body, ``/close`` with a body that ends at close,
    ``/big`` with ``BIG`` bytes written 4 KiB at a time with the kernel's ordinary socket
    buffers, anything else with ``ok``.
    """

    BIG = 16 * 1024 * 1024

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.heads: list[tuple[int, bytes]] = []
        self.written = 0
        self.big: socket.socket | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        connection = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            connection += 1
            threading.Thread(target=self._serve, args=(conn, connection), daemon=True).start()

    def _serve(self, conn: socket.socket, connection: int) -> None:
        with conn, contextlib.suppress(OSError):
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        return
                    data += more
                head, data = data.split(b"\r\n\r\n", 1)
                self.heads.append((connection, head))
                path = head.split(b" ")[1]
                if path == b"/chunked":
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\n\r\n"
                    )
                elif path == b"/close":
                    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
                    return
                elif path == b"/big":
                    self.big = conn
                    conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {self.BIG}\r\n\r\n".encode())
                    block = b"x" * 4096
                    for _ in range(self.BIG // len(block)):
                        conn.sendall(block)
                        self.written += len(block)
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: 5\r\n\r\nok")

    def acked(self) -> int:
        """Bytes of ``/big`` the proxy's kernel has taken (written, less what still waits)."""
        assert self.big is not None
        waiting = struct.unpack("I", fcntl.ioctl(self.big, termios.TIOCOUTQ, b"\0" * 4))[0]
        return self.written - int(waiting)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def origins() -> Iterator[tuple[Origin, Origin]]:
    first, second = Origin("127.0.0.1"), Origin("127.0.0.2")
    yield first, second
    first.close()
    second.close()


@contextlib.contextmanager
def running(guard: AddressGuard, buffer_bytes: int = 256 * 1024) -> Iterator[str]:
    """An egress proxy on its own event loop in a thread, for blocking clients."""
    loop = asyncio.new_event_loop()
    proxy = EgressProxy(guard, buffer_bytes)
    url = loop.run_until_complete(proxy.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def connect(proxy_url: str) -> http.client.HTTPConnection:
    host, port = proxy_url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=5)


def exchange(conn: http.client.HTTPConnection, url: str, **headers: str) -> tuple[int, bytes]:
    conn.request("GET", url, headers={k.replace("_", "-"): v for k, v in headers.items()})
    response = conn.getresponse()
    return response.status, response.read()


def test_requests_reach_the_origin_in_origin_form_without_hop_by_hop_fields(
    origins: tuple[Origin, Origin],
) -> None:
    origin, _ = origins
    with running(AddressGuard(allow_private=True)) as proxy:
        conn = connect(proxy)
        conn.putrequest("GET", f"http://127.0.0.1:{origin.port}/file?a=1&b=2", skip_host=True)
        for name, value in [
            ("Host", "wrong.example"),
            ("Proxy-Connection", "keep-alive"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "for the proxy only"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Range", "bytes=0-1"),
        ]:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"ok")
        assert response.getheader("Keep-Alive") is None, "hop-by-hop fields of responses too"
    [(_, head)] = origin.heads
    line, *fields = head.decode().split("\r\n")
    assert line == "GET /file?a=1&b=2 HTTP/1.1"
    names = [field.split(":")[0].lower() for field in fields]
    assert fields[names.index("host")] == f"Host: 127.0.0.1:{origin.port}"
    assert names.count("host") == 1
    assert "range" in names
    for dropped in ("proxy-connection", "connection", "x-private", "keep-alive", "te", "trailer",
                    "upgrade", "proxy-authorization"):  # fmt: skip
        assert dropped not in names


def test_one_client_connection_carries_many_requests(origins: tuple[Origin, Origin]) -> None:
    origin, _ = origins
    base = f"http://127.0.0.1:{origin.port}"
    with running(AddressGuard(allow_private=True)) as proxy:
        conn = connect(proxy)
        assert exchange(conn, f"{base}/one") == (200, b"ok")
        assert exchange(conn, f"{base}/chunked") == (200, b"abcdefg")
        assert exchange(conn, f"{base}/two") == (200, b"ok")
        assert exchange(conn, f"{base}/close") == (200, b"until close")
        # The origin closed the last one; the next request opens a new upstream connection.
        conn = connect(proxy)
        assert exchange(conn, f"{base}/three") == (200, b"ok")
    paths = [(connection, head.split(b" ")[1]) for connection, head in origin.heads]
    assert paths == [(1, b"/one"), (1, b"/chunked"), (1, b"/two"), (1, b"/close"), (2, b"/three")]


def test_another_host_on_the_same_connection_is_checked_and_gets_its_own_upstream(
    origins: tuple[Origin, Origin],
) -> None:
    first, second = origins
    with running(AddressGuard(allow_private=True)) as proxy:
        conn = connect(proxy)
        assert exchange(conn, f"http://127.0.0.1:{first.port}/a") == (200, b"ok")
        assert exchange(conn, f"http://127.0.0.2:{second.port}/b") == (200, b"ok")
        assert exchange(conn, f"http://127.0.0.1:{first.port}/c") == (200, b"ok")
    assert [h.split(b" ")[1] for _, h in first.heads] == [b"/a", b"/c"]
    assert [h.split(b" ")[1] for _, h in second.heads] == [b"/b"]
    with running(AddressGuard(allow_private=False, refused=only_127_0_0_1)) as proxy:
        conn = connect(proxy)
        assert exchange(conn, f"http://127.0.0.1:{first.port}/d") == (200, b"ok")
        assert exchange(conn, f"http://127.0.0.2:{second.port}/e")[0] == 403
    assert [h.split(b" ")[1] for _, h in second.heads] == [b"/b"], "refused host never reached"


def test_the_proxy_reads_no_further_ahead_of_its_client_than_the_bound(
    origins: tuple[Origin, Origin],
) -> None:
    origin, _ = origins
    bound = 256 * 1024
    with running(AddressGuard(allow_private=True), bound) as proxy:
        host, port = proxy.removeprefix("http://").split(":")
        client = socket.socket()
        # The client's own receive buffer is its business; keep it small to see the proxy's.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((host, int(port)))
        client.sendall(f"GET http://127.0.0.1:{origin.port}/big HTTP/1.1\r\n\r\n".encode())
        read = 0
        while read < 100_000:
            read += len(client.recv(65536))
        settled = -1
        while settled != origin.acked():
            settled = origin.acked()
            time.sleep(0.3)
        unread = struct.unpack("I", fcntl.ioctl(client, termios.FIONREAD, b"\0" * 4))[0]
        held = settled - read - unread
        client.close()
    assert 0 <= held <= bound, f"the proxy held {held} bytes its client had not read"
