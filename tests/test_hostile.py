"""Hostile URLs against every fetcher, proving refusal without a single connection.

The three fetchers of user-given URLs are the compress route's input file (the guarded client,
and the route end to end), the clip route's media sources (``parse_source`` for the link,
``_check_address`` for the source and format URLs) and webhooks (``WebhookSender.attempt``).
Each gets the same table of hostile URLs. Nothing here may reach past loopback: every resolver
is injected and recording, every address check goes through a recording ``refused`` spy, and
httpcore's real network backend is wrapped so any connection is recorded (and one to a
non-loopback address is stopped before it starts). Loopback targets carry the port of real
listeners on 127.0.0.1 and [::1] whose accept counters must stay at zero.

Also here: redirects from an allowed host to a refused one, a DNS-rebinding resolver, webhooks
never following a redirect, and a pixel bomb refused fast and small in a fresh process.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import pytest

from services.clip import pipeline
from services.clip.errors import SourceRefused, SourceUnreachable
from services.clip.jobs.delivery import Outcome, Payload, WebhookSender, webhook_client
from services.clip.pipeline import _check_address
from services.clip.request import InvalidUrl, parse_source
from services.clip.settings import ClipSettings
from services.common.errors import AddressRefused, FetchFailed
from services.common.http import AddressGuard, GuardedClient, IPAddress, is_refused_address
from services.compress import app as compress_app
from services.compress.app import create_app
from services.compress.settings import CompressSettings
from tests.support.apps import client as app_client
from tests.support.images import png_header_only

ROOT = Path(__file__).resolve().parents[1]
ROUTE = "/compress-an-image"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

# What the injected resolver answers for names; anything else is read the way getaddrinfo
# reads numeric hosts (127.1, 0x7f000001, 2130706433...), never with a DNS query.
NAMES: dict[str, list[str]] = {
    "metadata.internal": ["169.254.169.254"],
    "metadata.google.internal": ["169.254.169.254"],
    "localtest.me": ["127.0.0.1"],
    "v6.localtest.me": ["::1"],
    "localhost": ["127.0.0.1", "::1"],
    "internal.example": ["10.0.0.1", "192.168.1.1", "fd00::1"],
    "nat64.example": ["64:ff9b::a9fe:a9fe"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "cgnat.example": ["100.64.0.1"],
}


class Kind(enum.Enum):
    literal = "an IP literal: checked as is, never resolved"
    name = "a name (or a numeric form httpx leaves as a name): resolved, then checked"
    shape = "a scheme or userinfo refused before any lookup"
    malformed = "not a URL httpx accepts: rejected before any lookup"


@dataclass(frozen=True)
class Case:
    id: str
    url: str  # {port} is the port of the loopback listeners
    kind: Kind


CASES = [
    # IPv4 literals.
    Case("loopback", "http://127.0.0.1:{port}/", Kind.literal),
    Case("loopback-top", "http://127.255.255.254:{port}/", Kind.literal),
    Case("unspecified", "http://0.0.0.0:{port}/", Kind.literal),
    Case("private-10", "http://10.0.0.1/", Kind.literal),
    Case("private-172.16", "http://172.16.0.1/", Kind.literal),
    Case("private-172.31", "http://172.31.255.254/", Kind.literal),
    Case("private-192.168", "http://192.168.1.1:8080/", Kind.literal),
    Case("metadata", "http://169.254.169.254/latest/meta-data/", Kind.literal),
    Case("cgnat", "http://100.64.0.1/", Kind.literal),
    Case("multicast", "http://224.0.0.1/", Kind.literal),
    Case("reserved-240", "http://240.0.0.1/", Kind.literal),
    Case("broadcast", "http://255.255.255.255/", Kind.literal),
    Case("ietf-192.0.0", "http://192.0.0.170/", Kind.literal),
    Case("fullwidth-dots", "http://127\u30020\u30020\u30021:{port}/", Kind.literal),
    # Numeric forms httpx passes on as names; getaddrinfo reads them as 127.0.0.1 / 0.0.0.0.
    Case("short-127.1", "http://127.1:{port}/", Kind.name),
    Case("hex", "http://0x7f000001:{port}/", Kind.name),
    Case("hex-dotted", "http://0x7f.0.0.1:{port}/", Kind.name),
    Case("decimal", "http://2130706433:{port}/", Kind.name),
    Case("octal-whole", "http://017700000001:{port}/", Kind.name),
    Case("zero", "http://0:{port}/", Kind.name),
    # httpx itself rejects dotted octal.
    Case("octal-dotted", "http://0177.0.0.1:{port}/", Kind.malformed),
    # IPv6 literals.
    Case("v6-loopback", "http://[::1]:{port}/", Kind.literal),
    Case("v6-unspecified", "http://[::]:{port}/", Kind.literal),
    Case("v6-link-local", "http://[fe80::1]/", Kind.literal),
    Case("v6-link-local-zone", "http://[fe80::1%25lo]:{port}/", Kind.literal),
    Case("v6-ula-fc00", "http://[fc00::1]/", Kind.literal),
    Case("v6-ula-fd00", "http://[fd00::1]/", Kind.literal),
    Case("v4-mapped", "http://[::ffff:127.0.0.1]:{port}/", Kind.literal),
    Case("v4-mapped-hex", "http://[::ffff:7f00:1]:{port}/", Kind.literal),
    Case("v4-mapped-metadata", "http://[::ffff:169.254.169.254]/", Kind.literal),
    Case("v4-mapped-long", "http://[0:0:0:0:0:ffff:127.0.0.1]:{port}/", Kind.literal),
    Case("v4-translated", "http://[::ffff:0:7f00:1]:{port}/", Kind.literal),
    Case("v4-compatible", "http://[::127.0.0.1]:{port}/", Kind.literal),
    Case("nat64", "http://[64:ff9b::7f00:1]:{port}/", Kind.literal),
    Case("nat64-metadata", "http://[64:ff9b::a9fe:a9fe]/", Kind.literal),
    Case("6to4", "http://[2002:7f00:1::]/", Kind.literal),
    Case("teredo", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", Kind.literal),
    Case("v6-multicast", "http://[ff02::1]/", Kind.literal),
    Case("v6-site-local", "http://[fec0::1]/", Kind.literal),
    # Names the injected resolver answers with refused addresses.
    Case("name-metadata", "http://metadata.internal/latest/meta-data/", Kind.name),
    Case("name-gce-metadata", "http://metadata.google.internal/computeMetadata/v1/", Kind.name),
    Case("name-localtest", "http://localtest.me:{port}/", Kind.name),
    Case("name-v6-loopback", "http://v6.localtest.me:{port}/", Kind.name),
    Case("name-localhost", "http://localhost:{port}/", Kind.name),
    Case("name-all-private", "http://internal.example/", Kind.name),
    Case("name-nat64", "http://nat64.example/", Kind.name),
    Case("name-v4-mapped", "http://mapped.example:{port}/", Kind.name),
    Case("name-cgnat", "https://cgnat.example/", Kind.name),
    # Other schemes, and userinfo.
    Case("file", "file:///etc/passwd", Kind.shape),
    Case("file-localhost", "file://localhost/etc/passwd", Kind.shape),
    Case("ftp", "ftp://127.0.0.1:{port}/", Kind.shape),
    Case("gopher", "gopher://127.0.0.1:{port}/_GET%20/%20HTTP/1.0%0d%0a", Kind.shape),
    Case("dict", "dict://127.0.0.1:{port}/info", Kind.shape),
    Case("data", "data:text/plain;base64,aGVsbG8=", Kind.shape),
    Case("javascript", "javascript:alert(1)", Kind.shape),
    Case("unix-socket", "http+unix://%2Fvar%2Frun%2Fdocker.sock/info", Kind.shape),
    Case("userinfo", "http://user:pw@example.com/", Kind.shape),
    Case("userinfo-host-confusion", "http://example.com@127.0.0.1:{port}/", Kind.shape),
    Case("userinfo-port-confusion", "http://127.0.0.1:{port}@example.com/", Kind.shape),
    # No host at all.
    Case("no-host", "http:///etc/passwd", Kind.malformed),
]


# --- spies ---------------------------------------------------------------------------------


class Spies:
    """Every lookup, every address check and every connection, for one test."""

    def __init__(self) -> None:
        self.resolved: list[str] = []
        self.checked: list[tuple[str, bool]] = []
        self.connects: list[tuple[str, int]] = []
        self.predicate: Callable[[IPAddress], bool] = is_refused_address
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            self.resolved.clear()
            self.checked.clear()
            self.connects.clear()
        self.predicate = is_refused_address

    async def resolver(self, host: str, port: int) -> list[str]:
        with self.lock:
            self.resolved.append(host)
        if host in NAMES:
            return list(NAMES[host])
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def refused(self, ip: IPAddress) -> bool:
        verdict = self.predicate(ip)
        with self.lock:
            self.checked.append((str(ip), verdict))
        return verdict


SPIES = Spies()
_real_connect_tcp = httpcore.AnyIOBackend.connect_tcp


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in LOOPBACK if net.version == address.version)


async def _recording_connect_tcp(
    self: httpcore.AnyIOBackend,
    host: str,
    port: int,
    timeout: float | None = None,  # noqa: ASYNC109 (httpcore's backend interface)
    local_address: str | None = None,
    socket_options: Iterable[Any] | None = None,
) -> httpcore.AsyncNetworkStream:
    """The real backend, recording each connection and never leaving loopback."""
    with SPIES.lock:
        SPIES.connects.append((host, port))
    if not _is_loopback(host):
        raise httpcore.ConnectError(f"test safety net: no connection to {host} from tests")
    return await _real_connect_tcp(self, host, port, timeout, local_address, socket_options)


def only_127_0_0_1_allowed(ip: IPAddress) -> bool:
    return str(ip) != "127.0.0.1"


@pytest.fixture(scope="module", autouse=True)
def spied() -> Iterator[Spies]:
    """Wire the spies into every guard this module's fetchers build."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(httpcore.AnyIOBackend, "connect_tcp", _recording_connect_tcp)
        # Each GuardedClient builds two TLS contexts at ~75 ms each; no test here speaks TLS,
        # so they all share one, which keeps a few hundred fresh clients fast.
        shared_tls = httpx.create_ssl_context()
        for target in ("httpx.create_ssl_context", "httpx._transports.default.create_ssl_context"):
            patch.setattr(target, lambda *args, **kwargs: shared_tls)
        patch.setattr(
            pipeline,
            "AddressGuard",
            functools.partial(AddressGuard, resolver=SPIES.resolver, refused=SPIES.refused),
        )
        patch.setattr(
            compress_app,
            "GuardedClient",
            functools.partial(GuardedClient, resolver=SPIES.resolver, refused=SPIES.refused),
        )
        yield SPIES


