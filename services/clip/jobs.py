"""Clip jobs: their public state, the result handed to Ouro, and the embedded queue.

The embedded queue runs jobs as asyncio tasks in the API process, at most
``clip_concurrency`` at once, each within ``clip_job_timeout_seconds``. Every job works in its
own directory, removed when the job fails, times out or is cancelled, and when its result is
no longer kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from services.clip.delivery import WebhookSender
from services.clip.pipeline import ClipResult, make_clip
from services.clip.request import ClipSpec, safe_filename
from services.clip.settings import ClipSettings
from services.clip.source import ClipFailed
from services.common.errors import ErrorDetail, HermesError, Unavailable
from services.common.ouro import OuroHeaders, OutputFile, WebhookBody

logger = logging.getLogger(__name__)


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
    cut: str = Field(description="How the clip was cut: `reencode`.")


class JobView(BaseModel):
    """GET /jobs/{job_id}."""

    job_id: str
    status: JobStatus
    progress: float = Field(ge=0, le=1, description="0 to 1, live while the job runs.")
    stage: str = Field(description="What the job is doing now.")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: ErrorDetail | None = None
    result: ClipFacts | None = None
    webhook: WebhookState


class JobTimeout(ClipFailed):
    code = "job_timeout"


class Cancelled(ClipFailed):
    code = "cancelled"


class QueueFull(Unavailable):
    code = "queue_full"


@dataclass
class Job:
    spec: ClipSpec
    ouro: OuroHeaders
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.queued
    progress: float = 0.0
    stage: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: ErrorDetail | None = None
    result: ClipFacts | None = None
    file: Path | None = None
    webhook: WebhookState = WebhookState.none
    task: asyncio.Task[None] | None = None

    def view(self) -> JobView:
        return JobView(
            job_id=self.job_id,
            status=self.status,
            progress=round(self.progress, 4),
            stage=self.stage,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            error=self.error,
            result=self.result,
            webhook=self.webhook,
        )


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
    )


def success_response(facts: ClipFacts, data: bytes) -> dict[str, Any]:
    """The webhook's ``response`` on success: the file payload, and the facts beside it."""
    payload = OutputFile.of(
        data, name=facts.name, filename=facts.filename, mime="video/mp4", extension="mp4"
    )
    return {"file": payload.model_dump(), **facts.model_dump()}


def webhook_body(
    settings: ClipSettings, ouro: OuroHeaders, response: dict[str, Any], ok: bool
) -> dict[str, Any]:
    status = settings.webhook_success_status if ok else settings.webhook_error_status
    body = WebhookBody(
        status=status,
        ouro_action_id=ouro.action_id,
        ouro_route_id=ouro.route_id,
        response=response,
    )
    return body.model_dump()


class EmbeddedQueue:
    """Runs clip jobs inside the API process; the default when no Redis is configured."""

    def __init__(self, settings: ClipSettings, sender: WebhookSender) -> None:
        self.settings = settings
        self._sender = sender
        self._jobs: dict[str, Job] = {}
        self._slots = asyncio.Semaphore(settings.clip_concurrency)

    async def submit(self, spec: ClipSpec, ouro: OuroHeaders) -> JobView:
        self._expire()
        active = sum(1 for j in self._jobs.values() if j.finished_at is None)
        if active >= self.settings.clip_max_queued:
            raise QueueFull(
                f"{active} clip jobs are already waiting or running; try again shortly."
            )
        job = Job(spec=spec, ouro=ouro)
        self._jobs[job.job_id] = job
        job.task = asyncio.create_task(self._run(job), name=f"clip-{job.job_id}")
        logger.info("job %s accepted (action %s)", job.job_id, ouro.action_id)
        return job.view()

    def get(self, job_id: str) -> Job | None:
        self._expire()
        return self._jobs.get(job_id)

    async def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is not None and job.task is not None and job.finished_at is None:
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        return job

    async def close(self) -> None:
        """Cancel running jobs; their error webhooks get a few seconds to go out."""
        tasks = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        _, late = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in self._jobs.values():
            shutil.rmtree(self._dir(job), ignore_errors=True)

    def _dir(self, job: Job) -> Path:
        return self.settings.clip_work_dir / job.job_id

    def _expire(self) -> None:
        cutoff = time.time() - self.settings.clip_retention_seconds
        for job_id, job in list(self._jobs.items()):
            if job.finished_at is not None and job.finished_at < cutoff:
                shutil.rmtree(self._dir(job), ignore_errors=True)
                del self._jobs[job_id]

    async def _run(self, job: Job) -> None:
        response: dict[str, Any]
        try:
            async with self._slots:
                response = await self._work(job)
                ok = True
        except HermesError as exc:
            response, ok = self._fail(job, exc), False
        except asyncio.CancelledError:
            response = self._fail(job, Cancelled("The job was cancelled before it finished."))
            if job.ouro.webhook_url:
                await self._deliver(job, webhook_body(self.settings, job.ouro, response, False))
            raise
        except Exception:
            logger.exception("job %s failed unexpectedly", job.job_id)
            error = ClipFailed("The clip could not be made; the failure has been logged.")
            response, ok = self._fail(job, error), False
        if job.ouro.webhook_url:
            await self._deliver(job, webhook_body(self.settings, job.ouro, response, ok))

    async def _work(self, job: Job) -> dict[str, Any]:
        job.status, job.started_at, job.stage = JobStatus.running, time.time(), "starting"
        workdir = self._dir(job)
        workdir.mkdir(parents=True, exist_ok=True)

        def report(stage: str, progress: float) -> None:
            job.stage, job.progress = stage, max(job.progress, progress)

        try:
            async with asyncio.timeout(self.settings.clip_job_timeout_seconds):
                result = await make_clip(job.spec, workdir, self.settings, report)
        except TimeoutError as exc:
            raise JobTimeout(
                f"The job took longer than {self.settings.clip_job_timeout_seconds:g} s."
            ) from exc
        facts = facts_of(job.spec, result)
        data = await asyncio.to_thread(result.path.read_bytes)
        job.status, job.finished_at, job.progress = JobStatus.succeeded, time.time(), 1.0
        job.stage, job.result, job.file = "done", facts, result.path
        logger.info("job %s succeeded: %d bytes", job.job_id, facts.bytes)
        return success_response(facts, data)

    def _fail(self, job: Job, error: HermesError) -> dict[str, Any]:
        shutil.rmtree(self._dir(job), ignore_errors=True)
        job.status, job.finished_at, job.stage = JobStatus.failed, time.time(), "failed"
        job.error = ErrorDetail(code=error.code, message=error.message)
        logger.info("job %s failed: %s", job.job_id, error.code)
        return {"error": job.error.model_dump()}

    async def _deliver(self, job: Job, body: dict[str, Any]) -> None:
        assert job.ouro.webhook_url is not None
        job.webhook = WebhookState.pending
        delivered = await self._sender.deliver(
            job.ouro.webhook_url, body, token=job.ouro.webhook_token, job_id=job.job_id
        )
        job.webhook = WebhookState.delivered if delivered else WebhookState.failed
