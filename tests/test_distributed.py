"""Distributed clip jobs: the real app and real arq workers (subprocesses) on a real Redis."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.constants import in_progress_key_prefix
from standardwebhooks.webhooks import Webhook

from services.clip.app import create_app
from services.clip.jobs.distributed.lease import LEASE_SECONDS, Lease
from services.clip.jobs.distributed.records import Store, StoredJob, end, redis_connection
from services.clip.jobs.distributed.sweeper import take_back_unstarted
from services.clip.jobs.model import JobStatus, queued_view
from services.clip.request import build_spec
from services.clip.settings import ClipSettings
from services.common.ouro import OuroHeaders
from tests.conftest import Media
from tests.support.apps import client, wait_until
from tests.support.rangeserver import ThrottlePolicy
from tests.support.receiver import Receiver
from tests.support.redis import RedisServer, redis_server

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
JOB_TIMEOUT = 6.0
WEBHOOK_TIMEOUT = 1.0


@dataclass
class Cluster:
    """One deployment: a Redis, a queue name of its own, the API, and worker processes."""

    redis: RedisServer
    media: Media
    root: Path
    queue: str = field(default_factory=lambda: f"hermes-test:{uuid.uuid4().hex[:8]}")
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        values = {
            "HERMES_REDIS_URL": self.redis.url,
            "HERMES_CLIP_QUEUE_NAME": self.queue,
            "HERMES_ALLOW_PRIVATE_NETWORKS": "true",
            "HERMES_CLIP_EXTRA_SOURCE_HOSTS": self.media.host,
            "HERMES_CLIP_WORK_DIR": str(self.root / "work"),
            "HERMES_CLIP_STORAGE_URL": str(self.root / "results"),
            "HERMES_CLIP_JOB_TIMEOUT_SECONDS": str(JOB_TIMEOUT),
            "HERMES_CLIP_RETRY_BACKOFF_SECONDS": "0.2",
            "HERMES_WEBHOOK_BACKOFF_SECONDS": "0.2",
            "HERMES_WEBHOOK_TIMEOUT_SECONDS": str(WEBHOOK_TIMEOUT),
            "HERMES_WEBHOOK_SECRET": SECRET,
            "HERMES_WORKER_SHUTDOWN_GRACE_SECONDS": "0",
            **extra,
        }
        kept = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
        return {**kept, **values}

    def settings(self) -> ClipSettings:
        return ClipSettings(
            redis_url=self.redis.url,
            clip_queue_name=self.queue,
            allow_private_networks=True,
            clip_extra_source_hosts=self.media.host,
            clip_work_dir=self.root / "work",
            clip_storage_url=str(self.root / "results"),
        )

    def start_worker(self, **extra: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"worker-{len(self.workers)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-c", "from services.cli import main; main(['worker'])"],
            env=self.env(**extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(process)
        return process

    def log(self, index: int) -> str:
        return (self.root / f"worker-{index}.log").read_text()

    def stop(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def cluster(media: Media, tmp_path: Path) -> Iterator[Cluster]:
    with redis_server(tmp_path / "redis") as redis:
        found = Cluster(redis=redis, media=media, root=tmp_path)
        try:
            yield found
        finally:
            found.stop()


def ask(
    api: httpx.Client,
    url: str,
    start: str,
    end: str,
    hook: Receiver,
    action: str = "",
    user: str | None = None,
) -> httpx.Response:
    headers = {
        **({"ouro-user-id": user} if user else {}),
        "ouro-webhook-url": hook.url,
        "ouro-webhook-token": "tok",
        "ouro-action-id": action or uuid.uuid4().hex,
        "ouro-route-id": "route-1",
    }
    body = {"youtube_url": url, "start_time": start, "end_time": end}
    return api.post("/download-a-clip-from-youtube", json=body, headers=headers)


def view(api: httpx.Client, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = api.get(f"/jobs/{job_id}").json()
    return found


def test_jobs_run_on_two_workers_and_are_delivered_signed(cluster: Cluster, hook: Receiver) -> None:
    cluster.start_worker()
    cluster.start_worker()
    with client(create_app(cluster.settings())) as api:
        url = cluster.media.url("s60.mp4")
        jobs = [ask(api, url, "0:01", f"0:0{2 + i % 3}", hook).json()["job_id"] for i in range(6)]
        deliveries = hook.wait(6, timeout=90)
        views = [
            wait_until(lambda j=j: (v := view(api, j))["webhook"] == "delivered" and v)
            for j in jobs
        ]
        file = api.get(f"/jobs/{jobs[0]}/file")
    assert {v["status"] for v in views} == {"succeeded"}
    assert file.status_code == 200
    assert file.content[4:8] == b"ftyp"
    for delivery in deliveries:
        assert delivery.body["status"] == "success"
        assert delivery.headers["ouro-webhook-token"] == "tok"
        Webhook(SECRET).verify(_compact(delivery.body), delivery.headers)
    ran = [sum(job in cluster.log(i) for job in jobs) for i in range(2)]
    assert all(count > 0 for count in ran), ran
    assert not list((cluster.root / "work").glob("*/clip.mp4"))


def _compact(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


def test_twenty_identical_requests_make_one_job(cluster: Cluster, hook: Receiver) -> None:
    cluster.start_worker()
    with client(create_app(cluster.settings())) as api:
        url = cluster.media.url("s60.mp4")
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def send() -> None:
            response = ask(api, url, "0:01", "0:02", hook, action="same-action")
            with lock:
                answers.append(response)

        threads = [threading.Thread(target=send) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        hook.wait(1)
        time.sleep(1.5)
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["job_id"] for a in answers}) == 1
    assert len(hook.deliveries) == 1


def test_idempotency_key_for_direct_callers(cluster: Cluster) -> None:
    with client(create_app(cluster.settings())) as api:
        body = {"youtube_url": cluster.media.url("s60.mp4"), "start_time": "1", "end_time": "2"}
        first = api.post(
            "/download-a-clip-from-youtube", json=body, headers={"idempotency-key": "k1"}
        )
        again = api.post(
            "/download-a-clip-from-youtube", json=body, headers={"idempotency-key": "k1"}
        )
        other = api.post(
            "/download-a-clip-from-youtube", json=body, headers={"idempotency-key": "k2"}
        )
    assert first.json()["job_id"] == again.json()["job_id"] != other.json()["job_id"]


def test_webhook_500_three_times_then_200(cluster: Cluster, hook: Receiver) -> None:
    hook.statuses = [500, 502, 503]
    cluster.start_worker()
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:02", hook).json()["job_id"]
        deliveries = hook.wait(4, timeout=60)
        wait_until(lambda: view(api, job)["webhook"] == "delivered")
        time.sleep(0.5)
    assert len(hook.deliveries) == 4
    assert {d.headers["webhook-id"] for d in deliveries} == {job}
    assert all(d.body == deliveries[0].body for d in deliveries)
    gaps = [b.at - a.at for a, b in itertools.pairwise(deliveries)]
    assert gaps[0] < gaps[2], gaps
    assert cluster.log(0).count("clip_job(") == 1, "a failed delivery must not repeat the clip"


def test_webhook_that_hangs_is_cut_and_retried(cluster: Cluster, hook: Receiver) -> None:
    hook.delays = [WEBHOOK_TIMEOUT + 2]
    cluster.start_worker()
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:02", hook).json()["job_id"]
        first, second = hook.wait(2, timeout=60)
        wait_until(lambda: view(api, job)["webhook"] == "delivered")
    assert second.at - first.at < WEBHOOK_TIMEOUT + 1.5


def test_webhook_410_stops_delivery(cluster: Cluster, hook: Receiver) -> None:
    hook.statuses = [410]
    cluster.start_worker()
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:02", hook).json()["job_id"]
        hook.wait(1)
        wait_until(lambda: view(api, job)["webhook"] == "failed")
        time.sleep(1)
    assert len(hook.deliveries) == 1


def test_transient_failures_are_retried_terminal_ones_not(cluster: Cluster, hook: Receiver) -> None:
    cluster.start_worker()
    with client(create_app(cluster.settings())) as api:
        cluster.media.server.fail_next(503, count=2)
        retried = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:02", hook).json()["job_id"]
        final = wait_until(lambda: (v := view(api, retried))["webhook"] == "delivered" and v)
        bad = ask(api, cluster.media.url("s60.mp4"), "0:50", "1:10", hook).json()["job_id"]
        failed = wait_until(lambda: (v := view(api, bad))["webhook"] == "delivered" and v)
    assert final["status"] == "succeeded"
    assert final["tries"] == 3
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "range_out_of_bounds"
    assert failed["tries"] == 1


def test_timeout_ends_with_an_error_webhook(cluster: Cluster, hook: Receiver) -> None:
    cluster.start_worker(HERMES_CLIP_JOB_TIMEOUT_SECONDS="0.5")
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:55", hook).json()["job_id"]
        [delivery] = hook.wait(1, timeout=60)
        assert view(api, job)["error"]["code"] == "job_timeout"
    assert delivery.body["response"]["error"]["code"] == "job_timeout"


def wait_for_cutting(api: httpx.Client, job: str) -> None:
    wait_until(lambda: view(api, job)["stage"] == "cutting", timeout=30, every=0.02)


SLOW = ThrottlePolicy(max_fast_bytes=0, slow_rate=32 * 1024)
DEFAULT_JOB_TIMEOUT = {"HERMES_CLIP_JOB_TIMEOUT_SECONDS": "600"}


def runner_of(cluster: Cluster, arq_id: str) -> int:
    """The index of the worker that started the arq job ``arq_id`` (``<job>:r<run>`` or
    ``<job>:w<attempt>``; arq logs each job it starts)."""
    found: tuple[int] = wait_until(
        lambda: next(((i,) for i in range(len(cluster.workers)) if arq_id in cluster.log(i)), None),
        timeout=60,
    )
    return found[0]


def test_sigkill_mid_job_runs_again_within_a_minute(cluster: Cluster, hook: Receiver) -> None:
    """With the default 600 s job time limit, a killed worker's job runs again on the other
    worker within a minute (its lease lapses), and its webhook arrives once, under the job id."""
    cluster.media.server.throttle = SLOW
    cluster.start_worker(**DEFAULT_JOB_TIMEOUT)
    cluster.start_worker(**DEFAULT_JOB_TIMEOUT)
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:20", hook).json()["job_id"]
        wait_until(lambda: view(api, job)["stage"] == "fetching", timeout=60, every=0.02)
        first = runner_of(cluster, f"{job}:r1")
        cluster.workers[first].send_signal(signal.SIGKILL)
        killed_at, killed_mono = time.time(), time.monotonic()
        cluster.workers[first].wait(timeout=10)
        cluster.media.server.throttle = None
        second = wait_until(lambda: (v := view(api, job))["tries"] == 2 and v, timeout=60)
        [delivery] = hook.wait(1, timeout=60)
        final = wait_until(lambda: (v := view(api, job))["webhook"] == "delivered" and v)
        time.sleep(1)
    print(
        f"kill -> second start {second['started_at'] - killed_at:.1f} s, "
        f"kill -> webhook {delivery.at - killed_mono:.1f} s"
    )
    assert second["started_at"] - killed_at < 60
    assert delivery.at - killed_mono < 60
    assert f"{job}:r2" in cluster.log(1 - first), "the other worker ran it again"
    assert delivery.body["status"] == "success"
    assert delivery.headers["webhook-id"] == job
    assert len(hook.deliveries) == 1
    assert final["status"] == "succeeded"
    assert final["tries"] == 2
    assert not list((cluster.root / "work").glob(f"{job}*")), "the run directories are gone"


# Longer than a kill takes, shorter than the delivery's recovery: the receiver's thread is done
# before the second delivery comes (the receiver waits for its threads when it closes).
HELD_SECONDS = 12.0


def test_sigkill_mid_webhook_post_is_delivered_by_the_other_worker_within_a_minute(
    cluster: Cluster, hook: Receiver
) -> None:
    """The receiver holds the first webhook POST open and its sender is SIGKILLed mid-POST: with
    the default 600 s job time limit, the other worker sends it within a minute (its delivery
    lease lapses), with the same webhook-id and body, and the job says delivered."""
    hook.delays = [HELD_SECONDS]
    env = {**DEFAULT_JOB_TIMEOUT, "HERMES_WEBHOOK_TIMEOUT_SECONDS": "60"}
    cluster.start_worker(**env)
    cluster.start_worker(**env)
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:02", hook).json()["job_id"]
        [first] = hook.wait(1, timeout=60)
        sender = runner_of(cluster, f"{job}:w1")
        assert view(api, job)["webhook"] == "pending", "the POST is still held open"
        cluster.workers[sender].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        cluster.workers[sender].wait(timeout=10)
        second = hook.wait(2, timeout=60)[1]
        final = wait_until(lambda: (v := view(api, job))["webhook"] == "delivered" and v)
        time.sleep(1)
    print(f"kill -> webhook from the other worker {second.at - killed:.1f} s")
    assert second.at - killed < 60
    assert f"{job}:w2" in cluster.log(1 - sender), "the other worker sent it again"
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == job
    assert second.body == first.body
    assert second.body["status"] == "success"
    assert len(hook.deliveries) == 2
    assert final["status"] == "succeeded"
    assert final["tries"] == 1, "a delivery's recovery never repeats the clip"


def test_a_run_or_delivery_picked_and_never_leased_is_taken_back(cluster: Cluster) -> None:
    """A worker that dies between arq handing it a run (or delivery attempt) and the lease
    leaves arq's in-progress mark and no lease: after a lease's time the sweep queues the next
    one, which alone may take the job. A run still waiting in the queue (no mark), and one that
    took its lease, are left alone."""
    asyncio.run(_picked_and_never_leased(cluster.settings(), cluster.media.url("s60.mp4")))


async def _picked_and_never_leased(settings: ClipSettings, url: str) -> None:
    redis = redis_connection(settings)
    store = Store(redis, settings)
    waiting, picked, started, delivering = [
        await _submitted(store, url, "http://127.0.0.1:9/hook") for _ in range(4)
    ]
    ended = delivering.view
    ended.status, ended.finished_at = JobStatus.failed, time.time()
    assert await end(store, delivering, await store.fence(ended.job_id))
    dead = [f"{picked.view.job_id}:r1", f"{started.view.job_id}:r1", f"{ended.job_id}:w1"]
    for arq_id in dead:  # as a worker marks a job it picks
        await redis.psetex(in_progress_key_prefix + arq_id, 615_000, b"1")
    assert isinstance(await Lease.take(store, started, "run", 1), Lease)
    now = time.time()
    await take_back_unstarted(store, now)
    await take_back_unstarted(store, now + LEASE_SECONDS - 0.5)
    runs = [await store.current(job.view.job_id) for job in (waiting, picked, started)]
    assert runs == [1, 1, 1]
    assert await store.current(ended.job_id, "delivery") == 1
    await take_back_unstarted(store, now + LEASE_SECONDS + 0.5)
    runs = [await store.current(job.view.job_id) for job in (waiting, picked, started)]
    assert runs == [1, 2, 1]
    assert await store.current(ended.job_id, "delivery") == 2
    queued = {arq_id.decode() for arq_id in await redis.zrange(settings.clip_queue_name, 0, -1)}
    assert {f"{picked.view.job_id}:r2", f"{ended.job_id}:w2"} <= queued
    # The picked ones, should arq ever start them, are no longer theirs to take.
    assert await Lease.take(store, picked, "run", 1) == -1
    assert await Lease.take(store, delivering, "delivery", 1) == -1
    assert isinstance(await Lease.take(store, picked, "run", 2), Lease)
    assert isinstance(await Lease.take(store, delivering, "delivery", 2), Lease)
    await redis.aclose()


def test_a_stalled_worker_cannot_overwrite_the_run_that_took_its_job(
    cluster: Cluster, hook: Receiver
) -> None:
    """SIGSTOP a worker mid-job: the other takes the job and finishes it; the first, woken up,
    finds its fencing token stale and writes nothing: state, file and webhook stay the second's."""
    cluster.media.server.throttle = SLOW
    cluster.start_worker(**DEFAULT_JOB_TIMEOUT)
    cluster.start_worker(**DEFAULT_JOB_TIMEOUT)
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:20", hook).json()["job_id"]
        wait_until(lambda: view(api, job)["stage"] == "fetching", timeout=60, every=0.02)
        stalled = runner_of(cluster, f"{job}:r1")
        cluster.workers[stalled].send_signal(signal.SIGSTOP)
        cluster.media.server.throttle = None
        [delivery] = hook.wait(1, timeout=60)
        done = wait_until(lambda: (v := view(api, job))["webhook"] == "delivered" and v)
        served = api.get(f"/jobs/{job}/file").content
        cluster.workers[stalled].send_signal(signal.SIGCONT)
        wait_until(lambda: "another run" in cluster.log(stalled), timeout=20)
        time.sleep(2)
        after = view(api, job)
        served_after = api.get(f"/jobs/{job}/file").content
    assert f"{job}:r2" in cluster.log(1 - stalled)
    assert after == done
    assert after["tries"] == 2
    assert served_after == served
    assert base64.b64decode(delivery.body["response"]["file"]["base64"]) == served
    assert len(hook.deliveries) == 1
    kept = [p.name for p in (cluster.root / "results").iterdir()]
    assert len(kept) == 1, kept
    assert kept[0].startswith(f"{job}-")
    assert cluster.workers[stalled].poll() is None, "the woken worker carries on"


