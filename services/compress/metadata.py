"""What metadata travels from an input image to its compressed copy.

Kept by default: the ICC profile, EXIF (orientation included), XMP and comments, except where
the picture was taken. ``strip_metadata`` keeps only the ICC profile and the orientation, which
change how the picture looks; ``keep_location`` keeps the GPS coordinates.
"""

from __future__ import annotations

import re
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


@dataclass(frozen=True)
class Metadata:
    """What is carried from the input to the output, already reduced as asked."""

    icc: bytes | None
    exif: bytes | None
    xmp: bytes | None
    comment: bytes | None
    stripped: bool


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
    if not keep_location:
        exif.pop(GPS_IFD_TAG, None)
        if xmp is not None:
            xmp = _xmp_without_location(xmp)
    exif_bytes = exif.tobytes() if len(exif) else None
    return Metadata(icc=icc, exif=exif_bytes, xmp=xmp, comment=comment, stripped=False)


def _as_bytes(value: object) -> bytes | None:
    if isinstance(value, str):
        return value.encode() or None
    if isinstance(value, bytes):
        return value or None
    return None


def _xmp_without_location(xmp: bytes) -> bytes:
    return XMP_GPS_ELEMENT.sub(b"", XMP_GPS_ATTRIBUTE.sub(b"", xmp))
