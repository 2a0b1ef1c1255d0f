"""Bytes a clip takes from a strict origin: at most 1.3x the source's bytes from the keyframe
before ``start`` to ``end``, plus the index, plus 256 KiB, counted where the origin writes them."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from services.clip.app import create_app
from services.clip.ffmpeg import ffmpeg_exe
from tests.conftest import MEDIA_CACHE, Media
from tests.support.apps import client, finished_job
from tests.support.media import make_dash, make_source
from tests.test_clip_e2e import ask, settings_for

SLACK = 256 * 1024
MEDIA = (".mp4", ".m4a")


def moov_size(path: Path) -> int:
    with path.open("rb") as f:
        while header := f.read(8):
            size, kind = struct.unpack(">I4s", header)
            if kind == b"moov":
                return int(size)
            f.seek(size - 8, 1)
    raise ValueError("no moov")


def index_size(path: Path) -> int:
    """Bytes of a fragmented MP4's ftyp, moov and sidx: what a reader needs before any media."""
    total = 0
    with path.open("rb") as f:
        while header := f.read(8):
            size, kind = struct.unpack(">I4s", header)
            if kind not in (b"ftyp", b"moov", b"sidx"):
                return total
            total += size
            f.seek(size - 8, 1)
    return total


def span_bytes(source: Path, start: float, end: float, tmp_path: Path) -> int:
    """The source's samples from the keyframe before ``start`` to ``end``, as ffmpeg copies them."""
    span = tmp_path / "reference-span.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-ss", f"{start}", "-to", f"{end}", "-i", str(source),
         "-c", "copy", "-copyts", "-y", str(span)],
        check=True,
    )  # fmt: skip
    return span.stat().st_size - moov_size(span)


@pytest.mark.parametrize("media", ["strict"], indirect=True)
@pytest.mark.parametrize(
    ("name", "start", "end"),
    [("short", "1:04", "1:18.5"), ("long", "5:00", "5:30"), ("dash", "1:04", "1:18.5")],
)
def test_a_clip_takes_only_its_share_from_the_origin(
    media: Media, tmp_path: Path, name: str, start: str, end: str
) -> None:
    if name in ("short", "dash"):
        # 3 minutes of 640x360 under 1 Mbit/s.
        source = make_source(MEDIA_CACHE, seconds=180, width=640, height=360, fps=25, gop=100,
                             crf=34, name="b180")  # fmt: skip
    else:
        source = make_source(MEDIA_CACHE, seconds=600, width=320, height=180, fps=25, crf=8,
                             name="s600")  # fmt: skip
    first, last = (
        sum(float(p) * 60**i for i, p in enumerate(reversed(t.split(":")))) for t in (start, end)
    )
    share = span_bytes(source, first, last, tmp_path) + moov_size(source)
    served = source.name
    if name == "dash":
        # YouTube's shape: a video-only and an audio-only fragmented MP4, each with a global
        # sidx, behind an on-demand manifest; their index is each file's moov and sidx.
        manifest = make_dash(MEDIA_CACHE / "b180-dash", source)
        served = str(manifest.relative_to(MEDIA_CACHE))
        share = span_bytes(source, first, last, tmp_path) + sum(
            index_size(manifest.with_name(part)) for part in ("video.mp4", "audio.m4a")
        )
    settings = settings_for(media, tmp_path)
    with client(create_app(settings)) as api:
        media.server.reset()
        job = ask(api, media.url(served), start, end).json()["job_id"]
        assert finished_job(api, job)["status"] == "succeeded"
    taken = media.server.bytes_sent()
    print(f"{name}: taken {taken} share {share} ratio {taken / share:.3f}")
    assert taken <= 1.3 * share + SLACK
    # The manifest is a page read whole; every request for media is a bounded range.
    ranged = [r for r in media.server.requests if r.method == "GET" and r.path.endswith(MEDIA)]
    assert ranged
    assert all(r.requested_length is not None for r in ranged), "every GET is a bounded range"
    assert max(r.requested_length or 0 for r in ranged) <= settings.clip_max_range_bytes
