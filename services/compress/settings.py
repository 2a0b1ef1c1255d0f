"""Settings of the compress service."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class CompressSettings(CommonSettings):
    compress_max_input_bytes: int = Field(
        default=50 * 1024 * 1024,
        gt=0,
        description="Largest image accepted, fetched or uploaded (413 past it).",
    )
    compress_max_pixels: int = Field(
        default=100_000_000,
        gt=0,
        description=(
            "Largest width x height x frames, checked from the header before decoding (413)."
        ),
    )
    compress_max_frames: int = Field(
        default=1000, gt=0, description="Most animation frames accepted (413 past it)."
    )
    compress_workers: int = Field(
        default=0,
        ge=0,
        description="Processes that decode and encode images; 0 means one per CPU core.",
    )
