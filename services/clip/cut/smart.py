"""Cutting the fetched span into the clip: exactly the source's frames in ``[start, end)``.

The frames are read from the span's packets (no decoding), so one rule serves every source,
constant or variable frame rate: a frame belongs to the clip when its presentation time falls
in ``[start, end)``.

Smart cut, when the video is H.264: the frames from ``start`` to the first IDR frame in the
clip and from the last IDR frame to ``end`` are re-encoded with x264 set to the source's
profile, level and size (and parameter-set ids of their own); the packets between the two
IDR frames are copied. The parts are joined with
their exact starting times, so timestamps, and with them variable frame rates, come through
unchanged, and the MP4 declares every parameter set in its ``avcC`` (see ``avcc``).

Otherwise (another codec, a source taller than the limit, no IDR frame in the clip) the
clip is re-encoded whole with x264's veryfast preset. Either way the first frame is the
source's frame at ``start`` with no edit list hiding a lead-in, and the index is at the front.

Re-encoded video spends at most the span's own video bitrate (and never more than the
configured cap): a clip made from a format chosen to fit a byte budget stays about its
format's size, however much of it is re-encoded. The audio is re-encoded at ``AUDIO_BITRATE``.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from pathlib import Path

from services.clip import ffmpeg
from services.clip.cut.avcc import declare_parameter_sets, declared_parameter_sets, nal_units
from services.clip.errors import ProcessingFailed, RangeOutOfBounds
from services.clip.settings import ClipSettings

# Half a millisecond: a frame whose time is within it of ``start`` or ``end`` is at it.
EPSILON = 0.0005
SPS_FIELD = re.compile(r"\b(profile_idc|level_idc|seq_parameter_set_id)\s+\d+ = (\d+)")
X264_PROFILES = {66: "baseline", 77: "main", 100: "high"}
AUDIO_BITRATE = 128_000
AUDIO = ("-c:a", "aac", "-b:a", f"{AUDIO_BITRATE // 1000}k")
BITRATE = re.compile(r"^(\d+(?:\.\d+)?)([kKmMgG]?)$")
SI = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
MP4 = ("-movflags", "+faststart", "-f", "mp4", "-y")
PARTS_SHARE = 0.8


@dataclass(frozen=True)
class Bounds:
    """Where the clip is in the span's timestamps, and how far the span's audio timestamps run
    ahead of its video's."""

    start: float
    end: float
    audio_shift: float = 0.0


@dataclass(frozen=True)
class Window:
    """The clip's place in the span: its bounds, and the times of its frames."""

    bounds: Bounds
    frames: tuple[float, ...]

    @property
    def start(self) -> float:
        return self.bounds.start

    @property
    def end(self) -> float:
        return self.bounds.end

    @property
    def duration(self) -> float:
        """From the first frame to the end: what the clip's audio covers."""
        return self.end - self.frames[0]

    def audio_input(self, span: Path) -> list[str]:
        """ffmpeg's input options and the span, for the audio that goes with the frames."""
        begin = self.frames[0] + self.bounds.audio_shift
        return ["-ss", _at(begin), "-t", f"{self.duration:.6f}", "-i", str(span)]


@dataclass(frozen=True)
class Part:
    """A run of the clip's frames taken one way: its first frame's presentation and decode
    times, its frame count, and how."""

    start: float
    decode_start: float
    frames: int
    encoded: bool


@dataclass(frozen=True)
class Encoder:
    """x264 matched to the source: its profile and level, a parameter-set id of its own, and
    the peak bitrate (bit/s) its frames may spend."""

    profile: str
    level: str
    sps_id: int
    max_rate: int

    def args(self) -> list[str]:
        return [
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
            "-profile:v", self.profile, "-level:v", self.level, *rate_args(self.max_rate),
            "-x264-params", f"sps-id={self.sps_id}",
        ]  # fmt: skip


def rate_args(max_rate: int) -> list[str]:
    """x264's peak bitrate, with a buffer of one second of it."""
    return ["-maxrate", str(max_rate), "-bufsize", str(max_rate)]


def bits_per_second(text: str) -> int:
    """A bitrate as ffmpeg writes it (``5M``, ``800k``, ``128000``): SI prefixes."""
    match = BITRATE.match(text.strip())
    if match is None:
        raise ValueError(f"not a bitrate: {text!r}")
    return round(float(match.group(1)) * SI[match.group(2).lower()])


def max_rate(packets: list[ffmpeg.Packet], cap: str) -> int:
    """What re-encoded video may spend: the span's own video bitrate, at most ``cap``."""
    limit = bits_per_second(cap)
    times = sorted(p.pts for p in packets)
    if len(times) < 2 or times[-1] <= times[0]:
        return limit
    # From the first frame's start to the last frame's end.
    seconds = (times[-1] - times[0]) * len(times) / (len(times) - 1)
    return min(limit, round(sum(p.size for p in packets) * 8 / seconds))


