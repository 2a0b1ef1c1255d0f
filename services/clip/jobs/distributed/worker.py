"""The worker's side of the distributed queue: ``hermes-media worker`` runs clip jobs and
delivers webhooks as arq jobs, and sweeps for the whole deployment.

A run (``clip_job``) takes its job's lease (``lease``) before anything else, within its
caller's share of running jobs; a caller at the limit has the run come back a second later,
behind other callers' jobs. Every write of the job's state goes through the fenced commit
(``records``), the result file is stored under a key of the run's own (``<job id>-<token>``),
and the webhook is queued in the commit that ends the job, so a run that lost its job
changes nothing. Webhook delivery is a job of its own (``deliver_webhook``), each attempt an
arq job under a lease of its own kind, retried with backoff until the window or the job's
deadline closes, so a failed delivery never repeats the download.

On SIGTERM a worker takes no new job and gives running ones a grace period; the rest are
cancelled and their next run is queued for another worker. While Redis is down workers wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, cast

from arq.connections import RedisSettings
from arq.worker import Worker, func
from redis.exceptions import RedisError

from services.clip import canary
from services.clip.canary import CanaryResult
from services.clip.errors import ClipFailed, ResultNotStored
from services.clip.fetch.gate import ExtractionCache, RedisCooldown, SourceGate
from services.clip.jobs.delivery import (
    Outcome,
    Payload,
    WebhookSender,
    webhook_client,
    webhook_sender,
)
from services.clip.jobs.distributed.api import CANCELLED
from services.clip.jobs.distributed.lease import Lease
from services.clip.jobs.distributed.records import (
    Store,
    StoredJob,
    WorkerRecord,
    dumps,
    end,
    fail,
    run_of,
    webhook_of,
)
from services.clip.jobs.distributed.sweeper import sweep_forever
from services.clip.jobs.model import (
    DEADLINE_PASSED,
    Cancelled,
    DeadlineExceeded,
    JobStatus,
    WebhookState,
    deliveries_end_by,
    runs_end_by,
    success_payload,
    webhook_body,
)
from services.clip.jobs.runner import job_directory, remove_stale_directories, run_job
from services.clip.jobs.storage import ResultStore, StorageUnavailable, open_store, result_lifetime
from services.clip.settings import ClipSettings
from services.clip.toolchain import YT_DLP_VERSION, ToolchainStatus
from services.common import observability
from services.common.errors import ErrorDetail
from services.common.http import GuardedClient

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25
# How often a worker looks for work: 0.1 s starts a job within ~0.1 s for a few Redis calls.
POLL_SECONDS = 0.1
# arq's own limit is a backstop: the job's own timeout fires first and sends the error webhook.
ARQ_TIMEOUT_MARGIN = 5.0
# arq's tries of one arq job; every run of a clip job, and every attempt to deliver its
# webhook, is an arq job of its own.
ARQ_MAX_TRIES = 20
# A caller's run waiting for one of its running jobs to end looks again this much later: a
# waiting job costs one pick a second, and starts at most a second after a slot frees.
WAIT_SECONDS = 1.0
# A worker renews its record every HEARTBEAT_SECONDS (it expires after WORKER_TTL_SECONDS).
HEARTBEAT_SECONDS = 10.0
RESULT_GONE = "The clip was made, but its file is no longer kept; ask for it again."


@dataclass
class WorkerState:
    """What a worker shares between jobs: made at start-up, closed at shut-down."""

    settings: ClipSettings
    store: Store
    results: ResultStore
    client: GuardedClient
    sender: WebhookSender
    gate: SourceGate
    toolchain: ToolchainStatus
    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    canary: CanaryResult | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def record(self) -> WorkerRecord:
        return WorkerRecord(
            worker=self.worker_id,
            host=socket.gethostname(),
            yt_dlp=YT_DLP_VERSION,
            ready=self.toolchain.ok,
            checks=self.toolchain.checks,
            at=time.time(),
            canary=self.canary,
        )


def _state(ctx: dict[str, Any]) -> WorkerState:
    return cast(WorkerState, ctx["state"])


async def _quiet(*tasks: asyncio.Task[None] | None) -> None:
    """Cancel background tasks and wait until they are gone."""
    found = [task for task in tasks if task is not None]
    for task in found:
        task.cancel()
    await asyncio.gather(*found, return_exceptions=True)


async def clip_job(ctx: dict[str, Any], job_id: str, run: int) -> None:
    """Run ``run`` of one clip job, if it is still the job's current run, and record its end."""
    state = _state(ctx)
    store = state.store
    job = await store.load(job_id)
    if job is None or job.view.finished:
        return
    lease = await Lease.take(store, job, "run", run)
    if lease == 0:
        # The caller runs as many jobs as allowed: after other callers' jobs, look again.
        await store.next_run(job, run, lapsed=False, defer=WAIT_SECONDS)
        return
    if not isinstance(lease, Lease):
        return
    # As it is now that this run holds it (the sweep may have marked it requeued meanwhile).
    job = lease.job = await store.load(job_id) or job
    observability.job_id.set(job_id)
    observability.action_id.set(job.ouro.action_id)
    if time.time() >= runs_end_by(job.view.created_at, state.settings):
        await _committed(
            fail(store, job, lease.token, DeadlineExceeded(DEADLINE_PASSED), release=True), lease
        )
        return
    view = job.view
    view.status, view.started_at, view.tries = JobStatus.running, time.time(), view.tries + 1
    view.stage, view.progress, view.error = "starting", 0.0, None
    lease.start()
    flusher = asyncio.create_task(_flush_progress(store, job, lease))
    try:
        await _run(state, job, lease, run, flusher)
    except asyncio.CancelledError:
        # In a task of its own: before Python 3.11.3 (Debian 12 has 3.11.2), the asyncio.timeout
        # redis-py puts around reads raises CancelledError in a task being cancelled, so this
        # task could not record the job's end. The cancellation ends here: the job's next run,
        # if it needs one, is already queued.
        await asyncio.shield(_interrupted(store, job, lease, run, flusher))
    finally:
        await asyncio.shield(_quiet(flusher))
        await asyncio.shield(lease.stop())


