"""The embedded queue: clip jobs run as asyncio tasks inside the API process, the default.

Jobs and their pending webhooks are kept in the work directory's SQLite database
(``sqlite_store``): a process started again on the same directory resumes queued and
interrupted jobs, sends the webhooks that were not yet delivered (under the same webhook-id),
and answers for finished jobs and their files until retention ends.

The ``clip_concurrency`` slots are shared fairly: a caller has at most
``clip_max_running_per_caller`` jobs running and ``clip_max_queued_per_caller`` waiting or
running (past it, 429 with an estimate of when one of theirs ends); a free slot goes to the
caller with the fewest jobs running, then to the one served longest ago, each caller's oldest
job first. Every job ends within its deadline:
one still waiting when its runs must end fails with deadline_exceeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from services.clip.errors import ClipFailed
from services.clip.fetch.gate import SourceGate
from services.clip.jobs.delivery import Payload, WebhookSender
from services.clip.jobs.model import (
    DEADLINE_PASSED,
    Cancelled,
    DeadlineExceeded,
    JobFile,
    JobNotReady,
    JobStatus,
    JobView,
    QueueFull,
    TooManyJobs,
    WebhookState,
    deliveries_end_by,
    queued_view,
    runs_end_by,
    stored_file,
    success_payload,
    webhook_body,
)
from services.clip.jobs.runner import LOCK_FILE, job_directory, remove_stale_directories, run_job
from services.clip.jobs.sqlite_store import JobDatabase, StoredRecord
from services.clip.jobs.storage import ResultStore
from services.clip.request import ClipSpec
from services.clip.settings import ClipSettings
from services.common import observability
from services.common.errors import ErrorDetail, HermesError
from services.common.ouro import OuroHeaders

logger = logging.getLogger(__name__)
# What a run is assumed to take before any has finished here, for Retry-After estimates.
FIRST_RUN_ESTIMATE_SECONDS = 30.0
# Weight of the latest run in the running estimate of a run's length.
RUN_ESTIMATE_WEIGHT = 0.2


class JobInterrupted(ClipFailed):
    code = "job_interrupted"


@dataclass(eq=False)
class _Job:
    record: StoredRecord
    task: asyncio.Task[None] | None = None
    delivery: asyncio.Task[None] | None = None
    turn: asyncio.Future[None] | None = None
    holds_slot: bool = False

    @property
    def view(self) -> JobView:
        return self.record.view

    @property
    def caller(self) -> str:
        return self.record.caller


@dataclass
class EmbeddedQueue:
    """Runs clip jobs inside the API process; the default when no Redis is configured."""

    settings: ClipSettings
    sender: WebhookSender
    store: ResultStore
    db: JobDatabase
    _jobs: dict[str, _Job] = field(default_factory=dict)
    _keys: dict[str, str] = field(default_factory=dict)
    _waiting: dict[str, deque[_Job]] = field(default_factory=dict)
    _running: Counter[str] = field(default_factory=Counter)
    # When each caller last got a slot (a count of slots given), for round-robin among callers.
    _served: dict[str, int] = field(default_factory=dict)
    _turns: int = 0
    _run_estimate: float = FIRST_RUN_ESTIMATE_SECONDS
    _closing: bool = False
    gate: SourceGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = SourceGate.local(self.settings)

    async def start(self) -> None:
        """Take up what the previous process on this work directory left.

        A job it was running is run again, unless it already ran ``clip_max_tries`` times (a
        job that keeps bringing the process down must not do so forever).
        """
        records = await self.db.load()
        interrupted: list[_Job] = []
        for record in records:
            job = _Job(record)
            self._jobs[record.view.job_id] = job
            if record.key is not None:
                self._keys[record.key] = record.view.job_id
            if record.view.status is JobStatus.running:
                interrupted.append(job)
        kept = [j.view.job_id for j in self._jobs.values() if j.view.status is JobStatus.succeeded]
        removed = await asyncio.to_thread(
            remove_stale_directories, self.settings.clip_work_dir, "", kept
        )
        for job in interrupted:
            if job.view.tries >= self.settings.clip_max_tries:
                await self._end(job, JobInterrupted(
                    f"The service stopped {job.view.tries} times while this job ran; it is "
                    "not run again."
                ))  # fmt: skip
            else:
                _requeue(job.view)
        await self.db.put(*(j.record for j in interrupted))
        for job in self._jobs.values():
            if not job.view.finished:
                job.task = asyncio.create_task(self._run(job), name=f"clip-{job.view.job_id}")
            elif job.view.webhook is WebhookState.pending:
                self._deliver(job)
        if records:
            logger.info(
                "resumed from %s: %d jobs (%d interrupted), %d stale directories removed",
                self.db.path, len(records), len(interrupted), len(removed),
            )  # fmt: skip

    async def submit(
        self, spec: ClipSpec, ouro: OuroHeaders, key: str | None, caller: str
    ) -> JobView:
        await self._expire()
        if key is not None and (existing := self._keys.get(key)) in self._jobs:
            return self._jobs[existing].view
        active = [j for j in self._jobs.values() if not j.view.finished]
        if len(active) >= self.settings.clip_max_queued:
            raise QueueFull(
                f"{len(active)} clip jobs are already waiting or running; try again soon."
            )
        mine = [j for j in active if j.caller == caller]
        if len(mine) >= self.settings.clip_max_queued_per_caller:
            raise TooManyJobs(
                f"You have {len(mine)} clip jobs waiting or running, the most one caller may "
                "have; ask again when one has ended.",
                self._retry_after(mine),
            )
        job = _Job(StoredRecord.new(queued_view(), spec, ouro, caller, key))
        job_id = job.view.job_id
        self._jobs[job_id] = job
        if key is not None:
            self._keys[key] = job_id
        try:
            await self.db.put(job.record)
        except HermesError:
            del self._jobs[job_id]
            self._keys.pop(key or "", None)
            raise
        job.task = asyncio.create_task(self._run(job), name=f"clip-{job_id}")
        logger.info("job %s accepted (action %s)", job_id, ouro.action_id)
        return job.view

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
            if job.delivery is not None:
                job.delivery.cancel()
            await self._forget(job)
        return job.view

    async def stats(self) -> dict[str, int]:
        counts = dict.fromkeys(JobStatus, 0)
        for job in self._jobs.values():
            counts[job.view.status] += 1
        return {status.value: count for status, count in counts.items()}

    async def close(self) -> None:
        """Stop running jobs; they and undelivered webhooks are taken up at the next start.

        Webhooks being sent get a few seconds to arrive first.
        """
        self._closing = True
        jobs = [j.task for j in self._jobs.values() if j.task is not None and not j.task.done()]
        for task in jobs:
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        deliveries = [j.delivery for j in self._jobs.values() if j.delivery is not None]
        if deliveries:
            _, late = await asyncio.wait(deliveries, timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*deliveries, return_exceptions=True)
        unfinished = [j for j in self._jobs.values() if not j.view.finished]
        for job in unfinished:
            _requeue(job.view)
            shutil.rmtree(self.settings.clip_work_dir / job.view.job_id, ignore_errors=True)
        await self.db.put(*(j.record for j in unfinished))
        await self.db.close()

    async def _expire(self) -> None:
        cutoff = time.time() - self.settings.clip_retention_seconds
        for job in list(self._jobs.values()):
            done = job.view.finished and (job.delivery is None or job.delivery.done())
            if done and job.view.finished_at is not None and job.view.finished_at < cutoff:
                await self._forget(job)

    async def _forget(self, job: _Job) -> None:
        job_id = job.view.job_id
        del self._jobs[job_id]
        if job.record.key is not None:
            self._keys.pop(job.record.key, None)
        if job.view.status is JobStatus.succeeded:
            await self.store.delete(job_id)
        shutil.rmtree(self.settings.clip_work_dir / job_id, ignore_errors=True)
        await self.db.delete(job_id)

    async def _run(self, job: _Job) -> None:
        view = job.view
        observability.job_id.set(view.job_id)
        observability.action_id.set(job.record.ouro.action_id)
        try:
            try:
                await self._wait_turn(job)
                view.status, view.started_at = JobStatus.running, time.time()
                view.stage, view.tries = "starting", view.tries + 1
                await self.db.put(job.record)
                await self._work(job)
            finally:
                self._release(job)
        except HermesError as exc:
            await self._end(job, exc)
        except asyncio.CancelledError:
            if not self._closing:
                await self._end(job, Cancelled("The job was cancelled before it finished."))
                self._deliver(job)
            raise
        except Exception:
            logger.exception("job %s failed unexpectedly", view.job_id)
            await self._end(job, ClipFailed("The clip could not be made; it is logged."))
        self._deliver(job)

    async def _wait_turn(self, job: _Job) -> None:
        """Wait in the caller's line for a slot, at most until the job's runs must end."""
        job.turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job.caller, deque()).append(job)
        self._schedule()
        wait = runs_end_by(job.view.created_at, self.settings) - time.time()
        try:
            async with asyncio.timeout(wait):
                await job.turn
        except TimeoutError:
            raise DeadlineExceeded(DEADLINE_PASSED) from None
        finally:
            line = self._waiting.get(job.caller)
            if line is not None and job in line:
                line.remove(job)
                if not line:
                    del self._waiting[job.caller]

    def _schedule(self) -> None:
        """Give free slots to waiting callers: fewest jobs running first, then the one served
        longest ago (round-robin), each caller's oldest job first."""
        while sum(self._running.values()) < self.settings.clip_concurrency:
            heads = [
                line[0]
                for caller, line in self._waiting.items()
                if self._running[caller] < self.settings.clip_max_running_per_caller
            ]
            if not heads:
                return
            job = min(
                heads,
                key=lambda j: (
                    self._running[j.caller], self._served.get(j.caller, 0), j.view.created_at
                ),
            )  # fmt: skip
            line = self._waiting[job.caller]
            line.popleft()
            if not line:
                del self._waiting[job.caller]
            assert job.turn is not None
            if job.turn.done():  # cancelled while waiting
                continue
            job.holds_slot = True
            self._running[job.caller] += 1
            self._turns += 1
            self._served[job.caller] = self._turns
            job.turn.set_result(None)

    def _release(self, job: _Job) -> None:
        if not job.holds_slot:
            return
        job.holds_slot = False
        self._running[job.caller] -= 1
        if self._running[job.caller] <= 0:
            del self._running[job.caller]
            if job.caller not in self._waiting:
                # A caller with nothing left is forgotten: back later, it is served first.
                self._served.pop(job.caller, None)
        if job.view.started_at is not None and job.view.status is JobStatus.succeeded:
            took = time.time() - job.view.started_at
            self._run_estimate += RUN_ESTIMATE_WEIGHT * (took - self._run_estimate)
        if not self._closing:
            self._schedule()

    def _retry_after(self, mine: list[_Job]) -> float:
        """When one of the caller's jobs is likely to end: the soonest of its running ones, or,
        with none running, the next free slot and one run."""
        now, estimate = time.time(), self._run_estimate

        def left(job: _Job) -> float:
            return max(0.0, estimate - (now - (job.view.started_at or now)))

        running = [j for j in mine if j.holds_slot]
        if running:
            return min(left(j) for j in running)
        busy = [j for j in self._jobs.values() if j.holds_slot]
        free_in = min(map(left, busy)) if len(busy) >= self.settings.clip_concurrency else 0.0
        return free_in + estimate

    async def _work(self, job: _Job) -> None:
        view = job.view

        def report(stage: str, progress: float) -> None:
            view.stage, view.progress = stage, max(view.progress, round(progress, 4))

        with job_directory(self.settings.clip_work_dir, view.job_id) as workdir:
            facts, clip = await run_job(
                job.record.clip_spec(), workdir, self.settings, report, job.record.ouro,
                self.gate, runs_end_by(view.created_at, self.settings),
            )  # fmt: skip
            for leftover in workdir.iterdir():
                if leftover not in (workdir / LOCK_FILE, clip):
                    leftover.unlink()
            view.stage = "storing"
            await self.store.put(view.job_id, clip, facts.filename)
        # The directory now only keeps the result (when it is stored there): no lock left.
        (workdir / LOCK_FILE).unlink(missing_ok=True)
        view.status, view.finished_at, view.progress = JobStatus.succeeded, time.time(), 1.0
        view.stage, view.result = "done", facts
        view.webhook = _webhook_state(job)
        await self.db.put(job.record)
        logger.info("job %s succeeded: %d bytes", view.job_id, facts.bytes)

    async def _end(self, job: _Job, error: HermesError) -> None:
        """Record the job's failure; its webhook is sent by ``_deliver``."""
        shutil.rmtree(self.settings.clip_work_dir / job.view.job_id, ignore_errors=True)
        view = job.view
        view.status, view.finished_at, view.stage = JobStatus.failed, time.time(), "failed"
        view.error = ErrorDetail(code=error.code, message=error.message)
        view.webhook = _webhook_state(job)
        await self.db.put(job.record)
        logger.info("job %s failed: %s", view.job_id, error.code)

    def _payload(self, job: _Job) -> Payload:
        """The webhook body, made from the job's view (the same after a restart)."""
        view, ouro = job.view, job.record.ouro
        if view.result is not None:
            return success_payload(self.settings, ouro, view.result, self.store, view.job_id)
        assert view.error is not None
        failure = {"error": view.error.model_dump()}
        return Payload.of(webhook_body(self.settings, ouro, failure, ok=False))

    def _deliver(self, job: _Job) -> None:
        """Delivery runs beside the job, so a slow receiver never holds a job slot."""
        url = job.record.ouro.webhook_url
        if url is None or job.view.webhook is not WebhookState.pending:
            return
        view = job.view

        async def deliver() -> None:
            delivered = await self.sender.deliver(
                url, self._payload(job), token=job.record.ouro.webhook_token,
                delivery_id=view.job_id, ends_by=deliveries_end_by(view.created_at, self.settings),
            )  # fmt: skip
            view.webhook = WebhookState.delivered if delivered else WebhookState.failed
            await self.db.put(job.record)

        job.delivery = asyncio.create_task(deliver(), name=f"webhook-{view.job_id}")


def _webhook_state(job: _Job) -> WebhookState:
    return WebhookState.pending if job.record.ouro.webhook_url else WebhookState.none


def _requeue(view: JobView) -> None:
    """An interrupted job waits again from the start; its runs so far stay counted."""
    view.status, view.stage, view.progress, view.started_at = JobStatus.queued, "queued", 0, None
