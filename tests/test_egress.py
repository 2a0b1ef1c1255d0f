"""The egress proxy: yt-dlp and ffmpeg reach media sources only through the address guard."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
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
    )  # fmt: skip
    media.server.reset()
    with pytest.raises(ClipFailed):
        asyncio.run(pipeline.make_clip(spec, tmp_path, settings, lambda stage, share: None))
    assert media.server.requests == []
