"""Making one clip: read the video's facts, fetch only its span, and cut it frame-exactly.

1. yt-dlp reads the facts and formats; H.264 and AAC no taller than the limit are picked.
2. One ffmpeg copies the span from the keyframe before ``start`` to ``end`` into a local file,
   seeking in the remote file with bounded HTTP range requests, so only the span and the
   container index are fetched.
3. Smart cut, when the video is H.264: frames from ``start`` to the first keyframe inside the
   span and from the last keyframe to ``end`` are re-encoded with parameters matching the
   source (profile, level, size, frame rate; their own SPS/PPS id), everything between is
   copied, and the three parts are joined. Audio is cut to the same span. Otherwise (another
   codec, an unknown frame rate) the span is re-encoded whole with x264's veryfast preset.
Either way the first frame is the source's frame at ``start`` with no edit list hiding a
lead-in, and the MP4 has its index at the front.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ffmpeg as ffmpeg_python

from services.clip import ffmpeg
from services.clip.egress import egress_url
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
from services.common.errors import AddressRefused, FetchFailed
from services.common.http import AddressGuard, check_url

Report = Callable[[str, float], None]
CLIP_FILE = "clip.mp4"
SPAN_FILE = "span.mp4"
LIVE_STATES = frozenset({"is_live", "is_upcoming", "post_live"})
TIME_BASE = re.compile(r"#tb 0: (\d+)/(\d+)")
# Half a millisecond: timestamps of the same frame read two ways differ by rounding only.
EPSILON = 0.0005
SPS_FIELD = re.compile(r"\b(profile_idc|level_idc)\s+\d+ = (\d+)")
FETCH_SHARE = 0.7
X264_PROFILES = {66: "baseline", 77: "main", 100: "high"}
GLOBAL = ("-hide_banner", "-nostdin", "-nostats", "-loglevel", "info", "-progress", "pipe:1")


class OutputTooLarge(ClipFailed):
    code = "output_too_large"


class ProcessingFailed(ClipFailed):
    code = "processing_failed"


class DiskLimitExceeded(ClipFailed):
    code = "job_disk_exceeded"


class SourceRefused(ClipFailed):
    code = "source_refused"


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
    await _check_address(spec.source.url, settings)
    # Without an operator's proxy, yt-dlp and ffmpeg reach the source only through the egress
    # proxy, which resolves each host once and refuses private addresses. With one, both use
    # it, since YouTube binds its media URLs to the address that asked for them.
    proxy = settings.ytdlp_proxy or await egress_url(settings.allow_private_networks)
    options = ydl_options(spec.source, cookie_file=settings.ytdlp_cookie_file, proxy=proxy)
    info = await asyncio.to_thread(extract, spec.source, options)
    if info.live_status in LIVE_STATES:
        raise LiveNotSupported(
            "The video is a live stream or premiere that has not ended; try once it is over."
        )
    if info.duration is not None:
        _check_range(spec, info.duration)
    selection = select(info.formats, settings.clip_max_height)
    for chosen in (selection.video, selection.audio):
        if chosen is not None:
            await _check_address(chosen.url, settings)

    report("fetching", 0.05)
    span = workdir / SPAN_FILE
    code, log = await ffmpeg.run(
        _span_args(spec, selection, settings, span, proxy),
        on_progress=lambda s: report("fetching", 0.05 + (FETCH_SHARE - 0.05) * _share(s, spec)),
    )
    remote = ffmpeg.parse_banner(log)
    duration = info.duration or remote.duration
    if duration is not None:
        _check_range(spec, duration)
    if code != 0 or not span.exists():
        raise _failure(log)
    if span.stat().st_size > settings.clip_max_job_disk_bytes:
        raise DiskLimitExceeded(
            f"The clip needs more than {settings.clip_max_job_disk_bytes} bytes of working "
            "space; choose a shorter range."
        )

    output = workdir / CLIP_FILE
    # The span keeps the source's timestamps, which start at the source's own start time
    # (not always 0: HLS segments often start at 1.4 s); the clip's times are relative to it.
    at = TimeBase(offset=remote.start)
    plan = await _smart_plan(spec, span, await ffmpeg.file_facts(span), settings, at)
    if plan is not None:
        report("cutting", FETCH_SHARE)
        await _smart_cut(spec, span, plan, workdir, output, report, at)
        cut = "smart"
    else:
        report("re-encoding", FETCH_SHARE)
        await _reencode(spec, span, settings, output, report, at)
        cut = "reencode"
    span.unlink()

    size = output.stat().st_size
    if size > settings.clip_max_output_bytes:
        raise OutputTooLarge(
            f"The clip is {size} bytes, over the limit of {settings.clip_max_output_bytes}; "
            "choose a shorter range."
        )
    made = await ffmpeg.file_facts(output)
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
        cut=cut,
    )


async def _check_address(url: str, settings: ClipSettings) -> None:
    """Refuse a source whose host resolves to a private or reserved address.

    yt-dlp and ffmpeg resolve the host again themselves; this check stops a source that
    points inside the network on purpose, not one whose DNS answers change between lookups.
    """
    try:
        host = check_url(url).host
    except FetchFailed as exc:
        raise SourceRefused(f"The video source is not allowed: {exc.message}") from exc
    try:
        await AddressGuard(allow_private=settings.allow_private_networks).addresses(host)
    except AddressRefused as exc:
        raise SourceRefused(f"The video source is not allowed: {exc.message}") from exc
    except FetchFailed as exc:
        raise SourceUnreachable(f"The video source could not be reached: {exc.message}") from exc


def _share(seconds: float, spec: ClipSpec) -> float:
    return min(1.0, max(0.0, seconds - spec.start) / spec.duration)


def _check_range(spec: ClipSpec, duration: float) -> None:
    if spec.end > duration:
        raise RangeOutOfBounds(
            f"The video is {_clock(duration)} long; the clip must end by then, "
            f"not at {_clock(spec.end)}."
        )


def _span_args(
    spec: ClipSpec, selection: Selection, settings: ClipSettings, span: Path, proxy: str
) -> list[str]:
    """Copy from the keyframe before the start to the end, keeping the source's timestamps."""

    def source(url: str, headers: dict[str, str]) -> ffmpeg_python.nodes.FilterableStream:
        options: dict[str, object] = {
            "ss": f"{spec.start:.3f}",
            "to": f"{spec.end:.3f}",
            "http_proxy": proxy,
            **ffmpeg.http_options(settings.clip_max_range_bytes),
        }
        if headers:
            options["headers"] = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return ffmpeg_python.input(url, **options)

    main = source(selection.video.url, selection.video.headers)
    streams = [main["v:0"]]
    if selection.audio is not None:
        streams.append(source(selection.audio.url, selection.audio.headers)["a:0"])
    else:
        streams.append(main["a:0?"])
    # ffmpeg stops writing past the limit; the size check after the fetch names the failure.
    limit = settings.clip_max_job_disk_bytes + 1
    out = ffmpeg_python.output(*streams, str(span), c="copy", copyts=None, fs=limit, f="mp4")
    return list(out.global_args(*GLOBAL).overwrite_output().get_args())


