"""The guarded HTTP client for every URL a stranger gives us (input files, webhooks).

The host is resolved once, every address is checked, and the connection goes to that very
address: a second lookup never happens, so DNS rebinding cannot slip a private address in.
Redirects are followed by hand so each hop's URL is checked too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpcore
import httpx

from services.common.errors import AddressRefused, FetchFailed, PayloadTooLarge

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REFUSED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",
        "192.0.0.0/24",
        "198.18.0.0/15",
        "::/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "2001::/32",
        "2002::/16",
        "fc00::/7",
        "fec0::/10",
    )
)


def is_refused_address(ip: IPAddress) -> bool:
    """True for every address a user-given URL must not reach.

    Python calls some IPv6 forms that embed an IPv4 address "global"; they are refused whatever
    they carry, since the embedded address could be private.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return True
    if any(ip in net for net in _REFUSED_NETWORKS if net.version == ip.version):
        return True
    # Not global covers loopback, private, link-local and unspecified addresses too.
    return not ip.is_global or ip.is_multicast or ip.is_reserved


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class AddressGuard:
    """Resolves a host and keeps only the addresses we may connect to."""

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver = system_resolver,
        refused: Callable[[IPAddress], bool] = is_refused_address,
    ) -> None:
        self.allow_private = allow_private
        self._resolver = resolver
        self._refused = refused

    async def addresses(self, host: str) -> list[str]:
        host = host.strip("[]")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            candidates = [str(literal)]
        else:
            try:
                candidates = await self._resolver(host, 0)
            except OSError as exc:
                raise FetchFailed(f"The host {host} could not be resolved.") from exc
        if self.allow_private:
            return candidates
        allowed = [a for a in candidates if not self._refused(ipaddress.ip_address(a))]
        if not allowed:
            raise AddressRefused(
                f"The host {host} resolves to a private or reserved address, which is refused."
            )
        return allowed


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the checked address of a host instead of resolving it again."""

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        last: Exception | None = None
        for address in await self._guard.addresses(host):
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not reachable from user-given URLs")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, guard: AddressGuard) -> None:
        super().__init__()
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            network_backend=_GuardedBackend(guard),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
        )


def check_url(url: str | httpx.URL) -> httpx.URL:
    """Refuse what no fetch may start from: other schemes, userinfo, no host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise FetchFailed("The URL is not a valid http or https URL.") from exc
    if parsed.scheme not in ("http", "https"):
        raise AddressRefused("Only http and https URLs can be fetched.")
    if parsed.userinfo:
        raise AddressRefused("URLs with a user name or password are refused.")
    if not parsed.host:
        raise FetchFailed("The URL has no host.")
    return parsed


class GuardedClient:
    """An httpx client that only reaches addresses a stranger may make us reach."""

    def __init__(
        self,
        *,
        allow_private: bool,
        timeout: float,
        max_redirects: int = 5,
        resolver: Resolver = system_resolver,
        refused: Callable[[IPAddress], bool] = is_refused_address,
    ) -> None:
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.guard = AddressGuard(allow_private=allow_private, resolver=resolver, refused=refused)
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(self.guard),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"accept-encoding": "identity", "user-agent": "hermes-media"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def _stream(self, url: str) -> AsyncIterator[httpx.Response]:
        target = check_url(url)
        for _ in range(self.max_redirects + 1):
            async with self._client.stream("GET", target) as response:
                if not response.is_redirect:
                    yield response
                    return
                location = response.headers.get("location", "")
            target = check_url(target.join(location))
        raise FetchFailed(f"The URL redirected more than {self.max_redirects} times.")

    async def fetch_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """GET a URL, streaming, and stop with 413 as soon as it is larger than ``max_bytes``."""
        try:
            async with asyncio.timeout(self.timeout), self._stream(url) as response:
                if response.status_code != 200:
                    raise FetchFailed(
                        f"The file URL answered HTTP {response.status_code}; "
                        "check that the link is valid and not expired."
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise PayloadTooLarge(_too_large(max_bytes))
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(_too_large(max_bytes))
                    chunks.append(chunk)
                return b"".join(chunks)
        except TimeoutError as exc:
            raise FetchFailed(f"Fetching the file took longer than {self.timeout:g} s.") from exc
        except httpx.HTTPError as exc:
            raise FetchFailed(f"The file URL could not be fetched: {_reason(exc)}.") from exc

    async def post(
        self, url: str, content: bytes | AsyncIterable[bytes], *, headers: Mapping[str, str]
    ) -> httpx.Response:
        """POST to a checked URL without following redirects (webhooks); ``content`` may stream."""
        target = check_url(url)
        return await self._client.post(target, content=content, headers=dict(headers))


def _too_large(max_bytes: int) -> str:
    return f"The file is larger than the limit of {max_bytes} bytes."


def _reason(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "the connection timed out"
    if isinstance(exc, httpx.ConnectError):
        return "the host did not accept the connection"
    return type(exc).__name__
