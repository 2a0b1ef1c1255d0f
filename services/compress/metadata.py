"""What metadata travels from an input image to its compressed copy.

Kept by default: the ICC profile, EXIF (orientation included), XMP and comments, except where
the picture was taken. ``strip_metadata`` keeps only the ICC profile and the orientation, which
change how the picture looks; ``keep_location`` keeps the GPS coordinates.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from PIL import Image

ORIENTATION_TAG = 0x0112
GPS_IFD_TAG = 0x8825
# Pillow reads a TIFF's whole first directory as its EXIF, layout included (strips, tiles, bit
# depth, compression, colour model, palette). The encoder decides those for the new file; copied
# from the input they describe a file that no longer exists (and a copied RowsPerStrip made a
# three-page fax take 20 s to save).
TIFF_LAYOUT_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 264, 265, 266, 273, 277, 278, 279, 280, 281, 284,
     290, 291, 292, 293, 297, 317, 320, 322, 323, 324, 325, 330, 332, 338, 339, 340, 341, 347,
     529, 530, 531, 532}
)  # fmt: skip
# XMP repeats EXIF's GPS fields as properties of the exif namespace (exif:GPSLatitude, ...),
# written either as attributes of rdf:Description or as elements; other vendors (drones, phone
# makers) use their own prefix with the same names.
XMP_GPS_ATTRIBUTE = re.compile(rb"""\s[\w.-]+:GPS\w*\s*=\s*(?:"[^"]*"|'[^']*')""", re.IGNORECASE)
XMP_GPS_ELEMENT = re.compile(
    rb"<([\w.-]+:GPS\w*)(?:\s[^>]*)?(?:/>|>.*?</\1\s*>)", re.IGNORECASE | re.DOTALL
)
XMP_PACKET = re.compile(rb"<x:xmpmeta\b.*?</x:xmpmeta\s*>", re.DOTALL)
EXIF_PREFIX = b"Exif\x00\x00"
# Bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ... DOUBLE).
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}


@dataclass(frozen=True)
class Metadata:
    """What is carried from the input to the output, already reduced as asked."""

    icc: bytes | None
    exif: bytes | None
    xmp: bytes | None
    comment: bytes | None
    stripped: bool
    # The input says where it was taken and that is not to be kept.
    location_removed: bool = False


def read_metadata(image: Image.Image, *, strip: bool, keep_location: bool) -> Metadata:
    icc = image.info.get("icc_profile") or None
    exif = image.getexif()
    if image.format == "TIFF":
        for tag in TIFF_LAYOUT_TAGS:
            exif.pop(tag, None)
    xmp = _as_bytes(image.info.get("xmp"))
    comment = _as_bytes(image.info.get("comment"))
    if strip:
        orientation = exif.get(ORIENTATION_TAG)
        exif = Image.Exif()
        if orientation not in (None, 1):
            exif[ORIENTATION_TAG] = orientation
        exif_bytes = exif.tobytes() if len(exif) else None
        return Metadata(icc=icc, exif=exif_bytes, xmp=None, comment=None, stripped=True)
    removed = False
    if not keep_location:
        removed = exif.pop(GPS_IFD_TAG, None) is not None
        if xmp is not None:
            without = _xmp_without_location(xmp)
            removed = removed or without != xmp
            xmp = without
    exif_bytes = exif.tobytes() if len(exif) else None
    return Metadata(
        icc=icc, exif=exif_bytes, xmp=xmp, comment=comment, stripped=False, location_removed=removed
    )


def _as_bytes(value: object) -> bytes | None:
    if isinstance(value, str):
        return value.encode() or None
    if isinstance(value, bytes):
        return value or None
    return None


def _xmp_without_location(xmp: bytes, *, keep_length: bool = False) -> bytes:
    def blank(match: re.Match[bytes]) -> bytes:
        return b" " * len(match.group()) if keep_length else b""

    return XMP_GPS_ELEMENT.sub(blank, XMP_GPS_ATTRIBUTE.sub(blank, xmp))


def blank_location(data: bytes, image: Image.Image) -> bytes:
    """``data`` with its GPS data blanked in place, for when the input itself is returned.

    Every edit keeps the length, so no offset in any container (JPEG segments, RIFF, ISO boxes,
    TIFF) moves: the GPS directory's entry leaves the first EXIF directory (the entries after it
    move up, zeros fill the end), the GPS directory and its values become zeros, and the GPS
    properties of XMP packets become spaces.
    """
    out = bytearray(data)
    if image.format == "TIFF":
        _drop_gps_directory(out, 0)
    else:
        raw = image.info.get("exif")
        if isinstance(raw, bytes) and raw:
            tiff = raw.removeprefix(EXIF_PREFIX)
            at = data.find(tiff)
            if at >= 0:
                _drop_gps_directory(out, at)
    for packet in XMP_PACKET.finditer(data):
        start, end = packet.span()
        out[start:end] = _xmp_without_location(packet.group(), keep_length=True)
    return bytes(out)


def _drop_gps_directory(tiff: bytearray, base: int) -> None:
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[base : base + 2]))
    if order is None:
        return
    try:
        (first,) = struct.unpack_from(order + "I", tiff, base + 4)
        directory = base + first
        (count,) = struct.unpack_from(order + "H", tiff, directory)
        end = directory + 2 + 12 * count + 4
        for index in range(count):
            entry = directory + 2 + 12 * index
            tag, _, _, gps = struct.unpack_from(order + "HHII", tiff, entry)
            if tag == GPS_IFD_TAG:
                _blank_directory(tiff, base, base + gps, order)
                tiff[entry : end - 12] = tiff[entry + 12 : end]
                tiff[end - 12 : end] = bytes(12)
                struct.pack_into(order + "H", tiff, directory, count - 1)
                return
    except struct.error:
        return


def _blank_directory(tiff: bytearray, base: int, directory: int, order: str) -> None:
    (count,) = struct.unpack_from(order + "H", tiff, directory)
    for index in range(count):
        entry = directory + 2 + 12 * index
        _, kind, values, offset = struct.unpack_from(order + "HHII", tiff, entry)
        size = TIFF_TYPE_SIZES.get(kind, 1) * values
        if size > 4 and base + offset + size <= len(tiff):
            tiff[base + offset : base + offset + size] = bytes(size)
        tiff[entry : entry + 12] = bytes(12)
    struct.pack_into(order + "H", tiff, directory, 0)
