"""Shared fixtures: generated media served from loopback, cached across runs and workers."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.media import make_dash, make_hls, make_source
from tests.support.rangeserver import RangeServer

MEDIA_CACHE = Path(tempfile.gettempdir()) / "hermes-media-test-media"
FPS = 25
WIDTH, HEIGHT = 320, 180


@dataclass(frozen=True)
class Media:
    """Sources served over HTTP with Range: a progressive MP4, DASH and HLS renditions."""

    server: RangeServer
    root: Path

    @property
    def host(self) -> str:
        return self.server.base_url.removeprefix("http://")

    def url(self, relpath: str) -> str:
        return self.server.url(relpath)


@pytest.fixture(scope="session")
def media_root() -> Path:
    MEDIA_CACHE.mkdir(parents=True, exist_ok=True)
    source = make_source(MEDIA_CACHE, seconds=60, width=WIDTH, height=HEIGHT, fps=FPS, name="s60")
    make_dash(MEDIA_CACHE / "dash", source)
    make_hls(MEDIA_CACHE / "hls", source)
    (MEDIA_CACHE / "not-a-video.mp4").write_bytes(b"this is not a video file at all" * 100)
    return MEDIA_CACHE


@pytest.fixture
def media(media_root: Path) -> Iterator[Media]:
    with RangeServer(media_root) as server:
        yield Media(server=server, root=media_root)