def test_past_the_queued_cap_429_with_retry_after(cluster: Cluster, hook: Receiver) -> None:
    """No worker runs: a caller's jobs wait. At the cap they are accepted, one past it gets
    429 too_many_jobs with a Retry-After; another caller is not affected."""
    settings = cluster.settings().model_copy(update={"clip_max_queued_per_caller": 3})
    with client(create_app(settings)) as api:
        url = cluster.media.url("s60.mp4")
        accepted = [ask(api, url, "0:01", "0:02", hook, user="alice") for _ in range(3)]
        refused = ask(api, url, "0:01", "0:02", hook, user="alice")
        other = ask(api, url, "0:01", "0:02", hook, user="bob")
        direct = api.post(
            "/download-a-clip-from-youtube",
            json={"youtube_url": url, "start_time": "1", "end_time": "2"},
        )
        cancelled = api.delete(f"/jobs/{accepted[0].json()['job_id']}")
        again = ask(api, url, "0:01", "0:02", hook, user="alice")
    assert [a.status_code for a in accepted] == [202, 202, 202]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_jobs"
    assert 1 <= int(refused.headers["retry-after"]) <= settings.clip_deadline_seconds
    assert other.status_code == 202
    assert direct.status_code == 202
    assert cancelled.status_code == 200
    assert again.status_code == 202, "a job that ended frees its place"


