"""The loopback HTTP proxy through which yt-dlp and ffmpeg (and the range fetcher) reach sources.

yt-dlp and ffmpeg resolve host names themselves. Pointed at this proxy, they never do: the proxy
resolves the host of every request with ``AddressGuard``, refuses private and reserved
addresses, and connects to the very address it checked. Segment URLs inside DASH and HLS
manifests go through it too.

It speaks HTTP/1.1 to both sides (RFC 9112): a client's absolute-form request goes to the origin
in origin-form with a ``Host`` header from the target, hop-by-hop headers are dropped, and one
kept-alive client connection may carry many requests, each checked again (a request for another
host gets its own upstream connection). Message framing (Content-Length, chunked, or until
close) is parsed so each response is forwarded whole and no further. ``CONNECT`` opens a tunnel
for https.

It never reads ahead of its client: the upstream socket's receive buffer and the client
socket's send buffer are small and every byte is passed on before the next is read, so at most
``buffer_bytes`` of the origin's data wait in this proxy, and bytes a client abandons are bytes
the origin is never asked to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import weakref
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlsplit

from services.common.errors import HermesError
from services.common.http import AddressGuard

logger = logging.getLogger(__name__)
HEAD_LIMIT = 64 * 1024
CHUNK = 32 * 1024
CONNECT_TIMEOUT = 20.0
# A client or origin silent this long has gone; its connection is closed.
IDLE_TIMEOUT = 60.0
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
NO_BODY_STATUS = frozenset({204, 304})


class _BadMessage(Exception):
    """A request or response this proxy cannot frame; the connection ends."""


class _Closed(Exception):
    """The other side went away in the middle of a message."""


class _Peer:
    """One non-blocking socket read through the event loop, with a small read buffer.

    Time limits are ``asyncio.timeout`` blocks: on Python 3.11 a cancelled ``wait_for`` around
    ``sock_recv`` was seen to leave the receive pending, so the proxy never finished closing.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self._loop = asyncio.get_running_loop()

    async def _fill(self) -> bool:
        async with asyncio.timeout(IDLE_TIMEOUT):
            data = await self._loop.sock_recv(self.sock, CHUNK)
        self.buffer += data
        return bool(data)

    async def read_until(self, marker: bytes) -> bytes | None:
        """Bytes up to and including ``marker``; None if the peer closes before any byte."""
        while (end := self.buffer.find(marker)) < 0:
            if len(self.buffer) > HEAD_LIMIT:
                raise _BadMessage("header section too large")
            if not await self._fill():
                if self.buffer:
                    raise _Closed
                return None
        end += len(marker)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    async def read_some(self, limit: int) -> bytes:
        """At most ``limit`` bytes, buffered ones first; empty when the peer has closed."""
        if not self.buffer and not await self._fill():
            return b""
        data = bytes(self.buffer[:limit])
        del self.buffer[:limit]
        return data

    async def send(self, data: bytes) -> None:
        async with asyncio.timeout(IDLE_TIMEOUT):
            await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class _Message:
    """A request or status line and its header fields, in order."""

    start: str
    fields: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.fields if k.lower() == name]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()}


def _parse(head: bytes) -> _Message:
    lines = head.decode("latin-1").split("\r\n")[:-2]
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # Obsolete line folding and whitespace before the colon are refused (RFC 9112 5).
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise _BadMessage("malformed header field")
        fields.append((name, value.strip()))
    return _Message(lines[0], fields)


def _end_to_end(message: _Message) -> list[tuple[str, str]]:
    """The fields a proxy forwards: not hop-by-hop, not named by ``Connection``."""
    dropped = HOP_BY_HOP | message.tokens("connection")
    return [(k, v) for k, v in message.fields if k.lower() not in dropped]


def _serialize(start: str, fields: list[tuple[str, str]]) -> bytes:
    return "".join([f"{start}\r\n", *(f"{k}: {v}\r\n" for k, v in fields), "\r\n"]).encode(
        "latin-1"
    )


@dataclass(frozen=True)
class _Framing:
    """How a message body ends: after ``length`` bytes, after the last chunk, or at close."""

    length: int | None = 0
    chunked: bool = False

    @property
    def until_close(self) -> bool:
        return self.length is None and not self.chunked


