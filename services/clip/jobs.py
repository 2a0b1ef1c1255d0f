"""Clip jobs: their public state, the result handed to Ouro, running one, and the queues.

``ClipQueue`` is what the API needs of a queue. ``EmbeddedQueue`` (this module) runs jobs as
asyncio tasks inside the API process, the default; ``distributed.ArqQueue`` runs them on arq
workers sharing a Redis. Both run a job through ``run_job``, keep its MP4 in a
``storage.ResultStore``, and build its webhook from the stored file (``webhook_payload``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from services.clip.delivery import Payload, WebhookSender
from services.clip.errors import ClipFailed
from services.clip.fetch.gate import SourceGate
from services.clip.ouro_log import RunLog
from services.clip.pipeline import ClipResult, make_clip
from services.clip.request import ClipSpec, safe_filename
from services.clip.settings import ClipSettings
from services.clip.storage import ResultStore
from services.common import observability
from services.common.errors import ErrorDetail, HermesError, Unavailable
from services.common.ouro import OuroHeaders, WebhookBody

logger = logging.getLogger(__name__)
LOCK_FILE = ".lock"


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


class JobTimeout(ClipFailed):
    code = "job_timeout"


class Cancelled(ClipFailed):
    code = "cancelled"


class QueueFull(Unavailable):
    code = "queue_full"


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
    async def submit(self, spec: ClipSpec, ouro: OuroHeaders, key: str | None) -> JobView: ...

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


@contextlib.contextmanager
def job_directory(root: Path, job_id: str) -> Iterator[Path]:
    """The job's own directory, locked while the job runs so a restart can tell it is alive."""
    directory = root / job_id
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_FILE).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield directory


def remove_stale_directories(root: Path) -> list[str]:
    """Remove job directories no running process holds the lock of (dead jobs' leftovers)."""
    removed: list[str] = []
    if not root.exists():
        return removed
    for directory in root.iterdir():
        lock_path = directory / LOCK_FILE
        if not directory.is_dir():
            continue
        try:
            with lock_path.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        except OSError:
            pass
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory.name)
    return removed


async def run_job(
    spec: ClipSpec,
    workdir: Path,
    settings: ClipSettings,
    report: Callable[[str, float], None],
    ouro: OuroHeaders,
    gate: SourceGate | None = None,
) -> tuple[ClipFacts, Path]:
    """One run of a clip job, within the job time limit; the MP4's facts and its path.

    Its steps also go to the run's log on Ouro when an API key is configured. ``gate`` is what
    the process's jobs share when asking the source (cool-down, extraction cache).
    """
    run_log = RunLog(settings, ouro)

    def step(stage: str, progress: float) -> None:
        report(stage, progress)
        run_log.step(stage, progress)

    try:
        async with asyncio.timeout(settings.clip_job_timeout_seconds):
            result = await make_clip(spec, workdir, settings, step, gate)
        facts = facts_of(spec, result)
        run_log.note(f"Clip ready: {facts.clip_duration:.2f} s, {facts.bytes} bytes.")
        return facts, result.path
    except TimeoutError as exc:
        error = JobTimeout(f"The job took longer than {settings.clip_job_timeout_seconds:g} s.")
        run_log.note(error.message, "error")
        raise error from exc
    except HermesError as exc:
        run_log.note(exc.message, "error")
        raise
    finally:
        await run_log.aclose()


@dataclass
class _Job:
    view: JobView
    spec: ClipSpec
    ouro: OuroHeaders
    task: asyncio.Task[None] | None = None
    delivery: asyncio.Task[None] | None = None