def test_another_callers_job_starts_before_the_first_callers_backlog(
    cluster: Cluster, hook: Receiver
) -> None:
    """One running job per caller, two slots: alice's second and third jobs wait while bob's,
    sent after them, starts at once; alice's jobs never run two at a time."""
    cluster.media.server.throttle = SLOW
    cluster.start_worker(HERMES_CLIP_CONCURRENCY="2", HERMES_CLIP_MAX_RUNNING_PER_CALLER="1")
    with client(create_app(cluster.settings())) as api:
        url = cluster.media.url("s60.mp4")
        alice = [
            ask(api, url, "0:01", "0:04", hook, user="alice").json()["job_id"] for _ in range(3)
        ]
        wait_until(lambda: view(api, alice[0])["status"] == "running", timeout=60)
        time.sleep(0.5)
        bob = ask(api, url, "0:01", "0:02", hook, user="bob").json()["job_id"]
        wait_until(lambda: view(api, bob)["status"] != "queued", timeout=60)
        waiting = [view(api, job)["status"] for job in alice[1:]]
        cluster.media.server.throttle = None
        hook.wait(4, timeout=90)
        views = [
            wait_until(lambda j=j: (v := view(api, j))["webhook"] == "delivered" and v)
            for j in [*alice, bob]
        ]
    assert waiting == ["queued", "queued"]
    assert all(v["status"] == "succeeded" for v in views)
    first, second, third, bobs = views
    assert bobs["started_at"] < second["started_at"]
    assert second["started_at"] >= first["finished_at"]
    assert third["started_at"] >= second["finished_at"]