def _body_framing(message: _Message, *, request: bool) -> _Framing:
    """RFC 9112 6.3: Transfer-Encoding wins over Content-Length; a request without either
    has no body, a response without either runs until the connection closes."""
    codings = [t.strip().lower() for v in message.values("transfer-encoding") for t in v.split(",")]
    if codings:
        if codings[-1] == "chunked":
            return _Framing(length=None, chunked=True)
        if request:
            raise _BadMessage("request body without chunked framing")
        return _Framing(length=None)
    lengths = {v.strip() for v in message.values("content-length")}
    if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
        raise _BadMessage("invalid Content-Length")
    if lengths:
        return _Framing(length=int(lengths.pop()))
    return _Framing(length=0 if request else None)


async def _copy_body(source: _Peer, sink: _Peer, framing: _Framing) -> None:
    """Pass one body on, a chunk at a time: nothing is read before the last chunk is sent."""
    if framing.chunked:
        while True:
            line = await source.read_until(b"\r\n")
            if line is None:
                raise _Closed
            await sink.send(line)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise _BadMessage("invalid chunk size") from exc
            if size == 0:
                break
            await _copy_length(source, sink, size + 2)
        while (trailer := await source.read_until(b"\r\n")) not in (None, b"\r\n"):
            await sink.send(trailer)
        if trailer is None:
            raise _Closed
        await sink.send(trailer)
    elif framing.length is not None:
        await _copy_length(source, sink, framing.length)
    else:
        while data := await source.read_some(CHUNK):
            await sink.send(data)


async def _copy_length(source: _Peer, sink: _Peer, length: int) -> None:
    while length > 0:
        data = await source.read_some(min(length, CHUNK))
        if not data:
            raise _Closed
        await sink.send(data)
        length -= len(data)


@dataclass
class _Upstream:
    host: str
    port: int
    address: str
    peer: _Peer