@pytest.fixture(autouse=True)
def fresh_spies(spied: Spies) -> Iterator[Spies]:
    spied.reset()
    yield spied
    spied.reset()


# --- loopback servers that count what reaches them ----------------------------------------


class CountingServer(ThreadingHTTPServer):
    """An HTTP server counting accepted connections and requests.

    Paths in ``ok_paths`` answer 200 with ``body``; others answer ``status`` with
    ``location`` when one is set, else 200 too.
    """

    daemon_threads = True

    def __init__(
        self,
        host: str,
        port: int,
        *,
        body: bytes = b"reached",
        status: int = 302,
        location: str = "",
        ok_paths: frozenset[str] = frozenset(),
        keep_alive: bool = False,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.accepted = 0
        self.requests: list[tuple[str, str]] = []
        self.body = body
        self.status = status
        self.location = location
        self.ok_paths = ok_paths
        self.counter_lock = threading.Lock()
        handler = _KeepAliveHandler if keep_alive else _Handler
        super().__init__((host, port), handler)
        self.port = int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        request = super().get_request()
        with self.counter_lock:
            self.accepted += 1
        return request

    def reset(self) -> None:
        with self.counter_lock:
            self.accepted = 0
            self.requests.clear()


class _Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        server = self.server
        assert isinstance(server, CountingServer)
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        with server.counter_lock:
            server.requests.append((self.command, self.path))
        if server.location and self.path not in server.ok_paths:
            self.send_response(server.status)
            self.send_header("location", server.location)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-length", str(len(server.body)))
        self.end_headers()
        self.wfile.write(server.body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        return


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"


@contextmanager
def serving(server: CountingServer) -> Iterator[CountingServer]:
    # A short poll interval: shutdown() waits for the serving loop to notice.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def twin_servers(
    first: dict[str, Any], second: dict[str, Any]
) -> Iterator[tuple[CountingServer, CountingServer]]:
    """One server on 127.0.0.1:<port> and one on 127.0.0.2 at the same port."""
    for _ in range(20):
        a = CountingServer("127.0.0.1", 0, **first)
        try:
            b = CountingServer("127.0.0.2", a.port, **second)
        except OSError:
            a.server_close()
            continue
        with serving(a), serving(b):
            yield a, b
        return
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


@dataclass
class Listeners:
    """Real listeners on 127.0.0.1:<port> and, when IPv6 works, [::1]:<port>."""

    port: int
    servers: list[CountingServer]

    def reset(self) -> None:
        for server in self.servers:
            server.reset()

    def accepted(self) -> dict[str, int]:
        return {str(s.server_address[0]): s.accepted for s in self.servers}


@pytest.fixture(scope="module")
def listeners() -> Iterator[Listeners]:
    v4 = CountingServer("127.0.0.1", 0)
    servers = [v4]
    with suppress(OSError):
        servers.append(CountingServer("::1", v4.port))
    with ExitStack() as stack:
        for server in servers:
            stack.enter_context(serving(server))
        yield Listeners(v4.port, servers)


@pytest.fixture
def quiet_listeners(listeners: Listeners) -> Iterator[Listeners]:
    listeners.reset()
    yield listeners
    listeners.reset()


@pytest.fixture(scope="module")
def compress_route(spied: Spies) -> Iterator[httpx.Client]:
    settings = CompressSettings(compress_workers=1, allow_private_networks=False)
    with app_client(create_app(settings), timeout=30) as http:
        yield http


# --- the fetchers ---------------------------------------------------------------------------

CLIP_SETTINGS = ClipSettings(allow_private_networks=False)


def guarded(*, max_redirects: int = 5) -> GuardedClient:
    return GuardedClient(
        allow_private=False,
        timeout=5,
        max_redirects=max_redirects,
        resolver=SPIES.resolver,
        refused=SPIES.refused,
    )


async def _fetch_bytes(url: str) -> bytes:
    client = guarded()
    try:
        return await client.fetch_bytes(url, max_bytes=1_000_000)
    finally:
        await client.aclose()


def via_fetch_bytes(url: str, case: Case, request: pytest.FixtureRequest) -> None:
    with pytest.raises(FetchFailed) as info:
        asyncio.run(_fetch_bytes(url))
    if case.kind is not Kind.malformed:
        assert isinstance(info.value, AddressRefused), info.value.message


def via_compress_route(url: str, case: Case, request: pytest.FixtureRequest) -> None:
    http: httpx.Client = request.getfixturevalue("compress_route")
    response = http.post(ROUTE, json={"file": {"url": url}})
    assert response.status_code == 422, response.text
    expected = {"address_refused", "fetch_failed"} if case.kind is Kind.malformed else None
    code = response.json()["error"]["code"]
    assert code in (expected or {"address_refused"}), response.text


def _admitted(url: str) -> frozenset[str]:
    """The extra-hosts setting that would admit this URL's host, as an operator might."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return frozenset()
    host = (parts.hostname or "").lower().rstrip(".")
    return frozenset({host, f"{host}:{port}" if port else host} - {""})


def _source_refused(url: str, case: Case) -> None:
    with pytest.raises((SourceRefused, SourceUnreachable)) as info:
        asyncio.run(_check_address(url, CLIP_SETTINGS))
    if case.kind is not Kind.malformed:
        assert isinstance(info.value, SourceRefused), info.value.message


def via_clip_source(url: str, case: Case, request: pytest.FixtureRequest) -> None:
    with pytest.raises(InvalidUrl):
        parse_source(url, frozenset())
    try:
        source = parse_source(url, _admitted(url))
    except InvalidUrl:
        pass  # refused by its shape even with the host admitted
    else:
        _source_refused(source.url, case)
    _source_refused(url, case)  # as a format URL yt-dlp hands back


async def _attempt(url: str, client: GuardedClient) -> Outcome:
    sender = WebhookSender(
        client,
        timeout=5,
        window_seconds=1,
        backoff_seconds=0.01,
        backoff_max_seconds=0.01,
        secret="whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    try:
        return await sender.attempt(
            url, Payload.of({"status": "success"}), token="hostile-token", delivery_id="msg_hostile"
        )
    finally:
        await client.aclose()


def via_webhook(url: str, case: Case, request: pytest.FixtureRequest) -> None:
    assert asyncio.run(_attempt(url, guarded(max_redirects=0))) is Outcome.refused


Fetcher = Callable[[str, Case, pytest.FixtureRequest], None]
FETCHERS: dict[str, Fetcher] = {
    "compress-fetch_bytes": via_fetch_bytes,
    "compress-route": via_compress_route,
    "clip-source": via_clip_source,
    "webhook": via_webhook,
}


def _params() -> list[Any]:
    params = []
    for name in FETCHERS:
        for case in CASES:
            params.append(pytest.param(name, case, id=f"{name}-{case.id}"))
    return params


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("fetcher", "case"), _params())
def test_hostile_url_is_refused_without_connecting(
    fetcher: str, case: Case, quiet_listeners: Listeners, request: pytest.FixtureRequest
) -> None:
    url = case.url.format(port=quiet_listeners.port)
    FETCHERS[fetcher](url, case, request)

    assert SPIES.connects == [], "a connection was attempted"
    assert all(count == 0 for count in quiet_listeners.accepted().values()), (
        quiet_listeners.accepted()
    )
    allowed = [address for address, refused in SPIES.checked if not refused]
    assert allowed == [], f"addresses passed the check: {allowed}"
    if case.kind is Kind.literal:
        assert SPIES.resolved == [], "an IP literal was sent to the resolver"
        assert SPIES.checked, "the literal never reached the address check"
    elif case.kind is Kind.name:
        assert set(SPIES.resolved) == {httpx.URL(url).host}
        assert SPIES.checked, "the resolved addresses never reached the address check"
    else:
        assert SPIES.resolved == [], "a refused URL shape was resolved"
        assert SPIES.checked == [], "a refused URL shape reached the address check"


# --- redirects -------------------------------------------------------------------------------

REDIRECT_TARGETS = [
    pytest.param("http://127.0.0.2:{port}/image", id="literal"),
    pytest.param("//127.0.0.2:{port}/image", id="scheme-relative"),
    pytest.param("http://[::ffff:127.0.0.2]:{port}/image", id="v4-mapped"),
    pytest.param("http://2130706434:{port}/image", id="decimal"),
    pytest.param("http://metadata.internal:{port}/latest/meta-data/", id="name-metadata"),
    pytest.param("http://user:pw@127.0.0.1:{port}/image", id="userinfo-to-allowed"),
    pytest.param("gopher://127.0.0.2:{port}/_x", id="gopher"),
    pytest.param("file:///etc/passwd", id="file"),
]


def _redirect_fetch(fetcher: str, url: str, request: pytest.FixtureRequest) -> str:
    """Fetch ``url`` the compress way; return "ok", or the refusal's code."""
    if fetcher == "route":
        http: httpx.Client = request.getfixturevalue("compress_route")
        response = http.post(ROUTE, json={"file": {"url": url}})
        if response.status_code == 422:
            return str(response.json()["error"]["code"])
        return "ok" if response.status_code == 415 else f"HTTP {response.status_code}"
    try:
        asyncio.run(_fetch_bytes(url))
    except FetchFailed as exc:
        return exc.code
    return "ok"


@pytest.mark.parametrize("fetcher", ["fetch_bytes", "route"])
@pytest.mark.parametrize("target", REDIRECT_TARGETS)
def test_redirect_to_a_refused_address_is_not_followed(
    fetcher: str, target: str, request: pytest.FixtureRequest
) -> None:
    SPIES.predicate = only_127_0_0_1_allowed
    with twin_servers({"ok_paths": frozenset({"/image"})}, {}) as (allowed, refused):
        allowed.location = target.format(port=allowed.port)
        outcome = _redirect_fetch(fetcher, f"http://127.0.0.1:{allowed.port}/start", request)
        assert outcome == "address_refused"
        assert allowed.requests == [("GET", "/start")]
        assert refused.accepted == 0
    assert {host for host, _ in SPIES.connects} == {"127.0.0.1"}


@pytest.mark.parametrize("fetcher", ["fetch_bytes", "route"])
def test_redirect_within_the_allowed_address_is_followed(
    fetcher: str, request: pytest.FixtureRequest
) -> None:
    """The control: the same setup does follow a redirect that stays on 127.0.0.1."""
    SPIES.predicate = only_127_0_0_1_allowed
    with twin_servers({"ok_paths": frozenset({"/image"}), "body": b"not an image"}, {}) as (
        allowed,
        refused,
    ):
        allowed.location = f"http://127.0.0.1:{allowed.port}/image"
        outcome = _redirect_fetch(fetcher, f"http://127.0.0.1:{allowed.port}/start", request)
        assert outcome == "ok"
        assert allowed.requests == [("GET", "/start"), ("GET", "/image")]
        assert refused.accepted == 0


# --- DNS rebinding ---------------------------------------------------------------------------


def _rebinding(answers: list[list[str]], calls: list[str]) -> Callable[[str, int], Any]:
    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return list(answers[min(len(calls), len(answers)) - 1])

    return resolve


def test_rebinding_resolver_cannot_move_a_fetch() -> None:
    """First answer allowed, later ones refused: each connection goes where it was checked."""
    SPIES.predicate = only_127_0_0_1_allowed
    calls: list[str] = []
    resolver = _rebinding([["127.0.0.1"], ["127.0.0.2"]], calls)

    async def run(port: int) -> bytes:
        client = GuardedClient(
            allow_private=False, timeout=5, resolver=resolver, refused=SPIES.refused
        )
        try:
            body = await client.fetch_bytes(f"http://rebind.example:{port}/one", max_bytes=100)
            # HTTP/1.0: that connection is closed, so the next fetch needs a new one, and the
            # name is looked up again, now answering 127.0.0.2, which is refused.
            with pytest.raises(AddressRefused):
                await client.fetch_bytes(f"http://rebind.example:{port}/two", max_bytes=100)
            return body
        finally:
            await client.aclose()

    with twin_servers({"body": b"first"}, {"body": b"second"}) as (first, second):
        assert asyncio.run(run(first.port)) == b"first"
        assert first.requests == [("GET", "/one")]
        assert second.accepted == 0
        assert calls == ["rebind.example", "rebind.example"]
        assert SPIES.connects == [("127.0.0.1", first.port)]
        assert SPIES.checked == [("127.0.0.1", False), ("127.0.0.2", True)]


def test_rebinding_resolver_cannot_move_an_open_connection() -> None:
    """On a kept-alive connection the name is never looked up again: both requests stay."""
    SPIES.predicate = only_127_0_0_1_allowed
    calls: list[str] = []
    resolver = _rebinding([["127.0.0.1"], ["127.0.0.2"]], calls)

    async def run(port: int) -> list[bytes]:
        client = GuardedClient(
            allow_private=False, timeout=5, resolver=resolver, refused=SPIES.refused
        )
        try:
            return [
                await client.fetch_bytes(f"http://rebind.example:{port}/{n}", max_bytes=100)
                for n in ("one", "two")
            ]
        finally:
            await client.aclose()

    with twin_servers({"body": b"first", "keep_alive": True}, {"body": b"second"}) as (
        first,
        second,
    ):
        assert asyncio.run(run(first.port)) == [b"first", b"first"]
        assert first.accepted == 1
        assert first.requests == [("GET", "/one"), ("GET", "/two")]
        assert second.accepted == 0
        assert calls == ["rebind.example"]
        assert SPIES.connects == [("127.0.0.1", first.port)]


def test_one_answer_with_refused_and_allowed_addresses_connects_to_the_allowed_only() -> None:
    SPIES.predicate = only_127_0_0_1_allowed
    calls: list[str] = []
    resolver = _rebinding([["127.0.0.2", "::1", "127.0.0.1"]], calls)

    async def run(port: int) -> bytes:
        client = GuardedClient(
            allow_private=False, timeout=5, resolver=resolver, refused=SPIES.refused
        )
        try:
            return await client.fetch_bytes(f"http://mixed.example:{port}/x", max_bytes=100)
        finally:
            await client.aclose()

    with twin_servers({"body": b"first"}, {"body": b"second"}) as (first, second):
        assert asyncio.run(run(first.port)) == b"first"
        assert second.accepted == 0
        assert SPIES.connects == [("127.0.0.1", first.port)]


# --- webhooks follow no redirect -------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize(
    "target",
    [
        pytest.param("http://127.0.0.2:{port}/hook", id="to-refused"),
        pytest.param("http://127.0.0.1:{port}/moved", id="to-allowed"),
    ],
)
def test_webhook_follows_no_redirect(status: int, target: str) -> None:
    SPIES.predicate = only_127_0_0_1_allowed
    moved = frozenset({"/moved"})
    with twin_servers({"status": status, "ok_paths": moved}, {}) as (hook, elsewhere):
        hook.location = target.format(port=hook.port)
        url = f"http://127.0.0.1:{hook.port}/hook"
        assert asyncio.run(_attempt(url, guarded(max_redirects=0))) is Outcome.refused
        assert hook.requests == [("POST", "/hook")]
        assert elsewhere.accepted == 0
    assert SPIES.connects == [("127.0.0.1", hook.port)]