def test_a_job_past_its_deadline_fails_and_its_webhook_stops(
    cluster: Cluster, hook: Receiver
) -> None:
    """A job accepted so long ago that its runs must have ended fails with deadline_exceeded
    and an error webhook; a receiver that keeps failing is tried until the deadline, no later."""
    hook.statuses = [500] * 1000
    settings = cluster.settings()
    cluster.start_worker()
    wait_until(lambda: "Starting worker" in cluster.log(0), timeout=60)
    left = 8.0
    url = cluster.media.url("s60.mp4")
    age = settings.clip_deadline_seconds - left
    job = asyncio.run(_accepted_long_ago(settings, hook, url, age))
    ends = time.monotonic() + left
    with client(create_app(settings)) as api:
        failed = wait_until(lambda: (v := view(api, job))["webhook"] == "failed" and v, timeout=60)
    deliveries = list(hook.deliveries)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "deadline_exceeded"
    assert failed["tries"] == 0, "no run started after its runs had to end"
    assert len(deliveries) >= 3
    assert {d.body["response"]["error"]["code"] for d in deliveries} == {"deadline_exceeded"}
    assert {d.headers["webhook-id"] for d in deliveries} == {job}
    assert deliveries[-1].at < ends + 0.5


async def _accepted_long_ago(settings: ClipSettings, hook: Receiver, url: str, age: float) -> str:
    """A job as the API accepts it, but ``age`` seconds ago (the deadline cannot be set small:
    it is at least 600 s)."""
    redis = redis_connection(settings)
    job = await _submitted(Store(redis, settings), url, hook.url, age)
    await redis.aclose()
    return job.view.job_id


