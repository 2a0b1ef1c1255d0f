"""Clip jobs: their public state, the result handed to Ouro, running one, and the queues.

``ClipQueue`` is what the API needs of a queue. ``EmbeddedQueue`` (this module) runs jobs as
asyncio tasks inside the API process, the default; ``distributed.ArqQueue`` runs them on arq
workers sharing a Redis. Both run a job through ``run_job``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from services.clip.delivery import WebhookSender
from services.clip.errors import ClipFailed
from services.clip.fetch.gate import SourceGate
from services.clip.ouro_log import RunLog
from services.clip.pipeline import ClipResult, make_clip
from services.clip.request import ClipSpec, safe_filename
from services.clip.settings import ClipSettings
from services.common import observability
from services.common.errors import ErrorDetail, HermesError, Unavailable
from services.common.ouro import OuroHeaders, OutputFile, WebhookBody

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
    filename: str
    data: bytes


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


def success_response(facts: ClipFacts, data: bytes) -> dict[str, Any]:
    """The webhook's ``response`` on success: the file payload, and the facts beside it."""
    payload = OutputFile.of(
        data, name=facts.name, filename=facts.filename, mime="video/mp4", extension="mp4"
    )
    return {"file": payload.model_dump(), **facts.model_dump()}


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
) -> tuple[ClipFacts, bytes]:
    """One run of a clip job, within the job time limit; the MP4's bytes and its facts.

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
        data = await asyncio.to_thread(result.path.read_bytes)
        facts = facts_of(spec, result)
        run_log.note(f"Clip ready: {facts.clip_duration:.2f} s, {facts.bytes} bytes.")
        return facts, data
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
    file: Path | None = None
    task: asyncio.Task[None] | None = None
    delivery: asyncio.Task[None] | None = None


@dataclass
class EmbeddedQueue:
    """Runs clip jobs inside the API process; the default when no Redis is configured."""

    settings: ClipSettings
    sender: WebhookSender
    _jobs: dict[str, _Job] = field(default_factory=dict)
    _keys: dict[str, str] = field(default_factory=dict)
    _slots: asyncio.Semaphore = field(init=False)
    gate: SourceGate = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.settings.clip_concurrency)
        self.gate = SourceGate.local(self.settings)

    async def submit(self, spec: ClipSpec, ouro: OuroHeaders, key: str | None) -> JobView:
        self._expire()
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
        self._expire()
        job = self._jobs.get(job_id)
        return job.view if job is not None else None

    async def file(self, job_id: str) -> JobFile | None:
        self._expire()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.file is None or job.view.result is None:
            raise JobNotReady(
                f"The job is {job.view.status.value}; its file exists once it succeeds."
            )
        data = await asyncio.to_thread(job.file.read_bytes)
        return JobFile(filename=job.view.result.filename, data=data)

    async def cancel(self, job_id: str) -> JobView | None:
        job = self._jobs.get(job_id)
        if job is not None and job.task is not None and not job.task.done():
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        return job.view if job is not None else None

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

    def _expire(self) -> None:
        cutoff = time.time() - self.settings.clip_retention_seconds
        for job_id, job in list(self._jobs.items()):
            done = job.view.finished and (job.delivery is None or job.delivery.done())
            if done and job.view.finished_at is not None and job.view.finished_at < cutoff:
                shutil.rmtree(self.settings.clip_work_dir / job_id, ignore_errors=True)
                del self._jobs[job_id]
        self._keys = {k: v for k, v in self._keys.items() if v in self._jobs}

    async def _run(self, job: _Job) -> None:
        view = job.view
        observability.job_id.set(view.job_id)
        observability.action_id.set(job.ouro.action_id)
        try:
            async with self._slots:
                view.status, view.started_at, view.tries = JobStatus.running, time.time(), 1
                response, ok = await self._work(job), True
        except HermesError as exc:
            response, ok = self._fail(job, exc), False
        except asyncio.CancelledError:
            response = self._fail(job, Cancelled("The job was cancelled before it finished."))
            self._deliver(job, webhook_body(self.settings, job.ouro, response, ok=False))
            raise
        except Exception:
            logger.exception("job %s failed unexpectedly", view.job_id)
            error = ClipFailed("The clip could not be made; the failure has been logged.")
            response, ok = self._fail(job, error), False
        self._deliver(job, webhook_body(self.settings, job.ouro, response, ok=ok))

    async def _work(self, job: _Job) -> dict[str, Any]:
        view = job.view

        def report(stage: str, progress: float) -> None:
            view.stage, view.progress = stage, max(view.progress, round(progress, 4))

        with job_directory(self.settings.clip_work_dir, view.job_id) as workdir:
            facts, data = await run_job(
                job.spec, workdir, self.settings, report, job.ouro, self.gate
            )
            for leftover in workdir.iterdir():
                if leftover.name not in (LOCK_FILE, "clip.mp4"):
                    leftover.unlink()
            job.file = workdir / "clip.mp4"
        view.status, view.finished_at, view.progress = JobStatus.succeeded, time.time(), 1.0
        view.stage, view.result = "done", facts
        logger.info("job %s succeeded: %d bytes", view.job_id, facts.bytes)
        return success_response(facts, data)

    def _fail(self, job: _Job, error: HermesError) -> dict[str, Any]:
        shutil.rmtree(self.settings.clip_work_dir / job.view.job_id, ignore_errors=True)
        view = job.view
        view.status, view.finished_at, view.stage = JobStatus.failed, time.time(), "failed"
        view.error = ErrorDetail(code=error.code, message=error.message)
        logger.info("job %s failed: %s", view.job_id, error.code)
        return error_response(error)

    def _deliver(self, job: _Job, body: dict[str, Any]) -> None:
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
