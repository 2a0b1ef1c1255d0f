"""Declaring every H.264 parameter set of a smart-cut MP4 in its ``avcC`` box.

A smart cut joins frames x264 encoded (their own SPS and PPS, with ids of their own) to frames
copied from the source (the source's SPS and PPS). ffmpeg writes the ``avcC`` of the first
part only and leaves the others in band. An ``avc1`` track must carry every parameter set its
samples use in ``avcC`` (ISO/IEC 14496-15, 5.3.3): Chrome and Firefox decode with in-band sets
too, but Apple's decoders configure themselves from ``avcC`` alone. ``avc3`` (sets in band only)
would also be correct, but Safari and QuickTime do not accept it, so the track stays ``avc1``
and its ``avcC`` gets all of them. The in-band copies stay: they are the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

# Boxes on the way from the top of the file to ``avcC``, and those that only hold other boxes.
CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl"})
SPS, PPS = 7, 8
# An ``avc1`` sample entry: 8-byte box header, then 78 bytes before its child boxes.
VISUAL_SAMPLE_ENTRY = 78
STSD_HEADER = 8


def nal_units(annexb: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream, without their start codes."""
    units = []
    for chunk in annexb.split(b"\x00\x00\x01"):
        unit = chunk.rstrip(b"\x00")
        if unit:
            units.append(unit)
    return units


def parameter_sets(units: Iterable[bytes]) -> tuple[list[bytes], list[bytes]]:
    """The distinct SPS and PPS among ``units``, in the order first seen."""
    sps: list[bytes] = []
    pps: list[bytes] = []
    for unit in units:
        kind = unit[0] & 0x1F
        target = sps if kind == SPS else pps if kind == PPS else None
        if target is not None and unit not in target:
            target.append(unit)
    return sps, pps


def declared_parameter_sets(path: Path) -> list[bytes]:
    """The SPS and PPS listed in the first ``avcC`` of an MP4 file."""
    data = path.read_bytes()
    found = _find_avcc(data)
    if found is None:
        return []
    _, start, end = found
    return _listed(data[start + 8 : end])[0]


def declare_parameter_sets(path: Path, units: list[bytes]) -> None:
    """Rewrite the first ``avc1`` track's ``avcC`` of ``path`` to list every SPS and PPS among
    its own and ``units``.

    The ``moov`` box grows or shrinks in place; when it comes before ``mdat`` (faststart), every
    chunk offset moves by the same amount.
    """
    data = path.read_bytes()
    found = _find_avcc(data)
    if found is None:
        return
    chain, start, end = found
    old = data[start:end]
    sps, pps = parameter_sets([*_listed(old[8:])[0], *units])
    new = _avcc(old, sps, pps)
    delta = len(new) - len(old)
    if delta == 0 and new == old:
        return
    out = bytearray(data[:start] + new + data[end:])
    for box_start in chain:
        (size,) = struct.unpack_from(">I", out, box_start)
        struct.pack_into(">I", out, box_start, size + delta)
    moov = chain[0]
    mdat = _top_level(out, b"mdat")
    if mdat is not None and mdat > moov:
        _shift_chunk_offsets(out, moov, delta)
    path.write_bytes(bytes(out))


def _listed(payload: bytes) -> tuple[list[bytes], int]:
    """The parameter sets an ``avcC`` payload lists, and where the list ends."""
    units = []
    position = 5
    for count_mask in (0x1F, 0xFF):
        count = payload[position] & count_mask
        position += 1
        for _ in range(count):
            (length,) = struct.unpack_from(">H", payload, position)
            units.append(payload[position + 2 : position + 2 + length])
            position += 2 + length
    return units, position


def _avcc(old: bytes, sps: list[bytes], pps: list[bytes]) -> bytes:
    """A new ``avcC`` box: the old header fields and trailing extension, these sets between."""
    payload = old[8:]
    _, position = _listed(payload)
    body = bytearray(payload[:5])
    body.append(0xE0 | len(sps))
    for unit in sps:
        body += struct.pack(">H", len(unit)) + unit
    body.append(len(pps))
    for unit in pps:
        body += struct.pack(">H", len(unit)) + unit
    body += payload[position:]
    return struct.pack(">I", 8 + len(body)) + b"avcC" + bytes(body)


def _boxes(data: bytes | bytearray, start: int, end: int) -> Iterable[tuple[bytes, int, int]]:
    """(type, start, end) of each box between ``start`` and ``end``."""
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, position)
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, position + 8)
        elif size == 0:
            size = end - position
        if size < 8 or position + size > end:
            return
        yield kind, position, position + size
        position += size


def _top_level(data: bytes | bytearray, kind: bytes) -> int | None:
    return next((start for k, start, _ in _boxes(data, 0, len(data)) if k == kind), None)


def _find_avcc(data: bytes) -> tuple[list[int], int, int] | None:
    """The start of each box enclosing the first ``avcC`` (outermost first), and its bounds."""

    def search(start: int, end: int, chain: list[int]) -> tuple[list[int], int, int] | None:
        for kind, box_start, box_end in _boxes(data, start, end):
            if kind in CONTAINERS:
                found = search(box_start + 8, box_end, [*chain, box_start])
            elif kind == b"stsd":
                found = search(box_start + 8 + STSD_HEADER, box_end, [*chain, box_start])
            elif kind == b"avc1":
                inner = box_start + 8 + VISUAL_SAMPLE_ENTRY
                found = search(inner, box_end, [*chain, box_start])
            elif kind == b"avcC":
                found = (chain, box_start, box_end)
            else:
                found = None
            if found is not None:
                return found
        return None

    return search(0, len(data), [])


def _shift_chunk_offsets(data: bytearray, moov: int, delta: int) -> None:
    """Move every ``stco`` and ``co64`` entry of every track by ``delta`` bytes."""

    def walk(start: int, end: int) -> None:
        for kind, box_start, box_end in _boxes(data, start, end):
            if kind in CONTAINERS:
                walk(box_start + 8, box_end)
            elif kind in (b"stco", b"co64"):
                (count,) = struct.unpack_from(">I", data, box_start + 12)
                wide = kind == b"co64"
                fmt, step = (">Q", 8) if wide else (">I", 4)
                for index in range(count):
                    at = box_start + 16 + index * step
                    (offset,) = struct.unpack_from(fmt, data, at)
                    struct.pack_into(fmt, data, at, offset + delta)

    (size,) = struct.unpack_from(">I", data, moov)
    walk(moov + 8, moov + size)
