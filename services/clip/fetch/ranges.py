"""Fetching only the clip's bytes of an MP4: read its index, plan byte ranges, fetch exactly those.

For a progressive MP4 (a ``moov`` with sample tables, index at the front or at the end), the
index says where every sample lives. The plan covers the samples
ffmpeg reads to copy the span: the first few of each track (ffmpeg decodes them to learn the
streams when it opens the file) and those from the keyframe before ``start`` to a little past
``end``. Each range is fetched with requests of at most ``max_range_bytes`` through the proxy
into a sparse local file at the same offsets, which ffmpeg then reads as if it were the source.
A fragmented MP4 with a ``sidx`` (YouTube's DASH formats) is planned by subsegments: the
initialisation segment and the fragments that cover the span make a shorter fragmented MP4.
Anything else (HLS, other containers, an origin without ranges) is left to ffmpeg's own
reading.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.clip.errors import DiskLimitExceeded, SourceUnreachable

# The first request: ftyp and the start of a front index; the rest is asked for by size.
FIRST_BYTES = 64 * 1024
HEADER_BYTES = 16
# An index larger than this is not read here (an hour of 60 fps video needs about 3 MB).
MAX_INDEX_BYTES = 64 * 1024 * 1024
# ffmpeg reads a little past the last sample it keeps, and on opening it reads the first
# ANALYZE_SECONDS of each stream (told so with -analyzeduration) to learn them.
TAIL_SECONDS = 0.5
ANALYZE_SECONDS = 0.5
OPENING_SECONDS = 2 * ANALYZE_SECONDS
OPENING_SAMPLES = 16
TIMEOUT = 30.0

Range = tuple[int, int]  # [first, end) byte offsets


class NotPlannable(Exception):
    """The source is not an MP4 whose index this module reads; ffmpeg reads it itself."""


@dataclass(frozen=True)
class Track:
    """One track's samples in decode order: byte offsets, sizes, times in seconds."""

    offsets: list[int]
    sizes: list[int]
    dts: list[float]
    pts: list[float]
    sync: list[int]  # indexes of keyframes


