"""The download-a-clip-from-youtube API: check the request, queue the job, answer 202.

The job's result goes to ``ouro-webhook-url`` (declared as an OpenAPI callback) and can be
read at ``/jobs/{job_id}``, for direct callers who have no webhook.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, Header, Path, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from prometheus_client import Gauge
from pydantic import BaseModel, Field

from services.clip import canary
from services.clip.canary import CanaryResult
from services.clip.ffmpeg import ffmpeg_exe
from services.clip.jobs.delivery import WebhookSender, webhook_client, webhook_sender
from services.clip.jobs.distributed.api import ArqQueue
from services.clip.jobs.embedded import EmbeddedQueue
from services.clip.jobs.model import ClipFacts, ClipQueue, JobView
from services.clip.jobs.sqlite_store import JobDatabase
from services.clip.jobs.storage import ResultStore, content_disposition, open_store
from services.clip.request import build_spec, byte_budget
from services.clip.settings import ClipSettings
from services.clip.toolchain import ToolchainStatus
from services.common.asgi import create_base_app
from services.common.errors import ErrorDetail, NotFound, error_responses
from services.common.ouro import OuroHeaders, OutputFile

logger = logging.getLogger(__name__)
ROUTE = "/download-a-clip-from-youtube"
LOCAL = "local"
JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="The job id from the 202.")]


class ClipRequest(BaseModel):
    youtube_url: str = Field(max_length=2048, description="The YouTube video URL")
    start_time: str = Field(max_length=32, description="Start time in HH:MM:SS or MM:SS format")
    end_time: str = Field(max_length=32, description="End time in HH:MM:SS or MM:SS format")
    name: str | None = Field(
        default=None,
        max_length=1000,
        description="Optional name for the file asset. If not provided, uses the video title.",
    )
    max_height: Literal[144, 240, 360, 480, 720, 1080, 1440, 2160] | None = Field(
        default=None,
        description=(
            "Optional: the tallest video wanted, in pixels. The service takes the tallest "
            "format up to this and its own limit whose clip fits the size limit."
        ),
    )

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "youtube_url": "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
                    "start_time": "00:00:42",
                    "end_time": "00:01:02",
                    "name": "The chorus",
                }
            ]
        }
    }


class Accepted(BaseModel):
    status: str = Field(default="accepted")
    job_id: str = Field(description="Read the job at /jobs/{job_id} (the Location header).")


class ClipSuccess(ClipFacts):
    file: OutputFile


class ClipError(BaseModel):
    error: ErrorDetail


class ClipWebhook(BaseModel):
    status: str = Field(description="`success` or `error` (configurable).")
    ouro_action_id: str | None
    ouro_route_id: str | None
    response: ClipSuccess | ClipError


webhooks = APIRouter()


@webhooks.post("{$request.header.ouro-webhook-url}", summary="The job's result")
def job_result(body: ClipWebhook) -> None:
    """POSTed once the job ends, with the `ouro-webhook-token` header of the request."""


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ClipSettings = app.state.settings
    queue: ClipQueue
    canary_task = None
    if settings.redis_url:
        # The API runs no yt-dlp: the workers check their own toolchains and run the canary.
        arq_queue = await ArqQueue.connect(settings)
        queue, client, store = arq_queue, None, arq_queue.results
    else:
        # First, so a second process on the same work directory stops before touching it.
        jobs = await JobDatabase.open(settings.clip_work_dir)
        client = webhook_client(settings)
        app.state.sender = webhook_sender(settings, client)
        store = open_store(settings)
        embedded = EmbeddedQueue(settings, app.state.sender, store, jobs)
        await embedded.start()
        queue = embedded
        app.state.toolchain = ToolchainStatus(settings)
        await app.state.toolchain.current()
        if settings.clip_canary_url:

            def keep(result: CanaryResult) -> None:
                app.state.canaries = {LOCAL: result}

            canary_task = asyncio.create_task(
                canary.run_periodically(settings, embedded.gate, keep)
            )
    app.state.queue, app.state.store = queue, store
    try:
        yield
    finally:
        if canary_task is not None:
            canary_task.cancel()
            await asyncio.gather(canary_task, return_exceptions=True)
        await queue.close()
        if client is not None:
            await client.aclose()


async def _readiness(app: FastAPI) -> dict[str, bool]:
    checks = {"ffmpeg": os.access(ffmpeg_exe(), os.X_OK)}
    queue = getattr(app.state, "queue", None)
    if isinstance(queue, ArqQueue):
        checks["redis"] = await queue.ping()
        # Ready while at least one live worker can clip YouTube.
        checks["worker_youtube_toolchain"] = any(w.ready for w in await queue.workers())
    toolchain: ToolchainStatus | None = getattr(app.state, "toolchain", None)
    if toolchain is not None:
        checks.update({f"youtube_{c.name}": c.ok for c in await toolchain.current()})
    store: ResultStore | None = getattr(app.state, "store", None)
    if store is not None and app.state.settings.clip_storage_url is not None:
        checks["storage"] = await store.ping()
    return checks


async def _refresh_metrics(app: FastAPI) -> None:
    queue: ClipQueue | None = getattr(app.state, "queue", None)
    if queue is not None:
        for status, count in (await queue.stats()).items():
            app.state.jobs_gauge.labels(status).set(count)
    canaries: dict[str, CanaryResult] = getattr(app.state, "canaries", {})
    if isinstance(queue, ArqQueue):
        canaries = {w.worker: w.canary for w in await queue.workers() if w.canary is not None}
    for worker, result in canaries.items():
        app.state.canary_ok_gauge.labels(worker).set(1 if result.ok else 0)
        app.state.canary_time_gauge.labels(worker).set(result.finished_at)
        for step, seconds in result.steps.items():
            app.state.canary_step_gauge.labels(worker, step).set(seconds)
    sender: WebhookSender | None = getattr(app.state, "sender", None)
    if sender is not None:
        for outcome, count in sender.outcomes.items():
            app.state.webhooks_gauge.labels(outcome.value).set(count)


def caller_of(ouro: OuroHeaders, request: Request) -> str:
    """Whose fair share a job counts against: the Ouro user, else the client's address."""
    if ouro.user_id:
        return f"user:{ouro.user_id}"
    return f"address:{request.client.host if request.client else 'unknown'}"


