"""Pillow's own test images through the upload route: every file gets a 200 in its own format,
never bigger, showing the same frames for the same total time, or a 4xx with a stable code.

The files (``tests/data/pillow-images``, MIT-CMU licence beside them) are the accepted-format
images of Pillow's ``Tests/images`` folder: fuzzer crashes, truncated files, odd TIFF layouts,
16-bit and palette PNGs, decompression bombs, animations, multi-page TIFF. No worker may die
and none may grow past ``MEMORY_LIMIT``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pillow_heif
import pytest
from fastapi import FastAPI
from PIL import Image, ImageFile, ImageSequence

from services.compress.app import create_app
from services.compress.pool import CodecPool
from services.compress.settings import CompressSettings
from tests.support.apps import client

pillow_heif.register_heif_opener()

CORPUS = Path(__file__).parent / "data" / "pillow-images"
FILES = sorted(
    path.relative_to(CORPUS).as_posix()
    for path in CORPUS.rglob("*")
    if path.is_file() and path.name != "LICENSE"
)
STABLE_CODES = {
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
}
# Peak resident memory of one codec worker over the whole corpus.
MEMORY_LIMIT = 1024 * 1024 * 1024
# Mean absolute difference (0-255, premultiplied RGBA) a re-encode at quality 85 may show.
REENCODE_TOLERANCE = 12


@pytest.fixture(scope="module")
def api() -> Iterator[tuple[httpx.Client, FastAPI]]:
    app = create_app(CompressSettings(compress_workers=1))
    with client(app) as http:
        yield http, app


def rendered(data: bytes) -> tuple[list[np.ndarray], int]:
    """The frames as shown (premultiplied RGBA), consecutive repeats merged, and the total
    duration in milliseconds."""
    frames: list[np.ndarray] = []
    total = 0
    image = Image.open(io.BytesIO(data))
    for frame in ImageSequence.Iterator(image):
        frame.load()
        total += int(frame.info.get("duration", 0))
        shown = np.asarray(frame.convert("RGBA"))
        if shown[..., 3].min() < 255:
            wide = shown.astype(np.uint16)
            wide[..., :3] = wide[..., :3] * wide[..., 3:] // 255
            shown = wide.astype(np.uint8)
        if not frames or not np.array_equal(frames[-1], shown):
            frames.append(shown)
    return frames, total


def peak_memory(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.parametrize("name", FILES)
def test_pillow_image(api: tuple[httpx.Client, FastAPI], name: str) -> None:
    http, app = api
    pool: CodecPool = app.state.pool
    workers = pool.worker_pids()
    original = (CORPUS / name).read_bytes()
    response = http.post("/compress-an-image/upload", files={"file": (Path(name).name, original)})

    assert pool.worker_pids() == workers, "a codec worker died"
    assert all(peak_memory(pid) < MEMORY_LIMIT for pid in workers)
    if response.status_code != 200:
        assert STABLE_CODES.get(response.status_code) == response.json()["error"]["code"]
        return
    data = response.content
    assert len(data) <= len(original)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    source = Image.open(io.BytesIO(original))
    assert Image.open(io.BytesIO(data)).format == source.format
    assert response.headers["x-image-format"] == source.format
    try:
        before, before_ms = rendered(original)
    except OSError:
        # Pillow shows the first frames of some broken APNGs, then fails on a later one; the
        # route has passed such a file through oxipng, which keeps every chunk as it was.
        assert response.headers["x-compression-method"] == "lossless"
        return
    after, after_ms = rendered(data)
    if getattr(source, "is_animated", False) or source.get_format_mimetype() == "image/apng":
        assert after_ms == before_ms
    assert [frame.shape for frame in after] == [frame.shape for frame in before]
    for a, b in zip(before, after, strict=True):
        if response.headers["x-compression-method"] == "lossless":
            assert np.array_equal(a, b)
        else:
            assert np.abs(a.astype(np.int16) - b).mean() < REENCODE_TOLERANCE