class Reader:
    """Bounded range requests for one URL, through the proxy, into a sparse local file."""

    def __init__(
        self, client: httpx.AsyncClient, url: str, headers: dict[str, str], max_range_bytes: int
    ) -> None:
        self._client = client
        self._url = url
        self._headers = headers
        self._max = max_range_bytes
        self.size = 0
        self.fetched = 0

    async def get(self, first: int, end: int) -> bytes:
        return b"".join([data async for _, data in self._ranges(first, end)])

    async def copy(self, first: int, end: int, target: Path, moved: int = 0) -> None:
        """Write bytes ``[first, end)`` into ``target`` at their own offsets less ``moved``."""
        with target.open("r+b") as out:
            async for offset, data in self._ranges(first, end):
                out.seek(offset - moved)
                out.write(data)

    async def _ranges(self, first: int, end: int) -> AsyncIterator[tuple[int, bytes]]:
        for at in range(first, end, self._max):
            last = min(end, at + self._max) - 1
            headers = {**self._headers, "range": f"bytes={at}-{last}"}
            try:
                async with self._client.stream("GET", self._url, headers=headers) as response:
                    if response.status_code >= 400:
                        # ffmpeg would be refused the same; the job fails (or extracts anew).
                        raise SourceUnreachable(
                            f"The video source answered {response.status_code} to a request "
                            "for the clip's bytes."
                        )
                    if response.status_code != 206:
                        raise NotPlannable(f"HTTP {response.status_code} to a range request")
                    total = response.headers.get("content-range", "").rpartition("/")[2]
                    if total.isdigit():
                        self.size = int(total)
                    position = at
                    async for data in response.aiter_raw():
                        self.fetched += len(data)
                        yield position, data
                        position += len(data)
            except httpx.HTTPError as exc:
                raise SourceUnreachable(
                    "The video source stopped answering while the span was fetched."
                ) from exc
            if position != last + 1 and position != self.size:
                raise SourceUnreachable("The video source sent less than it was asked for.")


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload offset, box end) of each box in ``data[start:end]``."""
    end = len(data) if end is None else end
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, at + 8)
            header = 16
        elif size == 0:
            size = end - at
        if size < header or at + size > end:
            raise NotPlannable("malformed box")
        yield kind, at + header, at + size
        at += size


def _child(data: bytes, start: int, end: int, *path: bytes) -> tuple[int, int] | None:
    """Payload span of the first box along ``path`` under ``data[start:end]``."""
    for kind, payload, box_end in _boxes(data, start, end):
        if kind == path[0]:
            return (
                (payload, box_end) if len(path) == 1 else _child(data, payload, box_end, *path[1:])
            )
    return None


def _table(
    data: bytes, span: tuple[int, int] | None, entry: str, skip: int = 0
) -> list[tuple[int, ...]]:
    """Entries of a full box with a 32-bit entry count (stts, ctts, stsc, stco, co64, stss)."""
    if span is None:
        return []
    at = span[0] + 4 + skip
    (count,) = struct.unpack_from(">I", data, at)
    return list(
        struct.iter_unpack(">" + entry, data[at + 4 : at + 4 + count * struct.calcsize(entry)])
    )


def _track(moov: bytes, start: int, end: int) -> tuple[bytes, Track] | None:
    """The handler type and samples of one ``trak``; None for a fragmented track."""
    hdlr = _child(moov, start, end, b"mdia", b"hdlr")
    mdhd = _child(moov, start, end, b"mdia", b"mdhd")
    stbl = _child(moov, start, end, b"mdia", b"minf", b"stbl")
    if hdlr is None or mdhd is None or stbl is None:
        raise NotPlannable("track without sample tables")
    handler = moov[hdlr[0] + 8 : hdlr[0] + 12]
    version = moov[mdhd[0]]
    timescale = struct.unpack_from(">I", moov, mdhd[0] + (20 if version == 1 else 12))[0]
    stsz = _child(moov, *stbl, b"stsz")
    if stsz is None or not timescale:
        raise NotPlannable("track without sample sizes")
    uniform, count = struct.unpack_from(">II", moov, stsz[0] + 4)
    if count == 0:
        return None
    sizes = (
        [uniform] * count if uniform else list(struct.unpack_from(f">{count}I", moov, stsz[0] + 12))
    )
    chunk_offsets = [o for (o,) in _table(moov, _child(moov, *stbl, b"stco"), "I")] or [
        o for (o,) in _table(moov, _child(moov, *stbl, b"co64"), "Q")
    ]
    stsc = _table(moov, _child(moov, *stbl, b"stsc"), "III")
    offsets: list[int] = []
    for index, (first_chunk, per_chunk, _) in enumerate(stsc):
        last_chunk = stsc[index + 1][0] - 1 if index + 1 < len(stsc) else len(chunk_offsets)
        for chunk in range(first_chunk - 1, last_chunk):
            at = chunk_offsets[chunk]
            for _ in range(per_chunk):
                if len(offsets) == count:
                    break
                offsets.append(at)
                at += sizes[len(offsets) - 1]
    if len(offsets) != count:
        raise NotPlannable("sample tables disagree")
    ticks = [0] * count
    sample = 0
    for run, delta in _table(moov, _child(moov, *stbl, b"stts"), "II"):
        for _ in range(run):
            if sample + 1 < count:
                ticks[sample + 1] = ticks[sample] + delta
            sample += 1
    shifts = [0] * count
    sample = 0
    for run, shift in _table(moov, _child(moov, *stbl, b"ctts"), "Ii"):
        for _ in range(run):
            if sample < count:
                shifts[sample] = shift
            sample += 1
    edit = 0
    elst = _child(moov, start, end, b"edts", b"elst")
    if elst is not None:
        wide = moov[elst[0]] == 1
        for entry in _table(moov, elst, "QqI" if wide else "IiI"):
            if entry[1] >= 0:
                edit = entry[1]
                break
    sync = [n - 1 for (n,) in _table(moov, _child(moov, *stbl, b"stss"), "I")] or list(range(count))
    return handler, Track(
        offsets=offsets,
        sizes=sizes,
        dts=[(t - edit) / timescale for t in ticks],
        pts=[(t + s - edit) / timescale for t, s in zip(ticks, shifts, strict=True)],
        sync=sync,
    )


@dataclass(frozen=True)
class LocalCopy:
    """What was fetched; for a copy that holds only the span (read whole, no seek), the
    source's own start and duration in seconds, which the copy's would misstate."""

    fetched: int
    timeline: tuple[float, float] | None = None


@dataclass(frozen=True)
class Plan:
    """What to write where: the index pieces (offset in the local file, bytes), the source's
    byte ranges of samples, and how far each range moves down in the local file."""

    index: list[tuple[int, bytes]]
    spans: list[Range]
    moved: int = 0
    # A sparse copy is as large as the source; a compact one holds only what is written.
    size: int = 0
    timeline: tuple[float, float] | None = None


async def fetch_span_bytes(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    start: float,
    end: float,
    target: Path,
    *,
    max_range_bytes: int,
    max_bytes: int,
) -> LocalCopy:
    """Copy the bytes ffmpeg needs for ``[start, end)`` of the MP4 at ``url`` into ``target``.

    For a progressive MP4, ``target`` is a sparse file as large as the source, the samples at
    their own offsets. For a fragmented MP4 with a ``sidx``, it is the initialisation segment
    followed by the fragments that cover the span (their data offsets are relative to their
    ``moof``, their times in ``tfdt``), so it reads as a shorter fragmented MP4 to be read
    whole (ffmpeg's seek in it, with no ``sidx``, was seen to land a fragment late). Raises
    ``NotPlannable`` before writing anything when the source is neither, and
    ``DiskLimitExceeded`` before fetching the span when it is larger than ``max_bytes``.
    """
    reader = Reader(client, url, headers, max_range_bytes)
    plan = await _plan(reader, start, end)
    needed = sum(len(data) for _, data in plan.index) + sum(b - a for a, b in plan.spans)
    if needed > max_bytes:
        raise DiskLimitExceeded(
            f"The clip needs more than {max_bytes} bytes of working space; choose a shorter range."
        )
    with target.open("wb") as out:
        out.truncate(plan.size)
        for offset, data in plan.index:
            out.seek(offset)
            out.write(data)
    try:
        for first, last in plan.spans:
            await reader.copy(first, last, target, plan.moved)
    except NotPlannable as exc:
        raise SourceUnreachable("The video source stopped answering range requests.") from exc
    return LocalCopy(fetched=reader.fetched, timeline=plan.timeline)


async def _plan(reader: Reader, start: float, end: float) -> Plan:
    """Read the index with small requests, and plan what else to fetch."""
    head = await reader.get(0, FIRST_BYTES)
    if head[4:8] != b"ftyp":
        raise NotPlannable("not an MP4")

    async def read(first: int, last: int) -> bytes:
        if last <= len(head):
            return head[first:last]
        if first < len(head):
            return head[first:] + await reader.get(len(head), last)
        return await reader.get(first, last)

    index: list[tuple[int, bytes]] = []
    moov: bytes | None = None
    at = 0
    while at < reader.size:
        header = await read(at, min(at + HEADER_BYTES, reader.size))
        size, kind = struct.unpack_from(">I4s", header)
        if size == 1:
            (size,) = struct.unpack_from(">Q", header, 8)
        elif size == 0:
            size = reader.size - at
        if size < 8:
            raise NotPlannable("malformed box")
        if kind == b"sidx" and moov is not None and size <= MAX_INDEX_BYTES:
            return _fragments_plan(index, at, await read(at, at + size), start, end)
        if kind in (b"ftyp", b"moov") and size <= MAX_INDEX_BYTES:
            box = await read(at, at + size)
            index.append((at, box))
            if kind == b"moov":
                moov = box
        else:
            index.append((at, header))
        if moov is not None and kind in (b"mdat", b"moof"):
            break
        at += size
    if moov is None:
        raise NotPlannable("no moov")
    tracks = [
        found
        for kind, payload, box_end in _boxes(moov, 16 if moov[:4] == b"\0\0\0\1" else 8)
        if kind == b"trak" and (found := _track(moov, payload, box_end)) is not None
    ]
    if not tracks:
        raise NotPlannable("fragmented MP4 without a sidx")
    return Plan(index, _merge(_sample_ranges(tracks, start, end)), size=reader.size)


def _fragments_plan(
    index: list[tuple[int, bytes]], at: int, sidx: bytes, start: float, end: float
) -> Plan:
    """The initialisation segment and the subsegments a ``sidx`` (ISO/IEC 14496-12, 8.16.3)
    places from the one holding ``start`` to the one holding a little past ``end``."""
    init = b"".join(data for _, data in index)
    version = sidx[8]
    timescale = struct.unpack_from(">I", sidx, 16)[0]
    if version == 0:
        earliest, first_offset = struct.unpack_from(">II", sidx, 20)
        at_entries = 28
    else:
        earliest, first_offset = struct.unpack_from(">QQ", sidx, 20)
        at_entries = 36
    (count,) = struct.unpack_from(">H", sidx, at_entries + 2)
    if not timescale or not count:
        raise NotPlannable("empty sidx")
    offset = at + len(sidx) + first_offset
    time = earliest / timescale
    chosen: list[Range] = []
    for number in range(count):
        reference, duration, _ = struct.unpack_from(">III", sidx, at_entries + 4 + 12 * number)
        if reference >> 31:
            raise NotPlannable("a sidx of sidx boxes")
        size = reference & 0x7FFFFFFF
        following = time + duration / timescale
        if following > start and time < end + TAIL_SECONDS:
            chosen.append((offset, offset + size))
        offset += size
        time = following
    if not chosen:
        raise NotPlannable("the span is outside the sidx")
    first, last = chosen[0][0], chosen[-1][1]
    begin = earliest / timescale
    return Plan(
        [(0, init)],
        [(first, last)],
        moved=first - len(init),
        size=len(init) + last - first,
        timeline=(begin, time - begin),
    )


def _sample_ranges(tracks: list[tuple[bytes, Track]], start: float, end: float) -> list[Range]:
    video = next((t for handler, t in tracks if handler == b"vide"), tracks[0][1])
    keys = [i for i in video.sync if video.pts[i] <= start] or video.sync[:1]
    begin = min(video.dts[keys[-1]], video.pts[keys[-1]])
    ranges = []
    for _, track in tracks:
        opening = max(
            OPENING_SAMPLES, bisect.bisect_left(track.dts, track.dts[0] + OPENING_SECONDS)
        )
        first = max(0, bisect.bisect_right(track.dts, begin - TAIL_SECONDS) - 1)
        last = min(len(track.dts), bisect.bisect_left(track.dts, end + TAIL_SECONDS) + 1)
        for a, b in ((0, min(opening, len(track.dts))), (first, last)):
            if a < b:
                ranges.append(
                    (
                        min(track.offsets[a:b]),
                        max(
                            o + s for o, s in zip(track.offsets[a:b], track.sizes[a:b], strict=True)
                        ),
                    )
                )
    return ranges


def _merge(ranges: list[Range]) -> list[Range]:
    merged: list[Range] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged
