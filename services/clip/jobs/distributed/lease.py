"""A run's lease on its job: taken with a fencing token, renewed while the run lives.

Why a lease beside arq rather than arq's own keys: arq 0.28 marks a job in progress for the
longest job time limit plus 10 s, and nothing renews that mark, so a dead worker's job waits
out the whole time limit (615 s by default). Shortening the mark would not do: arq would start
the same job again while it still runs, and arq's bookkeeping (it deletes the job and its mark
when any run of it ends) is not fenced, so a stalled run waking up would erase a newer run's.
Instead each run of a job is an arq job of its own (``<job id>:r<run>``), and the job's own
lease, in Redis beside arq, says who runs it. A sweep (``sweeper``) enqueues the next run of a
job whose lease lapsed; the old arq job, if arq ever starts it again, finds it is not the
current run and returns at once.

Deliveries (``deliver_webhook``) hold no lease: a worker killed during a webhook POST has that
delivery tried again only when arq's in-progress mark lapses (the time limit + 15 s).

Times: the lease lasts ``LEASE_SECONDS`` (20 s) and is renewed every ``RENEW_SECONDS`` (5 s):
a live worker can miss three renewals in a row (a Redis blip, a stalled event loop) before its
job is taken from it, and a dead worker's job is taken within the lease, the sweep interval
and a poll of the queue: about 20 + 2 + 0.1 s, well within a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from services.clip.jobs.distributed.records import Store, StoredJob

logger = logging.getLogger(__name__)

LEASE_SECONDS = 20.0
RENEW_SECONDS = 5.0


@dataclass
class Lease:
    """The lease a run holds while it runs; it cancels the run's task when the lease is lost
    (another run took the job) or when the job is cancelled."""

    store: Store
    job: StoredJob
    token: int
    task: asyncio.Task[Any] | None = None
    lost: bool = False
    cancelled: bool = False
    _renewer: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def take(cls, store: Store, job: StoredJob, run: int) -> Lease | int:
        """The run's lease, or -1 (not this run's to take) or 0 (the caller's share is full)."""
        token = await store.acquire(job, run, time.time() + LEASE_SECONDS)
        return cls(store, job, token) if token > 0 else token

    def start(self) -> None:
        self.task = asyncio.current_task()
        self._renewer = asyncio.create_task(self._renew())

    def lose(self) -> None:
        """Stop the run: the job is another run's now."""
        if not self.lost:
            self.lost = True
            logger.warning("job %s was taken by another run; this run stops", self.job.view.job_id)
            if self.task is not None:
                self.task.cancel()

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                answer = await self.store.renew(self.job, self.token, time.time() + LEASE_SECONDS)
            except (RedisError, OSError) as exc:
                # Not lost yet: if Redis comes back before another run takes the job, it is ours.
                logger.warning("lease of job %s not renewed (%s)", self.job.view.job_id, exc)
                continue
            if answer == 0:
                self.lose()
                return
            if answer == 2 and not self.cancelled and self.task is not None:
                self.cancelled = True
                self.task.cancel()
