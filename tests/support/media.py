"""Synthetic test media: generation with ffmpeg, caching, and reading identities back.

This module owns the test clips and everything needed to check them after they have
been cut, remuxed or re-encoded by the service:

* ``make_source`` writes a progressive MP4 whose every video frame carries its own
  index as a 16-bit block pattern (``frame_number`` reads it back) and whose audio
  beeps at each whole second (``beep_onsets`` finds the beeps), so a test can check
  frame accuracy and A/V sync of any output.
* ``make_dash`` and ``make_hls`` derive YouTube-like renditions from a source.
* ``decode_frames`` decodes video to raw RGB for ``frame_number``.

Every generated file is cached next to a ``.params.json`` sentinel recording how it
was made; a file is reused only when its sentinel matches the current request.
"""

from __future__ import annotations

import fcntl
import functools
import json
import re
import struct
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import imageio_ffmpeg
import numpy as np

# Part of every sentinel: bump when the output changes in a way the recorded ffmpeg
# arguments do not capture (e.g. the hand-written MPD), so stale caches get rebuilt.
_LAYOUT_VERSION = 1

# Frame-index pattern: bit k is a block in column k % 8, row k // 8, each block
# 1/16 of the frame wide and 1/9 high. Sizes are relative to the frame so the
# pattern can still be read after the service rescales the video.
FRAME_BITS = 16
_BIT_COLUMNS = 8
_BLOCK_WIDTH_DIVISOR = 16
_BLOCK_HEIGHT_DIVISOR = 9
# Blocks must stay at least this big for the pattern to survive lossy re-encoding.
_MIN_BLOCK_PX = 10

AUDIO_RATE = 44100
BEEP_HZ = 1000
BEEP_SECONDS = 0.04
_BEEP_AMPLITUDE = 0.5
# Half the beep amplitude: well above AAC pre-echo and quantisation noise.
_ONSET_THRESHOLD = int(0.25 * 32767)
# Loud samples closer together than this belong to the same beep.
_ONSET_MIN_GAP_SECONDS = 0.2

DASH_MANIFEST = "manifest.mpd"
DASH_VIDEO = "video.mp4"
DASH_AUDIO = "audio.m4a"
HLS_MASTER = "master.m3u8"
HLS_MEDIA = "playlist.m3u8"
_PTS_TIME = re.compile(r"\] n:\s*\d+ pts:\s*-?\d+ pts_time:(-?[\d.]+)")


@functools.cache
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg (there is no system one)."""
    return str(imageio_ffmpeg.get_ffmpeg_exe())


def _run_ffmpeg(args: list[str]) -> bytes:
    """Run ffmpeg quietly and return its stdout; failures raise with ffmpeg's stderr."""
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", *args],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"ffmpeg {' '.join(args)} failed ({proc.returncode}):\n"
            + proc.stderr.decode(errors="replace")
        )
    return proc.stdout


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serialise generation of one target across processes (pytest-xdist workers)."""
    lock_path = target.with_name(f".{target.name}.lock")
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(target: Path, params: Mapping[str, object], build: Callable[[], object]) -> Path:
    """Return ``target``, running ``build`` first unless a matching sentinel exists.

    The sentinel is deleted before building and written only after success, so an
    interrupted build is never mistaken for a finished one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    sentinel = target.with_name(f"{target.name}.params.json")
    wanted = json.dumps({"layout": _LAYOUT_VERSION, **params}, sort_keys=True)
    with _locked(target):
        if target.exists() and sentinel.exists() and sentinel.read_text() == wanted:
            return target
        sentinel.unlink(missing_ok=True)
        build()
        sentinel.write_text(wanted)
    return target


