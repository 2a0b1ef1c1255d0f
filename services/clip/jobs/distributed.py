"""Distributed clip jobs: arq workers sharing one Redis, with durable webhook delivery.

The API (``ArqQueue``) keeps each job's state in Redis and enqueues it; any number of
``hermes-media worker`` processes run it (``clip_job``), and webhook delivery is a job of its
own (``deliver_webhook``), so a failed delivery never repeats the download. Job payloads are
JSON, never pickle. Every key lives under the deployment's queue name.

Results go to the deployment's ``storage.ResultStore`` (object storage, a shared directory, or
Redis up to a cap), never into the job record; the webhook is built from the stored file by the
delivery job. Every result is listed with its deletion time in a sorted set before it is
uploaded, and workers sweep that set, so a result whose job never records it (a worker killed
between upload and state update) is still deleted in time.

Faults: a worker killed mid-job leaves the job in the queue, and another worker runs it again
once the in-progress lease (job time limit + a few seconds) runs out. On SIGTERM a worker takes
no new job and gives running ones a grace period; the rest are cancelled and go back to the
queue. While Redis is down the API answers 503 and workers wait; both carry on when it returns.
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
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from arq.connections import ArqRedis, RedisSettings
from arq.constants import abort_jobs_ss
from arq.worker import Retry, Worker, func
from pydantic import BaseModel
from redis.asyncio import ConnectionPool
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
from services.clip.jobs.model import (
    Cancelled,
    JobFile,
    JobNotReady,
    JobStatus,
    JobView,
    QueueFull,
    WebhookState,
    queued_view,
    stored_file,
    success_payload,
    webhook_body,
)
from services.clip.jobs.runner import job_directory, remove_stale_directories, run_job
from services.clip.jobs.storage import ResultStore, StorageUnavailable, open_store, result_lifetime
from services.clip.request import ClipSpec, SourceUrl
from services.clip.settings import ClipSettings
from services.clip.toolchain import YT_DLP_VERSION, Check, ToolchainStatus
from services.common import observability
from services.common.errors import ErrorDetail, HermesError, Unavailable
from services.common.http import GuardedClient
from services.common.ouro import OuroHeaders

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25
# How often a worker looks for work: 0.1 s starts a job within ~0.1 s for a few Redis calls.
POLL_SECONDS = 0.1
# arq's own limit is a backstop: the job's own timeout fires first and sends the error webhook.
ARQ_TIMEOUT_MARGIN = 5.0
# Runs of a job that are not failures of its own (a worker died or was stopped under it).
ARQ_MAX_TRIES = 20
# A worker renews its record every HEARTBEAT_SECONDS; one not renewed for the TTL is dead.
HEARTBEAT_SECONDS = 10.0
WORKER_TTL_SECONDS = 30
REDIS_DOWN = "The job queue is unreachable; try again shortly."
REDIS_RESULTS = (
    "results are kept in Redis (capped by HERMES_CLIP_REDIS_RESULT_MAX_BYTES); set "
    "HERMES_CLIP_STORAGE_URL to object storage, which is how distributed mode is meant to run"
)
RESULT_GONE = "The clip was made, but its file is no longer kept; ask for it again."
SWEEP_MIN_SECONDS = 0.5
SWEEP_MAX_SECONDS = 30.0


class QueueUnavailable(Unavailable):
    code = "queue_unavailable"


class StoredJob(BaseModel):
    """Everything about one job that every replica and worker must see."""

    view: JobView
    spec: dict[str, Any]
    ouro: OuroHeaders
    caller: str
    webhook_started_at: float | None = None

    def clip_spec(self) -> ClipSpec:
        spec = dict(self.spec)
        return ClipSpec(source=SourceUrl(**spec.pop("source")), **spec)


class WorkerRecord(BaseModel):
    """What a worker tells the API about itself: its YouTube toolchain and its last canary."""

    worker: str
    host: str
    yt_dlp: str
    ready: bool
    checks: list[Check]
    at: float
    canary: CanaryResult | None = None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Store:
    """Job state, result files and webhook bodies in Redis, under one queue name."""

    redis: ArqRedis
    settings: ClipSettings

    def _key(self, kind: str, name: str) -> str:
        return f"{self.settings.clip_queue_name}:{kind}:{name}"

    @property
    def _ttl(self) -> int:
        s = self.settings
        running = s.clip_job_timeout_seconds * s.clip_max_tries + s.webhook_window_seconds
        return int(running + s.clip_retention_seconds) + 60

    async def load(self, job_id: str) -> StoredJob | None:
        raw = await self.redis.get(self._key("job", job_id))
        return StoredJob.model_validate_json(raw) if raw else None

    async def save(self, job: StoredJob) -> None:
        await self.redis.set(self._key("job", job.view.job_id), job.model_dump_json(), ex=self._ttl)

    async def claim(self, key: str, job_id: str) -> str | None:
        """Bind an idempotency key to ``job_id``; the job id it was already bound to, if any."""
        redis_key = self._key("key", key)
        if await self.redis.set(redis_key, job_id, nx=True, ex=self._ttl):
            return None
        found = await self.redis.get(redis_key)
        return found.decode() if found else None

    async def forget(self, job_id: str) -> None:
        await self.redis.delete(self._key("job", job_id))

    async def keep_result_until(self, job_id: str, deadline: float) -> None:
        """List the job's result for deletion at ``deadline`` (before it exists, too)."""
        await self.redis.zadd(self._key("results", "due"), {job_id: deadline})

    async def results_due(self, now: float) -> list[str]:
        found = await self.redis.zrangebyscore(
            self._key("results", "due"), 0, now, start=0, num=100
        )
        return [job_id.decode() for job_id in found]

    async def result_gone(self, job_id: str) -> None:
        await self.redis.zrem(self._key("results", "due"), job_id)

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.set(self._key("cancel", job_id), b"1", ex=self._ttl)

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self._key("cancel", job_id)))

    async def save_worker(self, record: WorkerRecord) -> None:
        await self.redis.set(
            self._key("worker", record.worker), record.model_dump_json(), ex=WORKER_TTL_SECONDS
        )

    async def drop_worker(self, worker_id: str) -> None:
        await self.redis.delete(self._key("worker", worker_id))

    async def workers(self) -> list[WorkerRecord]:
        """The records of the workers alive now (each expires unless its worker renews it)."""
        keys = [key async for key in self.redis.scan_iter(match=self._key("worker", "*"))]
        found = await self.redis.mget(keys) if keys else []
        return [WorkerRecord.model_validate_json(raw) for raw in found if raw]

    async def queued(self) -> int:
        return int(await self.redis.zcard(self.settings.clip_queue_name))

    async def enqueue(self, function: str, job_id: str, arq_id: str, defer: float = 0) -> None:
        await self.redis.enqueue_job(
            function, job_id, _job_id=arq_id, _queue_name=self.settings.clip_queue_name,
            _defer_by=defer or None,
        )  # fmt: skip