@dataclass(frozen=True)
class TimeBase:
    """Turns a time in the video into a timestamp in the span file."""

    offset: float

    def __call__(self, seconds: float) -> str:
        return f"{seconds + self.offset:.6f}"


@dataclass(frozen=True)
class SmartPlan:
    """Where the three parts start in the span, their frame counts, and x264's settings."""

    first_frame: float
    first_key: float
    last_key: float
    head_frames: int
    copy_frames: int
    tail_frames: int
    profile: str
    level: str


async def _frames(span: Path) -> list[tuple[float, bool]]:
    """Every video frame of the span: its timestamp and whether it is a keyframe.

    Read from the packets (``framecrc`` marks every packet that is not a plain keyframe with
    ``F=``), so nothing is decoded and variable frame rates need no special case.
    """
    _, log = await ffmpeg.run(
        ["-hide_banner", "-nostdin", "-loglevel", "error", "-copyts", "-i", str(span),
         "-map", "0:v:0", "-c", "copy", "-f", "framecrc", "pipe:2"]
    )  # fmt: skip
    base = TIME_BASE.search(log)
    if base is None:
        return []
    unit = int(base.group(1)) / int(base.group(2))
    frames = []
    for line in log.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 6 and fields[0] == "0" and fields[2].lstrip("-").isdigit():
            frames.append((int(fields[2]) * unit, not any(f.startswith("F=") for f in fields)))
    return sorted(frames)