async def _run(
    state: WorkerState, job: StoredJob, lease: Lease, run: int, flusher: asyncio.Task[None]
) -> None:
    store, settings, view = state.store, state.settings, job.view
    job_id = view.job_id
    deadline = runs_end_by(view.created_at, settings)

    def report(stage: str, progress: float) -> None:
        view.stage, view.progress = stage, max(view.progress, round(progress, 4))

    try:
        # Earlier runs' directories on this host whose worker died (a stalled one keeps its lock).
        remove_stale_directories(settings.clip_work_dir, f"{job_id}-")
        # A directory of the run's own: a stalled run on this host may still hold its lock.
        with job_directory(settings.clip_work_dir, f"{job_id}-{lease.token}") as workdir:
            try:
                facts, clip = await run_job(
                    job.clip_spec(), workdir, settings, report, job.ouro, state.gate,
                    runs_end_by=deadline,
                )  # fmt: skip
                view.stage = "storing"
                result_key = f"{job_id}-{lease.token}"
                await store.keep_result_until(result_key, time.time() + result_lifetime(settings))
                await state.results.put(result_key, clip, facts.filename)
                if await store.token(job_id) != lease.token:
                    # The job was taken while this run uploaded: its file is nobody's.
                    await state.results.delete(result_key)
                    await store.result_gone(result_key)
            except StorageUnavailable as exc:
                raise ResultNotStored(f"The clip could not be stored: {exc.message}") from exc
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    except ClipFailed as exc:
        await _quiet(flusher)
        await lease.stop()
        retrying = exc.transient and view.tries < settings.clip_max_tries
        delay = settings.clip_retry_backoff_seconds * 2.0 ** (view.tries - 1)
        if retrying:
            # A rate-limited source is not asked again before its cool-down ends.
            delay = max(delay, await state.gate.retry_after(settings, job.clip_spec().source))
        # No run starts after the job's runs must have ended: it fails with this run's error.
        if retrying and time.time() + delay < deadline:
            view.status, view.stage, view.progress = JobStatus.queued, "retrying", 0.0
            view.error = ErrorDetail(code=exc.code, message=exc.message)
            retry = run_of(job_id, run + 1, defer=delay)
            logger.info("job %s: %s, run %d again in %.1f s", job_id, exc.code, view.tries, delay)
            await _committed(store.commit(job, lease.token, release="run", enqueue=retry), lease)
            return
        await _committed(fail(store, job, lease.token, exc, release=True), lease)
        return
    except Exception:
        await _quiet(flusher)
        await lease.stop()
        logger.exception("job %s failed unexpectedly", job_id)
        failure = ClipFailed("The clip could not be made; it is logged.")
        await _committed(fail(store, job, lease.token, failure, release=True), lease)
        return
    await _quiet(flusher)
    await lease.stop()
    assert view.started_at is not None
    view.status, view.finished_at, view.progress = JobStatus.succeeded, time.time(), 1.0
    view.stage, view.result, view.error = "done", facts, None
    job.result_key = result_key
    await store.keep_result_until(result_key, _result_deadline(settings, job))
    if await _committed(end(store, job, lease.token, release=True), lease):
        await store.ran_for(view.finished_at - view.started_at)
        logger.info("job %s succeeded: %d bytes", job_id, facts.bytes)


