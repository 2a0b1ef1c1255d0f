"""The compress-an-image API: thin routes over ``codecs`` run in the ``pool``."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal
from urllib.parse import quote, unquote, urlsplit

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.formparsers import MultiPartParser

from services.common.asgi import create_base_app
from services.common.errors import PayloadTooLarge, error_responses
from services.common.http import GuardedClient
from services.common.ouro import InputFileAsset, OutputFile
from services.compress.codecs import DEFAULT_QUALITY, Compressed, Limits
from services.compress.formats import ACCEPTED_EXTENSIONS
from services.compress.pool import CodecPool
from services.compress.settings import CompressSettings

ROUTE = "/compress-an-image"
QUALITY_DESCRIPTION = (
    "1 to 100, higher is better quality; what it means for each format is in the README "
    "(PNG at 100 and TIFF, BMP, ICO are lossless). A JPEG asked for its own quality or more "
    "is only optimised losslessly."
)
STRIP_DESCRIPTION = "Drop EXIF, XMP and comments; the ICC profile and orientation stay."
KEEP_LOCATION_DESCRIPTION = (
    "Keep the GPS coordinates in EXIF and XMP; by default they are removed, so a published "
    "copy does not tell where the picture was taken."
)


class CompressRequest(BaseModel):
    file: InputFileAsset = Field(description="The image, as Ouro resolves a file asset.")
    quality: int = Field(default=DEFAULT_QUALITY, ge=1, le=100, description=QUALITY_DESCRIPTION)
    strip_metadata: bool = Field(default=False, description=STRIP_DESCRIPTION)
    keep_location: bool = Field(default=False, description=KEEP_LOCATION_DESCRIPTION)

    model_config = {
        "json_schema_extra": {
            "examples": [{"file": {"url": "https://example.com/cat.png"}, "quality": 85}]
        }
    }


class CompressResponse(BaseModel):
    file: OutputFile
    format: str = Field(description="The image format, the same as the input's (e.g. PNG).")
    width: int
    height: int
    frames: int = Field(description="Frames of an animation, sizes of an icon, else 1.")
    original_bytes: int
    compressed_bytes: int
    ratio: float = Field(description="compressed_bytes / original_bytes.")
    compressed: bool = Field(
        description=(
            "False when the input came back unchanged: nothing was smaller, or a re-encode "
            "would have saved less than 3%."
        )
    )
    method: Literal["lossless", "reencoded"] = Field(
        description=(
            "lossless: the pixels are the input's, bit for bit (only the encoding was "
            "optimised, or the input came back unchanged); reencoded: the image was encoded "
            "again at the requested quality."
        )
    )


def _filename(asset: InputFileAsset, compressed: Compressed) -> str:
    """The input's own file name, so cat.png stays cat.png."""
    candidates = (asset.filename, posixpath.basename(unquote(urlsplit(asset.url).path)))
    for candidate in candidates:
        if candidate and "." in candidate:
            return candidate
    return f"image.{compressed.format.extension}"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: CompressSettings = app.state.settings
    pool = CodecPool(settings.compress_workers)
    client = GuardedClient(
        allow_private=settings.allow_private_networks,
        timeout=settings.fetch_timeout_seconds,
        max_redirects=settings.max_redirects,
    )
    await pool.start()
    app.state.pool, app.state.client = pool, client
    try:
        yield
    finally:
        await client.aclose()
        pool.close()


async def _readiness(app: FastAPI) -> dict[str, bool]:
    pool: CodecPool | None = getattr(app.state, "pool", None)
    return {"codec_pool": pool is not None and pool.alive()}