def redis_connection(settings: ClipSettings) -> ArqRedis:
    """A lazily connecting client: the API starts, and answers 503, while Redis is down."""
    assert settings.redis_url is not None
    pool = ConnectionPool.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=5
    )
    return ArqRedis(
        pool,
        job_serializer=_dumps,
        job_deserializer=json.loads,
        default_queue_name=settings.clip_queue_name,
    )


@dataclass
class ArqQueue:
    """The API's side: state in Redis, jobs enqueued to arq."""

    store: Store
    results: ResultStore

    @classmethod
    async def connect(cls, settings: ClipSettings) -> ArqQueue:
        redis = redis_connection(settings)
        return cls(Store(redis, settings), open_store(settings, redis))

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
        # The record exists before the key is claimed, so a losing duplicate can read it.
        await store.save(job)
        if key is not None and (first := await store.claim(key, view.job_id)) is not None:
            await store.forget(view.job_id)
            existing = await store.load(first)
            if existing is not None:
                return existing.view
        await store.enqueue("clip_job", view.job_id, view.job_id)
        logger.info("job %s queued (action %s)", view.job_id, ouro.action_id)
        return view

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
            retention = self.store.settings.clip_retention_seconds
            return await stored_file(self.results, job_id, result, job.view.finished_at, retention)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(REDIS_DOWN) from exc

    async def cancel(self, job_id: str) -> JobView | None:
        """Cancel a job that has not ended; forget a finished one and delete its file."""
        try:
            job = await self.store.load(job_id)
            if job is None:
                return None
            if job.view.finished:
                await self.store.forget(job_id)
                if job.view.status is JobStatus.succeeded:
                    await self.results.delete(job_id)
                    await self.store.result_gone(job_id)
                return job.view
            await self.store.request_cancel(job_id)
            await self.store.redis.zadd(abort_jobs_ss, {job_id: int(time.time() * 1000)})
            if job.view.status is JobStatus.queued:
                await _finish_failed(self.store, job, Cancelled(CANCELLED))
            for _ in range(100):
                job = await self.store.load(job_id)
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


