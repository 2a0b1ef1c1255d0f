"""What a clip job is to its callers: its state, its result's facts, the webhook body, its errors.

``ClipQueue`` is what the API needs of a queue; ``embedded.EmbeddedQueue`` and
``distributed.ArqQueue`` are the two there are.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, Field

from services.clip.errors import ClipFailed
from services.clip.jobs.delivery import Payload
from services.clip.jobs.storage import ResultStore
from services.clip.pipeline import ClipResult
from services.clip.request import ClipSpec, SourceUrl, safe_filename
from services.clip.settings import ClipSettings
from services.common.errors import ErrorDetail, HermesError, TooManyRequests, Unavailable
from services.common.ouro import OuroHeaders, WebhookBody


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class WebhookState(StrEnum):
    none = "none"
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class ClipFacts(BaseModel):
    """What a finished clip is, beside its bytes."""

    name: str = Field(description="The asset name: `name` if given, else the video title.")
    filename: str
    title: str = Field(description="The video's title.")
    source_duration: float = Field(description="Length of the whole video, seconds.")
    start: float
    end: float
    clip_duration: float = Field(description="Length of the MP4, seconds.")
    bytes: int
    width: int
    height: int
    cut: str = Field(
        description="`smart` (only the head and tail re-encoded) or `reencode` (all of it)."
    )
    format_height: int | None = Field(
        default=None,
        description="Height of the source format the clip was made from (null when unknown).",
    )
    format_bitrate: int | None = Field(
        default=None,
        description=(
            "Bitrate of the source formats the clip was made from (video and audio), kbit/s, "
            "as the source gives it (null when it does not)."
        ),
    )
    reduced_to_fit: bool = Field(
        default=False,
        description=(
            "True when a shorter or leaner format than the tallest allowed was taken so the "
            "clip fits its byte budget (the webhook's, or a direct caller's)."
        ),
    )


class JobView(BaseModel):
    """GET /jobs/{job_id}."""

    job_id: str
    status: JobStatus
    progress: float = Field(ge=0, le=1, description="0 to 1, live while the job runs.")
    stage: str = Field(description="What the job is doing now.")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    tries: int = Field(default=0, description="Runs so far; transient failures are retried.")
    error: ErrorDetail | None = None
    result: ClipFacts | None = None
    webhook: WebhookState = WebhookState.none

    @property
    def finished(self) -> bool:
        return self.status in (JobStatus.succeeded, JobStatus.failed)


class JobRecord(BaseModel):
    """A job as a queue keeps it: what callers see, the request, Ouro's headers, the caller."""

    view: JobView
    spec: dict[str, Any]
    ouro: OuroHeaders
    caller: str

    def clip_spec(self) -> ClipSpec:
        spec = dict(self.spec)
        return ClipSpec(source=SourceUrl(**spec.pop("source")), **spec)


class JobTimeout(ClipFailed):
    code = "job_timeout"


class Cancelled(ClipFailed):
    code = "cancelled"


class DeadlineExceeded(ClipFailed):
    code = "deadline_exceeded"


DEADLINE_PASSED = "The job could not be finished within its deadline; ask for it again."
# The end of a job's deadline is kept for delivering its webhook: runs end this much before.
DELIVERY_RESERVE_SECONDS = 300.0


def runs_end_by(created_at: float, settings: ClipSettings) -> float:
    """When a job's runs must have ended, so its webhook can still go out within the deadline."""
    return created_at + settings.clip_deadline_seconds - DELIVERY_RESERVE_SECONDS


def deliveries_end_by(created_at: float, settings: ClipSettings) -> float:
    """When a job's webhook deliveries stop: its deadline."""
    return created_at + settings.clip_deadline_seconds


class QueueFull(Unavailable):
    code = "queue_full"


class QueueUnavailable(Unavailable):
    """Where the queue keeps its jobs (Redis, the job database) cannot be reached."""

    code = "queue_unavailable"


class TooManyJobs(TooManyRequests):
    code = "too_many_jobs"


class JobNotReady(HermesError):
    status_code = 409
    code = "job_not_ready"


@dataclass(frozen=True)
class JobFile:
    """A stored result: callers are sent to ``url`` when the store signs one, else streamed."""

    filename: str
    size: int
    url: str | None
    chunks: Callable[[], AsyncIterator[bytes]]


async def stored_file(
    store: ResultStore, job_id: str, facts: ClipFacts, finished_at: float, retention: float
) -> JobFile | None:
    """The job's result while it is kept: a presigned URL lives no longer than the result."""
    remaining = finished_at + retention - time.time()
    if remaining <= 0:
        return None
    size = await store.size(job_id)
    if size is None:
        return None
    url = await store.presign(job_id, remaining)
    return JobFile(facts.filename, size, url, lambda: store.chunks(job_id))


class ClipQueue(Protocol):
    async def submit(
        self, spec: ClipSpec, ouro: OuroHeaders, key: str | None, caller: str
    ) -> JobView:
        """Accept a job of ``caller`` (whose fair share it counts against), or raise."""
        ...

    async def get(self, job_id: str) -> JobView | None: ...

    async def file(self, job_id: str) -> JobFile | None: ...

    async def cancel(self, job_id: str) -> JobView | None: ...

    async def stats(self) -> dict[str, int]:
        """Jobs by status, as far as this queue can count them cheaply."""
        ...

    async def close(self) -> None: ...


def new_job_id() -> str:
    return uuid.uuid4().hex


def queued_view() -> JobView:
    """A new job, as it is the moment it is accepted."""
    return JobView(
        job_id=new_job_id(), status=JobStatus.queued, progress=0, stage="queued",
        created_at=time.time(),
    )  # fmt: skip


def facts_of(spec: ClipSpec, result: ClipResult) -> ClipFacts:
    name = spec.name or result.title
    return ClipFacts(
        name=name,
        filename=safe_filename(name, "mp4"),
        title=result.title,
        source_duration=result.source_duration,
        start=result.start,
        end=result.end,
        clip_duration=result.clip_duration,
        bytes=result.bytes,
        width=result.width,
        height=result.height,
        cut=result.cut,
        format_height=result.format_height,
        format_bitrate=result.format_bitrate,
        reduced_to_fit=result.reduced_to_fit,
    )


def success_payload(
    settings: ClipSettings, ouro: OuroHeaders, facts: ClipFacts, store: ResultStore, job_id: str
) -> Payload:
    """The success webhook, its file streamed from the store: the facts beside the file."""

    def build(base64: str) -> dict[str, Any]:
        file = {
            "name": facts.name, "description": None, "filename": facts.filename,
            "type": "video/mp4", "extension": "mp4", "base64": base64,
        }  # fmt: skip
        return webhook_body(settings, ouro, {"file": file, **facts.model_dump()}, ok=True)

    return Payload.around(build, lambda: store.chunks(job_id), facts.bytes)


def webhook_body(
    settings: ClipSettings, ouro: OuroHeaders, response: dict[str, Any], *, ok: bool
) -> dict[str, Any]:
    status = settings.webhook_success_status if ok else settings.webhook_error_status
    body = WebhookBody(
        status=status,
        ouro_action_id=ouro.action_id,
        ouro_route_id=ouro.route_id,
        response=response,
    )
    return body.model_dump()


def error_response(error: HermesError) -> dict[str, Any]:
    return {"error": {"code": error.code, "message": error.message}}