class EgressProxy:
    """The proxy; ``buffer_bytes`` bounds the origin's data it holds per connection."""

    def __init__(self, guard: AddressGuard, buffer_bytes: int = 256 * 1024) -> None:
        if buffer_bytes < 2 * CHUNK:
            raise ValueError(f"buffer_bytes must be at least {2 * CHUNK}")
        self._guard = guard
        # Linux doubles a requested socket buffer (half of it for its own bookkeeping, though
        # data may fill it): two buffers of a quarter of what is left after one chunk in
        # hand stay within the bound.
        self._socket_buffer = (buffer_bytes - CHUNK) // 4
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> str:
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept(listener))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._socket_buffer)
            task = asyncio.create_task(self._serve(_Peer(conn)))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, client: _Peer) -> None:
        upstream: _Upstream | None = None
        try:
            while True:
                head = await client.read_until(b"\r\n\r\n")
                if head is None:
                    return
                request = _parse(head)
                method, target, version = _request_line(request.start)
                if method == "CONNECT":
                    await self._tunnel(client, target)
                    return
                upstream = await self._exchange(client, request, method, target, upstream)
                if version != "HTTP/1.1" or "close" in request.tokens("connection"):
                    return
        except _BadMessage as exc:
            logger.info("egress: bad message: %s", exc)
            with contextlib.suppress(_Closed, OSError, TimeoutError):
                await _refuse(client, 400, "Bad Request")
        except (_Closed, OSError, TimeoutError):
            pass
        finally:
            if upstream is not None:
                upstream.peer.close()
            client.close()

    async def _exchange(
        self,
        client: _Peer,
        request: _Message,
        method: str,
        target: str,
        upstream: _Upstream | None,
    ) -> _Upstream | None:
        """Forward one request and its response; the upstream connection to keep, if any."""
        parts = urlsplit(target)
        try:
            port = parts.port or 80
        except ValueError:
            port = 0
        if parts.scheme != "http" or not parts.hostname or not port or parts.username:
            await _refuse(client, 400, "Only absolute http URLs or CONNECT")
        host = parts.hostname
        addresses = await self._check(client, host)
        reusable = upstream is not None and (upstream.host, upstream.port) == (host, port)
        if upstream is not None and not (reusable and upstream.address in addresses):
            upstream.peer.close()
            upstream = None
        authority = f"[{host}]" if ":" in host else host
        if port != 80:
            authority += f":{port}"
        framing = _body_framing(request, request=True)
        fields = [(k, v) for k, v in _end_to_end(request) if k.lower() != "host"]
        origin_form = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = _serialize(f"{method} {origin_form} HTTP/1.1", [("Host", authority), *fields])
        for attempt in range(2):
            if upstream is None:
                upstream = await self._open(client, host, port, addresses)
            await upstream.peer.send(head)
            await _copy_body(client, upstream.peer, framing)
            response_head = await upstream.peer.read_until(b"\r\n\r\n")
            if response_head is not None:
                break
            # A kept-alive connection the origin closed meanwhile: once more on a new one,
            # when the request can be sent again.
            upstream.peer.close()
            upstream = None
            if attempt or framing.length != 0 or framing.chunked:
                await _refuse(client, 502, "Bad Gateway")
        assert upstream is not None
        assert response_head is not None
        return await self._respond(client, upstream, method, response_head)

    async def _respond(
        self, client: _Peer, upstream: _Upstream, method: str, response_head: bytes
    ) -> _Upstream | None:
        while True:
            response = _parse(response_head)
            status = _status(response.start)
            if not 100 <= status < 200:
                break
            # Interim responses (100 Continue) go on as they are; the final one follows.
            await client.send(_serialize(response.start, _end_to_end(response)))
            next_head = await upstream.peer.read_until(b"\r\n\r\n")
            if next_head is None:
                raise _Closed
            response_head = next_head
        if method == "HEAD" or status in NO_BODY_STATUS:
            framing = _Framing(length=0)
        else:
            framing = _body_framing(response, request=False)
        keep = not framing.until_close and "close" not in response.tokens("connection")
        fields = _end_to_end(response)
        if framing.until_close:
            fields.append(("Connection", "close"))
        reason = response.start.split(" ", 2)[2] if response.start.count(" ") >= 2 else ""
        await client.send(_serialize(f"HTTP/1.1 {status} {reason}".rstrip(), fields))
        await _copy_body(upstream.peer, client, framing)
        if keep:
            return upstream
        upstream.peer.close()
        if framing.until_close:
            raise _Closed
        return None

    async def _check(self, client: _Peer, host: str) -> list[str]:
        try:
            return await self._guard.addresses(host)
        except HermesError as exc:
            logger.warning("egress refused %s: %s", host, exc.message)
            await _refuse(client, 403, "Forbidden")

    async def _open(self, client: _Peer, host: str, port: int, addresses: list[str]) -> _Upstream:
        try:
            sock, address = await self._connect(addresses, port)
        except OSError:
            await _refuse(client, 502, "Bad Gateway")
        return _Upstream(host, port, address, _Peer(sock))

    async def _connect(self, addresses: list[str], port: int) -> tuple[socket.socket, str]:
        """Connect to the first checked address that answers; never resolve again."""
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            # Set before connecting, so the window offered to the origin is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._socket_buffer)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await loop.sock_connect(sock, (address, port))
                return sock, address
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = OSError(str(exc))
        raise last or OSError("no address")

    async def _tunnel(self, client: _Peer, target: str) -> None:
        host, _, port_text = target.rpartition(":")
        host = host.strip("[]")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            await _refuse(client, 400, "Bad CONNECT target")
        addresses = await self._check(client, host)
        upstream = await self._open(client, host, int(port_text), addresses)
        try:
            await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(client, upstream.peer), _pipe(upstream.peer, client))
        finally:
            upstream.peer.close()


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadMessage("malformed request line")
    return parts[0], parts[1], parts[2]


def _status(line: str) -> int:
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise _BadMessage("malformed status line")
    return int(parts[1])


async def _pipe(source: _Peer, sink: _Peer) -> None:
    """One direction of a tunnel; the end of it is passed on as a half-close."""
    try:
        while data := await source.read_some(CHUNK):
            await sink.send(data)
        with contextlib.suppress(OSError):
            sink.sock.shutdown(socket.SHUT_WR)
    except (OSError, TimeoutError):
        source.close()
        sink.close()


async def _refuse(client: _Peer, status: int, reason: str) -> NoReturn:
    """Answer with an error; the client's connection ends with it."""
    await client.send(
        f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    raise _Closed


_proxies: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[bool, int], EgressProxy]
] = weakref.WeakKeyDictionary()


async def egress_url(allow_private: bool, buffer_bytes: int) -> str:
    """The proxy of the running event loop, started on first use."""
    loop = asyncio.get_running_loop()
    proxies = _proxies.setdefault(loop, {})
    key = (allow_private, buffer_bytes)
    if key not in proxies:
        proxy = EgressProxy(AddressGuard(allow_private=allow_private), buffer_bytes)
        await proxy.start()
        proxies[key] = proxy
    return proxies[key].url
