"""Real test images: photos shipped in scikit-image, saved in every accepted format."""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pyvips
import skimage
from PIL import Image, ImageCms, ImageDraw, PngImagePlugin

DATA = Path(skimage.__file__).parent / "data"
MAKE_TAG = 0x010F
ORIENTATION_TAG = 0x0112
GPS_IFD_TAG = 0x8825
# Where a phone would say the picture was taken: in EXIF's GPS directory and again in XMP.
GPS = {1: "N", 2: (52.0, 22.0, 30.5), 3: "E", 4: (4.0, 53.0, 12.25)}
XMP_WITH_LOCATION = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" '
    b'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:CreatorTool="HermesCam" '
    b'exif:GPSLatitude="52,22.508N" exif:GPSLongitude="4,53.204E">'
    b"<exif:GPSAltitude>3/1</exif:GPSAltitude></rdf:Description></rdf:RDF></x:xmpmeta>"
)


def photo(name: str = "astronaut.png") -> Image.Image:
    return Image.open(DATA / name).convert("RGB")


@cache
def srgb_profile() -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return bytes(profile.tobytes())


@cache
def display_p3_profile() -> bytes:
    """The Display P3 profile phones tag their photos with (libvips ships one)."""
    image = pyvips.Image.black(1, 1, bands=3).copy(interpretation="srgb")
    profile: bytes = image.icc_transform("p3", input_profile="srgb").get("icc-profile-data")
    return profile


def camera_exif(orientation: int = 6, *, location: bool = False) -> Image.Exif:
    exif = Image.Exif()
    exif[MAKE_TAG] = "HermesCam"
    exif[ORIENTATION_TAG] = orientation
    if location:
        exif.get_ifd(GPS_IFD_TAG).update(GPS)
    return exif


def camera_jpeg(name: str, quality: int, subsampling: str, orientation: int) -> bytes:
    """A photo as a camera saves it: a JPEG at ``quality``, with an ICC profile, EXIF
    (orientation, make, GPS) and XMP (location again)."""
    return encode(
        photo(name),
        "JPEG",
        quality=quality,
        subsampling=subsampling,
        icc_profile=srgb_profile(),
        exif=camera_exif(orientation, location=True),
        xmp=XMP_WITH_LOCATION,
    )


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def screenshot() -> Image.Image:
    """A UI-like picture: flat panels, text, a gradient bar."""
    image = Image.new("RGB", (640, 400), (245, 246, 248))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 640, 40), fill=(32, 40, 56))
    draw.rectangle((0, 40, 140, 400), fill=(225, 228, 234))
    for row in range(12):
        draw.text((160, 60 + row * 26), f"Row {row}: the quick brown fox jumps", fill=(20, 20, 20))
        draw.text((10, 60 + row * 26), f"Item {row}", fill=(60, 60, 90))
    for x in range(160, 620):
        draw.line((x, 370, x, 390), fill=(x % 256, 120, 255 - x % 256))
    return image


def animation(count: int = 6, size: tuple[int, int] = (96, 64)) -> list[Image.Image]:
    frames = []
    for index in range(count):
        frame = Image.new("RGBA", size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(frame)
        draw.ellipse((index * 10, 10, index * 10 + 30, 40), fill=(220, 40 + index * 30, 40, 255))
        draw.rectangle((0, 50, size[0], 63), fill=(30, 90, 200, 255))
        frames.append(frame)
    return frames


def samples() -> dict[str, bytes]:
    """Every kind of input the route promises to handle, by a short name."""
    astronaut = photo()
    coffee = photo("coffee.png")
    rgba = astronaut.convert("RGBA")
    alpha = np.zeros((astronaut.height, astronaut.width), dtype=np.uint8)
    alpha[64:448, 64:448] = 255
    rgba.putalpha(Image.fromarray(alpha))
    frames = animation()
    small = astronaut.resize((256, 256))
    multipage = [astronaut.resize((200, 200)), coffee.resize((200, 200))]
    return {
        "photo.jpg": encode(
            astronaut, "JPEG", quality=95, icc_profile=srgb_profile(), exif=camera_exif()
        ),
        "coffee.jpg": encode(coffee, "JPEG", quality=92),
        "screenshot.png": encode(screenshot(), "PNG"),
        "photo.png": encode(astronaut, "PNG"),
        "palette.png": encode(astronaut.quantize(64), "PNG"),
        "transparent.png": encode(rgba, "PNG"),
        "animated.gif": encode(
            frames[0],
            "GIF",
            save_all=True,
            append_images=frames[1:],
            duration=[80, 120, 80, 120, 80, 200],
            loop=0,
            disposal=2,
        ),
        "animated.webp": encode(
            frames[0],
            "WEBP",
            save_all=True,
            append_images=frames[1:],
            duration=[80, 120, 80, 120, 80, 200],
            loop=3,
            lossless=True,
        ),
        "photo.webp": encode(astronaut, "WEBP", quality=95),
        "lossless.webp": encode(screenshot(), "WEBP", lossless=True),
        "photo.avif": encode(astronaut, "AVIF", quality=95),
        "photo.heic": encode(astronaut, "HEIF", quality=95, exif=camera_exif().tobytes()),
        "camera-q90-422.jpg": camera_jpeg("chelsea.png", 90, "4:2:2", orientation=6),
        "camera-q95-444.jpg": camera_jpeg("coffee.png", 95, "4:4:4", orientation=8),
        "located.png": encode(
            small,
            "PNG",
            exif=camera_exif(location=True),
            pnginfo=_xmp_text(),
        ),
        "located.webp": encode(
            small, "WEBP", quality=80, exif=camera_exif(location=True), xmp=XMP_WITH_LOCATION
        ),
        "phone.heic": encode(
            photo("motorcycle_left.png").resize((480, 320)),
            "HEIF",
            quality=90,
            icc_profile=display_p3_profile(),
            exif=camera_exif(1, location=True).tobytes(),
        ),
        "photo.tiff": encode(astronaut, "TIFF", icc_profile=srgb_profile()),
        "pages.tiff": encode(multipage[0], "TIFF", save_all=True, append_images=multipage[1:]),
        "palette.bmp": encode(astronaut.quantize(64).convert("RGB"), "BMP"),
        "icon.ico": encode(
            small, "ICO", sizes=[(16, 16), (32, 32), (256, 256)], bitmap_format="bmp"
        ),
    }


def _xmp_text() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP_WITH_LOCATION.decode())
    return info


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``, with one tiny IDAT: a pixel bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def write_samples(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in samples().items():
        path = directory / name
        path.write_bytes(data)
        paths[name] = path
    return paths
