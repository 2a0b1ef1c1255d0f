"""compress-an-image end to end: the real app over HTTP, real images fetched from loopback."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pillow_heif
import pytest
import pyvips
import ssimulacra2
from PIL import Image, ImageSequence
from skimage.metrics import structural_similarity

from services.compress.app import create_app
from services.compress.jpeg import estimated_quality
from services.compress.settings import CompressSettings
from tests.support.apps import client
from tests.support.images import (
    GPS,
    GPS_IFD_TAG,
    MAKE_TAG,
    ORIENTATION_TAG,
    display_p3_profile,
    encode,
    photo,
    png_header_only,
    srgb_profile,
    write_samples,
)
from tests.support.rangeserver import RangeServer

pillow_heif.register_heif_opener()

LIMITS = CompressSettings(
    compress_max_input_bytes=3_000_000, compress_max_pixels=2_000_000, compress_max_frames=50
)
LOSSLESS = {"palette.bmp", "icon.ico", "photo.tiff", "pages.tiff"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RangeServer, Path]]:
    root = tmp_path_factory.mktemp("images")
    write_samples(root)
    with RangeServer(root) as server:
        yield server, root


@pytest.fixture(scope="module")
def api() -> Iterator[httpx.Client]:
    settings = LIMITS.model_copy(update={"allow_private_networks": True, "compress_workers": 2})
    with client(create_app(settings)) as http:
        yield http


def frames_of(data: bytes) -> list[np.ndarray]:
    """Every frame as the eye sees it: RGBA with colour premultiplied by alpha."""
    image = Image.open(io.BytesIO(data))
    frames = []
    for frame in ImageSequence.Iterator(image):
        rgba = np.asarray(frame.convert("RGBA")).astype(np.uint16)
        rgba[..., :3] = rgba[..., :3] * rgba[..., 3:] // 255
        frames.append(rgba.astype(np.uint8))
    return frames


def durations_of(image: Image.Image) -> list[int]:
    durations = []
    for frame in ImageSequence.Iterator(image):
        frame.load()
        durations.append(int(frame.info["duration"]))
    return durations


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def post(api: httpx.Client, url: str, **body: object) -> httpx.Response:
    return api.post("/compress-an-image", json={"file": {"url": url}, **body})


@pytest.mark.parametrize(
    "name",
    [
        "photo.jpg",
        "coffee.jpg",
        "screenshot.png",
        "photo.png",
        "palette.png",
        "transparent.png",
        "animated.gif",
        "animated.webp",
        "photo.webp",
        "lossless.webp",
        "photo.avif",
        "photo.heic",
        "phone.heic",
        "camera-q90-422.jpg",
        "camera-q95-444.jpg",
        "photo.tiff",
        "pages.tiff",
        "palette.bmp",
        "icon.ico",
    ],
)
def test_same_format_never_bigger_and_looks_the_same(
    api: httpx.Client, files: tuple[RangeServer, Path], name: str
) -> None:
    server, root = files
    original = (root / name).read_bytes()
    response = post(api, server.url(name), quality=85)
    assert response.status_code == 200, response.text
    body = response.json()
    data = base64.b64decode(body["file"]["base64"])
    source, result = Image.open(io.BytesIO(original)), Image.open(io.BytesIO(data))

    assert result.format == source.format == body["format"]
    assert body["file"]["filename"] == name
    assert body["file"]["extension"] == name.rsplit(".", 1)[1].replace("tiff", "tif")
    assert body["compressed_bytes"] == len(data) <= len(original) == body["original_bytes"]
    assert body["compressed"] == (len(data) < len(original))
    if body["method"] == "reencoded":
        assert len(data) <= 0.97 * len(original)
    assert (body["width"], body["height"]) == source.size
    before, after = frames_of(original), frames_of(data)
    assert len(after) == len(before) == body["frames"] or name == "icon.ico"
    for a, b in zip(before, after, strict=True):
        if name in LOSSLESS or body["method"] == "lossless":
            assert np.array_equal(a, b)
        else:
            assert similarity(a, b) > 0.85


def test_jpeg_keeps_icc_orientation_and_exif(
    api: httpx.Client, files: tuple[RangeServer, Path]
) -> None:
    server, _ = files
    body = post(api, server.url("photo.jpg"), quality=80).json()
    result = Image.open(io.BytesIO(base64.b64decode(body["file"]["base64"])))
    assert result.info["icc_profile"] == srgb_profile()
    assert result.getexif()[ORIENTATION_TAG] == 6
    assert result.getexif()[MAKE_TAG] == "HermesCam"
    assert body["compressed"] is True


def test_strip_metadata_keeps_icc_and_orientation_only(
    api: httpx.Client, files: tuple[RangeServer, Path]
) -> None:
    server, _ = files
    body = post(api, server.url("photo.jpg"), quality=80, strip_metadata=True).json()
    result = Image.open(io.BytesIO(base64.b64decode(body["file"]["base64"])))
    assert result.info["icc_profile"] == srgb_profile()
    assert result.getexif()[ORIENTATION_TAG] == 6
    assert MAKE_TAG not in result.getexif()


def test_animation_keeps_durations_and_loop(
    api: httpx.Client, files: tuple[RangeServer, Path]
) -> None:
    server, root = files
    for name in ("animated.gif", "animated.webp"):
        body = post(api, server.url(name), quality=60).json()
        data = base64.b64decode(body["file"]["base64"])
        source, result = Image.open(root / name), Image.open(io.BytesIO(data))
        assert durations_of(result) == durations_of(source)
        assert result.info.get("loop") == source.info.get("loop")


def test_png_at_100_is_lossless_and_keeps_palette(
    api: httpx.Client, files: tuple[RangeServer, Path]
) -> None:
    server, root = files
    body = post(api, server.url("palette.png"), quality=100).json()
    data = base64.b64decode(body["file"]["base64"])
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert np.array_equal(frames_of(data)[0], frames_of((root / "palette.png").read_bytes())[0])


def test_png_below_100_quantizes_a_screenshot(
    api: httpx.Client, files: tuple[RangeServer, Path]
) -> None:
    server, _ = files
    lossless = post(api, server.url("screenshot.png"), quality=100).json()
    lossy = post(api, server.url("screenshot.png"), quality=85).json()
    assert lossy["compressed_bytes"] < lossless["compressed_bytes"]
    data = base64.b64decode(lossy["file"]["base64"])
    assert Image.open(io.BytesIO(data)).mode == "P"


def test_not_smaller_returns_the_input_unchanged(api: httpx.Client, tmp_path: Path) -> None:
    tiny = encode(Image.new("P", (1, 1)), "PNG", optimize=True)
    (tmp_path / "tiny.png").write_bytes(tiny)
    with RangeServer(tmp_path) as server:
        body = post(api, server.url("tiny.png"), quality=100).json()
    assert body["compressed"] is False
    assert base64.b64decode(body["file"]["base64"]) == tiny
    assert body["ratio"] == 1.0


def test_upload_route_returns_bytes_and_sizes(
    api: httpx.Client, files: tuple[RangeServer, Path]
) -> None:
    _, root = files
    original = (root / "photo.jpg").read_bytes()
    response = api.post(
        "/compress-an-image/upload",
        files={"file": ("holiday photo.jpg", original, "image/jpeg")},
        data={"quality": "70"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert "holiday%20photo.jpg" in response.headers["content-disposition"]
    assert int(response.headers["x-original-bytes"]) == len(original)
    assert int(response.headers["x-compressed-bytes"]) == len(response.content) < len(original)
    assert Image.open(io.BytesIO(response.content)).format == "JPEG"


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert body["detail"] == body["error"]["message"]
    assert "\n" not in body["detail"]
    return str(body["detail"])


def upload(api: httpx.Client, data: bytes, name: str = "x.png", **form: str) -> httpx.Response:
    return api.post("/compress-an-image/upload", files={"file": (name, data)}, data=form)


def test_unsupported_format_is_415_with_the_list(api: httpx.Client) -> None:
    detail = error(upload(api, b"%PDF-1.4 not an image"), 415, "unsupported_media_type")
    assert "JPEG, PNG, WebP, GIF, AVIF, TIFF, BMP, ICO, HEIC/HEIF" in detail
    psd_like = encode(Image.new("RGB", (8, 8)), "PPM")
    error(upload(api, psd_like, "x.ppm"), 415, "unsupported_media_type")


def test_truncated_image_is_422(api: httpx.Client, files: tuple[RangeServer, Path]) -> None:
    _, root = files
    data = (root / "photo.png").read_bytes()
    error(upload(api, data[: len(data) // 2]), 422, "invalid_input")
    error(upload(api, data[:30]), 422, "invalid_input")


@pytest.mark.parametrize("quality", [0, 101, "high"])
def test_bad_quality_is_one_line_422(
    api: httpx.Client, files: tuple[RangeServer, Path], quality: object
) -> None:
    server, _ = files
    detail = error(post(api, server.url("photo.jpg"), quality=quality), 422, "invalid_input")
    assert detail.startswith("quality:")


def test_missing_file_is_422(api: httpx.Client) -> None:
    detail = error(api.post("/compress-an-image", json={"quality": 80}), 422, "invalid_input")
    assert detail.startswith("file:")


def test_input_bytes_at_and_past_the_limit(api: httpx.Client, tmp_path: Path) -> None:
    limit = LIMITS.compress_max_input_bytes
    base = encode(Image.new("RGB", (16, 16), (10, 20, 30)), "BMP")
    at_limit = base + b"\x00" * (limit - len(base))
    (tmp_path / "at.bmp").write_bytes(at_limit)
    (tmp_path / "past.bmp").write_bytes(at_limit + b"\x00")
    with RangeServer(tmp_path) as server:
        assert post(api, server.url("at.bmp")).status_code == 200
        error(post(api, server.url("past.bmp")), 413, "payload_too_large")
    assert upload(api, at_limit, "at.bmp").status_code == 200
    error(upload(api, at_limit + b"\x00", "past.bmp"), 413, "payload_too_large")


def test_pixels_at_and_past_the_limit(api: httpx.Client) -> None:
    width = 2000
    at_limit = encode(Image.new("L", (width, LIMITS.compress_max_pixels // width)), "PNG")
    past = encode(Image.new("L", (width, LIMITS.compress_max_pixels // width + 1)), "PNG")
    assert upload(api, at_limit).status_code == 200
    error(upload(api, past), 413, "payload_too_large")


def test_pixel_bomb_is_refused_from_the_header(api: httpx.Client) -> None:
    started = time.monotonic()
    error(upload(api, png_header_only(50_000, 50_000)), 413, "payload_too_large")
    assert time.monotonic() - started < 0.5


def test_frames_at_and_past_the_limit(api: httpx.Client) -> None:
    limit = LIMITS.compress_max_frames
    frames = [Image.new("L", (8, 8), index * 4) for index in range(limit + 1)]

    def gif(count: int) -> bytes:
        return encode(frames[0], "GIF", save_all=True, append_images=frames[1:count], duration=50)

    assert upload(api, gif(limit), "a.gif").status_code == 200
    detail = error(upload(api, gif(limit + 1), "a.gif"), 413, "payload_too_large")
    assert f"{limit + 1} frames" in detail


def test_private_address_refused_by_default(files: tuple[RangeServer, Path]) -> None:
    server, _ = files
    with client(create_app(CompressSettings(compress_workers=1))) as api:
        detail = error(post(api, server.url("photo.jpg")), 422, "address_refused")
    assert "private" in detail


def test_file_url_errors(api: httpx.Client, files: tuple[RangeServer, Path]) -> None:
    server, _ = files
    error(post(api, server.url("missing.png")), 422, "fetch_failed")
    error(post(api, "ftp://example.com/x.png"), 422, "address_refused")
    error(post(api, "http://user:pw@127.0.0.1/x.png"), 422, "address_refused")


class _Hang(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(3)

    def log_message(self, format: str, *args: object) -> None:
        return


def test_fetch_timeout_is_422() -> None:
    hang = ThreadingHTTPServer(("127.0.0.1", 0), _Hang)
    threading.Thread(target=hang.serve_forever, daemon=True).start()
    settings = CompressSettings(
        allow_private_networks=True, fetch_timeout_seconds=0.5, compress_workers=1
    )
    try:
        with client(create_app(settings)) as api:
            url = f"http://127.0.0.1:{hang.server_address[1]}/x.png"
            detail = error(post(api, url), 422, "fetch_failed")
        assert "0.5 s" in detail
    finally:
        hang.shutdown()
        hang.server_close()


def test_request_body_limit(files: tuple[RangeServer, Path]) -> None:
    settings = CompressSettings(
        allow_private_networks=True, max_request_bytes=10_000, compress_workers=1
    )
    with client(create_app(settings)) as api:
        error(upload(api, b"\x00" * 10_001), 413, "payload_too_large")
        assert upload(api, b"\x00" * 9_000).status_code == 415
        json_type = {"content-type": "application/json"}
        at_limit = api.post("/compress-an-image", content=b" " * 10_000, headers=json_type)
        assert at_limit.status_code == 422
        past = api.post("/compress-an-image", content=b" " * 10_001, headers=json_type)
        error(past, 413, "payload_too_large")


def compress_bytes(api: httpx.Client, data: bytes, name: str, **form: str) -> httpx.Response:
    response = upload(api, data, name, **form)
    assert response.status_code == 200, response.text
    return response


def score(reference: bytes, distorted: bytes) -> float:
    """SSIMULACRA2 of ``distorted`` against ``reference``, both decoded as RGB."""

    def png(data: bytes) -> io.BytesIO:
        return io.BytesIO(encode(Image.open(io.BytesIO(data)).convert("RGB"), "PNG"))

    return float(ssimulacra2.compute_ssimulacra2(png(reference), png(distorted)))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("quality", [1, 20, 50, 75, 80, 90, 95, 99, 100])
def test_jpeg_quality_is_read_from_its_tables(quality: int) -> None:
    for subsampling in ("4:2:0", "4:4:4"):
        jpeg = encode(photo(), "JPEG", quality=quality, subsampling=subsampling)
        assert estimated_quality(Image.open(io.BytesIO(jpeg))) == quality


def test_jpeg_quality_of_other_tables_and_of_none() -> None:
    # mozjpeg's table 5 at 75 steps more finely at low and more coarsely at high frequencies;
    # read as the IJG scale it is a lower quality.
    vips = pyvips.Image.new_from_memory(photo().tobytes(), 512, 512, 3, "uchar")
    table5 = vips.jpegsave_buffer(Q=75, quant_table=5)
    assert 55 <= (estimated_quality(Image.open(io.BytesIO(table5))) or 0) < 75
    assert estimated_quality(photo()) is None


@pytest.mark.parametrize(
    ("name", "quality"),
    [("camera-q90-422.jpg", 90), ("camera-q90-422.jpg", 100), ("camera-q95-444.jpg", 95)],
)
def test_jpeg_at_or_above_its_quality_is_optimised_losslessly(
    api: httpx.Client, files: tuple[RangeServer, Path], name: str, quality: int
) -> None:
    _, root = files
    original = (root / name).read_bytes()
    response = compress_bytes(api, original, name, quality=str(quality))
    assert response.headers["x-compression-method"] == "lossless"
    assert response.headers["x-compressed"] == "true"
    assert len(response.content) < 0.95 * len(original)
    assert np.array_equal(pixels(response.content), pixels(original))
    result, source = Image.open(io.BytesIO(response.content)), Image.open(io.BytesIO(original))
    assert result.info.get("progressive")
    assert result.info["icc_profile"] == source.info["icc_profile"]
    exif = result.getexif()
    assert exif[ORIENTATION_TAG] == source.getexif()[ORIENTATION_TAG]
    assert exif[MAKE_TAG] == "HermesCam"
    assert GPS_IFD_TAG not in exif


@pytest.mark.parametrize(
    ("name", "quality"),
    [
        ("camera-q95-444.jpg", 85),
        ("camera-q95-444.jpg", 75),
        ("camera-q95-444.jpg", 60),
        ("camera-q90-422.jpg", 85),
        ("camera-q90-422.jpg", 75),
    ],
)
def test_jpeg_below_its_quality_looks_no_worse_than_pillow(
    api: httpx.Client, files: tuple[RangeServer, Path], name: str, quality: int
) -> None:
    _, root = files
    original = (root / name).read_bytes()
    response = compress_bytes(api, original, name, quality=str(quality))
    pillow = encode(Image.open(io.BytesIO(original)), "JPEG", quality=quality)
    assert score(original, response.content) >= score(original, pillow) - 1
    assert len(response.content) <= 0.97 * len(original)
    if response.headers["x-compression-method"] == "lossless":
        assert np.array_equal(pixels(response.content), pixels(original))


@pytest.mark.parametrize("quality", [60, 85, 100])
def test_compressing_its_own_output_again_changes_nothing(
    api: httpx.Client, files: tuple[RangeServer, Path], quality: int
) -> None:
    _, root = files
    once = compress_bytes(api, (root / "camera-q95-444.jpg").read_bytes(), "a.jpg").content
    once = compress_bytes(api, once, "a.jpg", quality=str(quality)).content
    twice = compress_bytes(api, once, "a.jpg", quality=str(quality))
    assert twice.headers["x-compression-method"] == "lossless"
    assert np.array_equal(pixels(twice.content), pixels(once))


@pytest.mark.parametrize(("fmt", "quality"), [("AVIF", 75), ("HEIF", 90)])
def test_lossy_input_at_its_own_quality_saving_under_3_percent_comes_back_unchanged(
    api: httpx.Client, fmt: str, quality: int
) -> None:
    original = encode(photo(), fmt, quality=quality)
    response = compress_bytes(api, original, f"a.{fmt.lower()}", quality=str(quality))
    assert response.headers["x-compressed"] == "false"
    assert response.headers["x-compression-method"] == "lossless"
    assert response.content == original


@pytest.mark.parametrize(
    "name",
    ["camera-q90-422.jpg", "camera-q95-444.jpg", "phone.heic", "located.png", "located.webp"],
)
@pytest.mark.parametrize("quality", [75, 100])
def test_location_is_removed_unless_kept(
    api: httpx.Client, files: tuple[RangeServer, Path], name: str, quality: int
) -> None:
    server, root = files
    original = (root / name).read_bytes()
    private = post(api, server.url(name), quality=quality).json()
    kept = post(api, server.url(name), quality=quality, keep_location=True).json()
    form_kept = upload(api, original, name, quality=str(quality), keep_location="true")
    private_image = Image.open(io.BytesIO(base64.b64decode(private["file"]["base64"])))
    assert GPS_IFD_TAG not in private_image.getexif()
    assert b"GPS" not in xmp_of(private_image)
    assert private_image.getexif()[MAKE_TAG] == "HermesCam"
    for data in (base64.b64decode(kept["file"]["base64"]), form_kept.content):
        image = Image.open(io.BytesIO(data))
        assert image.getexif().get_ifd(GPS_IFD_TAG) == GPS
        if name != "phone.heic":
            assert b"exif:GPSLatitude" in xmp_of(image)
    if name != "phone.heic":
        assert b'xmp:CreatorTool="HermesCam"' in xmp_of(private_image)


def xmp_of(image: Image.Image) -> bytes:
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp", b"")
    return xmp.encode() if isinstance(xmp, str) else bytes(xmp)


def test_phone_heic_keeps_its_display_p3_profile(
    api: httpx.Client, files: tuple[RangeServer, Path]
) -> None:
    server, _ = files
    body = post(api, server.url("phone.heic"), quality=70).json()
    result = Image.open(io.BytesIO(base64.b64decode(body["file"]["base64"])))
    assert result.info["icc_profile"] == display_p3_profile()
    assert body["method"] == "reencoded"