def create_app(settings: ClipSettings | None = None) -> FastAPI:
    settings = settings or ClipSettings()
    app = create_base_app(
        settings,
        title="hermes-media: download-a-clip-from-youtube",
        description="Download a specific time range from a YouTube video as an MP4 clip.",
        lifespan=_lifespan,
        readiness=_readiness,
        refresh_metrics=_refresh_metrics,
    )
    app.state.settings = settings
    registry = app.state.metrics.registry
    app.state.jobs_gauge = Gauge(
        "hermes_clip_jobs", "Clip jobs by status (distributed: queued only).", ["status"],
        registry=registry,
    )  # fmt: skip
    app.state.canary_ok_gauge = Gauge(
        "hermes_clip_canary_ok",
        "1 when the last canary clip succeeded, 0 when it failed; by worker (local: the API).",
        ["worker"],
        registry=registry,
    )
    app.state.canary_time_gauge = Gauge(
        "hermes_clip_canary_last_run_timestamp_seconds", "When the last canary run ended.",
        ["worker"], registry=registry,
    )  # fmt: skip
    app.state.canary_step_gauge = Gauge(
        "hermes_clip_canary_step_seconds", "Seconds the last canary run spent in each step.",
        ["worker", "step"], registry=registry,
    )  # fmt: skip
    app.state.webhooks_gauge = Gauge(
        "hermes_webhook_attempts",
        "Webhook delivery attempts by outcome, by this process (delivered, refused, retry).",
        ["outcome"],
        registry=registry,
    )

    def queue(request: Request) -> ClipQueue:
        found: ClipQueue = request.app.state.queue
        return found

    def missing() -> NotFound:
        return NotFound("No such job; finished jobs are kept for a limited time.")

    @app.post(
        ROUTE,
        status_code=202,
        summary="Download a clip from YouTube",
        description="Download a specific time range from a YouTube video as an MP4 clip.",
        response_model=Accepted,
        responses={
            202: {
                "headers": {
                    "Location": {"description": "/jobs/{job_id}", "schema": {"type": "string"}}
                }
            },
            **error_responses(400, 401, 422, 429, 503),
            429: {
                **error_responses(429)[429],
                "description": "too_many_jobs: the caller's share of the queue is full.",
                "headers": {
                    "Retry-After": {
                        "description": "Seconds after which a new job may be accepted.",
                        "schema": {"type": "integer"},
                    }
                },
            },
        },
        callbacks=webhooks.routes,
        openapi_extra={
            "x-ouro-output-assets": {
                "file": {"asset_type": "file", "primary": True, "file_extensions": ["mp4"]}
            },
            "x-ouro-execution-mode": "async",
        },
    )
    async def download_a_clip(
        body: ClipRequest,
        request: Request,
        idempotency_key: Annotated[
            str | None,
            Header(
                max_length=200,
                description="Direct callers: a repeated key returns the first job, runs nothing.",
            ),
        ] = None,
    ) -> JSONResponse:
        ouro = OuroHeaders.from_request(request)
        spec = build_spec(
            youtube_url=body.youtube_url,
            start_time=body.start_time,
            end_time=body.end_time,
            name=body.name,
            extra_hosts=settings.clip_extra_source_hosts,
            max_seconds=settings.clip_max_seconds,
            max_name_length=settings.clip_name_max_length,
            # The webhook carries the clip in its body; a direct caller reads it as a file.
            max_bytes=byte_budget(settings, webhook=ouro.webhook_url is not None),
            max_height=body.max_height,
        )
        key = f"action:{ouro.action_id}" if ouro.action_id else None
        if key is None and idempotency_key:
            key = f"key:{idempotency_key}"
        view = await queue(request).submit(spec, ouro, key, caller_of(ouro, request))
        return JSONResponse(
            Accepted(job_id=view.job_id).model_dump(),
            status_code=202,
            headers={"location": f"/jobs/{view.job_id}"},
        )

    @app.get(
        "/jobs/{job_id}",
        summary="Read a clip job",
        response_model=JobView,
        responses=error_responses(401, 404, 422),
    )
    async def read_job(job_id: JobId, request: Request) -> JobView:
        view = await queue(request).get(job_id)
        if view is None:
            raise missing()
        return view

    @app.get(
        "/jobs/{job_id}/file",
        summary="Download a finished clip",
        description=(
            "The MP4, streamed; or, when results are kept in object storage, a redirect to a "
            "presigned URL that is valid while the result is kept."
        ),
        response_class=Response,
        responses={
            200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
            307: {
                "description": "Redirect to a presigned URL of the MP4 in object storage.",
                "headers": {"Location": {"schema": {"type": "string"}}},
            },
            **error_responses(401, 404, 409, 422, 503),
        },
    )
    async def read_job_file(job_id: JobId, request: Request) -> Response:
        found = await queue(request).file(job_id)
        if found is None:
            raise missing()
        if found.url is not None:
            return RedirectResponse(found.url, status_code=307)
        return StreamingResponse(
            found.chunks(),
            media_type="video/mp4",
            headers={
                "content-disposition": content_disposition(found.filename),
                "content-length": str(found.size),
            },
        )

    @app.delete(
        "/jobs/{job_id}",
        summary="Cancel a clip job, or delete a finished one and its file",
        response_model=JobView,
        responses=error_responses(401, 404, 422),
    )
    async def cancel_job(job_id: JobId, request: Request) -> JobView:
        view = await queue(request).cancel(job_id)
        if view is None:
            raise missing()
        return view

    return app
