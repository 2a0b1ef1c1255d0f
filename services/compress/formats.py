"""The formats the route accepts, and how each is named on the way in and out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    pillow_name: str
    mime: str
    extensions: tuple[str, ...]

    @property
    def extension(self) -> str:
        return self.extensions[0]


FORMATS: dict[str, ImageFormat] = {
    f.pillow_name: f
    for f in (
        ImageFormat("JPEG", "image/jpeg", ("jpg", "jpeg", "jpe", "jfif")),
        ImageFormat("PNG", "image/png", ("png", "apng")),
        ImageFormat("WEBP", "image/webp", ("webp",)),
        ImageFormat("GIF", "image/gif", ("gif",)),
        ImageFormat("AVIF", "image/avif", ("avif",)),
        ImageFormat("TIFF", "image/tiff", ("tif", "tiff")),
        ImageFormat("BMP", "image/bmp", ("bmp",)),
        ImageFormat("ICO", "image/x-icon", ("ico",)),
        ImageFormat("HEIF", "image/heic", ("heic", "heif")),
    )
}

ACCEPTED_EXTENSIONS: list[str] = [ext for f in FORMATS.values() for ext in f.extensions]
ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, AVIF, TIFF, BMP, ICO, HEIC/HEIF"
