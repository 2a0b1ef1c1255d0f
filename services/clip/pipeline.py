"""Making one clip: read the video's facts, pick formats, fetch only the span, cut exactly.

ffmpeg seeks in the remote file by HTTP range (input seeking), so only the part of the video
the clip needs is fetched. The span is re-encoded from the exact start frame, so the first
frame is the source's frame at ``start`` in every player, with no edit list hiding a lead-in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ffmpeg as ffmpeg_python

from services.clip import ffmpeg
from services.clip.request import ClipSpec
from services.clip.settings import ClipSettings
from services.clip.source import (
    ClipFailed,
    LiveNotSupported,
    RangeOutOfBounds,
    Selection,
    SourceUnreachable,
    UnsupportedSource,
    extract,
    select,
    ydl_options,
)

Report = Callable[[str, float], None]
CLIP_FILE = "clip.mp4"
LIVE_STATES = frozenset({"is_live", "is_upcoming", "post_live"})


class OutputTooLarge(ClipFailed):
    code = "output_too_large"


class ProcessingFailed(ClipFailed):
    code = "processing_failed"


@dataclass(frozen=True)
class ClipResult:
    path: Path
    title: str
    source_duration: float
    start: float
    end: float
    clip_duration: float
    bytes: int
    width: int
    height: int
    cut: str


def _clock(seconds: float) -> str:
    whole = int(seconds)
    text = f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
    fraction = seconds - whole
    return f"{text}.{round(fraction * 1000):03d}" if fraction > 0.0005 else text


async def make_clip(
    spec: ClipSpec, workdir: Path, settings: ClipSettings, report: Report
) -> ClipResult:
    report("reading video facts", 0.0)
    options = ydl_options(
        spec.source, cookie_file=settings.ytdlp_cookie_file, proxy=settings.ytdlp_proxy
    )
    info = await asyncio.to_thread(extract, spec.source, options)
    if info.live_status in LIVE_STATES:
        raise LiveNotSupported(
            "The video is a live stream or premiere that has not ended; try once it is over."
        )
    if info.duration is not None:
        _check_range(spec, info.duration)
    selection = select(info.formats, settings.clip_max_height)
    output = workdir / CLIP_FILE

    def on_progress(seconds: float) -> None:
        report("cutting", 0.05 + 0.95 * min(1.0, seconds / spec.duration))

    report("cutting", 0.05)
    code, log = await ffmpeg.run(
        _cut_args(spec, selection, settings, output), on_progress=on_progress
    )
    source = ffmpeg.parse_banner(log)
    duration = info.duration or source.duration
    if duration is not None:
        _check_range(spec, duration)
    if code != 0 or not output.exists():
        raise _cut_failure(log)
    size = output.stat().st_size
    if size > settings.clip_max_output_bytes:
        raise OutputTooLarge(
            f"The clip is {size} bytes, over the limit of {settings.clip_max_output_bytes}; "
            "choose a shorter range."
        )
    _, banner = await ffmpeg.run(["-hide_banner", "-nostdin", "-i", str(output)])
    made = ffmpeg.parse_banner(banner)
    report("done", 1.0)
    return ClipResult(
        path=output,
        title=info.title,
        source_duration=duration or spec.end,
        start=spec.start,
        end=spec.end,
        clip_duration=made.duration or spec.duration,
        bytes=size,
        width=made.width or 0,
        height=made.height or 0,
        cut="reencode",
    )


def _check_range(spec: ClipSpec, duration: float) -> None:
    if spec.end > duration:
        raise RangeOutOfBounds(
            f"The video is {_clock(duration)} long; the clip must end by then, "
            f"not at {_clock(spec.end)}."
        )


def _cut_args(
    spec: ClipSpec, selection: Selection, settings: ClipSettings, output: Path
) -> list[str]:
    """Input-seek to the start, decode from the keyframe before it, encode from it exactly."""

    def source(url: str, headers: dict[str, str]) -> ffmpeg_python.nodes.FilterableStream:
        options: dict[str, object] = {
            "ss": f"{spec.start:.3f}",
            **ffmpeg.http_options(settings.clip_max_range_bytes),
        }
        if headers:
            options["headers"] = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return ffmpeg_python.input(url, **options)

    main = source(selection.video.url, selection.video.headers)
    # Only ever scales down: sources with no format short enough are brought to the limit.
    video = main.video.filter("scale", -2, f"min(ih,{settings.clip_max_height})")
    streams = [video]
    if selection.audio is not None:
        streams.append(source(selection.audio.url, selection.audio.headers)["a:0"])
    else:
        streams.append(main["a:0?"])
    cap = settings.clip_video_bitrate_cap
    out = ffmpeg_python.output(
        *streams,
        str(output),
        t=f"{spec.duration:.3f}",
        vcodec="libx264",
        preset="veryfast",
        crf=20,
        maxrate=cap,
        bufsize=cap,
        pix_fmt="yuv420p",
        acodec="aac",
        audio_bitrate="128k",
        movflags="+faststart",
        f="mp4",
    )
    out = out.global_args(
        "-hide_banner", "-nostdin", "-nostats", "-loglevel", "info", "-progress", "pipe:1"
    )
    return list(out.overwrite_output().get_args())


def _cut_failure(log: str) -> ClipFailed:
    lowered = log.lower()
    if any(k in lowered for k in ("server returned", "connection", "timed out", "i/o error")):
        return SourceUnreachable("The video source stopped answering while the clip was cut.")
    if any(k in lowered for k in ("invalid data found", "does not contain any stream", "moov")):
        return UnsupportedSource("The source is not a video that can be read.")
    return ProcessingFailed("The clip could not be cut from this video.")
