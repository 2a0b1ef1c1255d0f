"""Running ffmpeg: live progress, media facts, packet listings, and mapping its failures.

The binary comes from the imageio-ffmpeg wheel, which has no ffprobe, so facts are read from
the banner ffmpeg prints about its inputs and packets from its ``framecrc`` muxer. Every run is
its own process group, killed whole when its job ends early.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import imageio_ffmpeg

from services.clip.errors import ClipFailed, ProcessingFailed, SourceUnreachable, UnsupportedSource

Report = Callable[[str, float], None]
Progress = Callable[[float], None]
GLOBAL = ("-hide_banner", "-nostdin", "-nostats", "-loglevel", "info", "-progress", "pipe:1")
QUIET = ("-hide_banner", "-nostdin", "-loglevel", "error")

# ffmpeg may only reach the network through these, whatever a playlist says.
PROTOCOLS = "http,https,httpproxy,tcp,tls,crypto"
STDERR_KEPT = 16 * 1024

DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
START = re.compile(r"Duration: [^\n]*?, start: (-?[\d.]+)")
STREAM = re.compile(r"Stream #\d+:(\d+)[^:]*: (Video|Audio): (\w+)([^\n]*)")
STREAM_START = re.compile(r", start (-?[\d.]+)")
SIZE = re.compile(r", (\d{2,5})x(\d{2,5})")
FPS = re.compile(r", ([\d.]+) (?:fps|tbr)")
TIME_BASE = re.compile(r"^#tb 0: (\d+)/(\d+)$", re.MULTILINE)


@cache
def ffmpeg_exe() -> str:
    return str(imageio_ffmpeg.get_ffmpeg_exe())


@dataclass(frozen=True)
class MediaFacts:
    """What ``ffmpeg -i`` says of a file; ``start`` is its video's first time (its own, else
    the file's), the clip's time zero."""

    duration: float | None
    start: float
    video_codec: str | None
    audio_codec: str | None
    width: int | None
    height: int | None
    fps: float | None


def parse_banner(text: str) -> MediaFacts:
    """Facts of input #0 from the banner ``ffmpeg -i`` prints."""
    duration = None
    if match := DURATION.search(text):
        hours, minutes, seconds = match.groups()
        duration = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    video = audio = None
    width = height = None
    fps = None
    video_start = None
    for _, kind, codec, rest in STREAM.findall(text):
        if kind == "Video" and video is None:
            video = codec
            if begins := STREAM_START.search(rest):
                video_start = float(begins.group(1))
            if size := SIZE.search(rest):
                width, height = int(size.group(1)), int(size.group(2))
            if rate := FPS.search(rest):
                fps = float(rate.group(1))
        elif kind == "Audio" and audio is None:
            audio = codec
    if video_start is None:
        video_start = float(match.group(1)) if (match := START.search(text)) else 0.0
    return MediaFacts(duration, video_start, video, audio, width, height, fps)


async def file_facts(path: Path) -> MediaFacts:
    """Facts of a local media file, from the banner of ``ffmpeg -i``."""
    _, banner = await run(["-hide_banner", "-nostdin", "-i", str(path)])
    return parse_banner(banner)


@dataclass(frozen=True)
class Packet:
    """One video packet: its decode and presentation times in seconds, whether it is a
    keyframe, and its size in bytes."""

    dts: float
    pts: float
    key: bool
    size: int


async def video_packets(path: Path, listing: Path, *, idr_only: bool = False) -> list[Packet]:
    """Every packet of the first video stream, in decode order, without decoding anything;
    with ``idr_only``, only the H.264 packets that hold an IDR picture.

    ``framecrc`` writes one line per packet (``index, dts, pts, duration, size, crc`` and
    ``F=0x..`` for every packet that is not a plain keyframe). It goes to ``listing``, a file,
    since an hour of video is far more text than the log of a run keeps.
    """
    only = ["-bsf:v", "filter_units=pass_types=5"] if idr_only else []
    code, log = await run(
        [*QUIET, "-copyts", "-i", str(path), "-map", "0:v:0", "-c", "copy", *only,
         "-f", "framecrc", "-y", str(listing)]
    )  # fmt: skip
    if code != 0:
        raise failure(log)
    return await asyncio.to_thread(_read_packets, listing)


def _read_packets(listing: Path) -> list[Packet]:
    text = listing.read_text()
    listing.unlink()
    base = TIME_BASE.search(text)
    if base is None:
        return []
    unit = int(base.group(1)) / int(base.group(2))
    packets = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 6 and fields[0] == "0" and fields[2].lstrip("-").isdigit():
            key = not any(f.startswith("F=") for f in fields)
            packets.append(
                Packet(
                    dts=int(fields[1]) * unit,
                    pts=int(fields[2]) * unit,
                    key=key,
                    size=int(fields[4]),
                )
            )
    return packets


def failure(log: str) -> ClipFailed:
    """The stable failure for an ffmpeg run that did not succeed, from what it printed."""
    lowered = log.lower()
    if any(k in lowered for k in ("server returned", "connection", "timed out", "i/o error")):
        return SourceUnreachable("The video source stopped answering while the clip was cut.")
    if any(k in lowered for k in ("invalid data found", "does not contain any stream", "moov")):
        return UnsupportedSource("The source is not a video that can be read.")
    return ProcessingFailed("The clip could not be cut from this video.")


def http_options(max_range_bytes: int) -> dict[str, object]:
    """Input options for a remote source: bounded range requests on one kept-alive connection.

    A host that throttles large or open-ended ranges (YouTube does) never sees one: every
    request asks for at most ``max_range_bytes``, and the header is read with a small one.
    """
    return {
        "protocol_whitelist": PROTOCOLS,
        "rw_timeout": 30_000_000,
        "multiple_requests": 1,
        "initial_request_size": 65536,
        "request_size": max_range_bytes,
    }


async def run(
    args: Sequence[str],
    *,
    on_progress: Progress | None = None,
) -> tuple[int, str]:
    """Run ffmpeg in its own process group; kill the group if the caller is cancelled.

    ``on_progress`` gets the seconds of output written so far, from ``-progress pipe:1``.
    The text returned holds the start of stderr (the banner) and its end (the errors).
    """
    process = await asyncio.create_subprocess_exec(
        ffmpeg_exe(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    head = bytearray()
    tail = bytearray()

    async def read_progress() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            key, _, value = line.decode(errors="replace").strip().partition("=")
            if on_progress is not None and key == "out_time_us" and value.isdigit():
                on_progress(int(value) / 1_000_000)

    async def read_stderr() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            if len(head) < STDERR_KEPT:
                head.extend(line)
            else:
                tail.extend(line)
                del tail[:-STDERR_KEPT]

    try:
        await asyncio.gather(read_progress(), read_stderr())
        code = await process.wait()
    except BaseException:
        kill_group(process.pid)
        with contextlib.suppress(ProcessLookupError):
            await process.wait()
        raise
    return code, (head + tail).decode(errors="replace")


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
