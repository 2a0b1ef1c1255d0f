"""Compressing one image: decode with limits, re-encode in the same format, never bigger.

This module is the domain of the route and knows nothing of HTTP. It runs in worker processes
(see ``pool``), so its inputs and outputs are plain picklable values.

What ``quality`` means per format is documented in the README; the reasons live beside each
encoder below.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import imagequant
import oxipng
import pillow_heif
import pyvips
from PIL import Image, ImageFile, ImageSequence, PngImagePlugin, UnidentifiedImageError

from services.common.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from services.compress import jpeg
from services.compress.formats import ACCEPTED_NAMES, FORMATS, ImageFormat
from services.compress.metadata import Metadata, blank_location, read_metadata

pillow_heif.register_heif_opener()
# The pixel limit is ours (checked from the header before decoding); Pillow's own warning would
# only repeat it, and its hard error is kept as the last line of defence.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Each worker process encodes one image at a time and there is one per core, so libvips' own
# threads would only compete with the other workers; nothing is worth caching between images.
pyvips.concurrency_set(1)
pyvips.cache_set_max(0)

# Ouro's published example uses 85; the route, the upload form and the CLI default to it.
DEFAULT_QUALITY = 85
# What Pillow's decoders and encoders raise on hostile or damaged files: libtiff, for one,
# surfaces bad tags as TypeError and RuntimeError. Each becomes a 422, never a 500.
DECODER_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, TypeError, RuntimeError,
    IndexError, KeyError, ZeroDivisionError, MemoryError, oxipng.PngError,
)  # fmt: skip
EXIF_TAG_IN_PNG = b"eXIf"
PNG_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"tIME"})
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# How each accepted format starts, to tell a damaged file of ours from another format.
MAGIC_NUMBERS = (
    PNG_SIGNATURE[:4],
    b"\xff\xd8\xff",
    b"GIF8",
    b"RIFF",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"\x00\x00\x01\x00",
)
ISO_BRANDS = frozenset(
    b"ftyp" + brand for brand in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1", b"hevc")
)


@dataclass(frozen=True)
class Limits:
    max_pixels: int
    max_frames: int


@dataclass(frozen=True)
class Compressed:
    data: bytes
    format: ImageFormat
    width: int
    height: int
    frames: int
    original_bytes: int
    compressed: bool
    # lossless: the pixels are the input's, bit for bit (also when the input came back as it
    # was); reencoded: they were encoded again at the requested quality.
    method: Literal["lossless", "reencoded"]


def compress(
    data: bytes, *, quality: int, strip_metadata: bool, keep_location: bool, limits: Limits
) -> Compressed:
    """Compress ``data`` in its own format; return the input itself when that is not smaller,
    or when a re-encode saves less than ``jpeg.MIN_SAVING`` (a second generation of loss for a
    few percent is a bad trade)."""
    image = _open(data, limits)
    fmt = FORMATS[str(image.format)]
    frames = _frame_count(image)
    width, height = image.size
    try:
        image.load()
        meta = read_metadata(image, strip=strip_metadata, keep_location=keep_location)
        encoded, lossless = _encode(image, data, fmt, quality, meta)
    except Image.DecompressionBombError as exc:
        # A frame larger than the image's header says (a GIF frame's own extent, say).
        raise PayloadTooLarge(_too_many_pixels(limits)) from exc
    except DECODER_ERRORS as exc:
        raise InvalidInput(f"The {fmt.extension.upper()} file is damaged or truncated.") from exc
    most = len(data) - 1 if lossless else len(data) * (1 - jpeg.MIN_SAVING)
    smaller = len(encoded) <= most
    result = encoded if smaller else data
    if meta.location_removed:
        # The input itself, or a PNG whose text chunks were carried over, may still say where
        # the picture was taken.
        result = blank_location(result, image)
        if fmt.pillow_name == "PNG":
            result = _png_with_fresh_crcs(result)
    return Compressed(
        data=result,
        format=fmt,
        width=width,
        height=height,
        frames=frames,
        original_bytes=len(data),
        compressed=smaller,
        method="reencoded" if smaller and not lossless else "lossless",
    )


def _open(data: bytes, limits: Limits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except UnidentifiedImageError as exc:
        if data.startswith(MAGIC_NUMBERS) or data[4:12] in ISO_BRANDS:
            raise InvalidInput("The image header is damaged or truncated.") from exc
        raise UnsupportedMediaType(
            f"The file is not an image in an accepted format ({ACCEPTED_NAMES})."
        ) from exc
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(_too_many_pixels(limits)) from exc
    except DECODER_ERRORS as exc:
        raise InvalidInput("The image header is damaged or truncated.") from exc
    try:
        frames = _frame_count(image)
    except DECODER_ERRORS as exc:
        raise InvalidInput("The image is damaged or truncated.") from exc
    if frames > limits.max_frames:
        raise PayloadTooLarge(f"The image has {frames} frames; the limit is {limits.max_frames}.")
    width, height = image.size
    if width * height * frames > limits.max_pixels:
        raise PayloadTooLarge(_too_many_pixels(limits))
    return image


def _too_many_pixels(limits: Limits) -> str:
    return (
        f"The image is larger than the limit of {limits.max_pixels} pixels "
        "(width x height x frames)."
    )


def _frame_count(image: Image.Image) -> int:
    if image.format == "ICO":
        return len(image.info.get("sizes", ())) or 1
    return int(getattr(image, "n_frames", 1))


def _encode(
    image: Image.Image, data: bytes, fmt: ImageFormat, quality: int, meta: Metadata
) -> tuple[bytes, bool]:
    """The encoded image, and whether its pixels are the input's (lossless)."""
    name = fmt.pillow_name
    if name == "JPEG":
        return jpeg.encode(image, data, quality, meta)
    if name == "PNG":
        return _png(image, data, quality, meta)
    if name == "WEBP":
        return _webp(image, data, quality, meta)
    if name == "GIF":
        return _gif(image, data, quality, meta)
    if name in ("AVIF", "HEIF"):
        return _lossy_modern(image, name, quality, meta), False
    if name == "BMP" and "A" in image.getbands():
        # Pillow writes alpha into 32-bit BMP without the bit masks that say it is alpha, so
        # every reader, Pillow included, would show the image opaque.
        return data, True
    if name in ("TIFF", "BMP"):
        return _lossless_raster(image, name, meta), True
    return _ico(image), True