def _fingerprint(path: Path) -> dict[str, object]:
    """Identify a cached input so derived renditions rebuild when it is regenerated."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _frame_index_filter() -> str:
    """drawbox chain painting the frame index ``n`` as white-on-black bit blocks."""
    rows = -(-FRAME_BITS // _BIT_COLUMNS)
    band = (
        f"drawbox=x=0:y=0:w={_BIT_COLUMNS}*iw/{_BLOCK_WIDTH_DIVISOR}"
        f":h={rows}*ih/{_BLOCK_HEIGHT_DIVISOR}:color=black:t=fill"
    )
    bits = [
        f"drawbox=x={bit % _BIT_COLUMNS}*iw/{_BLOCK_WIDTH_DIVISOR}"
        f":y={bit // _BIT_COLUMNS}*ih/{_BLOCK_HEIGHT_DIVISOR}"
        f":w=iw/{_BLOCK_WIDTH_DIVISOR}:h=ih/{_BLOCK_HEIGHT_DIVISOR}"
        f":color=white:t=fill:enable='eq(mod(floor(n/{1 << bit}),2),1)'"
        for bit in range(FRAME_BITS)
    ]
    return ",".join([band, *bits])


def make_source(
    dir: Path,
    *,
    seconds: float,
    width: int = 320,
    height: int = 180,
    fps: int = 25,
    gop: int = 50,
    crf: int = 23,
    preset: str = "ultrafast",
    name: str = "source",
    open_gop: bool = False,
    variable_rate: bool = False,
    audio_delay: float = 0,
) -> Path:
    """Write (or reuse) ``dir/<name>.mp4``: H.264 + mono AAC, moov first, fixed GOP.

    A lower ``crf`` gives the bytes per second of real video at a small picture size; a
    slower ``preset`` than ultrafast adds B-frames, as real H.264 (YouTube's) has.

    Video is testsrc2 (moving, so neighbouring frames differ) with the frame index
    painted top-left for ``frame_number``; a keyframe falls exactly every ``gop``
    frames. Audio is silence with a ``BEEP_HZ`` beep of ``BEEP_SECONDS`` starting at
    every whole second, so beep ``k`` lines up with frame ``k * fps``.

    ``open_gop`` makes x264 write open GOPs (keyframes whose leading B-frames refer to the GOP
    before). ``variable_rate`` gives every fifth frame one and a half frame durations, so the
    frame rate varies (beep ``k`` then lines up with the frame shown at ``k`` seconds).
    ``audio_delay`` starts the audio that many seconds after the video.
    """
    if width // _BLOCK_WIDTH_DIVISOR < _MIN_BLOCK_PX or height // _BLOCK_HEIGHT_DIVISOR < (
        _MIN_BLOCK_PX
    ):
        raise ValueError(f"{width}x{height} is too small for a readable frame index")
    if width % 2 or height % 2:
        raise ValueError("yuv420p needs even width and height")
    if round(seconds * fps) > 1 << FRAME_BITS:
        raise ValueError(f"more than {1 << FRAME_BITS} frames cannot be numbered")
    target = dir / f"{name}.mp4"
    video = f"testsrc2=size={width}x{height}:rate={fps},{_frame_index_filter()}"
    if variable_rate:
        video += f",settb=1/{fps * 60},setpts='(N+floor(N/5)/2)/({fps}*TB)'"
    audio = (
        f"aevalsrc='if(lt(mod(t,1),{BEEP_SECONDS}),"
        f"{_BEEP_AMPLITUDE}*sin(2*PI*{BEEP_HZ}*t),0)':s={AUDIO_RATE}:c=mono"
    )
    delay = ["-itsoffset", f"{audio_delay}"] if audio_delay else []
    args = [
        "-f", "lavfi", "-i", video,
        *delay, "-f", "lavfi", "-i", audio,
        "-t", f"{seconds}",
        "-c:v", "libx264", "-preset", preset, "-crf", f"{crf}", "-pix_fmt", "yuv420p",
        "-g", f"{gop}", "-keyint_min", f"{gop}", "-sc_threshold", "0",
        "-c:a", "aac", "-ar", f"{AUDIO_RATE}", "-ac", "1",
        "-movflags", "+faststart",
    ]  # fmt: skip
    if open_gop:
        args[args.index("-c:a") : args.index("-c:a")] = ["-x264-params", "open-gop=1"]
    if variable_rate:
        args[args.index("-c:a") : args.index("-c:a")] = ["-fps_mode", "vfr"]
    return _cached(target, {"ffmpeg": args}, lambda: _run_ffmpeg(["-y", *args, str(target)]))


def _top_level_boxes(path: Path) -> list[tuple[bytes, int, int]]:
    """(type, start offset, size) of each top-level ISO-BMFF box in ``path``."""
    boxes: list[tuple[bytes, int, int]] = []
    file_size = path.stat().st_size
    with path.open("rb") as f:
        offset = 0
        while offset < file_size:
            f.seek(offset)
            size, kind = struct.unpack(">I4s", f.read(8))
            if size == 1:
                (size,) = struct.unpack(">Q", f.read(8))
            elif size == 0:
                size = file_size - offset
            boxes.append((kind, offset, size))
            offset += size
    return boxes


def _read_box(path: Path, kind: bytes) -> tuple[int, bytes]:
    """Offset and full bytes of the first top-level box of type ``kind``."""
    for found, offset, size in _top_level_boxes(path):
        if found == kind:
            with path.open("rb") as f:
                f.seek(offset)
                return offset, f.read(size)
    raise ValueError(f"{path} has no {kind!r} box")


def _child_payload(moov: bytes, kind: bytes) -> bytes:
    """Payload of the first box named ``kind`` anywhere inside ``moov``.

    A byte search rather than a full box walk: the four-character codes used here
    (mvhd, tkhd, avcC) do not occur by accident in the small moov of our own files.
    """
    at = moov.find(kind)
    if at < 4:
        raise ValueError(f"no {kind!r} in moov")
    (size,) = struct.unpack(">I", moov[at - 4 : at])
    return moov[at + 4 : at - 4 + size]


def _duration_seconds(moov: bytes) -> float:
    mvhd = _child_payload(moov, b"mvhd")
    if mvhd[0] == 1:
        timescale, duration = struct.unpack(">IQ", mvhd[20:32])
    else:
        timescale, duration = struct.unpack(">II", mvhd[12:20])
    return float(duration) / float(timescale)


def _video_size(moov: bytes) -> tuple[int, int]:
    tkhd = _child_payload(moov, b"tkhd")
    # tkhd ends with width and height as 16.16 fixed point.
    width, height = struct.unpack(">II", tkhd[-8:])
    return width >> 16, height >> 16


def _avc_codecs(moov: bytes) -> str:
    avcc = _child_payload(moov, b"avcC")
    # RFC 6381: avc1.PPCCLL from profile, constraint flags and level of avcC.
    return f"avc1.{avcc[1]:02x}{avcc[2]:02x}{avcc[3]:02x}"


def _segment_base(path: Path) -> str:
    """SegmentBase element pointing at the init segment and the single sidx."""
    boxes = {kind: (offset, size) for kind, offset, size in _top_level_boxes(path)}
    moov_offset, moov_size = boxes[b"moov"]
    sidx_offset, sidx_size = boxes[b"sidx"]
    return (
        f'<SegmentBase indexRange="{sidx_offset}-{sidx_offset + sidx_size - 1}">'
        f'<Initialization range="0-{moov_offset + moov_size - 1}"/></SegmentBase>'
    )


def make_dash(dir: Path, source: Path) -> Path:
    """Write (or reuse) a YouTube-style DASH rendition of ``source`` in ``dir``.

    ``dir`` belongs to this rendition (fixed file names). The video-only
    ``video.mp4`` and audio-only ``audio.m4a`` are fragmented MP4s with one global
    sidx, and ``manifest.mpd`` lists each as a single-file Representation with
    SegmentBase, as YouTube does; ffmpeg's own dash muxer only writes SegmentList
    or SegmentTemplate, hence the hand-written manifest. Returns the manifest path.
    """
    manifest = dir / DASH_MANIFEST
    video, audio = dir / DASH_VIDEO, dir / DASH_AUDIO
    video_args = [
        "-i", str(source), "-map", "0:v:0", "-c", "copy",
        "-movflags", "+frag_keyframe+empty_moov+default_base_moof+global_sidx",
    ]  # fmt: skip
    # Every AAC frame is a sync sample, so fragment audio by time, not by keyframe.
    audio_args = [
        "-i", str(source), "-map", "0:a:0", "-c", "copy", "-frag_duration", "2000000",
        "-movflags", "+empty_moov+default_base_moof+global_sidx",
    ]  # fmt: skip

    def build() -> None:
        _run_ffmpeg(["-y", *video_args, str(video)])
        _run_ffmpeg(["-y", *audio_args, str(audio)])
        # The fragmented outputs have an empty moov; the duration comes from the source.
        duration = _duration_seconds(_read_box(source, b"moov")[1])
        video_moov = _read_box(video, b"moov")[1]
        width, height = _video_size(video_moov)
        manifest.write_text(
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static"'
            ' profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"'
            f' mediaPresentationDuration="PT{duration:.3f}S" minBufferTime="PT2S">\n'
            " <Period>\n"
            '  <AdaptationSet contentType="video" mimeType="video/mp4"'
            ' subsegmentAlignment="true">\n'
            f'   <Representation id="video" codecs="{_avc_codecs(video_moov)}"'
            f' bandwidth="{round(video.stat().st_size * 8 / duration)}"'
            f' width="{width}" height="{height}">\n'
            f"    <BaseURL>{DASH_VIDEO}</BaseURL>{_segment_base(video)}\n"
            "   </Representation>\n"
            "  </AdaptationSet>\n"
            '  <AdaptationSet contentType="audio" mimeType="audio/mp4"'
            ' subsegmentAlignment="true">\n'
            '   <Representation id="audio" codecs="mp4a.40.2"'
            f' bandwidth="{round(audio.stat().st_size * 8 / duration)}"'
            f' audioSamplingRate="{AUDIO_RATE}">\n'
            '    <AudioChannelConfiguration value="1"'
            ' schemeIdUri="urn:mpeg:dash:23003:3:audio_channel_configuration:2011"/>\n'
            f"    <BaseURL>{DASH_AUDIO}</BaseURL>{_segment_base(audio)}\n"
            "   </Representation>\n"
            "  </AdaptationSet>\n"
            " </Period>\n"
            "</MPD>\n"
        )

    params = {"source": _fingerprint(source), "video": video_args, "audio": audio_args}
    return _cached(manifest, params, build)


def make_hls(dir: Path, source: Path, segment_seconds: float = 2) -> Path:
    """Write (or reuse) an HLS rendition of ``source`` in ``dir``; return the master playlist.

    ``dir`` belongs to this rendition (fixed file names). Streams are copied into
    MPEG-TS segments, so segments can only start on the source's keyframes:
    ``segment_seconds`` should be a multiple of the source GOP duration. The master
    playlist carries CODECS and RESOLUTION for clients such as yt-dlp; the media
    playlist is ``playlist.m3u8``.
    """
    master = dir / HLS_MASTER
    args = [
        "-i", str(source), "-c", "copy", "-f", "hls",
        "-hls_time", f"{segment_seconds}", "-hls_playlist_type", "vod",
        "-hls_segment_filename", str(dir / "segment_%05d.ts"),
        "-master_pl_name", HLS_MASTER,
    ]  # fmt: skip

    def build() -> None:
        # Segments of an earlier, longer rendition would otherwise linger.
        for stale in dir.glob("segment_*.ts"):
            stale.unlink()
        _run_ffmpeg(["-y", *args, str(dir / HLS_MEDIA)])

    return _cached(master, {"source": _fingerprint(source), "ffmpeg": args}, build)


def decode_frames(
    path: Path | str,
    *,
    width: int,
    height: int,
    max_frames: int | None = None,
    ignore_editlist: bool = False,
) -> list[bytes]:
    """Decode the first video stream of a file or URL to rgb24 frames of ``width`` x ``height``.

    Frames are scaled to the given size, so a wrong guess cannot misalign the raw
    stream. Timestamps are passed through, so frames are neither duplicated nor
    dropped to fit a frame rate: the list is exactly what the decoder produced.
    ``ignore_editlist`` decodes MP4 samples the edit list would hide.
    """
    args = ["-ignore_editlist", "1"] if ignore_editlist else []
    args += ["-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough"]
    if max_frames is not None:
        args += ["-frames:v", f"{max_frames}"]
    args += ["-s", f"{width}x{height}", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    raw = _run_ffmpeg(args)
    frame_size = width * height * 3
    return [raw[at : at + frame_size] for at in range(0, len(raw), frame_size)]


def decode_timed_frames(
    path: Path | str, *, width: int, height: int, ignore_editlist: bool = False
) -> list[tuple[float, bytes]]:
    """Every decoded video frame with its presentation time in seconds, as ffmpeg's
    ``showinfo`` filter reports it (edit lists applied unless ``ignore_editlist``)."""
    args = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "info"]
    args += ["-ignore_editlist", "1"] if ignore_editlist else []
    args += ["-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough"]
    args += ["-vf", f"showinfo,scale={width}:{height}", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    proc = subprocess.run([*args, "pipe:"], capture_output=True, check=True)
    times = [float(m) for m in _PTS_TIME.findall(proc.stderr.decode(errors="replace"))]
    frame_size = width * height * 3
    raw = proc.stdout
    frames = [raw[at : at + frame_size] for at in range(0, len(raw), frame_size)]
    if len(times) != len(frames):
        raise RuntimeError(f"showinfo saw {len(times)} frames, the decoder gave {len(frames)}")
    return list(zip(times, frames, strict=True))


def grey_psnr(first: bytes, second: bytes) -> float:
    """PSNR in dB of two rgb24 frames of one size, on their luma."""
    weights = np.array([0.299, 0.587, 0.114])
    a = np.frombuffer(first, dtype=np.uint8).reshape(-1, 3) @ weights
    b = np.frombuffer(second, dtype=np.uint8).reshape(-1, 3) @ weights
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def frame_number(rgb: bytes, width: int, height: int) -> int:
    """Read back the frame index painted by ``make_source`` from one rgb24 frame.

    Each bit is decided by the mean luma of the middle half of its block, which
    keeps the block edges (where lossy codecs smear) out of the measurement.
    """
    if len(rgb) != width * height * 3:
        raise ValueError(f"{len(rgb)} bytes is not one {width}x{height} rgb24 frame")
    pixels = np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3).astype(np.float32)
    luma = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    block_w = width / _BLOCK_WIDTH_DIVISOR
    block_h = height / _BLOCK_HEIGHT_DIVISOR
    value = 0
    for bit in range(FRAME_BITS):
        x0 = (bit % _BIT_COLUMNS) * block_w
        y0 = (bit // _BIT_COLUMNS) * block_h
        inner = luma[
            round(y0 + block_h / 4) : round(y0 + 3 * block_h / 4),
            round(x0 + block_w / 4) : round(x0 + 3 * block_w / 4),
        ]
        if float(inner.mean()) > 128:
            value |= 1 << bit
    return value


def _decoded_audio(path: Path | str) -> bytes:
    """The first audio stream of a file decoded to mono 16-bit samples at ``AUDIO_RATE``."""
    return _run_ffmpeg(
        ["-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar", f"{AUDIO_RATE}",
         "-f", "s16le", "pipe:"]
    )  # fmt: skip


def audio_seconds(path: Path | str) -> float:
    """How long the first audio stream of a file plays, from its decoded samples."""
    return len(_decoded_audio(path)) / 2 / AUDIO_RATE


def beep_onsets(path: Path | str) -> list[float]:
    """Start times in seconds of the beeps in the first audio stream of a file or URL.

    Times are relative to the start of the decoded audio (edit lists applied). A clip
    that starts inside a beep reports an onset at 0.
    """
    samples = np.frombuffer(_decoded_audio(path), dtype="<i2").astype(np.int32)
    loud = np.flatnonzero(np.abs(samples) > _ONSET_THRESHOLD)
    if loud.size == 0:
        return []
    gap = _ONSET_MIN_GAP_SECONDS * AUDIO_RATE
    starts = np.concatenate([loud[:1], loud[1:][np.diff(loud) > gap]])
    return [float(start) / AUDIO_RATE for start in starts]