CANCELLED = "The job was cancelled before it finished."


async def _finish_failed(store: Store, job: StoredJob, error: HermesError) -> None:
    view = job.view
    view.status, view.finished_at, view.stage = JobStatus.failed, time.time(), "failed"
    view.error = ErrorDetail(code=error.code, message=error.message)
    await _queue_webhook(store, job)


async def _queue_webhook(store: Store, job: StoredJob) -> None:
    """Record the job's end; its webhook is built from the record (and the stored file)."""
    job_id = job.view.job_id
    if job.ouro.webhook_url:
        job.view.webhook = WebhookState.pending
        job.webhook_started_at = time.time()
    await store.save(job)
    if job.ouro.webhook_url:
        await store.enqueue("deliver_webhook", job_id, f"{job_id}:webhook")


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


async def clip_job(ctx: dict[str, Any], job_id: str) -> None:
    """Run one clip job, record its end, and queue its webhook."""
    state = _state(ctx)
    store, settings = state.store, state.settings
    job = await store.load(job_id)
    if job is None or job.view.finished:
        return
    observability.job_id.set(job_id)
    observability.action_id.set(job.ouro.action_id)
    view = job.view
    view.status, view.started_at, view.tries = JobStatus.running, time.time(), ctx["job_try"]
    view.stage, view.progress = "starting", 0.0
    await store.save(job)
    flusher = asyncio.create_task(_flush_progress(store, job))

    def report(stage: str, progress: float) -> None:
        view.stage, view.progress = stage, max(view.progress, round(progress, 4))

    try:
        with job_directory(settings.clip_work_dir, job_id) as workdir:
            try:
                facts, clip = await run_job(
                    job.clip_spec(), workdir, settings, report, job.ouro, state.gate
                )
                view.stage = "storing"
                await store.keep_result_until(job_id, time.time() + result_lifetime(settings))
                await state.results.put(job_id, clip, facts.filename)
            except StorageUnavailable as exc:
                raise ResultNotStored(f"The clip could not be stored: {exc.message}") from exc
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    except ClipFailed as exc:
        flusher.cancel()
        if exc.transient and view.tries < settings.clip_max_tries:
            view.status, view.stage, view.progress = JobStatus.queued, "retrying", 0.0
            view.error = ErrorDetail(code=exc.code, message=exc.message)
            await store.save(job)
            # A rate-limited source is not asked again before its cool-down ends.
            delay = max(
                settings.clip_retry_backoff_seconds * 2.0 ** (view.tries - 1),
                await state.gate.retry_after(settings, job.clip_spec().source),
            )
            logger.info("job %s: %s, run %d again in %.1f s", job_id, exc.code, view.tries, delay)
            raise Retry(defer=delay) from exc
        await _finish_failed(store, job, exc)
        return
    except asyncio.CancelledError:
        flusher.cancel()
        # In a task of its own: before Python 3.11.3 (Debian 12 has 3.11.2), the asyncio.timeout
        # redis-py puts around reads raises CancelledError in a task being cancelled, so this
        # task could not record the job's end.
        if await asyncio.shield(_interrupted(store, job)):
            return
        raise
    except Exception:
        flusher.cancel()
        logger.exception("job %s failed unexpectedly", job_id)
        await _finish_failed(store, job, ClipFailed("The clip could not be made; it is logged."))
        return
    flusher.cancel()
    view.status, view.finished_at, view.progress = JobStatus.succeeded, time.time(), 1.0
    view.stage, view.result, view.error = "done", facts, None
    await store.keep_result_until(job_id, _result_deadline(settings, job))
    await _queue_webhook(store, job)
    logger.info("job %s succeeded: %d bytes", job_id, facts.bytes)


def _result_deadline(settings: ClipSettings, job: StoredJob) -> float:
    """Retention after the job's end, and never before its webhook can have been sent."""
    assert job.view.finished_at is not None
    keep = settings.clip_retention_seconds
    if job.view.webhook is WebhookState.pending:
        keep = max(keep, settings.webhook_window_seconds)
    return job.view.finished_at + keep