# PNG: at 100, oxipng optimises losslessly on the original bytes, so bit depth, palette, APNG
# frames and every kept chunk survive exactly. Below 100, libimagequant makes a palette image
# whose quality is at least ``quality`` (aiming 10 above it, as pngquant's min-max range does)
# and oxipng packs it; only when that floor cannot be met is the lossless path run instead,
# because running both (to keep the smaller) cost the lossless pass on every image.
# APNG is always lossless. ``compress`` returns the input itself when neither is smaller.
def _png(image: Image.Image, data: bytes, quality: int, meta: Metadata) -> tuple[bytes, bool]:
    # An APNG of one frame is still an animation (its frame control gives it a duration).
    if quality >= 100 or getattr(image, "custom_mimetype", None) == "image/apng":
        return _png_lossless(data, meta), True
    try:
        quantized = imagequant.quantize_pil_image(
            image.convert("RGBA"),
            dithering_level=1.0,
            max_colors=256,
            min_quality=quality,
            max_quality=min(100, quality + 10),
        )
    except RuntimeError:
        return _png_lossless(data, meta), True
    out = io.BytesIO()
    quantized.save(out, "PNG", pnginfo=_png_text(image, meta), icc_profile=meta.icc, exif=meta.exif)
    return _oxipng(out.getvalue()), False


def _png_lossless(data: bytes, meta: Metadata) -> bytes:
    return _oxipng(_png_chunks(data, meta))