async def _submitted(store: Store, url: str, webhook_url: str, age: float = 0.0) -> StoredJob:
    """A job as the API accepts it, ``age`` seconds ago."""
    settings = store.settings
    job_view = queued_view()
    job_view.created_at -= age
    spec = build_spec(
        youtube_url=url, start_time="1", end_time="2", name=None,
        extra_hosts=settings.clip_extra_source_hosts, max_seconds=settings.clip_max_seconds,
        max_name_length=settings.clip_name_max_length, max_bytes=settings.clip_max_output_bytes,
    )  # fmt: skip
    ouro = OuroHeaders(action_id="a1", route_id="r1", webhook_url=webhook_url, webhook_token="t")
    job = StoredJob(view=job_view, spec=asdict(spec), ouro=ouro, caller=f"user:{job_view.job_id}")
    assert await store.submit(job, None) == (1, "")
    return job


def test_sigterm_lets_the_running_job_finish(cluster: Cluster, hook: Receiver) -> None:
    worker = cluster.start_worker(HERMES_WORKER_SHUTDOWN_GRACE_SECONDS="30")
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:30", hook).json()["job_id"]
        wait_for_cutting(api, job)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        finished = view(api, job)
        assert finished["status"] == "succeeded"
        assert finished["webhook"] == "pending", "the stopping worker takes no new job"
        cluster.start_worker()
        [delivery] = hook.wait(1, timeout=60)
    assert delivery.body["status"] == "success"
    assert finished["tries"] == 1