def test_the_webhook_client_allows_no_redirect() -> None:
    client = webhook_client(ClipSettings(allow_private_networks=False))
    try:
        assert client.max_redirects == 0
        assert client.guard.allow_private is False
    finally:
        asyncio.run(client.aclose())


# --- a pixel bomb ----------------------------------------------------------------------------

# VmHWM is this process's own peak RSS; ru_maxrss would carry the pytest worker's peak over
# fork and exec.
BOMB_PROBE = """
import json, re, sys, time
from pathlib import Path
from services.common.errors import PayloadTooLarge
from services.compress.codecs import Limits, compress

def peak_kb():
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))

max_pixels = int(sys.argv[1])
data = sys.stdin.buffer.read()
before = peak_kb()
started = time.perf_counter()
try:
    compress(data, quality=85, strip_metadata=False, keep_location=False,
             limits=Limits(max_pixels=max_pixels, max_frames=1000))
    outcome = "accepted"
except PayloadTooLarge:
    outcome = "refused"
except Exception as exc:
    outcome = type(exc).__name__
seconds = time.perf_counter() - started
after = peak_kb()
print(json.dumps({"outcome": outcome, "seconds": seconds, "before_kb": before,
                  "peak_kb": after}))
"""


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [
        pytest.param(50_000, 50_000, 100_000_000, id="50000x50000"),
        # Under Pillow's own bomb limit, over ours: only our header check stands.
        pytest.param(12_000, 12_000, 100_000_000, id="12000x12000"),
        # Our limit set absurdly high: Pillow's hard limit is the last line of defence.
        pytest.param(50_000, 50_000, 10**12, id="50000x50000-no-own-limit"),
    ],
)
def test_pixel_bomb_is_refused_fast_and_small(width: int, height: int, max_pixels: int) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, str(max_pixels)],
        input=png_header_only(width, height),
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["outcome"] == "refused", report
    assert report["seconds"] < 0.5, report
    assert report["peak_kb"] < 300 * 1024, report
    assert time.monotonic() - started < 30