def _oxipng(png: bytes) -> bytes:
    optimised: bytes = oxipng.optimize_from_memory(png, level=2)
    return optimised


def _png_chunks(data: bytes, meta: Metadata) -> bytes:
    """The original PNG with text and EXIF chunks replaced by what ``meta`` keeps."""
    out = [PNG_SIGNATURE]
    for kind, chunk in _iter_png_chunks(data):
        if kind in PNG_TEXT_CHUNKS and meta.stripped:
            continue
        if kind == EXIF_TAG_IN_PNG:
            if meta.exif:
                out.append(_png_chunk(kind, meta.exif))
            continue
        out.append(chunk)
    return b"".join(out)


def _iter_png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        end = position + 12 + length
        yield kind, data[position:end]
        position = end
        if kind == b"IEND":
            return


def _png_with_fresh_crcs(png: bytes) -> bytes:
    chunks = (_png_chunk(kind, chunk[8:-4]) for kind, chunk in _iter_png_chunks(png))
    return PNG_SIGNATURE + b"".join(chunks)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_text(image: Image.Image, meta: Metadata) -> PngImagePlugin.PngInfo | None:
    if meta.stripped:
        return None
    info = PngImagePlugin.PngInfo()
    for key, value in getattr(image, "text", {}).items():
        info.add_itxt(key, str(value))
    return info


# WebP: lossy input is re-encoded lossy at ``quality`` with the slowest, best method. Lossless
# input stays lossless at 100 and below it follows the quality like any lossy WebP. Animations
# keep every frame, its duration and the loop count; frames may mix lossy and lossless.
def _webp(image: Image.Image, data: bytes, quality: int, meta: Metadata) -> tuple[bytes, bool]:
    lossless = quality >= 100 and _webp_is_lossless(data)
    frames, durations = _frames(image)
    out = io.BytesIO()
    frames[0].save(
        out,
        "WEBP",
        save_all=len(frames) > 1,
        append_images=frames[1:],
        duration=durations,
        loop=image.info.get("loop", 0),
        lossless=lossless,
        # Lossless effort 75 at method 4 is within 5% of the exhaustive 100 at method 6 and
        # 30 times faster; lossy method 6 costs twice method 4 for 5% fewer bytes on a still,
        # but on an animation (42 frames of 245x245 in Pillow's iss634.webp) 7-11 times the
        # time of method 4 (12-20 s against 1.8 s) for 7% fewer bytes.
        quality=75 if lossless else quality,
        method=4 if lossless or len(frames) > 1 else 6,
        allow_mixed=len(frames) > 1 and not lossless,
        **_pillow_metadata(meta),
    )
    return out.getvalue(), lossless


def _webp_is_lossless(data: bytes) -> bool:
    kinds: set[bytes] = set()
    position = 12
    while position + 8 <= len(data):
        kind = data[position : position + 4]
        (length,) = struct.unpack("<I", data[position + 4 : position + 8])
        if kind == b"ANMF":
            inner = position + 8 + 16
            kinds.add(data[inner : inner + 4])
        kinds.add(kind)
        position += 8 + length + (length & 1)
    return b"VP8L" in kinds and b"VP8 " not in kinds


def _pillow_metadata(meta: Metadata) -> dict[str, bytes]:
    fields = {"icc_profile": meta.icc, "exif": meta.exif, "xmp": meta.xmp}
    return {key: value for key, value in fields.items() if value}


def _frames(image: Image.Image) -> tuple[list[Image.Image], list[int]]:
    frames: list[Image.Image] = []
    durations: list[int] = []
    for frame in ImageSequence.Iterator(image):
        frame.load()
        durations.append(int(frame.info.get("duration", 0)))
        frames.append(frame.copy())
    return frames, durations


