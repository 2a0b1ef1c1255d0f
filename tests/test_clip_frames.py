"""Frame exactness: a clip holds exactly the source's frames whose time falls in [start, end).

Each source varies one axis (GOP length, frame rate, B-frames, open GOPs, a variable frame
rate, audio that starts late, the container), is generated once at a low resolution and
cached, and is clipped through the real pipeline (yt-dlp and ffmpeg, served over HTTP). The
clip is then compared with the source decoded by ffmpeg, frame by frame: the same count, the
same painted frame numbers, the same pictures (PSNR of the luma), the same times, with the edit
list honoured and ignored; and the audio's beeps where the source has them. The origin is the
standard library's file server (with Range added), which takes a request as the RFC says.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import certifi
import pytest

from services.clip.pipeline import ClipResult, make_clip
from services.clip.request import build_spec
from services.clip.settings import ClipSettings
from tests.conftest import MEDIA_CACHE, Media
from tests.support.media import (
    audio_seconds,
    beep_onsets,
    decode_timed_frames,
    frame_number,
    grey_psnr,
    make_dash,
    make_hls,
    make_source,
)
from tests.support.strictorigin import StrictOrigin

WIDTH, HEIGHT = 160, 90
SECONDS = 45
# A frame whose time is within this of a bound is at the bound (ffmpeg prints microseconds).
EPSILON = 0.0005
# Re-encoded frames stay far above this; a neighbouring frame of testsrc2 falls far below.
MIN_PSNR = 30.0
FRAMES_DIR = MEDIA_CACHE / "frames"


@dataclass(frozen=True)
class Source:
    """One generated source: how ``make_source`` makes it, and in which container it is served."""

    fps: int
    gop_seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    container: str = "mp4"

    def progressive(self, name: str) -> Path:
        return make_source(
            FRAMES_DIR,
            seconds=SECONDS,
            width=WIDTH,
            height=HEIGHT,
            fps=self.fps,
            gop=round(self.fps * self.gop_seconds),
            name=name,
            **self.options,
        )


SOURCES = {
    "gop-1s": Source(fps=25, gop_seconds=1),
    "gop-4s-30fps": Source(fps=30, gop_seconds=4),
    "gop-10s": Source(fps=25, gop_seconds=10),
    "60fps": Source(fps=60, gop_seconds=2),
    "b-frames": Source(fps=25, gop_seconds=2, options={"preset": "veryfast"}),
    "open-gop": Source(fps=25, gop_seconds=2, options={"preset": "veryfast", "open_gop": True}),
    "variable-rate": Source(fps=30, gop_seconds=2, options={"variable_rate": True}),
    "audio-late": Source(fps=25, gop_seconds=2, options={"audio_delay": 0.5}),
    "hls": Source(fps=25, gop_seconds=2, options={"preset": "veryfast"}, container="hls"),
    "dash": Source(fps=25, gop_seconds=2, options={"preset": "veryfast"}, container="dash"),
}
# Several GOPs, starting and ending inside one; and one clip inside a single GOP.
CLIPS = {"several-gops": ("0:03.3", "0:38.7"), "inside-one-gop": ("0:21.2", "0:21.9")}


@functools.cache
def served(kind: str) -> tuple[Path, str]:
    """The file whose frames and times are the source's, and the path the server serves at.

    ffmpeg decodes a file with times from its start, the earliest of its streams, as players
    do: for HLS that is the playlist itself (MPEG-TS has no edit list to hide AAC's priming
    samples, so its audio starts a little before the video).
    """
    source = SOURCES[kind]
    name = kind if source.container == "mp4" else f"{kind}-source"
    progressive = source.progressive(name)
    if source.container == "hls":
        master = make_hls(FRAMES_DIR / kind, progressive, segment_seconds=source.gop_seconds)
        return master.with_name("playlist.m3u8"), f"frames/{kind}/master.m3u8"
    if source.container == "dash":
        make_dash(FRAMES_DIR / kind, progressive)
        return progressive, f"frames/{kind}/manifest.mpd"
    return progressive, f"frames/{name}.mp4"


@functools.cache
def source_frames(path: Path) -> list[tuple[float, bytes]]:
    return decode_timed_frames(path, width=WIDTH, height=HEIGHT)


def clip_of(media: Media, relpath: str, start: str, end: str, work: Path) -> ClipResult:
    settings = ClipSettings(
        allow_private_networks=True,
        clip_extra_source_hosts=media.host,
        clip_work_dir=work,
    )
    spec = build_spec(
        youtube_url=media.url(relpath),
        start_time=start,
        end_time=end,
        name=None,
        extra_hosts=settings.clip_extra_source_hosts,
        max_seconds=settings.clip_max_seconds,
        max_name_length=settings.clip_name_max_length,
        max_bytes=settings.clip_max_output_bytes,
    )
    work.mkdir(parents=True, exist_ok=True)
    return asyncio.run(make_clip(spec, work, settings, lambda stage, share: None))


@pytest.mark.parametrize("media", ["strict"], indirect=True)
@pytest.mark.parametrize("clip", sorted(CLIPS))
@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_clip_holds_exactly_the_source_frames(
    kind: str, clip: str, media: Media, tmp_path: Path
) -> None:
    progressive, relpath = served(kind)
    result = clip_of(media, relpath, *CLIPS[clip], tmp_path / "work")
    # A clip with a keyframe inside is smart-cut; one inside a single GOP has none to copy from.
    if kind != "open-gop":
        assert result.cut == ("smart" if clip == "several-gops" else "reencode")
    assert_same_frames(progressive, result, SOURCES[kind])


def assert_same_frames(progressive: Path, result: ClipResult, source: Source) -> None:
    """The clip holds exactly the source's frames in its range, at their times, in sync."""
    start, end = result.start, result.end
    expected = [
        (t, f) for t, f in source_frames(progressive) if start - EPSILON <= t < end - EPSILON
    ]
    assert expected, "the test's range must hold frames"
    first_time = expected[0][0]
    for ignore_editlist in (False, True):
        made = decode_timed_frames(
            result.path, width=WIDTH, height=HEIGHT, ignore_editlist=ignore_editlist
        )
        assert len(made) == len(expected), (
            f"{len(made)} frames instead of {len(expected)} (edit list ignored: {ignore_editlist})"
        )
        for index, ((_, want), (_, got)) in enumerate(zip(expected, made, strict=True)):
            wanted, seen = frame_number(want, WIDTH, HEIGHT), frame_number(got, WIDTH, HEIGHT)
            assert seen == wanted, f"frame {index} is source frame {seen}, not {wanted}"
            assert grey_psnr(want, got) >= MIN_PSNR, f"frame {index} does not look like the source"
        if not ignore_editlist:
            shift = [
                round(got - (want - first_time), 3)
                for (want, _), (got, _) in zip(expected, made, strict=True)
            ]
            assert set(shift) == {0.0}, "frames must keep the source's times"

    # The audio covers the clip: from its first frame to its end, give or take an AAC frame.
    assert audio_seconds(result.path) == pytest.approx(end - first_time, abs=0.05)
    delay = source.options.get("audio_delay", 0)
    heard = [t for t in beep_onsets(result.path) if t > 0.02]
    due = [s + delay - first_time for s in range(SECONDS) if start + 0.02 < s + delay < end]
    assert len(heard) == len(due), f"beeps at {heard}, expected at {due}"
    for onset, when in zip(heard, due, strict=True):
        assert abs(onset - when) < 1 / source.fps, "audio out of sync with video"


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_youtube_shape_over_https_is_frame_exact(
    test_ca: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DASH rendition (a video-only fMP4 and an audio-only m4a, each with a sidx) over
    https: yt-dlp, the range fetcher and ffmpeg reach it through the proxy's CONNECT."""
    cert, key = test_ca
    # yt-dlp and httpx trust certifi's bundle; this one also holds the test's certificate.
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(Path(certifi.where()).read_text() + cert.read_text())
    monkeypatch.setattr(certifi, "where", lambda: str(bundle))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    progressive, relpath = served("dash")
    with StrictOrigin(MEDIA_CACHE, tls=tls) as origin:
        media = Media(server=origin, root=MEDIA_CACHE)
        result = clip_of(media, relpath, *CLIPS["several-gops"], tmp_path / "work")
        fetched = {r.path for r in origin.requests}
    assert {"frames/dash/video.mp4", "frames/dash/audio.m4a"} <= fetched
    assert result.cut == "smart"
    assert_same_frames(progressive, result, SOURCES["dash"])
