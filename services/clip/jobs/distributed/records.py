"""What the distributed queue keeps in Redis, and the atomic steps that change it.

Every key lives under the deployment's queue name ``P``:

- ``P:job:<id>``: the job's record (``StoredJob``, JSON); ``P:token:<id>``: its fencing token,
  raised by every run that takes the job and by anyone else who ends it (cancel, deadline);
  ``P:run:<id>``: the arq job the job's next run belongs to (``<id>:r<run>``).
- ``P:leases``: running jobs by the time their lease ends; ``P:running:<caller>``: the same for
  one caller's jobs, ``P:active:<caller>``: the caller's jobs waiting or running, by the time
  the job surely ended (its deadline), so a count never outlives a crash.
- ``P:deadlines``: unfinished jobs by the time their runs must have ended.
- ``P:results:due``: result files by the time they are deleted; ``P:stats:run_seconds``: the
  moving average of run times (for ``Retry-After``); ``P:cancel:<id>``, ``P:key:<key>``
  (idempotency), ``P:worker:<id>`` (live workers).

A record is only ever written by ``commit``: a Lua script that writes it only while the token
is the writer's, and in the same step releases the lease, drops the job from its caller's
counts, and enqueues the arq job that comes next (a run or the webhook). A worker that stalled
and lost its job can then change nothing, and a job's end and its webhook are never apart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job
from pydantic import BaseModel
from redis.asyncio import ConnectionPool

from services.clip.canary import CanaryResult
from services.clip.jobs.model import (
    JobStatus,
    JobView,
    WebhookState,
    deliveries_end_by,
    runs_end_by,
)
from services.clip.request import ClipSpec, SourceUrl
from services.clip.settings import ClipSettings
from services.clip.toolchain import Check
from services.common.errors import ErrorDetail, HermesError, Unavailable
from services.common.ouro import OuroHeaders

REDIS_DOWN = "The job queue is unreachable; try again shortly."
# A worker renews its record every few seconds; one not renewed for the TTL is dead.
WORKER_TTL_SECONDS = 30
# What a run takes before any has been measured (a short clip on a quiet worker).
DEFAULT_RUN_SECONDS = 30.0
# Weight of the newest run in the moving average of run times.
RUN_SECONDS_WEIGHT = 0.2


class QueueUnavailable(Unavailable):
    code = "queue_unavailable"


class StoredJob(BaseModel):
    """Everything about one job that every replica and worker must see."""

    view: JobView
    spec: dict[str, Any]
    ouro: OuroHeaders
    caller: str
    webhook_started_at: float | None = None
    result_key: str | None = None

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


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Enqueue:
    """An arq job to put in the queue in the same step as a commit."""

    function: str
    arq_id: str
    args: tuple[Any, ...]
    defer: float = 0.0


def run_of(job_id: str, run: int, defer: float = 0.0) -> Enqueue:
    return Enqueue("clip_job", f"{job_id}:r{run}", (job_id, run), defer)


def webhook_of(job_id: str) -> Enqueue:
    return Enqueue("deliver_webhook", f"{job_id}:webhook", (job_id,))


# Puts an arq job in the queue as ``ArqRedis.enqueue_job`` does, unless that id is there already.
_ENQUEUE = """
local function enqueue(job_key, queue, arq_id, payload, score, expires_ms)
  if arq_id ~= '' and redis.call('EXISTS', job_key) == 0 then
    redis.call('PSETEX', job_key, expires_ms, payload)
    redis.call('ZADD', queue, score, arq_id)
  end
end
"""

# KEYS: record, token, leases, running, active, deadlines, arq job, queue, run
# ARGV: token, record, ttl, release, finished, job id, arq id, payload, score, expiry, next run
COMMIT = (
    _ENQUEUE
    + """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[6])
  redis.call('ZREM', KEYS[4], ARGV[6])
end
if ARGV[5] == '1' then
  redis.call('ZREM', KEYS[5], ARGV[6])
  redis.call('ZREM', KEYS[6], ARGV[6])
end
if ARGV[11] ~= '' then redis.call('SET', KEYS[9], ARGV[11], 'EX', ARGV[3]) end
enqueue(KEYS[7], KEYS[8], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
return 1
"""
)

# KEYS: record, idempotency key, active, deadlines, run, arq job, queue
# ARGV: job id, record, ttl, has key, cap, now, active until, runs end by, arq id, payload,
#       score, expiry
SUBMIT = (
    _ENQUEUE
    + """
if ARGV[4] == '1' then
  local found = redis.call('GET', KEYS[2])
  if found then return {2, found} end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
local active = redis.call('ZCARD', KEYS[3])
if active >= tonumber(ARGV[5]) then return {0, tostring(active)} end
if ARGV[4] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3]) end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[8], ARGV[1])
redis.call('SET', KEYS[5], '1', 'EX', ARGV[3])
enqueue(KEYS[6], KEYS[7], ARGV[9], ARGV[10], ARGV[11], ARGV[12])
return {1, ''}
"""
)

# A run takes its job: -1 not this run's to take (a stale arq job, the job ended, or another
# run holds a live lease), 0 the caller already runs as many as allowed, else the new token.
# KEYS: run, record, token, leases, running. ARGV: job id, run, now, lease until, cap, ttl
ACQUIRE = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
local raw = redis.call('GET', KEYS[2])
if not raw then return -1 end
local status = cjson.decode(raw)['view']['status']
if status == 'succeeded' or status == 'failed' then return -1 end
local held = redis.call('ZSCORE', KEYS[4], ARGV[1])
if held and tonumber(held) > tonumber(ARGV[3]) then return -1 end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[5]) then return 0 end
local token = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
redis.call('EXPIRE', KEYS[5], ARGV[6])
return token
"""

# 1 renewed, 0 the lease is someone else's now, 2 renewed but a cancel was asked for.
# KEYS: token, leases, running, cancel. ARGV: token, job id, lease until
RENEW = """
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
if redis.call('EXISTS', KEYS[4]) == 1 then return 2 end
return 1
"""

# The job's next run, when ``run`` is still the current one; with ``lapsed`` set only when its
# lease ended (then the lapsed holder is fenced off at once): 0 not enqueued, else the token.
# KEYS: run, leases, running, token, arq job, queue
# ARGV: run, next run, job id, now, lapsed, ttl, arq id, payload, score, expiry
NEXT_RUN = (
    _ENQUEUE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local token = 1
if ARGV[5] == '1' then
  local held = redis.call('ZSCORE', KEYS[2], ARGV[3])
  if not held or tonumber(held) > tonumber(ARGV[4]) then return 0 end
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
  token = redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[6])
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[6])
enqueue(KEYS[5], KEYS[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
return token
"""
)

# KEYS: token. ARGV: ttl
FENCE = """
local token = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return token
"""


@dataclass(frozen=True)
class Store:
    """Job state, leases, per-caller counts and the queue, in Redis, under one queue name."""

    redis: ArqRedis
    settings: ClipSettings

    def key(self, kind: str, name: str) -> str:
        return f"{self.settings.clip_queue_name}:{kind}:{name}"

    @property
    def leases(self) -> str:
        return f"{self.settings.clip_queue_name}:leases"

    @property
    def deadlines(self) -> str:
        return f"{self.settings.clip_queue_name}:deadlines"

    @property
    def ttl(self) -> int:
        s = self.settings
        return int(s.clip_deadline_seconds + s.clip_retention_seconds) + 60

    def _arq(self, enqueue: Enqueue | None) -> tuple[list[str], list[Any]]:
        """The keys and arguments of the ``enqueue`` part of a script."""
        queue = self.settings.clip_queue_name
        if enqueue is None:
            return [job_key_prefix, queue], ["", "", 0, 0]
        now_ms = int(time.time() * 1000)
        defer_ms = int(enqueue.defer * 1000)
        payload = serialize_job(enqueue.function, enqueue.args, {}, None, now_ms, serializer=dumps)
        expiry = defer_ms + expires_extra_ms
        return [job_key_prefix + enqueue.arq_id, queue], [
            enqueue.arq_id, payload, now_ms + defer_ms, expiry,
        ]  # fmt: skip

    async def _script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        # redis-py types script arguments as str; it sends ints, floats and bytes as well.
        call: Any = self.redis.eval
        return await call(script, len(keys), *keys, *args)

    async def load(self, job_id: str) -> StoredJob | None:
        raw = await self.redis.get(self.key("job", job_id))
        return StoredJob.model_validate_json(raw) if raw else None

    async def token(self, job_id: str) -> int:
        raw = await self.redis.get(self.key("token", job_id))
        return int(raw) if raw else 0

    async def run(self, job_id: str) -> int:
        raw = await self.redis.get(self.key("run", job_id))
        return int(raw) if raw else 0

    async def submit(self, job: StoredJob, idempotency_key: str | None) -> tuple[int, str]:
        """Accept a new job within its caller's share: (1, ''), (0, jobs the caller has), or
        (2, the job id ``idempotency_key`` is bound to)."""
        view, s = job.view, self.settings
        arq_keys, arq_args = self._arq(run_of(view.job_id, 1))
        keys = [
            self.key("job", view.job_id), self.key("key", idempotency_key or "-"),
            self.key("active", job.caller), self.deadlines, self.key("run", view.job_id),
            *arq_keys,
        ]  # fmt: skip
        args = [
            view.job_id, job.model_dump_json(), self.ttl, int(idempotency_key is not None),
            s.clip_max_queued_per_caller, time.time(), deliveries_end_by(view.created_at, s),
            runs_end_by(view.created_at, s), *arq_args,
        ]  # fmt: skip
        code, value = await self._script(SUBMIT, keys, args)
        return int(code), value.decode() if isinstance(value, bytes) else str(value)

    async def commit(
        self,
        job: StoredJob,
        token: int,
        *,
        release: bool = False,
        finished: bool = False,
        enqueue: Enqueue | None = None,
        next_run: int | None = None,
    ) -> bool:
        """Write the record if ``token`` is still the job's; False when it is not."""
        job_id = job.view.job_id
        arq_keys, arq_args = self._arq(enqueue)
        keys = [
            self.key("job", job_id), self.key("token", job_id), self.leases,
            self.key("running", job.caller), self.key("active", job.caller), self.deadlines,
            *arq_keys, self.key("run", job_id),
        ]  # fmt: skip
        args = [
            token, job.model_dump_json(), self.ttl, int(release), int(finished), job_id,
            *arq_args, "" if next_run is None else next_run,
        ]  # fmt: skip
        done = await self._script(COMMIT, keys, args)
        return bool(done)

    async def acquire(self, job: StoredJob, run: int, lease_until: float) -> int:
        job_id = job.view.job_id
        keys = [
            self.key("run", job_id), self.key("job", job_id), self.key("token", job_id),
            self.leases, self.key("running", job.caller),
        ]  # fmt: skip
        args = [
            job_id, run, time.time(), lease_until, self.settings.clip_max_running_per_caller,
            self.ttl,
        ]  # fmt: skip
        return int(await self._script(ACQUIRE, keys, args))

    async def renew(self, job: StoredJob, token: int, lease_until: float) -> int:
        job_id = job.view.job_id
        keys = [
            self.key("token", job_id), self.leases, self.key("running", job.caller),
            self.key("cancel", job_id),
        ]  # fmt: skip
        result = await self._script(RENEW, keys, [token, job_id, lease_until])
        return int(result)

    async def next_run(self, job: StoredJob, run: int, *, lapsed: bool, defer: float) -> int:
        """Enqueue run ``run + 1`` of the job if ``run`` is its current one (and, ``lapsed``,
        its lease ran out): how a waiting job comes back and how a dead worker's job is taken.
        0 when not; else, ``lapsed``, the token that fenced the lapsed run off."""
        job_id = job.view.job_id
        arq_keys, arq_args = self._arq(run_of(job_id, run + 1, defer))
        keys = [
            self.key("run", job_id), self.leases, self.key("running", job.caller),
            self.key("token", job_id), *arq_keys,
        ]  # fmt: skip
        args = [run, run + 1, job_id, time.time(), int(lapsed), self.ttl, *arq_args]
        return int(await self._script(NEXT_RUN, keys, args))

    async def fence(self, job_id: str) -> int:
        """A new token for a writer that is not a run (cancel, the deadline): runs lose theirs."""
        key = self.key("token", job_id)
        return int(await self._script(FENCE, [key], [self.ttl]))

    async def forget(self, job_id: str) -> None:
        await self.fence(job_id)
        await self.redis.delete(self.key("job", job_id))

    async def lapsed(self, now: float) -> list[str]:
        found = await self.redis.zrangebyscore(self.leases, 0, now, start=0, num=100)
        return [job_id.decode() for job_id in found]

    async def past_deadline(self, now: float) -> list[str]:
        found = await self.redis.zrangebyscore(self.deadlines, 0, now, start=0, num=100)
        return [job_id.decode() for job_id in found]

    async def lease_live(self, job_id: str, now: float) -> bool:
        held = await self.redis.zscore(self.leases, job_id)
        return held is not None and float(held) > now

    async def drop(self, job_id: str) -> None:
        """Forget a vanished job's lease and deadline entries."""
        await self.redis.zrem(self.leases, job_id)
        await self.redis.zrem(self.deadlines, job_id)

    async def running_of(self, caller: str, now: float) -> list[str]:
        found = await self.redis.zrangebyscore(self.key("running", caller), now, "+inf")
        return [job_id.decode() for job_id in found]

    async def active_until(self, caller: str, now: float) -> list[float]:
        """When the caller's jobs waiting or running surely end (their deadlines)."""
        found = await self.redis.zrangebyscore(
            self.key("active", caller), now, "+inf", withscores=True
        )
        return [float(score) for _, score in found]

    async def run_seconds(self) -> float:
        raw = await self.redis.get(self.key("stats", "run_seconds"))
        return float(raw) if raw else DEFAULT_RUN_SECONDS

    async def ran_for(self, seconds: float) -> None:
        """Fold one successful run's time into the moving average (a lost update costs nothing)."""
        average = await self.run_seconds()
        updated = average + RUN_SECONDS_WEIGHT * (seconds - average)
        await self.redis.set(self.key("stats", "run_seconds"), updated)

    async def keep_result_until(self, result_key: str, deadline: float) -> None:
        """List a result for deletion at ``deadline`` (before it exists, too)."""
        await self.redis.zadd(self.key("results", "due"), {result_key: deadline})

    async def results_due(self, now: float) -> list[str]:
        found = await self.redis.zrangebyscore(self.key("results", "due"), 0, now, start=0, num=100)
        return [key.decode() for key in found]

    async def result_gone(self, result_key: str) -> None:
        await self.redis.zrem(self.key("results", "due"), result_key)

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.set(self.key("cancel", job_id), b"1", ex=self.ttl)

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.key("cancel", job_id)))

    async def save_worker(self, record: WorkerRecord) -> None:
        await self.redis.set(
            self.key("worker", record.worker), record.model_dump_json(), ex=WORKER_TTL_SECONDS
        )

    async def drop_worker(self, worker_id: str) -> None:
        await self.redis.delete(self.key("worker", worker_id))

    async def workers(self) -> list[WorkerRecord]:
        """The records of the workers alive now (each expires unless its worker renews it)."""
        keys = [key async for key in self.redis.scan_iter(match=self.key("worker", "*"))]
        found = await self.redis.mget(keys) if keys else []
        return [WorkerRecord.model_validate_json(raw) for raw in found if raw]

    async def queued(self) -> int:
        return int(await self.redis.zcard(self.settings.clip_queue_name))


async def end(store: Store, job: StoredJob, token: int, *, release: bool = False) -> bool:
    """Record the job's end and, in the same step, queue its webhook (built from the record
    and the stored file when it is sent)."""
    job_id = job.view.job_id
    if job.ouro.webhook_url:
        job.view.webhook = WebhookState.pending
        job.webhook_started_at = time.time()
    # Earlier runs' results (a run whose worker died after its upload) go now.
    earlier = {f"{job_id}-{run_token}" for run_token in range(1, token + 1)} - {job.result_key}
    if earlier:
        await store.redis.zadd(store.key("results", "due"), dict.fromkeys(earlier, 0))
    enqueue = webhook_of(job_id) if job.ouro.webhook_url else None
    return await store.commit(job, token, release=release, finished=True, enqueue=enqueue)


async def fail(
    store: Store, job: StoredJob, token: int, error: HermesError, *, release: bool = False
) -> bool:
    view = job.view
    view.status, view.finished_at, view.stage = JobStatus.failed, time.time(), "failed"
    view.error = ErrorDetail(code=error.code, message=error.message)
    return await end(store, job, token, release=release)


def redis_connection(settings: ClipSettings) -> ArqRedis:
    """A lazily connecting client: the API starts, and answers 503, while Redis is down."""
    assert settings.redis_url is not None
    pool = ConnectionPool.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=5
    )
    return ArqRedis(
        pool,
        job_serializer=dumps,
        job_deserializer=json.loads,
        default_queue_name=settings.clip_queue_name,
    )
