"""The API's side of the distributed queue: accept jobs within each caller's share, read their
state and results, cancel them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass

from arq.constants import abort_jobs_ss
from redis.exceptions import RedisError

from services.clip.jobs.distributed.records import (
    REDIS_DOWN,
    Store,
    StoredJob,
    WorkerRecord,
    fail,
    redis_connection,
    run_of,
)
from services.clip.jobs.model import (
    Cancelled,
    JobFile,
    JobNotReady,
    JobStatus,
    JobView,
    QueueFull,
    QueueUnavailable,
    TooManyJobs,
    queued_view,
    stored_file,
)
from services.clip.jobs.storage import ResultStore, open_store
from services.clip.request import ClipSpec
from services.clip.settings import ClipSettings
from services.common.ouro import OuroHeaders

logger = logging.getLogger(__name__)

CANCELLED = "The job was cancelled before it finished."


@dataclass
class ArqQueue:
    """The API's side: state in Redis, jobs enqueued to arq, results in the object store."""

    store: Store
    results: ResultStore

    @classmethod
    async def connect(cls, settings: ClipSettings) -> ArqQueue:
        return cls(Store(redis_connection(settings), settings), open_store(settings))

    async def submit(
        self, spec: ClipSpec, ouro: OuroHeaders, key: str | None, caller: str
    ) -> JobView:
        try:
            return await self._submit(spec, ouro, key, caller)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(REDIS_DOWN) from exc

    async def _submit(
        self, spec: ClipSpec, ouro: OuroHeaders, key: str | None, caller: str
    ) -> JobView:
        store = self.store
        queued = await store.queued()
        if queued >= store.settings.clip_max_queued:
            raise QueueFull(f"{queued} clip jobs are already waiting; try again soon.")
        view = queued_view()
        job = StoredJob(view=view, spec=asdict(spec), ouro=ouro, caller=caller)
        code, value = await store.submit(job, key)
        if code == 2:
            existing = await store.load(value)
            if existing is not None:
                return existing.view
        if code == 0:
            raise TooManyJobs(
                f"You have {value} clip jobs waiting or running, the most allowed at once; "
                "ask again when one has finished.",
                await self._retry_after(caller),
            )
        logger.info("job %s queued (action %s)", view.job_id, ouro.action_id)
        return view

    async def _retry_after(self, caller: str) -> float:
        """When one of the caller's jobs is expected to end: the earliest of its running jobs'
        starts plus the deployment's average run time (from the average run time when none
        runs yet), never later than the caller's first deadline, by which a job surely ends."""
        store, now = self.store, time.time()
        average = await store.run_seconds()
        expected = now + average
        for job_id in await store.running_of(caller, now):
            job = await store.load(job_id)
            if job is not None and job.view.started_at is not None:
                expected = min(expected, max(now, job.view.started_at + average))
        ends = await store.active_until(caller, now)
        if ends:
            expected = min(expected, min(ends))
        return expected - now

    async def get(self, job_id: str) -> JobView | None:
        try:
            job = await self.store.load(job_id)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(REDIS_DOWN) from exc
        return job.view if job is not None else None

    async def file(self, job_id: str) -> JobFile | None:
        try:
            job = await self.store.load(job_id)
            if job is None:
                return None
            result = job.view.result
            if job.view.status is not JobStatus.succeeded or result is None:
                raise JobNotReady(
                    f"The job is {job.view.status.value}; its file exists once it succeeds."
                )
            assert job.view.finished_at is not None
            assert job.result_key is not None
            retention = self.store.settings.clip_retention_seconds
            return await stored_file(
                self.results, job.result_key, result, job.view.finished_at, retention
            )
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(REDIS_DOWN) from exc

    async def cancel(self, job_id: str) -> JobView | None:
        """Cancel a job that has not ended; forget a finished one and delete its file."""
        store = self.store
        try:
            job = await store.load(job_id)
            if job is None:
                return None
            if job.view.finished:
                await store.forget(job_id)
                if job.result_key is not None:
                    await self.results.delete(job.result_key)
                    await store.result_gone(job.result_key)
                return job.view
            await store.request_cancel(job_id)
            if job.view.status is JobStatus.queued:
                # Fenced: a run that takes the job meanwhile loses it and stops.
                token = await store.fence(job_id)
                job = await store.load(job_id)
                if job is not None and not job.view.finished:
                    await fail(store, job, token, Cancelled(CANCELLED), release=True)
            else:
                run = await store.current(job_id)
                await store.redis.zadd(
                    abort_jobs_ss, {run_of(job_id, run).arq_id: int(time.time() * 1000)}
                )
            for _ in range(100):
                job = await store.load(job_id)
                if job is None or job.view.finished:
                    break
                await asyncio.sleep(0.05)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(REDIS_DOWN) from exc
        return job.view if job is not None else None

    async def stats(self) -> dict[str, int]:
        """Only the queue's depth: counting every job's state would scan Redis."""
        try:
            return {"queued": await self.store.queued()}
        except (RedisError, OSError):
            return {}

    async def workers(self) -> list[WorkerRecord]:
        try:
            return await self.store.workers()
        except (RedisError, OSError):
            return []

    async def ping(self) -> bool:
        try:
            return bool(await self.store.redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.store.redis.aclose()