async def _committed(commit: Awaitable[bool], lease: Lease) -> bool:
    """Await a fenced commit; a refused one means another run has the job now."""
    if await commit:
        return True
    lease.lost = True
    job_id = lease.job.view.job_id
    logger.warning("job %s: another run has the job; this run's end is dropped", job_id)
    return False


def _result_deadline(settings: ClipSettings, job: StoredJob) -> float:
    """Retention after the job's end, and never before its webhook can have been sent."""
    assert job.view.finished_at is not None
    keep = job.view.finished_at + settings.clip_retention_seconds
    if job.ouro.webhook_url and job.view.webhook in (WebhookState.none, WebhookState.pending):
        keep = max(keep, deliveries_end_by(job.view.created_at, settings))
    return keep


async def _interrupted(
    store: Store, job: StoredJob, lease: Lease, run: int, flusher: asyncio.Task[None]
) -> None:
    """Record a cancelled job's end, or queue an interrupted one's next run (a worker stopping),
    unless the job is another run's now."""
    await _quiet(flusher)
    await lease.stop()
    if lease.lost:
        return
    if lease.cancelled or await store.cancel_requested(job.view.job_id):
        await _committed(fail(store, job, lease.token, Cancelled(CANCELLED), release=True), lease)
        return
    view = job.view
    view.status, view.stage, view.progress = JobStatus.queued, "requeued", 0.0
    await _committed(
        store.commit(job, lease.token, release="run", enqueue=run_of(view.job_id, run + 1)),
        lease,
    )


async def _flush_progress(store: Store, job: StoredJob, lease: Lease) -> None:
    """Write live progress to Redis a few times a second, so every replica can show it."""
    last = -1.0
    with contextlib.suppress(RedisError, OSError):
        if not await store.commit(job, lease.token):
            lease.lose()
            return
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        if job.view.progress != last:
            last = job.view.progress
            with contextlib.suppress(RedisError, OSError):
                if not await store.commit(job, lease.token):
                    lease.lose()
                    return


async def deliver_webhook(ctx: dict[str, Any], job_id: str, attempt: int) -> None:
    """Attempt ``attempt`` of the job's webhook, if it is still the current one, under its
    lease; the next attempt is queued with backoff until the window or deadline closes."""
    state = _state(ctx)
    store = state.store
    job = await store.load(job_id)
    if job is None or job.ouro.webhook_url is None or job.view.webhook is not WebhookState.pending:
        return
    lease = await Lease.take(store, job, "delivery", attempt)
    if not isinstance(lease, Lease):
        return
    observability.job_id.set(job_id)
    observability.action_id.set(job.ouro.action_id)
    lease.start()
    try:
        try:
            outcome = await _post(state, job, job.ouro.webhook_url)
        finally:
            await asyncio.shield(lease.stop())
    except asyncio.CancelledError:
        # The lease was lost (nothing to do), or the worker is stopping: the next attempt goes
        # to another worker now. In a task of its own, as in ``clip_job``.
        if not lease.lost:
            handed = store.commit(job, lease.token, release="delivery",
                                  enqueue=webhook_of(job_id, attempt + 1))  # fmt: skip
            await asyncio.shield(_committed(handed, lease))
        return
    if outcome is Outcome.retry:
        delay = state.sender.delay(attempt)
        started = job.webhook_started_at or time.time()
        closes = min(
            started + state.settings.webhook_window_seconds,
            deliveries_end_by(job.view.created_at, state.settings),
        )
        if time.time() + delay < closes:
            retry = webhook_of(job_id, attempt + 1, defer=delay)
            await _committed(
                store.commit(job, lease.token, release="delivery", enqueue=retry), lease
            )
            return
        logger.warning("webhook %s: window closed after %d attempts", job_id, attempt)
    job.view.webhook = (
        WebhookState.delivered if outcome is Outcome.delivered else WebhookState.failed
    )
    if not await _committed(store.commit(job, lease.token, release="delivery"), lease):
        return
    if job.result_key is not None:
        await store.keep_result_until(job.result_key, _result_deadline(state.settings, job))