async def _interrupted(store: Store, job: StoredJob) -> bool:
    """Record a cancelled job's end (True), or hand an interrupted one back to the queue."""
    if await store.cancel_requested(job.view.job_id):
        await _finish_failed(store, job, Cancelled(CANCELLED))
        return True
    view = job.view
    view.status, view.stage, view.progress = JobStatus.queued, "requeued", 0.0
    await store.save(job)
    return False


async def _flush_progress(store: Store, job: StoredJob) -> None:
    """Write live progress to Redis a few times a second, so every replica can show it."""
    last = -1.0
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL)
        if job.view.progress != last:
            last = job.view.progress
            with contextlib.suppress(RedisError, OSError):
                await store.save(job)


async def deliver_webhook(ctx: dict[str, Any], job_id: str) -> None:
    """One delivery attempt; retried by arq with backoff until the window closes."""
    state = _state(ctx)
    store = state.store
    job = await store.load(job_id)
    if job is None or job.ouro.webhook_url is None or job.view.webhook is not WebhookState.pending:
        return
    observability.job_id.set(job_id)
    observability.action_id.set(job.ouro.action_id)
    attempt = int(ctx["job_try"])
    try:
        body = await _webhook_payload(state, job)
    except StorageUnavailable:
        logger.info("webhook %s: the object store is unreachable", job_id)
        outcome = Outcome.retry
    else:
        outcome = await state.sender.attempt(
            job.ouro.webhook_url, body, token=job.ouro.webhook_token, delivery_id=job_id
        )
    if outcome is Outcome.retry:
        delay = state.sender.delay(attempt)
        started = job.webhook_started_at or time.time()
        if time.time() + delay < started + state.settings.webhook_window_seconds:
            raise Retry(defer=delay)
        logger.warning("webhook %s: window closed after %d attempts", job_id, attempt)
    job.view.webhook = (
        WebhookState.delivered if outcome is Outcome.delivered else WebhookState.failed
    )
    await store.save(job)
    if job.view.status is JobStatus.succeeded:
        await store.keep_result_until(job_id, _result_deadline(state.settings, job))


async def _webhook_payload(state: WorkerState, job: StoredJob) -> Payload:
    """The body, built from the record, and on success the stored file, never kept in Redis."""
    view, settings = job.view, state.settings
    error = view.error or ErrorDetail(code="processing_failed", message="The job failed.")
    if view.status is JobStatus.succeeded and view.result is not None:
        if await state.results.size(view.job_id) is not None:
            return success_payload(settings, job.ouro, view.result, state.results, view.job_id)
        logger.warning("webhook %s: the stored result is gone", view.job_id)
        error = ErrorDetail(code="result_expired", message=RESULT_GONE)
    response = {"error": error.model_dump()}
    return Payload.of(webhook_body(settings, job.ouro, response, ok=False))


async def _sweep(state: WorkerState) -> None:
    """Delete results whose time is up, every few seconds; any worker may do it."""
    every = min(
        SWEEP_MAX_SECONDS, max(SWEEP_MIN_SECONDS, state.settings.clip_retention_seconds / 4)
    )
    while True:
        try:
            for job_id in await state.store.results_due(time.time()):
                await state.results.delete(job_id)
                await state.store.result_gone(job_id)
                logger.info("result of job %s expired and was deleted", job_id)
        except (RedisError, OSError, StorageUnavailable) as exc:
            logger.warning("result sweep failed (%s); trying again", type(exc).__name__)
        await asyncio.sleep(every)


async def _startup(ctx: dict[str, Any]) -> None:
    settings: ClipSettings = ctx["settings"]
    removed = remove_stale_directories(settings.clip_work_dir)
    if removed:
        logger.info("removed %d directories of dead jobs", len(removed))
    if settings.clip_storage_url is None:
        logger.warning(REDIS_RESULTS)
    client = webhook_client(settings)
    cooldown = RedisCooldown(ctx["redis"], f"{settings.clip_queue_name}:cooldown")
    state = WorkerState(
        settings=settings,
        store=Store(ctx["redis"], settings),
        results=open_store(settings, ctx["redis"]),
        client=client,
        sender=webhook_sender(settings, client),
        gate=SourceGate(cooldown, ExtractionCache(settings.ytdlp_extraction_cache_seconds)),
        toolchain=ToolchainStatus(settings),
    )
    ctx["state"] = state
    await state.toolchain.current()
    state.tasks.append(asyncio.create_task(_heartbeat(state)))
    state.tasks.append(asyncio.create_task(_sweep(state)))
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
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
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
                max_tries=1_000_000,
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
        job_serializer=_dumps,
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
