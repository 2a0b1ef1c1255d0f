"""The embedded queue: clip jobs run as asyncio tasks inside the API process, the default."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field

from services.clip.errors import ClipFailed
from services.clip.fetch.gate import SourceGate
from services.clip.jobs.delivery import Payload, WebhookSender
from services.clip.jobs.model import (
    Cancelled,
    JobFile,
    JobNotReady,
    JobStatus,
    JobView,
    QueueFull,
    WebhookState,
    error_response,
    queued_view,
    stored_file,
    success_payload,
    webhook_body,
)
from services.clip.jobs.runner import LOCK_FILE, job_directory, run_job
from services.clip.jobs.storage import ResultStore
from services.clip.request import ClipSpec
from services.clip.settings import ClipSettings
from services.common import observability
from services.common.errors import ErrorDetail, HermesError
from services.common.ouro import OuroHeaders

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    view: JobView
    spec: ClipSpec
    ouro: OuroHeaders
    caller: str
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

    async def submit(
        self, spec: ClipSpec, ouro: OuroHeaders, key: str | None, caller: str
    ) -> JobView:
        await self._expire()
        if key is not None and (existing := self._keys.get(key)) in self._jobs:
            return self._jobs[existing].view
        active = sum(1 for j in self._jobs.values() if not j.view.finished)
        if active >= self.settings.clip_max_queued:
            raise QueueFull(f"{active} clip jobs are already waiting or running; try again soon.")
        view = queued_view()
        job = _Job(view=view, spec=spec, ouro=ouro, caller=caller)
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