def test_sigterm_past_the_grace_hands_the_job_back(cluster: Cluster, hook: Receiver) -> None:
    worker = cluster.start_worker()
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:50", hook).json()["job_id"]
        wait_for_cutting(api, job)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        assert wait_until(lambda: view(api, job)["stage"] == "requeued", timeout=10)
        cluster.start_worker()
        [delivery] = hook.wait(1, timeout=60)
        final = wait_until(lambda: (v := view(api, job))["webhook"] == "delivered" and v)
    assert delivery.body["status"] == "success"
    assert final["tries"] == 2


def test_redis_outage_gives_503_then_everything_carries_on(
    cluster: Cluster, hook: Receiver
) -> None:
    cluster.start_worker()
    with client(create_app(cluster.settings())) as api:
        url = cluster.media.url("s60.mp4")
        before = ask(api, url, "0:01", "0:02", hook).json()["job_id"]
        hook.wait(1)
        cluster.redis.stop()
        down = ask(api, url, "0:01", "0:02", hook)
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "queue_unavailable"
        assert api.get(f"/jobs/{before}").status_code == 503
        time.sleep(1.5)
        cluster.redis.start()
        after = wait_until(
            lambda: (r := ask(api, url, "0:02", "0:03", hook)).status_code == 202 and r
        )
        hook.wait(2, timeout=60)
        assert view(api, before)["status"] == "succeeded"
        job = after.json()["job_id"]
        assert wait_until(lambda: view(api, job)["webhook"] == "delivered")
    assert cluster.workers[0].poll() is None, "the worker must outlive the outage"


def test_cancel_a_running_job(cluster: Cluster, hook: Receiver) -> None:
    cluster.start_worker()
    with client(create_app(cluster.settings())) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:50", hook).json()["job_id"]
        wait_for_cutting(api, job)
        cancelled = api.delete(f"/jobs/{job}").json()
        [delivery] = hook.wait(1, timeout=30)
    assert cancelled["error"]["code"] == "cancelled"
    assert delivery.body["response"]["error"]["code"] == "cancelled"
    assert not list((cluster.root / "work").glob(f"{job}*")), "the run directories are gone"


def test_worker_removes_dead_jobs_directories_on_start(cluster: Cluster) -> None:
    stale = cluster.root / "work" / ("a" * 32)
    stale.mkdir(parents=True)
    (stale / "clip.mp4").write_bytes(b"partial")
    cluster.start_worker()
    wait_until(lambda: not stale.exists(), timeout=20)