async def _post(state: WorkerState, job: StoredJob, url: str) -> Outcome:
    """One POST of the job's webhook, its body read from the record and the stored file."""
    job_id = job.view.job_id
    try:
        body = await _webhook_payload(state, job)
    except StorageUnavailable:
        logger.info("webhook %s: the object store is unreachable", job_id)
        return Outcome.retry
    return await state.sender.attempt(url, body, token=job.ouro.webhook_token, delivery_id=job_id)


async def _webhook_payload(state: WorkerState, job: StoredJob) -> Payload:
    """The body, built from the record, and on success the stored file, never kept in Redis."""
    view, settings = job.view, state.settings
    error = view.error or ErrorDetail(code="processing_failed", message="The job failed.")
    key = job.result_key
    if view.status is JobStatus.succeeded and view.result is not None and key is not None:
        if await state.results.size(key) is not None:
            return success_payload(settings, job.ouro, view.result, state.results, key)
        logger.warning("webhook %s: the stored result is gone", view.job_id)
        error = ErrorDetail(code="result_expired", message=RESULT_GONE)
    response = {"error": error.model_dump()}
    return Payload.of(webhook_body(settings, job.ouro, response, ok=False))


async def _startup(ctx: dict[str, Any]) -> None:
    settings: ClipSettings = ctx["settings"]
    removed = remove_stale_directories(settings.clip_work_dir)
    if removed:
        logger.info("removed %d directories of dead jobs", len(removed))
    client = webhook_client(settings)
    cooldown = RedisCooldown(ctx["redis"], f"{settings.clip_queue_name}:cooldown")
    state = WorkerState(
        settings=settings,
        store=Store(ctx["redis"], settings),
        results=open_store(settings),
        client=client,
        sender=webhook_sender(settings, client),
        gate=SourceGate(cooldown, ExtractionCache(settings.ytdlp_extraction_cache_seconds)),
        toolchain=ToolchainStatus(settings),
    )
    ctx["state"] = state
    await state.toolchain.current()
    state.tasks.append(asyncio.create_task(_heartbeat(state)))
    state.tasks.append(asyncio.create_task(sweep_forever(state.store, state.results)))
    if settings.clip_canary_url:

        def keep(result: CanaryResult) -> None:
            state.canary = result

        state.tasks.append(asyncio.create_task(canary.run_periodically(settings, state.gate, keep)))


async def _heartbeat(state: WorkerState) -> None:
    """Keep this worker's record in Redis while it lives; the API's readiness reads them."""
    while True:
        await state.toolchain.current()
        try:
            await state.store.save_worker(state.record())
        except (RedisError, OSError) as exc:
            logger.warning("worker record not saved (%s)", type(exc).__name__)
        await asyncio.sleep(HEARTBEAT_SECONDS)


async def _shutdown(ctx: dict[str, Any]) -> None:
    state = ctx.get("state")
    if isinstance(state, WorkerState):
        await _quiet(*state.tasks)
        with contextlib.suppress(RedisError, OSError):
            await state.store.drop_worker(state.worker_id)
        await state.client.aclose()


def worker(settings: ClipSettings) -> Worker:
    """The arq worker mirroring the app; create it inside a running event loop."""
    assert settings.redis_url is not None
    timeout = settings.clip_job_timeout_seconds + ARQ_TIMEOUT_MARGIN
    return Worker(
        functions=[
            func(clip_job, name="clip_job", timeout=timeout, max_tries=ARQ_MAX_TRIES),
            func(
                deliver_webhook,
                name="deliver_webhook",
                timeout=settings.webhook_timeout_seconds + ARQ_TIMEOUT_MARGIN,
                max_tries=ARQ_MAX_TRIES,
            ),
        ],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=settings.clip_queue_name,
        max_jobs=settings.clip_concurrency,
        job_timeout=timeout,
        keep_result=0,
        poll_delay=POLL_SECONDS,
        allow_abort_jobs=True,
        job_completion_wait=int(settings.worker_shutdown_grace_seconds),
        job_serializer=dumps,
        job_deserializer=json.loads,
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"settings": settings},
    )


async def run_worker(settings: ClipSettings) -> None:
    """Run a worker until it is stopped by a signal; outlive Redis outages."""
    while True:
        current = worker(settings)
        try:
            await current.async_run()
            return
        except asyncio.CancelledError:
            return
        except (RedisError, OSError) as exc:
            logger.warning("worker lost Redis (%s); reconnecting in 1 s", type(exc).__name__)
            await asyncio.sleep(1)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await current.close()