async def _smart_plan(
    spec: ClipSpec, span: Path, facts: ffmpeg.MediaFacts, settings: ClipSettings, at: TimeBase
) -> SmartPlan | None:
    """How to smart-cut the span, or None when it must be re-encoded whole."""
    if facts.video_codec != "h264" or not facts.height or facts.height > settings.clip_max_height:
        return None
    start, end = float(at(spec.start)), float(at(spec.end))
    clip = [(t, key) for t, key in await _frames(span) if start - EPSILON <= t < end - EPSILON]
    keys = [t for t, key in clip if key]
    if not clip or not keys:
        return None
    _, sps_log = await ffmpeg.run(
        ["-hide_banner", "-nostdin", "-i", str(span), "-map", "0:v:0", "-frames:v", "1",
         "-c", "copy", "-bsf:v", "trace_headers", "-f", "null", "-"]
    )  # fmt: skip
    sps = {name: int(value) for name, value in SPS_FIELD.findall(sps_log)}
    profile = X264_PROFILES.get(sps.get("profile_idc", 0))
    if profile is None or "level_idc" not in sps:
        return None
    times = [t for t, _ in clip]
    return SmartPlan(
        first_frame=times[0],
        first_key=keys[0],
        last_key=keys[-1],
        head_frames=sum(t < keys[0] for t in times),
        copy_frames=sum(keys[0] <= t < keys[-1] for t in times),
        tail_frames=sum(t >= keys[-1] for t in times),
        profile=profile,
        level=f"{sps['level_idc'] / 10:.1f}",
    )


async def _smart_cut(
    spec: ClipSpec,
    span: Path,
    plan: SmartPlan,
    workdir: Path,
    output: Path,
    report: Report,
    at: TimeBase,
) -> None:
    encode = [
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
        "-profile:v", plan.profile, "-level:v", plan.level, "-x264-params", "sps-id=1",
    ]  # fmt: skip
    parts: list[tuple[float, int, list[str]]] = [
        (plan.first_frame, plan.head_frames, encode),
        (plan.first_key, plan.copy_frames, ["-c:v", "copy"]),
        (plan.last_key, plan.tail_frames, encode),
    ]
    written: list[Path] = []
    for index, (start, frames, codec) in enumerate(parts):
        if frames == 0:
            continue
        part = workdir / f"part{index}.ts"
        code, _ = await ffmpeg.run(
            ["-hide_banner", "-nostdin", "-loglevel", "error", "-seek_timestamp", "1",
             "-ss", f"{start:.6f}", "-i", str(span), "-map", "0:v:0", "-frames:v", str(frames),
             *codec, "-f", "mpegts", "-y", str(part)]
        )  # fmt: skip
        if code != 0:
            raise ProcessingFailed("The clip could not be cut from this video.")
        written.append(part)
        report("cutting", FETCH_SHARE + (1 - FETCH_SHARE) * 0.8 * (index + 1) / len(parts))
    listing = workdir / "parts.txt"
    listing.write_text("".join(f"file '{part.name}'\n" for part in written))
    code, _ = await ffmpeg.run(
        ["-hide_banner", "-nostdin", "-loglevel", "error", "-f", "concat", "-safe", "0",
         "-i", str(listing), "-seek_timestamp", "1", "-ss", f"{plan.first_frame:.6f}",
         "-i", str(span),
         "-t", f"{spec.duration:.6f}", "-map", "0:v:0", "-map", "1:a:0?", "-c:v", "copy",
         "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", "-f", "mp4", "-y",
         str(output)]
    )  # fmt: skip
    for path in [*written, listing]:
        path.unlink()
    if code != 0:
        raise ProcessingFailed("The clip's parts could not be joined.")


async def _reencode(
    spec: ClipSpec,
    span: Path,
    settings: ClipSettings,
    output: Path,
    report: Report,
    at: TimeBase,
) -> None:
    cap = settings.clip_video_bitrate_cap
    args = [
        *GLOBAL, "-seek_timestamp", "1", "-ss", at(spec.start), "-i", str(span),
        "-t", f"{spec.duration:.6f}", "-map", "0:v:0", "-map", "0:a:0?",
        # Only ever scales down: sources with no format short enough come to the limit.
        "-vf", f"scale=-2:'min(ih,{settings.clip_max_height})'",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-maxrate", cap,
        "-bufsize", cap, "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k",
        "-movflags", "+faststart", "-f", "mp4", "-y", str(output),
    ]  # fmt: skip

    def on_progress(seconds: float) -> None:
        share = min(1.0, seconds / spec.duration)
        report("re-encoding", FETCH_SHARE + (1 - FETCH_SHARE) * share)

    code, log = await ffmpeg.run(args, on_progress=on_progress)
    if code != 0:
        raise _failure(log)


def _failure(log: str) -> ClipFailed:
    lowered = log.lower()
    if any(k in lowered for k in ("server returned", "connection", "timed out", "i/o error")):
        return SourceUnreachable("The video source stopped answering while the clip was cut.")
    if any(k in lowered for k in ("invalid data found", "does not contain any stream", "moov")):
        return UnsupportedSource("The source is not a video that can be read.")
    return ProcessingFailed("The clip could not be cut from this video.")