def create_app(settings: CompressSettings | None = None) -> FastAPI:
    settings = settings or CompressSettings()
    app = create_base_app(
        settings,
        title="hermes-media: compress-an-image",
        description="Compress an image while maintaining its current format.",
        lifespan=_lifespan,
        readiness=_readiness,
    )
    app.state.settings = settings
    # Starlette spools an uploaded file to a temporary file past 1 MB, and then every 64 KB chunk
    # and the final read each go through a thread: about 4 ms of a 2 MP photo's request. The
    # route reads the whole file into memory anyway, so keep it there up to the input limit.
    # This is Starlette's process-wide knob; the clip service takes no uploads.
    MultiPartParser.spool_max_size = max(
        MultiPartParser.spool_max_size, settings.compress_max_input_bytes + 1
    )
    limits = Limits(
        max_pixels=settings.compress_max_pixels, max_frames=settings.compress_max_frames
    )

    async def run(
        request: Request, data: bytes, quality: int, strip: bool, keep_location: bool
    ) -> Compressed:
        pool: CodecPool = request.app.state.pool
        return await pool.compress(
            data,
            quality=quality,
            strip_metadata=strip,
            keep_location=keep_location,
            limits=limits,
        )

    @app.post(
        ROUTE,
        summary="Compress an image",
        description="Compress an image while maintaining its current format.",
        response_model=CompressResponse,
        responses=error_responses(400, 401, 413, 415, 422),
        openapi_extra={
            "x-ouro-input-assets": {
                "file": {
                    "asset_type": "file",
                    "primary": True,
                    "input_filter": "image",
                    "file_extensions": ACCEPTED_EXTENSIONS,
                }
            },
            "x-ouro-output-assets": {"file": {"asset_type": "file", "primary": True}},
            "x-ouro-execution-mode": "sync",
        },
    )
    async def compress_an_image(body: CompressRequest, request: Request) -> CompressResponse:
        client: GuardedClient = request.app.state.client
        data = await client.fetch_bytes(body.file.url, max_bytes=settings.compress_max_input_bytes)
        result = await run(request, data, body.quality, body.strip_metadata, body.keep_location)
        filename = _filename(body.file, result)
        return CompressResponse(
            file=OutputFile.of(
                result.data,
                name=body.file.name or filename,
                description=body.file.description,
                filename=filename,
                mime=result.format.mime,
                extension=result.format.extension,
            ),
            format=result.format.pillow_name,
            width=result.width,
            height=result.height,
            frames=result.frames,
            original_bytes=result.original_bytes,
            compressed_bytes=len(result.data),
            ratio=round(len(result.data) / result.original_bytes, 4),
            compressed=result.compressed,
            method=result.method,
        )

    @app.post(
        f"{ROUTE}/upload",
        summary="Compress an uploaded image",
        description=(
            "For direct HTTP callers: send the image as multipart form data, get the "
            "compressed bytes back. Sizes are in the X-Original-Bytes and "
            "X-Compressed-Bytes headers; X-Compressed and X-Compression-Method say what was done."
        ),
        response_class=Response,
        responses={
            200: {
                "description": "The compressed image, in the input's format.",
                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
            },
            **error_responses(400, 401, 413, 415, 422),
        },
    )
    async def compress_an_upload(
        request: Request,
        file: Annotated[UploadFile, File(description="The image.")],
        quality: Annotated[
            int, Form(ge=1, le=100, description=QUALITY_DESCRIPTION)
        ] = DEFAULT_QUALITY,
        strip_metadata: Annotated[bool, Form(description=STRIP_DESCRIPTION)] = False,
        keep_location: Annotated[bool, Form(description=KEEP_LOCATION_DESCRIPTION)] = False,
    ) -> Response:
        data = await file.read(settings.compress_max_input_bytes + 1)
        if len(data) > settings.compress_max_input_bytes:
            raise PayloadTooLarge(
                f"The file is larger than the limit of {settings.compress_max_input_bytes} bytes."
            )
        result = await run(request, data, quality, strip_metadata, keep_location)
        filename = file.filename or f"image.{result.format.extension}"
        return Response(
            content=result.data,
            media_type=result.format.mime,
            headers={
                "content-disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
                "x-original-bytes": str(result.original_bytes),
                "x-compressed-bytes": str(len(result.data)),
                "x-compressed": str(result.compressed).lower(),
                "x-compression-method": result.method,
                "x-image-format": result.format.pillow_name,
            },
        )

    return app
