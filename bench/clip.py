"""Benchmark of ``services.clip.pipeline.make_clip`` on 720p sources served from loopback.

Every figure is a ratio against a baseline measured in the same run: the sides of a comparison
run interleaved (the order rotates from one repetition to the next) and a time ratio is the
median of the per-repetition ratios, because the machine is noisy. It measures:

A. A 30 s clip (5:00-5:30) of a 10-minute source on an unthrottled server: the bytes our
   pipeline fetches against the clip's share of the file (goal <= 2x) and against the bytes
   between the clip's first and last samples plus the container index (goal <= 1.3x), and its
   time against the bare yt-dlp command line (``--download-sections --force-keyframes-at-cuts``)
   and against downloading the whole file and cutting it locally with the same exactness.
B. The same clip of a 60-minute source with the server throttling large and open-ended ranges
   as YouTube does, against unthrottled (goal <= 1.5x), with the bare yt-dlp command line on
   the throttled server for reference; the same clip of the 60-minute source against the
   10-minute one (goal <= 1.1x); and a frame-exact 60 s clip against a full veryfast x264
   re-encode of the same span from a local file (goal <= 0.25x).

Sources are generated once with ``tests.support.media.make_source`` and cached under
/tmp/hermes-media-bench: one 5-minute encode, stream-copied 2 and 12 times into the 10- and
60-minute files with ffmpeg's concat demuxer (frame numbers repeat, which timing ignores).

Run ``python -m bench.clip``; ``--quick`` is a smoke run, ``--out PATH`` also writes the
Markdown report to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from services.clip.ffmpeg import ffmpeg_exe
from services.clip.pipeline import make_clip
from services.clip.request import build_spec
from services.clip.settings import ClipSettings
from tests.support.media import make_dash, make_source
from tests.support.rangeserver import RequestRecord, ThrottlePolicy
from tests.support.strictorigin import StrictOrigin

CACHE = Path(tempfile.gettempdir()) / "hermes-media-bench"
YT_DLP = Path(sys.executable).parent / "yt-dlp"
FPS = 25
GOP = 50
# testsrc2 with the frame index painted on is busy: crf 32 at ultrafast gives a few Mbit/s
# at 720p, about what a real 720p H.264 video carries.
CRF = 32
SHORT_MINUTES = 10
LONG_MINUTES = 60
CLIP = (300.0, 330.0)
# A 14.5 s clip of the short low-bitrate source (3 minutes of 640x360 under 1 Mbit/s).
SMALL_CLIP = (64.0, 78.5)
LONG_CLIP = (300.0, 360.0)
THROTTLE = ThrottlePolicy()
SHARE_GOAL = 2.0
SPAN_GOAL = 1.3
SLACK = 256 * 1024
THROTTLED_GOAL = 1.5
LONG_SOURCE_GOAL = 1.1
REENCODE_GOAL = 0.25
DOWNLOAD_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    mode: str
    width: int
    height: int
    base_seconds: int
    reps: int
    cap_seconds: float


FULL = Plan(mode="full", width=1280, height=720, base_seconds=300, reps=3, cap_seconds=120.0)
QUICK = Plan(
    mode="quick (--quick, a smoke run at 640x360 with one repetition: figures are indicative)",
    width=640,
    height=360,
    base_seconds=300,
    reps=1,
    cap_seconds=30.0,
)


@dataclass(frozen=True)
class Source:
    path: Path
    minutes: int
    seconds_to_make: float
    index_bytes: int
    clip_span_bytes: int
    long_clip_span_bytes: int

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def share(self, start: float, end: float) -> float:
        return self.size * (end - start) / (self.minutes * 60)


@dataclass(frozen=True)
class Run:
    seconds: float
    fetched: int
    requests: tuple[RequestRecord, ...] = ()


@dataclass
class Track:
    """One track's samples: decode time (s), file offset and size, and keyframe indexes."""

    handler: bytes
    times: list[float]
    offsets: list[int]
    sizes: list[int]
    sync: list[int] | None


