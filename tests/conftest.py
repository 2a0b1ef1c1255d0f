"""Shared fixtures: generated media served from loopback, cached across runs and workers, and
a webhook receiver."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.media import ffmpeg_exe, make_dash, make_hls, make_source
from tests.support.rangeserver import RangeServer
from tests.support.receiver import Receiver, receiver
from tests.support.strictorigin import StrictOrigin

MEDIA_CACHE = Path(tempfile.gettempdir()) / "hermes-media-test-media"
FPS = 25
WIDTH, HEIGHT = 320, 180


ORIGINS = {"strict": StrictOrigin, "range": RangeServer}


@dataclass(frozen=True)
class Media:
    """Sources served over HTTP with Range: a progressive MP4, DASH and HLS renditions."""

    server: StrictOrigin | RangeServer
    root: Path

    @property
    def host(self) -> str:
        return urlsplit(self.server.base_url).netloc

    def url(self, relpath: str) -> str:
        return self.server.url(relpath)


@pytest.fixture(scope="session")
def media_root() -> Path:
    MEDIA_CACHE.mkdir(parents=True, exist_ok=True)
    source = make_source(MEDIA_CACHE, seconds=60, width=WIDTH, height=HEIGHT, fps=FPS, name="s60")
    make_source(
        MEDIA_CACHE, seconds=60, width=WIDTH, height=HEIGHT, fps=FPS, preset="veryfast", name="b60"
    )
    make_source(MEDIA_CACHE, seconds=20, width=WIDTH, height=HEIGHT, fps=FPS, name="s20")
    _mpeg4_copy(MEDIA_CACHE / "s20.mp4", MEDIA_CACHE / "mpeg4.mp4")
    make_dash(MEDIA_CACHE / "dash", source)
    make_hls(MEDIA_CACHE / "hls", source)
    (MEDIA_CACHE / "not-a-video.mp4").write_bytes(b"this is not a video file at all" * 100)
    _live_copy(MEDIA_CACHE / "hls", MEDIA_CACHE / "live")
    return MEDIA_CACHE


def _mpeg4_copy(source: Path, target: Path) -> None:
    """The source in MPEG-4 Part 2: a codec the smart cut cannot copy, so it re-encodes."""
    if not target.exists():
        subprocess.run(
            [ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(source), "-c:v", "mpeg4",
             "-q:v", "3", "-g", "50", "-c:a", "copy", str(target)],
            check=True,
        )  # fmt: skip


def _live_copy(hls: Path, live: Path) -> None:
    """The HLS rendition as a live stream: no end marker, segments taken from the VOD."""
    live.mkdir(exist_ok=True)
    (live / "master.m3u8").write_text((hls / "master.m3u8").read_text())
    lines = (hls / "playlist.m3u8").read_text().splitlines()
    kept = [
        f"../hls/{line}" if line.endswith(".ts") else line
        for line in lines
        if line not in ("#EXT-X-ENDLIST", "#EXT-X-PLAYLIST-TYPE:VOD")
    ]
    (live / "playlist.m3u8").write_text("\n".join(kept) + "\n")


@pytest.fixture
def media(media_root: Path, request: pytest.FixtureRequest) -> Iterator[Media]:
    """The media behind the project's own range server, or behind the strict origin (the
    standard library's server, the reference) when a test module parametrizes ``media``
    indirectly with ``"strict"``: ``pytest.mark.parametrize("media", ORIGINS, indirect=True)``."""
    origin = ORIGINS[getattr(request, "param", "range")]
    with origin(media_root) as server:
        yield Media(server=server, root=media_root)


@pytest.fixture
def hook() -> Iterator[Receiver]:
    """A real HTTP receiver for webhooks, on a free loopback port."""
    with receiver() as r:
        yield r