# GIF: every frame, duration, disposal and the loop count are kept. At 100 the colours are
# kept and Pillow's optimiser only crops frames to what changes; below 100 each frame gets a
# smaller palette, 256 colours scaled by quality (at least 16), which LZW then packs tighter.
def _gif(image: Image.Image, data: bytes, quality: int, meta: Metadata) -> tuple[bytes, bool]:
    frames: list[Image.Image] = []
    durations: list[int] = []
    disposals: list[int] = []
    colours = 256 if quality >= 100 else max(16, round(256 * quality / 100))
    for frame in ImageSequence.Iterator(image):
        frame.load()
        durations.append(int(frame.info.get("duration", 0)))
        disposals.append(int(getattr(frame, "disposal_method", 0)))
        current = frame.copy()
        if frames and current.size != frames[0].size:
            # A frame that outgrows the logical screen (Pillow then grows the image) cannot
            # be written back as it was shown.
            return data, True
        if colours < 256:
            # Back to RGBA, so that Pillow's GIF writer picks the transparent index as it does
            # for the input's own frames; a quantised palette image alone loses transparency.
            current = (
                current.convert("RGBA")
                .quantize(colors=colours, method=Image.Quantize.FASTOCTREE)
                .convert("RGBA")
            )
        frames.append(current)
    out = io.BytesIO()
    extra: dict[str, object] = {}
    if "loop" in image.info:
        extra["loop"] = image.info["loop"]
    if meta.comment:
        extra["comment"] = meta.comment
    single = len(frames) == 1 or (len(set(durations)) == 1 and len(set(disposals)) == 1)
    frames[0].save(
        out,
        "GIF",
        save_all=len(frames) > 1,
        append_images=frames[1:],
        # Pillow merges identical consecutive frames and then fails on per-frame lists.
        duration=durations[0] if single else durations,
        disposal=disposals[0] if single else disposals,
        optimize=True,
        **extra,
    )
    # Even with every colour kept, the frames are written anew from what Pillow composited.
    return out.getvalue(), False


# AVIF and HEIC: lossy at ``quality``, as their encoders define it; animations (AVIF) keep
# their frames and durations.
def _lossy_modern(image: Image.Image, name: str, quality: int, meta: Metadata) -> bytes:
    frames, durations = _frames(image)
    out = io.BytesIO()
    options: dict[str, object] = {"quality": quality, **_pillow_metadata(meta)}
    if len(frames) > 1:
        options.update(save_all=True, append_images=frames[1:], duration=durations)
    frames[0].save(out, name, **options)
    return out.getvalue()


# TIFF and BMP: lossless always. Images with at most 256 colours are stored as a palette
# (exactly the same pixels in a third of the bytes or less); TIFF also gets Deflate.
def _lossless_raster(image: Image.Image, name: str, meta: Metadata) -> bytes:
    frames = [_palette_if_exact(frame) for frame in _frames(image)[0]]
    out = io.BytesIO()
    options: dict[str, object] = {}
    if name == "TIFF":
        options.update(compression="tiff_adobe_deflate", **_pillow_metadata(meta))
        if len(frames) > 1:
            options.update(save_all=True, append_images=frames[1:])
    elif meta.icc:
        options["icc_profile"] = meta.icc
    frames[0].save(out, name, **options)
    return out.getvalue()


def _palette_if_exact(image: Image.Image) -> Image.Image:
    if image.mode != "RGB":
        return image
    colours = image.getcolors(256)
    if colours is None:
        return image
    indexed = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=len(colours))
    return indexed if indexed.convert("RGB").tobytes() == image.tobytes() else image


# ICO: every size the icon holds is kept as its own picture, stored as PNG (lossless).
def _ico(image: Image.Image) -> bytes:
    sizes = sorted(image.info.get("sizes", {image.size}))
    ico = getattr(image, "ico", None)
    pictures = [ico.getimage(size) if ico is not None else image for size in sizes]
    largest = pictures[-1]
    out = io.BytesIO()
    largest.save(out, "ICO", sizes=sizes, append_images=pictures[:-1])
    return out.getvalue()
