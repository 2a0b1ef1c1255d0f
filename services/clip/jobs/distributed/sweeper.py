"""What any worker does for the whole deployment, every second: take back jobs and webhook
deliveries whose lease lapsed or that a worker picked and never leased, end jobs their deadline
caught waiting, and delete results whose time is up.

Every step is safe to run in several workers at once: taking a job back and ending it are
atomic in Redis (a second sweeper finds nothing to do), and deleting a result twice is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from services.clip.jobs.distributed.lease import LEASE_SECONDS
from services.clip.jobs.distributed.records import Kind, Store, fail, parse_arq_id, wanted
from services.clip.jobs.model import DEADLINE_PASSED, DeadlineExceeded, JobStatus
from services.clip.jobs.storage import ResultStore, StorageUnavailable

logger = logging.getLogger(__name__)

# One second adds at most a second to a dead worker's job coming back, for three cheap reads.
SWEEP_SECONDS = 1.0


async def sweep_forever(store: Store, results: ResultStore) -> None:
    while True:
        try:
            await take_back_lapsed(store, "run")
            await take_back_lapsed(store, "delivery")
            await take_back_unstarted(store, time.time())
            await end_past_deadline(store)
            await delete_due_results(store, results)
        except (RedisError, OSError, StorageUnavailable) as exc:
            logger.warning("sweep failed (%s); trying again", type(exc).__name__)
        await asyncio.sleep(SWEEP_SECONDS)


async def take_back_lapsed(store: Store, kind: Kind) -> None:
    """Queue the next run (or delivery attempt) of each job whose worker stopped renewing its
    lease of that kind."""
    for job_id in await store.lapsed(kind, time.time()):
        job, number = await store.load(job_id), await store.current(job_id, kind)
        if job is None or not wanted(kind, job):
            await store.drop(job_id, kind)
            continue
        token = await store.next_run(job, number, lapsed=True, defer=0, kind=kind)
        if token:
            logger.warning("job %s: its worker stopped renewing its lease; %s %d queued",
                           job_id, kind, number + 1)  # fmt: skip
            if kind == "run":
                view = job.view
                view.status, view.stage, view.progress = JobStatus.queued, "requeued", 0.0
                await store.commit(job, token)


async def take_back_unstarted(store: Store, now: float) -> None:
    """Queue the next run (or delivery attempt) of each job whose current one a worker picked
    and has held for a lease's time without taking the lease: it died in between."""
    for arq_id in await store.picked():
        picked = parse_arq_id(arq_id)
        job = None if picked is None else await store.load(picked.job_id)
        if picked is None or job is None:
            continue
        if await store.unstarted(job, picked, now, LEASE_SECONDS):
            logger.warning("job %s: %s picked %.0f s ago and never started; %s %d queued",
                           picked.job_id, arq_id, LEASE_SECONDS, picked.kind,
                           picked.number + 1)  # fmt: skip


async def end_past_deadline(store: Store) -> None:
    """Fail each job still waiting when its runs must have ended, and queue its webhook.
    A job running then is cut short by its own run (``run_job``'s ``runs_end_by``)."""
    now = time.time()
    for job_id in await store.past_deadline(now):
        if await store.lease_live(job_id, now):
            continue
        token = await store.fence(job_id)
        job = await store.load(job_id)
        if job is None or job.view.finished:
            await store.drop(job_id)
            continue
        if await fail(store, job, token, DeadlineExceeded(DEADLINE_PASSED), release=True):
            logger.warning("job %s: its deadline passed before it could run", job_id)


async def delete_due_results(store: Store, results: ResultStore) -> None:
    for key in await store.results_due(time.time()):
        await results.delete(key)
        await store.result_gone(key)
        logger.info("result %s expired and was deleted", key)
