"""JPEG without generation loss: estimate the input's quality, then optimise or re-encode.

Every JPEG the route sees was already compressed once. Re-quantising it with other tables loses
detail a second time, so:
- asked for a quality at or above the input's own, no coefficient changes: mozjpeg's lossless
  transcoder (``mozjpeg-lossless-optimization``) rewrites the entropy coding with optimal
  Huffman tables and progressive scans, and the decoded pixels are the input's bit for bit;
- asked for less, the image is re-encoded (settings below), and the smaller of that and the
  lossless optimisation is returned (the latter is not run when the re-encode is already
  smaller than it can be); a re-encode that saves less than ``MIN_SAVING`` of the input is not
  worth a second generation of loss, and the lossless result is kept instead.
"""

from __future__ import annotations

import os
import struct

import mozjpeg_lossless_optimization as mozjpeg_lossless  # type: ignore[import-untyped]
import pyvips
from PIL import Image

from services.compress.metadata import Metadata

# A re-encode, which changes pixels, must save at least this share of the input's bytes.
MIN_SAVING = 0.03
# The least the lossless pass has left of an input: 0.827 on 18 camera JPEGs
# (jpeg-measurements), 0.918-0.954 in docs/benchmarks-compress.md. A re-encode under this share
# of the input is smaller than the pass could be, and the pass, whose progressive scan search
# takes several times a re-encode, is skipped.
LOSSLESS_LEAVES_AT_LEAST = 0.8
# ITU-T T.81 Annex K, table K.1: the luminance table that libjpeg (IJG) scales for quality q,
# in natural (row by row) order, as Pillow reports tables.
STANDARD_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
# A re-encode asked for fewer than SAME_FAMILY_WITHIN quality points below the input's keeps
# the input's table family (libjpeg's Annex K tables, which Pillow, cameras and phones use or
# approximate) at the requested number; further below, it uses table 5 at the mapped number.
# Calibrated offline by bench/jpeg_calibration.py (docs/jpeg-calibration.md) on photos that
# the tests and the benchmark do not use (skimage's motorcycle_right and rocket, saved by
# Pillow at 60-95, 4:2:0, 4:2:2 and 4:4:4, asked for 40-90; 84 cases): 5 and 10 points below
# the input's quality, table 5 scored up to 6.3 SSIMULACRA2 points below Pillow's re-save at
# the same number in 16 of 24 cases (the input's rounding steps are re-rounded to other ones);
# 15 and more below, at worst 0.8 below and on average 1.7 above, at 0.81-1.02x the bytes.
# Annex K at the requested number scores exactly as Pillow's re-save, at 0.99-1.0x its
# optimize+progressive bytes.
SAME_FAMILY_WITHIN = 15


def encode(image: Image.Image, data: bytes, quality: int, meta: Metadata) -> tuple[bytes, bool]:
    """The JPEG to return, and whether its pixels are the input's (lossless)."""
    candidates: list[tuple[bytes, bool]] = []
    source_quality = estimated_quality(image)
    if source_quality is None or quality < source_quality:
        reencoded = reencode(image, quality, meta, source_quality=source_quality)
        if len(reencoded) < len(data) * LOSSLESS_LEAVES_AT_LEAST:
            return reencoded, False
        if len(reencoded) <= len(data) * (1 - MIN_SAVING):
            candidates.append((reencoded, False))
    lossless = optimise_losslessly(data, meta, adobe=image.mode == "CMYK")
    if lossless is not None:
        candidates.append((lossless, True))
    return min(candidates, key=lambda candidate: len(candidate[0]), default=(data, True))


def estimated_quality(image: Image.Image) -> int | None:
    """The IJG quality (1-100) the input's luminance table corresponds to, None without one.

    libjpeg makes the table for quality q by scaling Annex K's by s = 5000 / q percent below 50
    and s = 200 - 2q from 50, rounding and clamping each entry to 1..255. A table made that way
    is recognised exactly (all hundred are built once). Any other table (a camera's own, mozjpeg's
    table 5) is read as jpegoptim and ImageMagick do: s is the mean of entry / Annex K entry in
    percent, and q is s inverted (q = 100 - s / 2 up to s = 100, else 5000 / s).
    """
    tables: dict[int, list[int]] | None = getattr(image, "quantization", None)
    if not tables or 0 not in tables or len(tables[0]) != len(STANDARD_LUMINANCE):
        return None
    table = tuple(tables[0])
    if table in IJG_TABLES:
        return IJG_TABLES[table]
    scale = sum(q * 100 / k for q, k in zip(table, STANDARD_LUMINANCE, strict=True)) / 64
    estimate = 100 - scale / 2 if scale <= 100 else 5000 / scale
    return min(100, max(1, round(estimate)))


