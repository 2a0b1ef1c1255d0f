"""Cutting the fetched span into the clip: exactly the source's frames in ``[start, end)``.

The frames are read from the span's packets (no decoding), so one rule serves every source,
constant or variable frame rate: a frame belongs to the clip when its presentation time falls
in ``[start, end)``.

Smart cut, when the video is H.264: the frames from ``start`` to the first clean keyframe in
the clip and from the last clean keyframe to ``end`` are re-encoded with x264 set to the
source's profile, level and size (and parameter-set ids of their own); the packets between
the two keyframes are copied. A keyframe is clean when no packet after it in decode order shows
before it (an open GOP's leading frames would need the GOP before). The parts are joined with
their exact starting times, so timestamps, and with them variable frame rates, come through
unchanged, and the MP4 declares every parameter set in its ``avcC`` (see ``avcc``).

Otherwise (another codec, a source taller than the limit, no clean keyframe in the clip) the
clip is re-encoded whole with x264's veryfast preset. Either way the first frame is the
source's frame at ``start`` with no edit list hiding a lead-in, and the index is at the front.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from pathlib import Path

from services.clip import ffmpeg
from services.clip.cut.avcc import declare_parameter_sets
from services.clip.errors import ProcessingFailed, RangeOutOfBounds
from services.clip.settings import ClipSettings

# Half a millisecond: a frame whose time is within it of ``start`` or ``end`` is at it.
EPSILON = 0.0005
SPS_FIELD = re.compile(r"\b(profile_idc|level_idc|seq_parameter_set_id)\s+\d+ = (\d+)")
X264_PROFILES = {66: "baseline", 77: "main", 100: "high"}
AUDIO = ("-c:a", "aac", "-b:a", "128k")
MP4 = ("-movflags", "+faststart", "-f", "mp4", "-y")
PARTS_SHARE = 0.8


@dataclass(frozen=True)
class Window:
    """The clip's place in the span: its bounds in the span's timestamps, and its frames."""

    start: float
    end: float
    frames: tuple[float, ...]

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Part:
    """A run of the clip's frames taken one way: its first frame, its frame count, and how."""

    start: float
    frames: int
    encoded: bool


@dataclass(frozen=True)
class Encoder:
    """x264 matched to the source: its profile and level, and a parameter-set id of its own."""

    profile: str
    level: str
    sps_id: int

    def args(self) -> list[str]:
        return [
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
            "-profile:v", self.profile, "-level:v", self.level,
            "-x264-params", f"sps-id={self.sps_id}",
        ]  # fmt: skip


async def cut(
    span: Path,
    start: float,
    end: float,
    workdir: Path,
    output: Path,
    settings: ClipSettings,
    report: ffmpeg.Report,
) -> str:
    """Write the clip of ``span`` from ``start`` to ``end`` (span timestamps) to ``output``.

    Returns how: ``smart`` or ``reencode``.
    """
    packets = await ffmpeg.video_packets(span, workdir / "packets.crc")
    frames = tuple(sorted(p.pts for p in packets if start - EPSILON <= p.pts < end - EPSILON))
    if not frames:
        raise RangeOutOfBounds("The video has no frames in this range; choose an earlier one.")
    window = Window(start=start, end=end, frames=frames)
    facts = await ffmpeg.file_facts(span)
    smart = facts.video_codec == "h264" and 0 < (facts.height or 0) <= settings.clip_max_height
    encoder = await _encoder(span) if smart else None
    keys = _clean_keys(packets, window) if encoder is not None else []
    if encoder is None or not keys:
        report("re-encoding", 0.0)
        await _reencode(span, window, settings, output, report)
        return "reencode"
    report("cutting", 0.0)
    await _smart_cut(span, window, _parts(window, keys), encoder, workdir, output, report)
    return "smart"


def _clean_keys(packets: list[ffmpeg.Packet], window: Window) -> list[float]:
    """Times of the keyframes in the clip that a decoder can start from on their own."""
    clean = []
    for index, packet in enumerate(packets):
        if not packet.key or not window.start - EPSILON <= packet.pts < window.end - EPSILON:
            continue
        following = packets[index + 1 :]
        gop = next((i for i, p in enumerate(following) if p.key), len(following))
        if all(p.pts > packet.pts for p in following[:gop]):
            clean.append(packet.pts)
    return clean


def _parts(window: Window, keys: list[float]) -> list[Part]:
    """Head (encoded), middle (copied) and tail (encoded); the empty ones left out."""
    first, last = keys[0], keys[-1]
    frames = window.frames
    parts = [
        Part(frames[0], sum(t < first - EPSILON for t in frames), encoded=True),
        Part(first, sum(first - EPSILON <= t < last - EPSILON for t in frames), encoded=False),
        Part(last, sum(t >= last - EPSILON for t in frames), encoded=True),
    ]
    return [part for part in parts if part.frames]


async def _encoder(span: Path) -> Encoder | None:
    """x264's settings for the span's video, or None when x264 cannot match its profile."""
    _, log = await ffmpeg.run(
        ["-hide_banner", "-nostdin", "-i", str(span), "-map", "0:v:0", "-frames:v", "1",
         "-c", "copy", "-bsf:v", "trace_headers", "-f", "null", "-"]
    )  # fmt: skip
    sps = {name: int(value) for name, value in SPS_FIELD.findall(log)}
    profile = X264_PROFILES.get(sps.get("profile_idc", 0))
    if profile is None or "level_idc" not in sps:
        return None
    return Encoder(
        profile=profile,
        level=f"{sps['level_idc'] / 10:.1f}",
        sps_id=(sps.get("seq_parameter_set_id", 0) + 1) % 32,
    )


def _at(seconds: float) -> str:
    """A time for ``-ss`` that is never after ``seconds`` (ffmpeg parses microseconds)."""
    return f"{math.floor(seconds * 1_000_000) / 1_000_000:.6f}"


async def _smart_cut(
    span: Path,
    window: Window,
    parts: list[Part],
    encoder: Encoder,
    workdir: Path,
    output: Path,
    report: ffmpeg.Report,
) -> None:
    written: list[Path] = []
    for index, part in enumerate(parts):
        path = workdir / f"part{index}.ts"
        if part.encoded:
            # Decoding starts at the keyframe before, and frames before ``start`` are dropped.
            codec = ["-ss", _at(part.start - EPSILON), "-i", str(span), *encoder.args()]
        else:
            codec = ["-ss", _at(part.start), "-i", str(span), "-c:v", "copy"]
        code, log = await ffmpeg.run(
            [*ffmpeg.QUIET, "-seek_timestamp", "1", *codec, "-map", "0:v:0",
             "-fps_mode", "passthrough", "-frames:v", str(part.frames), "-f", "mpegts", "-y",
             str(path)]
        )  # fmt: skip
        if code != 0:
            raise ffmpeg.failure(log)
        written.append(path)
        report("cutting", PARTS_SHARE * (index + 1) / len(parts))
    # Each part is placed at its first frame's own time: the concat demuxer shifts a part by
    # the durations listed before it, so listing them exactly keeps every timestamp.
    listing = workdir / "parts.txt"
    lines = []
    for part, following, path in zip(parts, [*parts[1:], None], written, strict=True):
        lines.append(f"file '{path.name}'\n")
        if following is not None:
            lines.append(f"duration {following.start - part.start:.6f}\n")
    listing.write_text("".join(lines))
    code, log = await ffmpeg.run(
        [*ffmpeg.QUIET, "-f", "concat", "-safe", "0", "-i", str(listing),
         "-seek_timestamp", "1", "-ss", _at(window.frames[0]), "-t", f"{window.duration:.6f}",
         "-i", str(span), "-map", "0:v:0", "-map", "1:a:0?", "-c:v", "copy",
         "-frames:v", str(len(window.frames)), *AUDIO, *MP4, str(output)]
    )  # fmt: skip
    await asyncio.to_thread(_remove, [*written, listing])
    if code != 0:
        raise ProcessingFailed("The clip's parts could not be joined.")
    await _declare_parameter_sets(output)


async def _declare_parameter_sets(clip: Path) -> None:
    """List every SPS and PPS the clip's samples carry in its ``avcC``."""
    sets = clip.with_suffix(".h264")
    code, _ = await ffmpeg.run(
        [*ffmpeg.QUIET, "-i", str(clip), "-map", "0:v:0", "-c", "copy",
         "-bsf:v", "h264_mp4toannexb,filter_units=pass_types=7-8", "-f", "h264", "-y",
         str(sets)]
    )  # fmt: skip
    if code != 0:
        raise ProcessingFailed("The clip's parts could not be joined.")
    await asyncio.to_thread(declare_parameter_sets, clip, sets)


async def _reencode(
    span: Path,
    window: Window,
    settings: ClipSettings,
    output: Path,
    report: ffmpeg.Report,
) -> None:
    cap = settings.clip_video_bitrate_cap
    args = [
        *ffmpeg.GLOBAL, "-seek_timestamp", "1", "-ss", _at(window.frames[0] - EPSILON),
        "-i", str(span), "-map", "0:v:0", "-map", "0:a:0?",
        "-frames:v", str(len(window.frames)), "-t", f"{window.duration:.6f}",
        # Only ever scales down: sources with no format short enough come to the limit.
        "-vf", f"scale=-2:'min(ih,{settings.clip_max_height})'", "-fps_mode", "passthrough",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-maxrate", cap,
        "-bufsize", cap, "-pix_fmt", "yuv420p", *AUDIO, *MP4, str(output),
    ]  # fmt: skip

    def on_progress(seconds: float) -> None:
        report("re-encoding", min(1.0, seconds / window.duration))

    code, log = await ffmpeg.run(args, on_progress=on_progress)
    if code != 0:
        raise ffmpeg.failure(log)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink()
