"""Distributed clip jobs: arq workers sharing one Redis, with durable webhook delivery.

The API (``ArqQueue``) keeps each job's state in Redis and enqueues it; any number of
``hermes-media worker`` processes run it (``clip_job``), and webhook delivery is a job of its
own (``deliver_webhook``), so a failed delivery never repeats the download. Job payloads are
JSON, never pickle. Every key lives under the deployment's queue name.

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
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

from arq.connections import ArqRedis, RedisSettings
from arq.constants import abort_jobs_ss
from arq.worker import Retry, Worker, func
from pydantic import BaseModel
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError

from services.clip.delivery import Outcome, WebhookSender, webhook_client, webhook_sender
from services.clip.jobs import (
    Cancelled,
    JobFile,
    JobNotReady,
    JobStatus,
    JobView,
    QueueFull,
    WebhookState,
    error_response,
    job_directory,
    queued_view,
    remove_stale_directories,
    run_job,
    success_response,
    webhook_body,
)
from services.clip.request import ClipSpec, SourceUrl
from services.clip.settings import ClipSettings
from services.clip.source import ClipFailed
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
REDIS_DOWN = "The job queue is unreachable; try again shortly."


class QueueUnavailable(Unavailable):
    code = "queue_unavailable"


class StoredJob(BaseModel):
    """Everything about one job that every replica and worker must see."""

    view: JobView
    spec: dict[str, Any]
    ouro: OuroHeaders
    webhook_started_at: float | None = None

    def clip_spec(self) -> ClipSpec:
        spec = dict(self.spec)
        return ClipSpec(source=SourceUrl(**spec.pop("source")), **spec)


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

    async def save_file(self, job_id: str, data: bytes) -> None:
        ttl = max(1, int(self.settings.clip_retention_seconds))
        await self.redis.set(self._key("file", job_id), data, ex=ttl)

    async def load_file(self, job_id: str) -> bytes | None:
        found = await self.redis.get(self._key("file", job_id))
        return cast(bytes | None, found)

    async def save_webhook(self, job_id: str, body: dict[str, Any]) -> None:
        ttl = int(self.settings.webhook_window_seconds) + 60
        await self.redis.set(self._key("webhook", job_id), _dumps(body), ex=ttl)

    async def load_webhook(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self._key("webhook", job_id))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    async def drop_webhook(self, job_id: str) -> None:
        await self.redis.delete(self._key("webhook", job_id))

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.set(self._key("cancel", job_id), b"1", ex=self._ttl)

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self._key("cancel", job_id)))

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

    @classmethod
    async def connect(cls, settings: ClipSettings) -> ArqQueue:
        return cls(Store(redis_connection(settings), settings))

    async def submit(self, spec: ClipSpec, ouro: OuroHeaders, key: str | None) -> JobView:
        try:
            return await self._submit(spec, ouro, key)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(REDIS_DOWN) from exc

    async def _submit(self, spec: ClipSpec, ouro: OuroHeaders, key: str | None) -> JobView:
        store = self.store
        queued = await store.queued()
        if queued >= store.settings.clip_max_queued:
            raise QueueFull(f"{queued} clip jobs are already waiting; try again soon.")
        view = queued_view()
        job = StoredJob(view=view, spec=asdict(spec), ouro=ouro)
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
            data = await self.store.load_file(job_id)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(REDIS_DOWN) from exc
        return JobFile(filename=result.filename, data=data) if data is not None else None

    async def cancel(self, job_id: str) -> JobView | None:
        try:
            job = await self.store.load(job_id)
            if job is None or job.view.finished:
                return job.view if job is not None else None
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
    body = webhook_body(store.settings, job.ouro, error_response(error), ok=False)
    await _queue_webhook(store, job, body)


async def _queue_webhook(store: Store, job: StoredJob, body: dict[str, Any]) -> None:
    job_id = job.view.job_id
    if job.ouro.webhook_url:
        job.view.webhook = WebhookState.pending
        job.webhook_started_at = time.time()
        await store.save_webhook(job_id, body)
    await store.save(job)
    if job.ouro.webhook_url:
        await store.enqueue("deliver_webhook", job_id, f"{job_id}:webhook")


@dataclass
class WorkerState:
    """What a worker shares between jobs: made at start-up, closed at shut-down."""

    settings: ClipSettings
    store: Store
    client: GuardedClient
    sender: WebhookSender


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
                facts, data = await run_job(job.clip_spec(), workdir, settings, report, job.ouro)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    except ClipFailed as exc:
        flusher.cancel()
        if exc.transient and view.tries < settings.clip_max_tries:
            view.status, view.stage, view.progress = JobStatus.queued, "retrying", 0.0
            view.error = ErrorDetail(code=exc.code, message=exc.message)
            await store.save(job)
            delay = settings.clip_retry_backoff_seconds * 2.0 ** (view.tries - 1)
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
    await store.save_file(job_id, data)
    view.status, view.finished_at, view.progress = JobStatus.succeeded, time.time(), 1.0
    view.stage, view.result, view.error = "done", facts, None
    body = webhook_body(settings, job.ouro, success_response(facts, data), ok=True)
    await _queue_webhook(store, job, body)
    logger.info("job %s succeeded: %d bytes", job_id, facts.bytes)


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
    body = await store.load_webhook(job_id)
    if job is None or body is None or job.ouro.webhook_url is None:
        return
    observability.job_id.set(job_id)
    observability.action_id.set(job.ouro.action_id)
    attempt = int(ctx["job_try"])
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
    await store.drop_webhook(job_id)


async def _startup(ctx: dict[str, Any]) -> None:
    settings: ClipSettings = ctx["settings"]
    removed = remove_stale_directories(settings.clip_work_dir)
    if removed:
        logger.info("removed %d directories of dead jobs", len(removed))
    client = webhook_client(settings)
    ctx["state"] = WorkerState(
        settings=settings,
        store=Store(ctx["redis"], settings),
        client=client,
        sender=webhook_sender(settings, client),
    )


async def _shutdown(ctx: dict[str, Any]) -> None:
    state = ctx.get("state")
    if isinstance(state, WorkerState):
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
