"""The loopback HTTP proxy through which yt-dlp and ffmpeg reach media sources.

yt-dlp and ffmpeg resolve host names themselves. Pointed at this proxy, they never do: the proxy
resolves each host once with ``AddressGuard``, refuses private and reserved addresses, and
connects to the very address it checked (``CONNECT`` for https, absolute-form requests for
http). Segment URLs inside DASH and HLS manifests go through it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from urllib.parse import urlsplit

from services.common.errors import HermesError
from services.common.http import AddressGuard

logger = logging.getLogger(__name__)
HEAD_LIMIT = 64 * 1024
CHUNK = 64 * 1024


class EgressProxy:
    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            head = await client_in.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            client_out.close()
            return
        if len(head) > HEAD_LIMIT:
            await _refuse(client_out, 431, "Request header too large")
            return
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            forwarded = b""
        else:
            parts = urlsplit(target)
            if parts.scheme != "http" or not parts.hostname:
                await _refuse(client_out, 400, "Only absolute http URLs or CONNECT")
                return
            host, port, forwarded = parts.hostname, str(parts.port or 80), head
        try:
            addresses = await self._guard.addresses(host.strip("[]"))
            upstream_in, upstream_out = await _connect(addresses, int(port))
        except HermesError as exc:
            logger.warning("egress refused %s: %s", host, exc.message)
            await _refuse(client_out, 403, "Forbidden")
            return
        except (OSError, ValueError):
            await _refuse(client_out, 502, "Bad Gateway")
            return
        if method == "CONNECT":
            client_out.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            upstream_out.write(forwarded)
        await asyncio.gather(
            _pipe(client_in, upstream_out), _pipe(upstream_in, client_out), return_exceptions=True
        )


async def _connect(
    addresses: list[str], port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the first checked address that answers; never resolve again."""
    last: OSError | None = None
    for address in addresses:
        try:
            return await asyncio.wait_for(asyncio.open_connection(address, port), timeout=20)
        except (OSError, TimeoutError) as exc:
            last = OSError(str(exc))
    raise last or OSError("no address")


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(CHUNK):
            sink.write(chunk)
            await sink.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            sink.close()


async def _refuse(out: asyncio.StreamWriter, status: int, reason: str) -> None:
    out.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    with contextlib.suppress(OSError):
        await out.drain()
    out.close()


_proxies: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[bool, EgressProxy]] = (
    weakref.WeakKeyDictionary()
)


async def egress_url(allow_private: bool) -> str:
    """The proxy of the running event loop, started on first use."""
    loop = asyncio.get_running_loop()
    proxies = _proxies.setdefault(loop, {})
    if allow_private not in proxies:
        proxy = EgressProxy(AddressGuard(allow_private=allow_private))
        await proxy.start()
        proxies[allow_private] = proxy
    return proxies[allow_private].url
