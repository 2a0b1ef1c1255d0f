"""Settings of the clip service."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from services.clip.fetch.ytdlp_cli import js_runtimes, parse_extractor_args
from services.common.settings import CommonSettings

DISTRIBUTED_NEEDS_STORAGE = (
    "distributed mode (HERMES_REDIS_URL) needs HERMES_CLIP_STORAGE_URL: s3://bucket/prefix or "
    "an absolute directory every API replica and worker mounts"
)


class ClipSettings(CommonSettings):
    clip_max_seconds: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Longest clip. A clip for a webhook has the output limit below, 64 MiB: 895 "
            "kbit/s over 600 s, 778 kbit/s after the format choice's 15% margin. YouTube's "
            "H.264 at 144p (itag 160) runs at about 50 to 130 kbit/s, 240p (133) 110 to 280, "
            "360p (134) 210 to 600, with AAC at 130 (140): 600 s fit at 360p for most videos "
            "and at 144p or 240p for all. Longer spans fit at 144p (about 30 minutes), but "
            "take longer than the job time limit allows on a slow source."
        ),
    )
    clip_max_height: int = Field(
        default=1080,
        ge=144,
        description=(
            "Tallest video picked from the source, in pixels; a request's `max_height` may "
            "ask for less."
        ),
    )
    clip_max_output_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description=(
            "Byte budget of a clip delivered by webhook (base64 in one body, 85 MiB at this "
            "default): the tallest format whose expected size fits is taken; a clip over it "
            "fails with output_too_large."
        ),
    )
    clip_max_file_bytes: int = Field(
        default=512 * 1024 * 1024,
        gt=0,
        description=(
            "Byte budget of a clip for a direct caller (no webhook; read from "
            "/jobs/{id}/file): the tallest format whose expected size fits is taken; a clip "
            "over it fails with output_too_large. The span fetched is about as large, so keep "
            "it under HERMES_CLIP_MAX_JOB_DISK_BYTES."
        ),
    )
    clip_max_job_disk_bytes: int = Field(
        default=1024 * 1024 * 1024,
        gt=0,
        description=(
            "Largest span a job may fetch to its directory (the job fails with "
            "job_disk_exceeded past it); its parts and the MP4 take at most as much again, "
            "and the sparse copy of an MP4 source's bytes the span is copied from at most twice "
            "as much."
        ),
    )
    clip_concurrency: int = Field(default=2, ge=1, description="Clip jobs run at once.")
    clip_max_queued: int = Field(
        default=100, ge=1, description="Jobs waiting or running before new ones get 503."
    )
    clip_max_running_per_caller: int = Field(
        default=2,
        ge=1,
        description=(
            "Jobs of one caller (Ouro's `ouro-user-id`, else the client address) run at once; "
            "the caller's further jobs wait while other callers' jobs go first."
        ),
    )
    clip_max_queued_per_caller: int = Field(
        default=10,
        ge=1,
        description=(
            "Jobs of one caller waiting or running; past it, new ones get 429 too_many_jobs "
            "with a Retry-After."
        ),
    )
    clip_deadline_seconds: float = Field(
        default=2400.0,
        ge=600,
        description=(
            "End-to-end deadline from a job's acceptance: its runs, retries and webhook "
            "deliveries all end within it (shorter than the 45 minutes after which Ouro "
            "refuses a late result); its runs end 300 s before it, so the webhook can still go "
            "out. A run cut short by it fails with deadline_exceeded."
        ),
    )
    clip_job_timeout_seconds: float = Field(
        default=600.0, gt=0, description="Time a job may run before it fails with job_timeout."
    )
    clip_retention_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="How long a finished job and its MP4 stay readable at /jobs/{id}.",
    )
    clip_name_max_length: int = Field(
        default=200, ge=1, description="Longest accepted `name` (characters)."
    )
    clip_extra_source_hosts: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description=(
            "Comma-separated hosts (host or host:port) admitted besides YouTube; their URLs "
            "go through yt-dlp's generic extractor. Empty in production."
        ),
    )
    clip_work_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "hermes-clip",
        description=(
            "Where each job's own directory of temporary files is made "
            "(default: hermes-clip in the system's temporary directory). Embedded mode also "
            "keeps its jobs there (jobs.sqlite3) and finished MP4s without a storage URL: "
            "put it on a lasting disk to keep them across reboots. One process per directory."
        ),
    )
    clip_max_range_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=65536,
        description=(
            "Largest HTTP range requested from a source: YouTube throttles larger ones to "
            "tens of KiB/s."
        ),
    )
    clip_proxy_buffer_bytes: int = Field(
        default=256 * 1024,
        ge=64 * 1024,
        description=(
            "Most of a source's data the egress proxy holds per connection that its client "
            "(yt-dlp, ffmpeg) has not read yet; what a client abandons, the source never "
            "sends. One connection's speed is at most this over the round trip to the source "
            "(256 KiB over 20 ms: about 100 Mbit/s)."
        ),
    )
    clip_video_bitrate_cap: str = Field(
        default="5M",
        pattern=r"^\d+(\.\d+)?[kKmMgG]?$",
        description=(
            "Peak video bitrate of re-encoded parts (ffmpeg -maxrate); lower still where the "
            "source's own video bitrate is lower, so the head and tail of a smart cut cost "
            "no more bytes per second than the frames copied between them."
        ),
    )
    ytdlp_cookie_file: str | None = Field(
        default=None,
        description=(
            "A Netscape cookies file yt-dlp sends to YouTube, for videos that need a signed-in "
            "account or when YouTube asks to prove this is not a bot."
        ),
    )
    ytdlp_proxy: str | None = Field(
        default=None,
        description=(
            "Proxy URL for yt-dlp's and ffmpeg's requests to sources (e.g. when this host's IP "
            "is blocked). Unset, both go through the built-in egress proxy that refuses "
            "private addresses."
        ),
    )
    webhook_window_seconds: float = Field(
        default=1800.0,
        gt=0,
        description=(
            "How long a webhook is retried (network errors, timeouts, 5xx) before it is given "
            "up; shorter than the 45 minutes after which Ouro refuses a late result."
        ),
    )
    webhook_backoff_seconds: float = Field(
        default=1.0, gt=0, description="First wait between webhook tries; doubles each time."
    )
    webhook_backoff_max_seconds: float = Field(
        default=120.0, gt=0, description="Longest wait between two webhook tries."
    )
    webhook_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Time limit of one webhook POST."
    )
    webhook_success_status: str = Field(
        default="success", description="`status` of a successful webhook body."
    )
    webhook_error_status: str = Field(
        default="error", description="`status` of a failed job's webhook body."
    )
    webhook_secret: str | None = Field(
        default=None,
        description=(
            "With a Standard Webhooks secret (whsec_...), deliveries also carry webhook-id, "
            "webhook-timestamp and webhook-signature headers."
        ),
    )
    ouro_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OURO_API_KEY", "ouro_api_key"),
        description=(
            "The service owner's Ouro API key: with it, clip jobs write their steps and "
            "progress to the run's log on Ouro. Without it, nothing is sent."
        ),
    )
    ouro_backend_url: str = Field(
        default="https://api.ouro.foundation",
        validation_alias=AliasChoices("OURO_BACKEND_URL", "ouro_backend_url"),
        description="Ouro's API, for run logs.",
    )
    redis_url: str | None = Field(
        default=None,
        description=(
            "Redis URL for distributed clip jobs: the API enqueues to arq and "
            "`hermes-media worker` processes run them; needs HERMES_CLIP_STORAGE_URL. Unset: "
            "jobs run inside the API."
        ),
    )
    clip_queue_name: str = Field(
        default="hermes:clip",
        description="arq queue of this deployment; two deployments on one Redis need two names.",
    )
    clip_max_tries: int = Field(
        default=3,
        ge=1,
        description="Runs of a job whose failure is transient (source unreachable, rate-limited).",
    )
    clip_retry_backoff_seconds: float = Field(
        default=5.0, gt=0, description="Wait before the second run of a job; doubles after."
    )
    worker_shutdown_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        description=(
            "On SIGTERM a worker takes no new job and gives running ones this long to finish; "
            "the rest go back to the queue for another worker."
        ),
    )

    # YouTube in production: steering yt-dlp, its toolchain, and behaving under YouTube's limits.
    ytdlp_extractor_args: str = Field(
        default="",
        description=(
            "Extractor arguments for yt-dlp in its own syntax, e.g. "
            "`youtube:player_client=default,mweb;skip=dash`; several extractors separated by "
            "spaces. Checked at start-up with yt-dlp's own parser."
        ),
    )
    ytdlp_js_runtime: str = Field(
        default="deno",
        description=(
            "The JavaScript runtime yt-dlp solves YouTube's challenges with, as yt-dlp's "
            "`--js-runtimes` takes it: `deno`, `node`, `bun` or `quickjs`, optionally with "
            "`:PATH` (the binary or its folder). `deno` alone is found in this environment's "
            "scripts folder, then on PATH."
        ),
    )
    ytdlp_pot_provider_url: str | None = Field(
        default=None,
        description=(
            "Base URL of a bgutil-ytdlp-pot-provider server (needs `hermes-media[pot]`); "
            "yt-dlp then asks it for PO tokens. It must reach yt-dlp's proxy: see README."
        ),
    )
    youtube_cooldown_seconds: float = Field(
        default=600.0,
        ge=0,
        description=(
            "After YouTube rate-limits an egress address, how long no request is made from it; "
            "new jobs fail at once with rate_limited and a Retry-After (shared through Redis "
            "in distributed mode). 0 turns it off."
        ),
    )
    ytdlp_extraction_cache_seconds: float = Field(
        default=300.0,
        ge=0,
        description=(
            "How long a video's extraction (its formats and signed media URLs) is reused by "
            "the same process, so repeated clips of one video ask YouTube once. 0 turns it off."
        ),
    )
    clip_canary_url: str | None = Field(
        default=None,
        description=(
            "A video clipped periodically (from 61 s in) as a canary; its result is exported "
            "at /metrics (hermes_clip_canary_*). Unset: no canary."
        ),
    )
    clip_canary_interval_seconds: float = Field(
        default=3600.0, gt=0, description="Time between two canary runs."
    )

    # Result storage: where finished MP4s are kept, and how callers get them.
    clip_storage_url: str | None = Field(
        default=None,
        description=(
            "Where finished MP4s are kept: s3://bucket/prefix (endpoint, region and credentials "
            "from the usual AWS_* variables, e.g. AWS_ENDPOINT_URL for MinIO or R2), or an "
            "absolute directory (in distributed mode, one every replica and worker mounts). "
            "Required in distributed mode (results are never kept in Redis); unset in the "
            "embedded mode: each job's own directory."
        ),
    )
    clip_storage_public_endpoint: str | None = Field(
        default=None,
        description=(
            "The object store's address as callers reach it, when it differs from "
            "AWS_ENDPOINT_URL inside the deployment: presigned download URLs are made for it."
        ),
    )

    @field_validator("clip_storage_url")
    @classmethod
    def _check_storage_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if value.startswith("s3://"):
            if not value.removeprefix("s3://").split("/", 1)[0]:
                raise ValueError("an s3:// storage URL needs a bucket: s3://bucket/prefix")
            return value
        if "://" in value or not Path(value).is_absolute():
            raise ValueError("the storage URL must be s3://bucket/prefix or an absolute directory")
        return value

    @model_validator(mode="after")
    def _check_distributed_storage(self) -> ClipSettings:
        if self.redis_url and self.clip_storage_url is None:
            raise ValueError(DISTRIBUTED_NEEDS_STORAGE)
        return self

    @field_validator("clip_extra_source_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(h.strip().lower() for h in value.split(",") if h.strip())
        return value

    @field_validator("ytdlp_extractor_args")
    @classmethod
    def _check_extractor_args(cls, value: str) -> str:
        parse_extractor_args(value)
        return value

    @field_validator("ytdlp_js_runtime")
    @classmethod
    def _check_js_runtime(cls, value: str) -> str:
        js_runtimes(value)
        return value
