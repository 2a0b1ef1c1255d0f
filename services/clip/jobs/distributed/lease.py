"""A run's (or a webhook delivery attempt's) lease on its job: taken with a fencing token,
renewed while it lives.

Why a lease beside arq rather than arq's own keys: arq 0.28 marks a job in progress for the
longest job time limit plus 10 s, and nothing renews that mark, so a dead worker's job waits
out the whole time limit (615 s by default). Shortening the mark would not do: arq would start
the same job again while it still runs, and arq's bookkeeping (it deletes the job and its mark
when any run of it ends) is not fenced, so a stalled run waking up would erase a newer run's.
Instead each run of a job is an arq job of its own (``<job id>:r<run>``), and the job's own
lease, in Redis beside arq, says who runs it. A sweep (``sweeper``) enqueues the next run of a
job whose lease lapsed; the old arq job, if arq ever starts it again, finds it is not the
current run and returns at once.

Deliveries get the same treatment: each attempt to send a finished job's webhook is an arq job
of its own (``<job id>:w<attempt>``) that takes a lease of its own kind (``P:deliveries``, with
the job's fencing token) and renews it while the POST runs. The sweep queues the next attempt
of a delivery whose lease lapsed (a worker killed mid-POST), and a stalled attempt waking up
cannot mark the delivery delivered or failed over a newer attempt's. Delivery stays
at-least-once (a POST the receiver got just before its sender died is sent again), always with
the job id as ``webhook-id``, so the receiver can tell.

Between arq handing a run or attempt to a worker (arq's ``arq:in-progress:<id>`` mark) and the
lease being taken there are a few Redis calls; a worker killed then holds no lease to lapse.
The sweep notes when it first sees an arq job picked but holding no lease, and after a lease's
time queues the next one (``records.UNSTARTED``); one still waiting in arq's queue carries no
in-progress mark, so it is never run twice, and the picked one, if it ever runs, finds it is
no longer the current one.

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

from services.clip.jobs.distributed.records import Kind, Store, StoredJob

logger = logging.getLogger(__name__)

LEASE_SECONDS = 20.0
RENEW_SECONDS = 5.0


@dataclass
class Lease:
    """The lease a run (or delivery attempt) holds while it runs; it cancels the holder's task
    when the lease is lost (another took the job) or, for a run, when the job is cancelled."""

    store: Store
    job: StoredJob
    kind: Kind
    token: int
    task: asyncio.Task[Any] | None = None
    lost: bool = False
    cancelled: bool = False
    _renewer: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def take(cls, store: Store, job: StoredJob, kind: Kind, number: int) -> Lease | int:
        """The lease of run (or delivery attempt) ``number``, or -1 (not its to take) or 0
        (the caller's share of running runs is full)."""
        token = await store.acquire(job, kind, number, time.time() + LEASE_SECONDS)
        return cls(store, job, kind, token) if token > 0 else token

    def start(self) -> None:
        self.task = asyncio.current_task()
        self._renewer = asyncio.create_task(self._renew())

    def lose(self) -> None:
        """Stop the run: the job is another run's now."""
        if not self.lost:
            self.lost = True
            job_id = self.job.view.job_id
            logger.warning("job %s was taken by another %s; this one stops", job_id, self.kind)
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
                until = time.time() + LEASE_SECONDS
                answer = await self.store.renew(self.job, self.kind, self.token, until)
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