def _log(message: str) -> None:
    sys.stderr.write(f"[bench.clip {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _run(args: Sequence[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


# Reading the MP4 index: where the clip's samples sit in the file


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of each box in ``data[start:end]``."""
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, at + 8)
            header = 16
        elif size == 0:
            size = end - at
        yield kind, at + header, at + size
        at += size


def _read_moov(path: Path) -> bytes:
    with path.open("rb") as f:
        end = path.stat().st_size
        at = 0
        while at < end:
            f.seek(at)
            size, kind = struct.unpack(">I4s", f.read(8))
            if size == 1:
                (size,) = struct.unpack(">Q", f.read(8))
            if kind == b"moov":
                f.seek(at)
                return f.read(size)
            at += size
    raise ValueError(f"{path} has no moov")


def _children(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    return {kind: (payload, box_end) for kind, payload, box_end in _boxes(data, start, end)}


def _uints(data: bytes, at: int, count: int, width: int = 4) -> list[int]:
    return list(struct.unpack_from(f">{count}{'I' if width == 4 else 'Q'}", data, at))


def _track(moov: bytes, start: int, end: int) -> Track:
    mdia = _children(moov, *_children(moov, start, end)[b"mdia"])
    mdhd = mdia[b"mdhd"][0]
    timescale = struct.unpack_from(">I", moov, mdhd + (20 if moov[mdhd] == 1 else 12))[0]
    handler = moov[mdia[b"hdlr"][0] + 8 : mdia[b"hdlr"][0] + 12]
    minf = _children(moov, *mdia[b"minf"])
    stbl = _children(moov, *minf[b"stbl"])

    def table(kind: bytes) -> tuple[int, int]:
        """Offset of the entries and their count (full-box header skipped)."""
        at = stbl[kind][0]
        return at + 8, struct.unpack_from(">I", moov, at + 4)[0]

    times: list[float] = []
    at, count = table(b"stts")
    clock = 0
    for samples, delta in zip(*[iter(_uints(moov, at, 2 * count))] * 2, strict=True):
        for _ in range(samples):
            times.append(clock / timescale)
            clock += delta
    stsz = stbl[b"stsz"][0]
    uniform, total = struct.unpack_from(">II", moov, stsz + 4)
    sizes = [uniform] * total if uniform else _uints(moov, stsz + 12, total)
    if b"co64" in stbl:
        at, count = table(b"co64")
        chunks = _uints(moov, at, count, width=8)
    else:
        at, count = table(b"stco")
        chunks = _uints(moov, at, count)
    at, count = table(b"stsc")
    runs = list(zip(*[iter(_uints(moov, at, 3 * count))] * 3, strict=True))
    offsets: list[int] = []
    for index, (first_chunk, per_chunk, _) in enumerate(runs):
        last_chunk = runs[index + 1][0] if index + 1 < len(runs) else len(chunks) + 1
        for chunk in range(first_chunk, last_chunk):
            offset = chunks[chunk - 1]
            for _ in range(per_chunk):
                offsets.append(offset)
                offset += sizes[len(offsets) - 1]
    sync = None
    if b"stss" in stbl:
        at, count = table(b"stss")
        sync = [number - 1 for number in _uints(moov, at, count)]
    return Track(handler, times, offsets, sizes, sync)


def _span_bytes(tracks: Sequence[Track], start: float, end: float) -> int:
    """Bytes from the first to the last sample a seek to ``start`` reads up to ``end``.

    Input seeking starts at the keyframe at or before ``start``, in every track.
    """
    video = next(t for t in tracks if t.handler == b"vide")
    keyframes = video.sync if video.sync is not None else range(len(video.times))
    begin = max(video.times[i] for i in keyframes if video.times[i] <= start)
    low, high = sys.maxsize, 0
    for track in tracks:
        for moment, offset, size in zip(track.times, track.offsets, track.sizes, strict=True):
            if begin <= moment < end:
                low, high = min(low, offset), max(high, offset + size)
    return high - low


def _index(path: Path) -> tuple[int, list[Track]]:
    """The moov box's size and its tracks."""
    moov = _read_moov(path)
    payload = 8 if struct.unpack_from(">I", moov)[0] != 1 else 16
    tracks = [
        _track(moov, start, end)
        for kind, start, end in _boxes(moov, payload, len(moov))
        if kind == b"trak"
    ]
    return len(moov), tracks


# Sources


def _concat(base: Path, copies: int, target: Path) -> float:
    """Write (or reuse) ``copies`` stream copies of ``base`` end to end; seconds spent."""
    sentinel = target.with_name(f"{target.name}.params.json")
    stat = base.stat()
    wanted = json.dumps({"base": str(base), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                         "copies": copies})  # fmt: skip
    if target.exists() and sentinel.exists() and sentinel.read_text() == wanted:
        return 0.0
    sentinel.unlink(missing_ok=True)
    began = time.perf_counter()
    listing = target.with_name(f"{target.name}.txt")
    listing.write_text(f"file '{base}'\n" * copies)
    _run([
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-f", "concat", "-safe", "0", "-i", str(listing),
        "-c", "copy", "-movflags", "+faststart", str(target),
    ])  # fmt: skip
    listing.unlink()
    sentinel.write_text(wanted)
    return time.perf_counter() - began


def _small_source(folder: Path) -> tuple[Source, str, int]:
    """The 3-minute source, its DASH rendition's manifest path, and that rendition's index
    bytes (each file's ftyp, moov and sidx)."""
    began = time.perf_counter()
    path = make_source(
        folder, seconds=180, width=640, height=360, fps=FPS, gop=100, crf=34, name="b180"
    )
    manifest = make_dash(folder / "b180-dash", path)
    index_bytes, tracks = _index(path)
    source = Source(
        path=path,
        minutes=3,
        seconds_to_make=time.perf_counter() - began,
        index_bytes=index_bytes,
        clip_span_bytes=_span_bytes(tracks, *SMALL_CLIP),
        long_clip_span_bytes=0,
    )
    dash_index = sum(_head_boxes(manifest.with_name(name)) for name in ("video.mp4", "audio.m4a"))
    return source, str(manifest.relative_to(folder)), dash_index


def _head_boxes(path: Path) -> int:
    """Bytes of the ftyp, moov and sidx boxes at the start of a fragmented MP4."""
    total = 0
    data = path.read_bytes()[: 1 << 20]
    for kind, _, end in _boxes(data, 0, len(data)):
        if kind not in (b"ftyp", b"moov", b"sidx"):
            break
        total = end
    return total


def _sources(plan: Plan) -> tuple[float, Source, Source]:
    """Seconds the base encode took (0 if cached), and the 10- and 60-minute sources."""
    folder = CACHE / f"{plan.height}p"
    began = time.perf_counter()
    _log(f"encoding (or reusing) the {plan.base_seconds} s {plan.width}x{plan.height} base")
    base = make_source(
        folder,
        seconds=plan.base_seconds,
        width=plan.width,
        height=plan.height,
        fps=FPS,
        gop=GOP,
        crf=CRF,
        name="base",
    )
    base_seconds = time.perf_counter() - began
    made: list[Source] = []
    for minutes in (SHORT_MINUTES, LONG_MINUTES):
        target = folder / f"s{minutes}m.mp4"
        _log(f"concatenating (or reusing) the {minutes}-minute source")
        seconds = _concat(base, minutes * 60 // plan.base_seconds, target)
        index_bytes, tracks = _index(target)
        made.append(
            Source(
                path=target,
                minutes=minutes,
                seconds_to_make=seconds,
                index_bytes=index_bytes,
                clip_span_bytes=_span_bytes(tracks, *CLIP),
                long_clip_span_bytes=_span_bytes(tracks, *LONG_CLIP),
            )
        )
    return base_seconds, made[0], made[1]


# The sides measured


class Bench:
    """The server, the pipeline's settings and the sides of every comparison."""

    def __init__(self, server: StrictOrigin, work: Path, plan: Plan) -> None:
        self.server = server
        self.work = work
        self.plan = plan
        self.settings = ClipSettings(
            allow_private_networks=True,
            clip_extra_source_hosts=frozenset({server.base_url.removeprefix("http://")}),
            clip_work_dir=work / "clip",
        )
        self.format_ids: dict[Path, str] = {}

    def _measure(self, counted: str | None, throttled: bool, action: Callable[[], object]) -> Run:
        """Run ``action``; bytes are those the origin wrote for ``counted`` (all if None)."""
        self.server.throttle = THROTTLE if throttled else None
        self.server.reset()
        began = time.perf_counter()
        action()
        seconds = time.perf_counter() - began
        return Run(seconds, self.server.bytes_sent(counted), tuple(self.server.requests))

    def ours(
        self,
        source: Source,
        span: tuple[float, float],
        throttled: bool = False,
        served: str | None = None,
    ) -> Run:
        """Our clip of ``source`` (or of the rendition at ``served``, all its bytes counted);
        it must hold every frame of the span."""
        spec = build_spec(
            youtube_url=self.server.url(served or source.path.name),
            start_time=_clock(span[0]),
            end_time=_clock(span[1]),
            name=None,
            extra_hosts=self.settings.clip_extra_source_hosts,
            max_seconds=self.settings.clip_max_seconds,
            max_name_length=self.settings.clip_name_max_length,
            max_bytes=self.settings.clip_max_file_bytes,
        )

        def clip() -> None:
            with tempfile.TemporaryDirectory(dir=self.work) as job:
                result = asyncio.run(make_clip(spec, Path(job), self.settings, _ignore))
                frames = _frame_count(result.path)
                if frames != round(spec.duration * FPS):
                    raise RuntimeError(f"clip of {frames} frames, not {spec.duration * FPS:g}")

        return self._measure(None if served else source.path.name, throttled, clip)

    def _ytdlp_args(self, source: Source, out: Path) -> list[str]:
        url = self.server.url(source.path.name)
        if source.path not in self.format_ids:
            self.server.throttle = None
            printed = _run([str(YT_DLP), "--simulate", "--print", "format_id", url])
            self.format_ids[source.path] = printed.strip()
        return [
            str(YT_DLP), "--quiet", "--no-progress", "--no-cache-dir", "--force-overwrites",
            "--download-sections", f"*{_clock(CLIP[0])}-{_clock(CLIP[1])}",
            "--force-keyframes-at-cuts", "-f", self.format_ids[source.path],
            "--ffmpeg-location", ffmpeg_exe(), "-o", str(out), url,
        ]  # fmt: skip

    def ytdlp(self, source: Source, throttled: bool = False) -> tuple[Run, bool]:
        """The bare yt-dlp command line, and whether it finished within the plan's cap."""
        with tempfile.TemporaryDirectory(dir=self.work) as job:
            args = self._ytdlp_args(source, Path(job) / "out.mp4")
            finished = True

            def download() -> None:
                nonlocal finished
                # Its own process group: yt-dlp's ffmpeg child is killed with it at the cap.
                process = subprocess.Popen(
                    args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
                )
                try:
                    _, stderr = process.communicate(timeout=self.plan.cap_seconds)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.communicate()
                    finished = False
                    return
                if process.returncode != 0 or not (Path(job) / "out.mp4").exists():
                    raise RuntimeError(f"yt-dlp failed ({process.returncode}): {stderr!r}")

            run = self._measure(source.path.name, throttled, download)
        return run, finished

    def download_and_cut(self, source: Source) -> Run:
        """GET the whole file to disk, then cut it as ``local_cut`` does."""

        def fetch_then_cut() -> None:
            with tempfile.TemporaryDirectory(dir=self.work) as job:
                local = Path(job) / "whole.mp4"
                with (
                    httpx.stream("GET", self.server.url(source.path.name)) as response,
                    local.open("wb") as f,
                ):
                    response.raise_for_status()
                    for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                        f.write(chunk)
                _cut(local, CLIP, Path(job) / "out.mp4")

        return self._measure(source.path.name, False, fetch_then_cut)

    def local_cut(self, source: Source, span: tuple[float, float]) -> Run:
        with tempfile.TemporaryDirectory(dir=self.work) as job:
            began = time.perf_counter()
            _cut(source.path, span, Path(job) / "out.mp4")
            return Run(time.perf_counter() - began, 0)


def _frame_count(path: Path) -> int:
    """Video packets of a file, as ffmpeg's framecrc lists them."""
    listing = _run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy",
                    "-f", "framecrc", "-"])  # fmt: skip
    return sum(1 for line in listing.splitlines() if line and not line.startswith("#"))