@dataclass
class EmbeddedQueue:
    """Runs clip jobs inside the API process; the default when no Redis is configured."""

    settings: ClipSettings
    sender: WebhookSender
    store: ResultStore
    _jobs: dict[str, _Job] = field(default_factory=dict)
    _keys: dict[str, str] = field(default_factory=dict)
    _slots: asyncio.Semaphore = field(init=False)
    gate: SourceGate = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.settings.clip_concurrency)
        self.gate = SourceGate.local(self.settings)

    async def submit(self, spec: ClipSpec, ouro: OuroHeaders, key: str | None) -> JobView:
        await self._expire()
        if key is not None and (existing := self._keys.get(key)) in self._jobs:
            return self._jobs[existing].view
        active = sum(1 for j in self._jobs.values() if not j.view.finished)
        if active >= self.settings.clip_max_queued:
            raise QueueFull(f"{active} clip jobs are already waiting or running; try again soon.")
        view = queued_view()
        job = _Job(view=view, spec=spec, ouro=ouro)
        self._jobs[view.job_id] = job
        if key is not None:
            self._keys[key] = view.job_id
        job.task = asyncio.create_task(self._run(job), name=f"clip-{view.job_id}")
        logger.info("job %s accepted (action %s)", view.job_id, ouro.action_id)
        return view

    async def get(self, job_id: str) -> JobView | None:
        await self._expire()
        job = self._jobs.get(job_id)
        return job.view if job is not None else None

    async def file(self, job_id: str) -> JobFile | None:
        await self._expire()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        view = job.view
        if view.status is not JobStatus.succeeded or view.result is None:
            raise JobNotReady(f"The job is {view.status.value}; its file exists once it succeeds.")
        assert view.finished_at is not None
        return await stored_file(
            self.store, job_id, view.result, view.finished_at, self.settings.clip_retention_seconds
        )

    async def cancel(self, job_id: str) -> JobView | None:
        """Cancel a job that has not ended; forget a finished one and delete its file."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.task is not None and not job.task.done():
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        elif job.view.finished:
            del self._jobs[job_id]
            if job.delivery is not None:
                job.delivery.cancel()
            if job.view.status is JobStatus.succeeded:
                await self.store.delete(job_id)
            shutil.rmtree(self.settings.clip_work_dir / job_id, ignore_errors=True)
        return job.view

    async def stats(self) -> dict[str, int]:
        counts = dict.fromkeys(JobStatus, 0)
        for job in self._jobs.values():
            counts[job.view.status] += 1
        return {status.value: count for status, count in counts.items()}

    async def close(self) -> None:
        """Cancel running jobs; their error webhooks get a few seconds to go out."""
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
        tasks = [t for j in self._jobs.values() for t in (j.task, j.delivery) if t is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for job_id in self._jobs:
            shutil.rmtree(self.settings.clip_work_dir / job_id, ignore_errors=True)

    async def _expire(self) -> None:
        cutoff = time.time() - self.settings.clip_retention_seconds
        for job_id, job in list(self._jobs.items()):
            done = job.view.finished and (job.delivery is None or job.delivery.done())
            if done and job.view.finished_at is not None and job.view.finished_at < cutoff:
                del self._jobs[job_id]
                if job.view.status is JobStatus.succeeded:
                    await self.store.delete(job_id)
                shutil.rmtree(self.settings.clip_work_dir / job_id, ignore_errors=True)
        self._keys = {k: v for k, v in self._keys.items() if v in self._jobs}

    async def _run(self, job: _Job) -> None:
        view = job.view
        observability.job_id.set(view.job_id)
        observability.action_id.set(job.ouro.action_id)
        try:
            async with self._slots:
                view.status, view.started_at, view.tries = JobStatus.running, time.time(), 1
                payload = await self._work(job)
        except HermesError as exc:
            payload = self._fail(job, exc)
        except asyncio.CancelledError:
            self._deliver(
                job, self._fail(job, Cancelled("The job was cancelled before it finished."))
            )
            raise
        except Exception:
            logger.exception("job %s failed unexpectedly", view.job_id)
            payload = self._fail(job, ClipFailed("The clip could not be made; it is logged."))
        self._deliver(job, payload)

    async def _work(self, job: _Job) -> Payload:
        view = job.view

        def report(stage: str, progress: float) -> None:
            view.stage, view.progress = stage, max(view.progress, round(progress, 4))

        with job_directory(self.settings.clip_work_dir, view.job_id) as workdir:
            facts, clip = await run_job(
                job.spec, workdir, self.settings, report, job.ouro, self.gate
            )
            for leftover in workdir.iterdir():
                if leftover not in (workdir / LOCK_FILE, clip):
                    leftover.unlink()
            view.stage = "storing"
            await self.store.put(view.job_id, clip, facts.filename)
        view.status, view.finished_at, view.progress = JobStatus.succeeded, time.time(), 1.0
        view.stage, view.result = "done", facts
        logger.info("job %s succeeded: %d bytes", view.job_id, facts.bytes)
        return success_payload(self.settings, job.ouro, facts, self.store, view.job_id)

    def _fail(self, job: _Job, error: HermesError) -> Payload:
        shutil.rmtree(self.settings.clip_work_dir / job.view.job_id, ignore_errors=True)
        view = job.view
        view.status, view.finished_at, view.stage = JobStatus.failed, time.time(), "failed"
        view.error = ErrorDetail(code=error.code, message=error.message)
        logger.info("job %s failed: %s", view.job_id, error.code)
        return Payload.of(webhook_body(self.settings, job.ouro, error_response(error), ok=False))

    def _deliver(self, job: _Job, body: Payload) -> None:
        """Delivery runs beside the job, so a slow receiver never holds a job slot."""
        url = job.ouro.webhook_url
        if url is None:
            return
        job.view.webhook = WebhookState.pending

        async def deliver() -> None:
            delivered = await self.sender.deliver(
                url, body, token=job.ouro.webhook_token, delivery_id=job.view.job_id
            )
            job.view.webhook = WebhookState.delivered if delivered else WebhookState.failed

        job.delivery = asyncio.create_task(deliver(), name=f"webhook-{job.view.job_id}")