async def cut(
    span: Path,
    bounds: Bounds,
    workdir: Path,
    output: Path,
    settings: ClipSettings,
    max_height: int,
    report: ffmpeg.Report,
) -> str:
    """Write the clip of ``span`` within ``bounds`` to ``output``, no taller than
    ``max_height`` (a taller source is re-encoded, scaled down).

    Returns how: ``smart`` or ``reencode``.
    """
    packets = await ffmpeg.video_packets(span, workdir / "packets.crc")
    frames = tuple(
        sorted(p.pts for p in packets if bounds.start - EPSILON <= p.pts < bounds.end - EPSILON)
    )
    if not frames:
        raise RangeOutOfBounds("The video has no frames in this range; choose an earlier one.")
    window = Window(bounds=bounds, frames=frames)
    rate = max_rate(packets, settings.clip_video_bitrate_cap)
    facts = await ffmpeg.file_facts(span)
    smart = facts.video_codec == "h264" and 0 < (facts.height or 0) <= max_height
    encoder = await _encoder(span, rate) if smart else None
    keys = []
    if encoder is not None:
        idrs = await ffmpeg.video_packets(span, workdir / "idr.crc", idr_only=True)
        keys = _idr_keys(idrs, window)
    if encoder is None or not keys:
        report("re-encoding", 0.0)
        await _reencode(span, window, max_height, rate, output, report)
        return "reencode"
    report("cutting", 0.0)
    await _smart_cut(span, window, _parts(window, keys), encoder, workdir, output, report)
    return "smart"


def _idr_keys(idrs: list[ffmpeg.Packet], window: Window) -> list[ffmpeg.Packet]:
    """The IDR frames in the clip, where copied frames may start and end.

    Only at an IDR frame may a decoder switch to another SPS (H.264, 7.4.1.2.1) and forget
    every frame before; an open GOP's keyframe is not one, and frames copied from it on would
    be shown among the encoded ones before them.
    """
    return [p for p in idrs if window.start - EPSILON <= p.pts < window.end - EPSILON]


def _parts(window: Window, keys: list[ffmpeg.Packet]) -> list[Part]:
    """Head (encoded), middle (copied) and tail (encoded); the empty ones left out."""
    first, last = keys[0].pts, keys[-1].pts
    frames = window.frames
    parts = [
        Part(frames[0], frames[0], sum(t < first - EPSILON for t in frames), encoded=True),
        Part(
            first,
            keys[0].dts,
            sum(first - EPSILON <= t < last - EPSILON for t in frames),
            encoded=False,
        ),
        Part(last, keys[-1].dts, sum(t >= last - EPSILON for t in frames), encoded=True),
    ]
    return [part for part in parts if part.frames]


async def _encoder(span: Path, rate: int) -> Encoder | None:
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
        max_rate=rate,
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
            # Packets before the keyframe are dropped as they are read (a demuxer's seek may
            # land on an earlier keyframe, and a copy would start there); a copy starts at the
            # first keyframe whose decode time is not before ``-ss``.
            codec = ["-i", str(span), "-ss", _at(part.decode_start), "-c:v", "copy"]
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
         "-seek_timestamp", "1", *window.audio_input(span), "-map", "0:v:0", "-map", "1:a:0?",
         "-c:v", "copy",
         "-frames:v", str(len(window.frames)), *AUDIO, *MP4, str(output)]
    )  # fmt: skip
    await asyncio.to_thread(_remove, [*written, listing])
    if code != 0:
        raise ProcessingFailed("The clip's parts could not be joined.")
    await _declare_parameter_sets(output, span)


async def _declare_parameter_sets(clip: Path, span: Path) -> None:
    """List in the clip's ``avcC`` every SPS and PPS its samples use: the source's (from the
    span's ``avcC``: copied frames need them even where no IDR frame carries them in band)
    and every set the clip carries in band (x264's, at the IDR frames of each encoded part)."""
    in_band = clip.with_suffix(".h264")
    code, _ = await ffmpeg.run(
        [*ffmpeg.QUIET, "-i", str(clip), "-map", "0:v:0", "-c", "copy",
         "-bsf:v", "filter_units=pass_types=7-8", "-f", "h264", "-y", str(in_band)]
    )  # fmt: skip
    if code != 0:
        raise ProcessingFailed("The clip's parts could not be joined.")
    await asyncio.to_thread(_declare, clip, span, in_band)


def _declare(clip: Path, span: Path, in_band: Path) -> None:
    units = [*declared_parameter_sets(span), *nal_units(in_band.read_bytes())]
    in_band.unlink()
    declare_parameter_sets(clip, units)


async def _reencode(
    span: Path,
    window: Window,
    max_height: int,
    rate: int,
    output: Path,
    report: ffmpeg.Report,
) -> None:
    args = [
        *ffmpeg.GLOBAL, "-seek_timestamp", "1", "-ss", _at(window.frames[0] - EPSILON),
        "-i", str(span), "-seek_timestamp", "1", *window.audio_input(span),
        "-map", "0:v:0", "-map", "1:a:0?", "-frames:v", str(len(window.frames)),
        # Only ever scales down: sources with no format short enough come to the limit.
        "-vf", f"scale=-2:'min(ih,{max_height})'", "-fps_mode", "passthrough",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", *rate_args(rate),
        "-pix_fmt", "yuv420p", *AUDIO, *MP4, str(output),
    ]  # fmt: skip

    def on_progress(seconds: float) -> None:
        report("re-encoding", min(1.0, seconds / window.duration))

    code, log = await ffmpeg.run(args, on_progress=on_progress)
    if code != 0:
        raise ffmpeg.failure(log)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink()