def _ijg_table(quality: int) -> tuple[int, ...]:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(min(255, max(1, (entry * scale + 50) // 100)) for entry in STANDARD_LUMINANCE)


# Where two qualities make the same table, the higher one is named.
IJG_TABLES = {_ijg_table(quality): quality for quality in range(1, 101)}


def optimise_losslessly(data: bytes, meta: Metadata, *, adobe: bool) -> bytes | None:
    """The input's own coefficients with optimal Huffman tables and progressive scans, or None
    when mozjpeg cannot transcode it (arithmetic coding, coefficients out of range)."""
    optimised = _in_child(data)
    return with_markers(optimised, meta, adobe=adobe) if optimised else None


def _in_child(data: bytes) -> bytes | None:
    """``mozjpeg_lossless.optimize`` in a forked child, whose output comes back through a pipe.

    On some damaged files (coefficients out of range: Pillow's hopper_bad_exif.jpg) libjpeg's
    error handler calls exit() inside the library, which would end the worker process itself.
    A fork costs about a millisecond, against tens for the transcode.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(reader)
            output = mozjpeg_lossless.optimize(data, mozjpeg_lossless.COPY_MARKERS.NONE)
            with os.fdopen(writer, "wb") as pipe:
                pipe.write(output)
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    return output if os.waitstatus_to_exitcode(status) == 0 and output else None


# The re-encode: mozjpeg (the libjpeg in pyvips-binary's libvips) with progressive scans and
# optimised Huffman tables, 4:2:0 at every quality as Pillow does. Far below the input's quality
# it uses quantisation table 5 (Klein, Silverstein and Carney) at a lowered number: against
# Pillow's optimize+progressive at an equal SSIMULACRA2 score on four photos at quality 60-95
# this measured 0.94x the bytes at about 1.2-1.3x the time; jpegli alone was 0.98x (0.8x time),
# jpegli with mozjpeg's lossless scan optimisation 0.91x (2.6x time) and mozjpeg with trellis
# quantisation and every other option 0.95x (5-6x time): trellis and table 3 cut bytes at the
# same number but cut the score about as much. Near the input's quality it keeps the input's
# table family (see SAME_FAMILY_WITHIN). Greyscale stays greyscale and CMYK stays Adobe CMYK,
# inverted as Pillow writes and reads it.
def reencode(
    image: Image.Image, quality: int, meta: Metadata, *, source_quality: int | None
) -> bytes:
    cmyk = image.mode == "CMYK"
    if image.mode not in ("L", "RGB", "CMYK"):
        image = image.convert("RGB")
    bands = len(image.getbands())
    pixels = pyvips.Image.new_from_memory(
        image.tobytes(), image.width, image.height, bands, "uchar"
    )
    if cmyk:
        pixels = pixels.copy(interpretation="cmyk")
    same_family = source_quality is not None and source_quality - quality < SAME_FAMILY_WITHIN
    encoded: bytes = pixels.jpegsave_buffer(
        Q=quality if same_family else _mozjpeg_quality(quality),
        keep="none",
        optimize_coding=True,
        interlace=True,
        quant_table=0 if same_family else 5,
        subsample_mode="on",
    )
    return with_markers(encoded, meta, adobe=cmyk)


def _mozjpeg_quality(quality: int) -> int:
    """Pillow's number, lowered where table 5 still scores as well: by 3 up to 77, 2 at 78-82,
    1 at 83-87 and not from 88.

    Measured on four photos at 30 to 98: SSIMULACRA2 mean +0.14 against Pillow's at the same
    number (lowest -1.2, at 98, where the number is used as it is), at 0.92x its bytes.
    """
    return max(1, quality - min(3, max(0, round((90 - quality) / 5))))


def with_markers(jpeg: bytes, meta: Metadata, *, adobe: bool) -> bytes:
    """Insert metadata segments right after SOI and the encoder's own APP0/APP14."""
    segments: list[bytes] = []
    if meta.exif:
        segments.append(_segment(0xE1, b"Exif\x00\x00" + meta.exif))
    if meta.xmp:
        segments.append(_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + meta.xmp))
    if meta.icc:
        chunk = 65519
        parts = [meta.icc[i : i + chunk] for i in range(0, len(meta.icc), chunk)]
        for index, part in enumerate(parts, start=1):
            segments.append(_segment(0xE2, b"ICC_PROFILE\x00" + bytes([index, len(parts)]) + part))
    if meta.comment:
        segments.append(_segment(0xFE, meta.comment[:65533]))
    position = 2
    kept = {0xE0, 0xEE} if adobe else {0xE0}
    while jpeg[position] == 0xFF and jpeg[position + 1] in kept:
        length = struct.unpack(">H", jpeg[position + 2 : position + 4])[0]
        position += 2 + length
    return jpeg[:position] + b"".join(segments) + jpeg[position:]


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload
