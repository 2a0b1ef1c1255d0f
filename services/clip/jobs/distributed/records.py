"""What the distributed queue keeps in Redis, and the atomic steps that change it.

Every key lives under the deployment's queue name ``P``:

- ``P:job:<id>``: the job's record (``StoredJob``, JSON); ``P:token:<id>``: its fencing token,
  raised by every run or delivery attempt that takes the job and by anyone else who ends it
  (cancel, deadline); ``P:run:<id>``: the arq job the job's current run belongs to
  (``<id>:r<run>``); ``P:delivery:<id>``: the same for its webhook (``<id>:w<attempt>``).
- ``P:leases``: running jobs by the time their lease ends; ``P:running:<caller>``: the same for
  one caller's jobs, ``P:active:<caller>``: the caller's jobs waiting or running, by the time
  the job surely ended (its deadline), so a count never outlives a crash; ``P:deliveries``:
  webhooks being sent, by the time their lease ends; ``P:picked:<arq id>``: when a sweep first
  saw that arq job picked by a worker but holding no lease.
- ``P:deadlines``: unfinished jobs by the time their runs must have ended.
- ``P:results:due``: result files by the time they are deleted; ``P:stats:run_seconds``: the
  moving average of run times (for ``Retry-After``); ``P:cancel:<id>``, ``P:key:<key>``
  (idempotency), ``P:worker:<id>`` (live workers).

A record is only ever written by ``commit``: a Lua script that writes it only while the token
is the writer's, and in the same step releases the lease, drops the job from its caller's
counts, and enqueues the arq job that comes next (a run or a delivery attempt). A worker that
stalled and lost its job can then change nothing, and a job's end and its webhook are never
apart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from pydantic import BaseModel
from redis.asyncio import ConnectionPool

from services.clip.canary import CanaryResult
from services.clip.jobs.model import (
    JobRecord,
    JobStatus,
    WebhookState,
    deliveries_end_by,
    runs_end_by,
)
from services.clip.settings import ClipSettings
from services.clip.toolchain import Check
from services.common.errors import ErrorDetail, HermesError

REDIS_DOWN = "The job queue is unreachable; try again shortly."
# A worker renews its record every few seconds; one not renewed for the TTL is dead.
WORKER_TTL_SECONDS = 30
# What a run takes before any has been measured (a short clip on a quiet worker).
DEFAULT_RUN_SECONDS = 30.0
# Weight of the newest run in the moving average of run times.
RUN_SECONDS_WEIGHT = 0.2


class StoredJob(JobRecord):
    """Everything about one job that every replica and worker must see."""

    webhook_started_at: float | None = None
    result_key: str | None = None


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


# What holds a lease on a job: one of its runs, or one attempt to deliver its webhook.
Kind = Literal["run", "delivery"]
_FUNCTIONS: dict[Kind, str] = {"run": "clip_job", "delivery": "deliver_webhook"}
_SUFFIXES: dict[Kind, str] = {"run": "r", "delivery": "w"}


@dataclass(frozen=True)
class Enqueue:
    """Run or delivery attempt ``number`` of a job as an arq job of its own, to put in the
    queue in the same step as a commit (which makes it the job's current one)."""

    kind: Kind
    job_id: str
    number: int
    defer: float = 0.0

    @property
    def function(self) -> str:
        return _FUNCTIONS[self.kind]

    @property
    def arq_id(self) -> str:
        return f"{self.job_id}:{_SUFFIXES[self.kind]}{self.number}"

    @property
    def args(self) -> tuple[str, int]:
        return self.job_id, self.number


def run_of(job_id: str, run: int, defer: float = 0.0) -> Enqueue:
    return Enqueue("run", job_id, run, defer)


def webhook_of(job_id: str, attempt: int = 1, defer: float = 0.0) -> Enqueue:
    return Enqueue("delivery", job_id, attempt, defer)


def parse_arq_id(arq_id: str) -> Enqueue | None:
    """The run or delivery attempt an arq job id names; None for any other id."""
    job_id, _, tail = arq_id.rpartition(":")
    for kind, suffix in _SUFFIXES.items():
        if job_id and tail[:1] == suffix and tail[1:].isdigit():
            return Enqueue(kind, job_id, int(tail[1:]))
    return None


# Puts an arq job in the queue as ``ArqRedis.enqueue_job`` does, unless that id is there already.
_ENQUEUE = """
local function enqueue(job_key, queue, arq_id, payload, score, expires_ms)
  if arq_id ~= '' and redis.call('EXISTS', job_key) == 0 then
    redis.call('PSETEX', job_key, expires_ms, payload)
    redis.call('ZADD', queue, score, arq_id)
  end
end
"""

# Whether a run (kind 'run') or a delivery attempt may still take the job of this record.
_WANTED = """
local function wanted(raw, kind)
  if not raw then return false end
  local view = cjson.decode(raw)['view']
  if kind == 'delivery' then return view['webhook'] == 'pending' end
  return view['status'] ~= 'succeeded' and view['status'] ~= 'failed'
end
"""

# The lease's sets (``Store.held``) are the last keys of the scripts that change a lease.
# KEYS: record, token, active, deadlines, current, arq job, queue, lease sets to release...
# ARGV: token, record, ttl, finished, job id, number, arq id, payload, score, expiry
COMMIT = (
    _ENQUEUE
    + """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
for i = 8, #KEYS do redis.call('ZREM', KEYS[i], ARGV[5]) end
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[5])
end
if ARGV[6] ~= '' then redis.call('SET', KEYS[5], ARGV[6], 'EX', ARGV[3]) end
enqueue(KEYS[6], KEYS[7], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
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

# A run or delivery attempt takes its job: -1 not its to take (a stale arq job, nothing left
# to do, or another holds a live lease), 0 the caller already runs as many as allowed (a run:
# its second lease set is the caller's running runs), else the new token.
# KEYS: current, record, token, lease sets... ARGV: job id, number, now, lease until, cap,
#       ttl, kind
ACQUIRE = (
    _WANTED
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
if not wanted(redis.call('GET', KEYS[2]), ARGV[7]) then return -1 end
local held = redis.call('ZSCORE', KEYS[4], ARGV[1])
if held and tonumber(held) > tonumber(ARGV[3]) then return -1 end
if KEYS[5] then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[3])
  if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[5]) then return 0 end
end
local token = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[6])
for i = 4, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[4], ARGV[1])
  redis.call('EXPIRE', KEYS[i], ARGV[6])
end
return token
"""
)

# 1 renewed, 0 the lease is someone else's now, 2 renewed but a cancel was asked for (only
# a run stops for one: a finished job's webhook goes out whatever is asked).
# KEYS: token, cancel, lease sets... ARGV: token, job id, lease until, cancellable
RENEW = """
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return 0 end
for i = 3, #KEYS do redis.call('ZADD', KEYS[i], ARGV[3], ARGV[2]) end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
return 1
"""

# The job's next run or delivery attempt, when ``number`` is still the current one; with
# ``lapsed`` set only when its lease ended (then the lapsed holder is fenced off at once):
# 0 not enqueued, else the token.
# KEYS: current, token, arq job, queue, lease sets...
# ARGV: number, next, job id, now, lapsed, ttl, arq id, payload, score, expiry
NEXT_RUN = (
    _ENQUEUE
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local token = 1
if ARGV[5] == '1' then
  local held = redis.call('ZSCORE', KEYS[5], ARGV[3])
  if not held or tonumber(held) > tonumber(ARGV[4]) then return 0 end
  for i = 5, #KEYS do redis.call('ZREM', KEYS[i], ARGV[3]) end
  token = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[6])
enqueue(KEYS[3], KEYS[4], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
return token
"""
)

# The next run or delivery attempt of a job whose current one a worker picked from arq's queue
# but never took the lease of (the worker died in between): 1 once sweeps have seen it so for
# ``after`` seconds, else 0. One still waiting in the queue has no in-progress mark; one that
# took its lease, or whose job needs nothing more, is left alone.
# KEYS: current, record, arq in-progress mark, picked, lease set, arq job, queue
# ARGV: number, next, job id, now, after, kind, ttl, arq id, payload, score, expiry
UNSTARTED = (
    _ENQUEUE
    + _WANTED
    + """
local function forget()
  redis.call('DEL', KEYS[4])
  return 0
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return forget() end
if redis.call('EXISTS', KEYS[3]) == 0 then return forget() end
if redis.call('ZSCORE', KEYS[5], ARGV[3]) then return forget() end
if not wanted(redis.call('GET', KEYS[2]), ARGV[6]) then return forget() end
local seen = redis.call('GET', KEYS[4])
if not seen then
  redis.call('SET', KEYS[4], ARGV[4], 'EX', math.ceil(3 * tonumber(ARGV[5])))
  return 0
end
if tonumber(ARGV[4]) - tonumber(seen) < tonumber(ARGV[5]) then return 0 end
redis.call('DEL', KEYS[4])
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[7])
enqueue(KEYS[6], KEYS[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11])
return 1
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
    def deadlines(self) -> str:
        return f"{self.settings.clip_queue_name}:deadlines"

    def lease_set(self, kind: Kind) -> str:
        """Every job's lease of this kind, by the time it ends."""
        name = "leases" if kind == "run" else "deliveries"
        return f"{self.settings.clip_queue_name}:{name}"

    def held(self, kind: Kind, job: StoredJob) -> list[str]:
        """The sets a lease of this kind is kept in: a run's counts in its caller's share too."""
        if kind == "run":
            return [self.lease_set(kind), self.key("running", job.caller)]
        return [self.lease_set(kind)]

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

    async def current(self, job_id: str, kind: Kind = "run") -> int:
        """The number of the job's current run (or delivery attempt)."""
        raw = await self.redis.get(self.key(kind, job_id))
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
        release: Kind | None = None,
        finished: bool = False,
        enqueue: Enqueue | None = None,
    ) -> bool:
        """Write the record if ``token`` is still the job's; False when it is not. In the same
        step: release the lease of kind ``release``, drop a ``finished`` job from its caller's
        counts, and make ``enqueue`` the job's current run or delivery attempt."""
        job_id = job.view.job_id
        arq_keys, arq_args = self._arq(enqueue)
        current = self.key(enqueue.kind if enqueue else "run", job_id)
        keys = [
            self.key("job", job_id), self.key("token", job_id), self.key("active", job.caller),
            self.deadlines, current, *arq_keys, *(self.held(release, job) if release else []),
        ]  # fmt: skip
        args = [
            token, job.model_dump_json(), self.ttl, int(finished), job_id,
            enqueue.number if enqueue else "", *arq_args,
        ]  # fmt: skip
        done = await self._script(COMMIT, keys, args)
        return bool(done)

    async def acquire(self, job: StoredJob, kind: Kind, number: int, lease_until: float) -> int:
        job_id = job.view.job_id
        keys = [
            self.key(kind, job_id), self.key("job", job_id), self.key("token", job_id),
            *self.held(kind, job),
        ]  # fmt: skip
        args = [
            job_id, number, time.time(), lease_until, self.settings.clip_max_running_per_caller,
            self.ttl, kind,
        ]  # fmt: skip
        return int(await self._script(ACQUIRE, keys, args))

    async def renew(self, job: StoredJob, kind: Kind, token: int, lease_until: float) -> int:
        job_id = job.view.job_id
        keys = [self.key("token", job_id), self.key("cancel", job_id), *self.held(kind, job)]
        args = [token, job_id, lease_until, int(kind == "run")]
        return int(await self._script(RENEW, keys, args))

    async def next_run(
        self, job: StoredJob, number: int, *, lapsed: bool, defer: float, kind: Kind = "run"
    ) -> int:
        """Enqueue run (or delivery attempt) ``number + 1`` of the job if ``number`` is its
        current one (and, ``lapsed``, its lease ran out): how a waiting job comes back and how
        a dead worker's job or delivery is taken. 0 when not; else, ``lapsed``, the token that
        fenced the lapsed holder off."""
        job_id = job.view.job_id
        arq_keys, arq_args = self._arq(Enqueue(kind, job_id, number + 1, defer))
        keys = [
            self.key(kind, job_id), self.key("token", job_id), *arq_keys, *self.held(kind, job),
        ]  # fmt: skip
        args = [number, number + 1, job_id, time.time(), int(lapsed), self.ttl, *arq_args]
        return int(await self._script(NEXT_RUN, keys, args))

    async def picked(self) -> list[str]:
        """The arq jobs of this queue that workers have picked and not finished.

        A picked job stays first in arq's queue (by the time it became due) until it ends, and
        a worker reads no further than ``queue_read_limit`` (arq's default: 100 at our
        concurrency) ahead, so reading as far finds every picked one."""
        queue_read_limit = max(self.settings.clip_concurrency * 5, 100)
        due = await self.redis.zrangebyscore(
            self.settings.clip_queue_name, "-inf", time.time() * 1000, 0, queue_read_limit
        )
        ids = [arq_id.decode() for arq_id in due]
        async with self.redis.pipeline(transaction=False) as pipe:
            for arq_id in ids:
                pipe.exists(in_progress_key_prefix + arq_id)
            marked = await pipe.execute()
        return [arq_id for arq_id, mark in zip(ids, marked, strict=True) if mark]

    async def unstarted(self, job: StoredJob, picked: Enqueue, now: float, after: float) -> bool:
        """Enqueue the next run or delivery attempt after ``picked`` if that one was picked by
        a worker, took no lease, and has been seen so for ``after`` seconds (``UNSTARTED``)."""
        job_id, kind = job.view.job_id, picked.kind
        arq_keys, arq_args = self._arq(Enqueue(kind, job_id, picked.number + 1))
        keys = [
            self.key(kind, job_id), self.key("job", job_id),
            in_progress_key_prefix + picked.arq_id, self.key("picked", picked.arq_id),
            self.lease_set(kind), *arq_keys,
        ]  # fmt: skip
        args = [
            picked.number, picked.number + 1, job_id, now, after, kind, self.ttl, *arq_args,
        ]  # fmt: skip
        return bool(await self._script(UNSTARTED, keys, args))

    async def fence(self, job_id: str) -> int:
        """A new token for a writer that is not a run (cancel, the deadline): runs lose theirs."""
        key = self.key("token", job_id)
        return int(await self._script(FENCE, [key], [self.ttl]))

    async def forget(self, job_id: str) -> None:
        await self.fence(job_id)
        await self.redis.delete(self.key("job", job_id))

    async def lapsed(self, kind: Kind, now: float) -> list[str]:
        found = await self.redis.zrangebyscore(self.lease_set(kind), 0, now, start=0, num=100)
        return [job_id.decode() for job_id in found]

    async def past_deadline(self, now: float) -> list[str]:
        found = await self.redis.zrangebyscore(self.deadlines, 0, now, start=0, num=100)
        return [job_id.decode() for job_id in found]

    async def lease_live(self, job_id: str, now: float) -> bool:
        held = await self.redis.zscore(self.lease_set("run"), job_id)
        return held is not None and float(held) > now

    async def drop(self, job_id: str, kind: Kind = "run") -> None:
        """Forget the lease of a job that needs no more of this kind (and, for a run, its
        deadline entry)."""
        await self.redis.zrem(self.lease_set(kind), job_id)
        if kind == "run":
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


def wanted(kind: Kind, job: StoredJob) -> bool:
    """Whether the job still needs a run (or a delivery attempt) (``_WANTED`` in Lua)."""
    if kind == "delivery":
        return job.view.webhook is WebhookState.pending
    return not job.view.finished


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
    return await store.commit(
        job, token, release="run" if release else None, finished=True, enqueue=enqueue
    )


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