def _ignore(stage: str, progress: float) -> None:
    del stage, progress


def _cut_args(local: Path, span: tuple[float, float], out: Path) -> list[str]:
    return [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-ss", f"{span[0]:g}", "-i", str(local), "-t", f"{span[1] - span[0]:g}",
        "-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac", str(out),
    ]  # fmt: skip


def _cut(local: Path, span: tuple[float, float], out: Path) -> None:
    _run(_cut_args(local, span, out))


def _interleaved(sides: dict[str, Callable[[], Run]], reps: int) -> dict[str, list[Run]]:
    """Every side once per repetition, the order rotating by one each repetition."""
    names = list(sides)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            _log(f"rep {rep + 1}/{reps}: {name}")
            runs[name].append(sides[name]())
    return runs


def _ratio(ours: Sequence[Run], base: Sequence[Run]) -> float:
    """Median of the paired per-repetition time ratios."""
    return statistics.median(o.seconds / b.seconds for o, b in zip(ours, base, strict=True))


def _seconds(runs: Sequence[Run]) -> float:
    return statistics.median(r.seconds for r in runs)


def _fetched(runs: Sequence[Run]) -> int:
    return round(statistics.median(r.fetched for r in runs))


# Report


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _mib(count: float) -> str:
    return f"{count / 2**20:.1f} MiB"


