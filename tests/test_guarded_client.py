"""The guarded client: which addresses it refuses, and that redirects are checked hop by hop."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.common.errors import AddressRefused, FetchFailed
from services.common.http import (
    GuardedClient,
    IPAddress,
    Resolver,
    is_refused_address,
    system_resolver,
)

REFUSED = [
    "127.0.0.1",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "::ffff:127.0.0.1",
    "::ffff:8.8.8.8",
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "2002:7f00:1::",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "ff02::1",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", REFUSED)
def test_refused(address: str) -> None:
    assert is_refused_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_allowed(address: str) -> None:
    assert not is_refused_address(ipaddress.ip_address(address))


class _Redirect(BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        if self.path == "/image":
            self.send_response(200)
            self.send_header("content-length", "5")
            self.end_headers()
            self.wfile.write(b"hello")
            return
        self.send_response(302)
        self.send_header("location", self.target or "/image")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def redirector() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def only_127_0_0_1_allowed(ip: IPAddress) -> bool:
    return str(ip) != "127.0.0.1"


async def fetch(url: str, *, max_redirects: int = 5, resolver: Resolver = system_resolver) -> bytes:
    guarded = GuardedClient(
        allow_private=False,
        timeout=5,
        refused=only_127_0_0_1_allowed,
        max_redirects=max_redirects,
        resolver=resolver,
    )
    try:
        return await guarded.fetch_bytes(url, max_bytes=1000)
    finally:
        await guarded.aclose()


def test_redirect_within_allowed_hosts_is_followed(redirector: ThreadingHTTPServer) -> None:
    _Redirect.target = ""
    port = redirector.server_address[1]
    assert asyncio.run(fetch(f"http://127.0.0.1:{port}/start")) == b"hello"


def test_redirect_to_a_refused_address_is_not_followed(redirector: ThreadingHTTPServer) -> None:
    port = redirector.server_address[1]
    _Redirect.target = f"http://127.0.0.2:{port}/image"
    with pytest.raises(AddressRefused):
        asyncio.run(fetch(f"http://127.0.0.1:{port}/start"))


def test_name_resolving_to_a_refused_address_is_refused_without_connecting() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.2"]

    with pytest.raises(AddressRefused):
        asyncio.run(fetch("http://images.example/x.png", resolver=resolver))


def test_too_many_redirects(redirector: ThreadingHTTPServer) -> None:
    port = redirector.server_address[1]
    _Redirect.target = "/again"
    with pytest.raises(FetchFailed, match="redirected more than 2"):
        asyncio.run(fetch(f"http://127.0.0.1:{port}/start", max_redirects=2))