def _kib(count: float) -> str:
    return f"{count / 1024:,.0f} KiB"


def _header(plan: Plan, base_seconds: float, short: Source, long: Source) -> list[str]:
    nproc = _run(["nproc"]).strip()
    ffmpeg_version = _run([ffmpeg_exe(), "-version"]).split(" Copyright")[0]
    tcp_rmem = Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()
    ytdlp_version = _run([str(YT_DLP), "--version"]).strip()

    def made(seconds: float) -> str:
        return f"{seconds:.1f} s" if seconds else "reused from the cache"

    def described(source: Source) -> str:
        rate = source.size * 8 / (source.minutes * 60) / 1e6
        return (
            f"{source.minutes} minutes, {_mib(source.size)} ({rate:.2f} Mbit/s), "
            f"moov {_mib(source.index_bytes)}; concatenated in {made(source.seconds_to_make)}"
        )

    return [
        "# Clip benchmark: `make_clip` against yt-dlp and download-then-cut",
        "",
        f"Command: `{shlex.join(sys.orig_argv)}`",
        "",
        f"- Machine: `nproc` = {nproc}; Python {sys.version.split()[0]}; {ffmpeg_version} "
        f"(imageio-ffmpeg's binary, given to yt-dlp as `--ffmpeg-location` directly); "
        f"yt-dlp {ytdlp_version}.",
        f"- Run: {plan.mode}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        f"- Sources: `make_source` ({plan.width}x{plan.height}, {FPS} fps, keyframe every "
        f"{GOP} frames, x264 ultrafast crf {CRF}, mono AAC, moov first), one "
        f"{plan.base_seconds} s encode made in {made(base_seconds)}, copied end to end with "
        "the concat demuxer and `-c copy` into: "
        f"{described(short)}; {described(long)}. Cached in `{CACHE}`.",
        "- Served by `tests.support.strictorigin.StrictOrigin` (the standard library's "
        "`http.server`, which takes a request target literally, with Range added) on "
        "127.0.0.1; bytes fetched are the body bytes the origin handed to its socket, with "
        "ordinary socket buffers, including what sits unread in them when a client stops "
        f"reading (`tcp_rmem` max = {int(tcp_rmem[2]) // 2**20} MiB). Every request of ours "
        "goes through the egress proxy. Throttled: "
        f"`ThrottlePolicy()`, ranges open-ended or over {_mib(THROTTLE.max_fast_bytes)} "
        f"sent at {THROTTLE.slow_rate // 1024} KiB/s.",
        "- Ours: `make_clip` called in this process (a HEAD recognises the direct media link; "
        "the MP4 index is read with small range requests and only the span's byte ranges are "
        "fetched; one ffmpeg run copies the span from that local copy; then the smart cut "
        "re-encodes only the frames before the first and after the last IDR frame and copies "
        "the rest). Every clip is checked to hold every frame of its span.",
        "- yt-dlp: `" + shlex.join(_display_ytdlp()) + "`; its ffmpeg re-encodes with "
        "x264's default preset (medium).",
        "- Download and cut: httpx GET of the whole file to disk, then `"
        + shlex.join(_display_cut(CLIP))
        + "`.",
        "- Every comparison is a ratio measured within this run: the sides run interleaved, "
        f"the order rotating each repetition, repetitions: {plan.reps}; a time ratio is the "
        "median of the per-repetition ratios, seconds and bytes are medians.",
        "",
    ]


def _display_ytdlp() -> list[str]:
    return [
        "yt-dlp", "--download-sections", f"*{_clock(CLIP[0])}-{_clock(CLIP[1])}",
        "--force-keyframes-at-cuts", "-f", "<format_id>", "--ffmpeg-location", "<ffmpeg>",
        "-o", "out.mp4", "URL",
    ]  # fmt: skip


def _display_cut(span: tuple[float, float]) -> list[str]:
    args = _cut_args(Path("whole.mp4"), span, Path("out.mp4"))
    return ["ffmpeg", *args[args.index("-ss") :]]


def _requests_table(run: Run) -> list[str]:
    rows = [
        [
            record.range_header or "(none)",
            "open" if record.requested_length is None else _kib(record.requested_length),
            _kib(record.bytes_sent),
            "yes" if record.throttled else "no",
            "yes" if record.completed else "no",
        ]
        for record in run.requests
    ]
    return _table(["Range", "Asked", "Written", "Throttled", "Completed"], rows)


def _time_row(
    label: str, ours: Sequence[Run], base: Sequence[Run], goal: float | None
) -> list[str]:
    ratio = _ratio(ours, base)
    verdict = "-" if goal is None else f"<= {goal:g}x: {_verdict(ratio <= goal)}"
    return [label, f"{_seconds(ours):.1f}", f"{_seconds(base):.1f}", f"{ratio:.2f}", verdict]


def run(plan: Plan) -> str:
    started = time.perf_counter()
    CACHE.mkdir(parents=True, exist_ok=True)
    base_seconds, short, long = _sources(plan)
    small, dash, dash_index = _small_source(short.path.parent)
    clip_label = f"{_clock(CLIP[0])}-{_clock(CLIP[1])}"
    with (
        StrictOrigin(short.path.parent) as server,
        tempfile.TemporaryDirectory(dir=CACHE, prefix="work-") as work,
    ):
        bench = Bench(server, Path(work), plan)
        runs = _interleaved(
            {
                "ours, 10 min": lambda: bench.ours(short, CLIP),
                "yt-dlp, 10 min": lambda: _finished(bench.ytdlp(short)),
                "download and cut, 10 min": lambda: bench.download_and_cut(short),
                "ours, 60 min": lambda: bench.ours(long, CLIP),
                "ours, 60 min, throttled": lambda: bench.ours(long, CLIP, throttled=True),
            },
            plan.reps,
        )
        small_runs = _interleaved(
            {
                "progressive": lambda: bench.ours(small, SMALL_CLIP),
                "DASH (video-only fMP4 + audio-only m4a, sidx)": lambda: bench.ours(
                    small, SMALL_CLIP, served=dash
                ),
            },
            plan.reps,
        )
        long_runs = _interleaved(
            {
                "ours, 60 s clip": lambda: bench.ours(short, LONG_CLIP),
                "local re-encode, 60 s": lambda: bench.local_cut(short, LONG_CLIP),
            },
            plan.reps,
        )
        capped: list[Run] = []
        finished = True
        for rep in range(plan.reps):
            _log(
                f"rep {rep + 1}/{plan.reps}: yt-dlp, 60 min, throttled, {plan.cap_seconds:g} s cap"
            )
            ytdlp_run, finished = bench.ytdlp(long, throttled=True)
            capped.append(ytdlp_run)
            if not finished:
                break

    ours10 = runs["ours, 10 min"]
    share = short.share(*CLIP)
    span = short.clip_span_bytes + short.index_bytes
    fetched = _fetched(ours10)
    verdicts = {
        "share": fetched / share <= SHARE_GOAL,
        "span": fetched / span <= SPAN_GOAL,
        "throttled": _ratio(runs["ours, 60 min, throttled"], runs["ours, 60 min"])
        <= THROTTLED_GOAL,
        "long source": _ratio(runs["ours, 60 min"], ours10) <= LONG_SOURCE_GOAL,
        "re-encode": _ratio(long_runs["ours, 60 s clip"], long_runs["local re-encode, 60 s"])
        <= REENCODE_GOAL,
    }

    lines = _header(plan, base_seconds, short, long)
    lines += [
        f"## A. 30 s clip ({clip_label}) of the 10-minute source, unthrottled",
        "",
        f"Clip's share of the file (30/600 of {_mib(short.size)}): {_mib(share)}. Bytes "
        f"from the keyframe at or before {_clock(CLIP[0])} to the last sample before "
        f"{_clock(CLIP[1])}, all tracks: {_mib(short.clip_span_bytes)}; plus the moov "
        f"({_mib(short.index_bytes)}): {_mib(span)}.",
        "",
    ]
    rows = []
    for name in ("ours, 10 min", "yt-dlp, 10 min", "download and cut, 10 min"):
        got = _fetched(runs[name])
        rows.append([name.removesuffix(", 10 min"), _mib(got), f"{got / share:.2f}",
                     f"{got / span:.2f}"])  # fmt: skip
    lines += _table(["Side", "Bytes fetched", "x share", "x (span + moov)"], rows)
    lines += [
        "",
        f"Goals for ours: <= {SHARE_GOAL:g}x share: {_verdict(verdicts['share'])}; "
        f"<= {SPAN_GOAL:g}x (span + moov): {_verdict(verdicts['span'])}.",
        "",
    ]
    time_header = ["Ours against", "Ours (s)", "Baseline (s)", "Time ratio", "Goal"]
    lines += _table(
        time_header,
        [
            _time_row("bare yt-dlp command line", ours10, runs["yt-dlp, 10 min"], None),
            _time_row("whole download + local cut", ours10, runs["download and cut, 10 min"], None),
        ],
    )
    long_share = long.share(*CLIP)
    long_span = long.clip_span_bytes + long.index_bytes
    lines += [
        "",
        "## B. Throttling, source length and re-encoding",
        "",
    ]
    lines += _table(
        ["Comparison", "Ours (s)", "Baseline (s)", "Time ratio", "Goal"],
        [
            _time_row(
                f"{clip_label} of 60 min: throttled / unthrottled",
                runs["ours, 60 min, throttled"],
                runs["ours, 60 min"],
                THROTTLED_GOAL,
            ),
            _time_row(
                f"{clip_label}: 60-min source / 10-min source",
                runs["ours, 60 min"],
                ours10,
                LONG_SOURCE_GOAL,
            ),
            _time_row(
                f"frame-exact 60 s clip ({_clock(LONG_CLIP[0])}-{_clock(LONG_CLIP[1])}) of "
                "10 min / local veryfast re-encode of the span",
                long_runs["ours, 60 s clip"],
                long_runs["local re-encode, 60 s"],
                REENCODE_GOAL,
            ),
        ],
    )
    lines += ["", f"Bytes fetched from the 60-minute source (share {_mib(long_share)}, "
              f"span + moov {_mib(long_span)}):", ""]  # fmt: skip
    rows = []
    for name in ("ours, 60 min", "ours, 60 min, throttled"):
        got = _fetched(runs[name])
        rows.append([name, _mib(got), f"{got / long_share:.2f}", f"{got / long_span:.2f}"])
    lines += _table(["Side", "Bytes fetched", "x share", "x (span + moov)"], rows)
    throttled_ours = _seconds(runs["ours, 60 min, throttled"])
    if finished:
        ytdlp_text = (
            f"finished in {_seconds(capped):.1f} s (median of {len(capped)}), fetching "
            f"{_mib(_fetched(capped))}: ours takes {throttled_ours / _seconds(capped):.2f}x "
            "its time"
        )
    else:
        ytdlp_text = (
            f"> {plan.cap_seconds:g} s (killed at the cap after fetching "
            f"{_mib(capped[-1].fetched)}); ours took {throttled_ours:.1f} s, "
            f"< {throttled_ours / plan.cap_seconds:.2f}x its time"
        )
    lines += [
        "",
        f"Bare yt-dlp command line, {clip_label} of the 60-minute source on the throttled "
        f"server: {ytdlp_text}.",
        "",
        "## Where ours' bytes go",
        "",
        "Requests of the last run of ours on each source (the first is the HEAD that "
        "recognises a direct media link, then the index in requests sized to it, then the "
        "span's byte ranges): what was asked and what the origin wrote.",
        "",
    ]
    for name in ("ours, 10 min", "ours, 60 min", "ours, 60 min, throttled"):
        lines += [f"{name}:", "", *_requests_table(runs[name][-1]), ""]
    small_label = f"{_clock(SMALL_CLIP[0])}-{_clock(SMALL_CLIP[1])}"
    small_span = small.clip_span_bytes
    lines += [
        f"## C. {small_label} of a 3-minute 640x360 source ({_mib(small.size)}, "
        f"{small.size * 8 / 180 / 1e6:.2f} Mbit/s)",
        "",
        f"Source bytes from the keyframe at or before {_clock(SMALL_CLIP[0])} to "
        f"{_clock(SMALL_CLIP[1])}: {_mib(small_span)}; index: moov {_kib(small.index_bytes)} "
        f"(progressive), ftyp + moov + sidx of both files {_kib(dash_index)} (DASH).",
        "",
    ]
    rows = []
    for name, index in (("progressive", small.index_bytes),
                        ("DASH (video-only fMP4 + audio-only m4a, sidx)", dash_index)):  # fmt: skip
        got = _fetched(small_runs[name])
        share_c = small_span + index
        rows.append([name, _mib(got), _mib(share_c), f"{got / share_c:.2f}",
                     _verdict(got <= SPAN_GOAL * share_c + SLACK)])  # fmt: skip
    lines += _table(
        ["Source", "Bytes from the origin", "Span + index", "Ratio",
         f"<= {SPAN_GOAL:g}x + 256 KiB"], rows)  # fmt: skip
    lines += ["", "Requests of the last DASH run:", ""]
    lines += _requests_table(small_runs["DASH (video-only fMP4 + audio-only m4a, sidx)"][-1])
    lines += [""]
    lines += ["## Goals", ""]
    lines += _table(
        ["Goal", "Result"],
        [
            [f"A: bytes <= {SHARE_GOAL:g}x the clip's share", _verdict(verdicts["share"])],
            [f"A: bytes <= {SPAN_GOAL:g}x span + moov", _verdict(verdicts["span"])],
            [f"B: throttled <= {THROTTLED_GOAL:g}x unthrottled", _verdict(verdicts["throttled"])],
            [
                f"B: 60-min source <= {LONG_SOURCE_GOAL:g}x 10-min source",
                _verdict(verdicts["long source"]),
            ],
            [
                f"B: 60 s frame-exact clip <= {REENCODE_GOAL:g}x local veryfast re-encode",
                _verdict(verdicts["re-encode"]),
            ],
        ],
    )
    lines += ["", f"Whole run: {time.perf_counter() - started:.0f} s.", ""]
    return "\n".join(lines)


def _finished(outcome: tuple[Run, bool]) -> Run:
    run, finished = outcome
    if not finished:
        raise RuntimeError("yt-dlp outlived its cap on the unthrottled server")
    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.clip", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="A fast smoke run.")
    parser.add_argument("--out", type=Path, help="Also write the Markdown report here.")
    args = parser.parse_args(argv)
    report = run(QUICK if args.quick else FULL)
    sys.stdout.write(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
