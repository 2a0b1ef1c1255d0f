"""The embedded default across a crash, its fair share per caller, and its end-to-end deadline.

The restart test runs the real ``hermes-media serve clip`` process, kills it with SIGKILL while
jobs are queued and running and a webhook is still being retried, and starts it again on the
same work directory. The others run the app in this process on a throttled loopback origin;
the deadline tests start the app on a database written as a process that died long ago would
have left it, which is how a job meets its deadline without waiting ten minutes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from services.clip.app import create_app
from services.clip.jobs.model import JobStatus, JobView, WebhookState
from services.clip.jobs.sqlite_store import DATABASE, JobDatabase, JobDatabaseError, StoredRecord
from services.clip.request import build_spec
from services.clip.settings import ClipSettings
from services.common.errors import ErrorDetail
from services.common.ouro import OuroHeaders
from tests.conftest import Media
from tests.support.apps import client, free_port, wait_until
from tests.support.rangeserver import ThrottlePolicy
from tests.support.receiver import Receiver, receiver
from tests.support.serve import HERMES_MEDIA, serve_clip


def ask(
    api: httpx.Client, url: str, start: str, end: str, hook: Receiver, *, action: str, user: str
) -> httpx.Response:
    headers = {
        "ouro-webhook-url": hook.url,
        "ouro-webhook-token": "tok",
        "ouro-action-id": action,
        "ouro-route-id": "route-1",
        "ouro-user-id": user,
    }
    body = {"youtube_url": url, "start_time": start, "end_time": end}
    return api.post("/download-a-clip-from-youtube", json=body, headers=headers)


def view(api: httpx.Client, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = api.get(f"/jobs/{job_id}").json()
    return found


# --- a crash: SIGKILL with jobs queued, running and a webhook pending ----------------------


def process_env(media: Media, work: Path, **extra: str) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    return {
        **kept,
        "HERMES_ALLOW_PRIVATE_NETWORKS": "true",
        "HERMES_CLIP_EXTRA_SOURCE_HOSTS": media.host,
        "HERMES_CLIP_WORK_DIR": str(work),
        "HERMES_CLIP_CONCURRENCY": "2",
        "HERMES_CLIP_MAX_RUNNING_PER_CALLER": "2",
        "HERMES_WEBHOOK_BACKOFF_SECONDS": "0.05",
        "HERMES_WEBHOOK_BACKOFF_MAX_SECONDS": "0.3",
        **extra,
    }


def test_a_killed_process_restarted_on_its_work_dir_ends_every_job_and_delivers_every_webhook(
    media: Media, tmp_path: Path, hook: Receiver
) -> None:
    work, log = tmp_path / "work", tmp_path / "serve.log"
    env = process_env(media, work)
    url = media.url("s60.mp4")
    actions: dict[str, str] = {}
    # Every webhook fails until the kill: the first job's is still being retried then.
    hook.statuses = [503] * 10_000
    with serve_clip(env, log) as (process, base), httpx.Client(base_url=base, timeout=10) as api:
        first = ask(api, url, "0:01", "0:03", hook, action="a-first", user="u1").json()["job_id"]
        actions[first] = "a-first"
        wait_until(lambda: view(api, first)["status"] == "succeeded", timeout=60)
        hook.wait(2, timeout=30)
        assert view(api, first)["webhook"] == "pending"

        media.server.throttle = ThrottlePolicy(max_fast_bytes=0, slow_rate=8 * 1024)
        for n in range(4):
            action = f"a-{n}"
            job = ask(api, url, "0:05", "0:15", hook, action=action, user="u1").json()["job_id"]
            actions[job] = action
        later = list(actions)[1:]

        def two_running() -> bool:
            states = [view(api, j)["status"] for j in later]
            return states.count("running") == 2 and states.count("queued") == 2

        wait_until(two_running, timeout=30)
        running = {j for j in later if view(api, j)["status"] == "running"}

        # A second process on the same work directory is refused, and says why.
        second = subprocess.run(
            [str(HERMES_MEDIA), "serve", "clip", "--port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode != 0
        assert "Another process is using the clip work directory" in second.stderr
        assert view(api, first)["status"] == "succeeded", "the first process is unharmed"

        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    media.server.throttle = None
    hook.statuses.clear()
    delivered_before = len(hook.deliveries)

    started = time.monotonic()
    with serve_clip(env, log) as (_, base), httpx.Client(base_url=base, timeout=10) as api:

        def all_delivered() -> bool:
            fresh = hook.deliveries[delivered_before:]
            return {d.headers["webhook-id"] for d in fresh} >= set(actions)

        wait_until(all_delivered, timeout=90)
        took = time.monotonic() - started
        views = {job: view(api, job) for job in actions}
        wait_until(lambda: all(view(api, j)["webhook"] == "delivered" for j in actions), 10)
        again = ask(api, url, "0:05", "0:15", hook, action="a-0", user="u1")
        download = api.get(f"/jobs/{first}/file")
        later_download = api.get(f"/jobs/{later[0]}/file")
    pending = next(
        d for d in hook.deliveries[delivered_before:] if d.headers["webhook-id"] == first
    )
    print(
        f"restart to the pending webhook: {pending.at - started:.1f} s, "
        f"to every webhook delivered: {took:.1f} s"
    )

    for job, found in views.items():
        assert found["status"] == "succeeded", found
        assert found["tries"] == (2 if job in running else 1), found
    assert again.status_code == 202
    assert again.json()["job_id"] == later[0], "the idempotency key survives the restart"
    for delivery in hook.deliveries:
        job = delivery.headers["webhook-id"]
        assert job in actions, "one webhook-id per job: the job's id"
        assert delivery.body["ouro_action_id"] == actions[job]
        assert delivery.body["status"] == "success"
        assert delivery.headers["ouro-webhook-token"] == "tok"
    assert any(d.headers["webhook-id"] == first for d in hook.deliveries[:delivered_before])
    assert download.status_code == 200
    assert len(download.content) == views[first]["result"]["bytes"]
    assert download.content[4:8] == b"ftyp"
    assert later_download.status_code == 200
    assert len(later_download.content) == views[later[0]]["result"]["bytes"]


# --- fair share -----------------------------------------------------------------------------


def test_fair_share_per_caller(media: Media, tmp_path: Path, hook: Receiver) -> None:
    settings = ClipSettings(
        allow_private_networks=True,
        clip_extra_source_hosts=media.host,
        clip_work_dir=tmp_path / "work",
        clip_concurrency=2,
        clip_max_running_per_caller=1,
        clip_max_queued_per_caller=3,
    )
    url = media.url("s60.mp4")
    media.server.throttle = ThrottlePolicy(max_fast_bytes=0, slow_rate=128 * 1024)
    with client(create_app(settings)) as api:

        def submit(user: str, end: str = "0:03") -> httpx.Response:
            return ask(api, url, "0:01", end, hook, action=uuid.uuid4().hex, user=user)

        a = [submit("a").json()["job_id"] for _ in range(3)]
        refused = submit("a")
        # Longer, so a's first job ends first and a and c both have none running then.
        b1 = submit("b", "0:12").json()["job_id"]
        c1 = submit("c").json()["job_id"]
        wait_until(lambda: view(api, b1)["status"] == "running", 10)
        states = {j: view(api, j)["status"] for j in (*a, b1, c1)}
        wait_until(lambda: all(view(api, j)["status"] == "succeeded" for j in states), 90)
        ends = {j: view(api, j) for j in states}
        # Once one of its jobs has ended, the caller may submit again.
        assert submit("a").status_code == 202

    # At the queued cap (3): accepted; one past it: 429, a stable code and a Retry-After.
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_jobs"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # One running per caller although a slot is free: the second caller's job takes it.
    assert states == {a[0]: "running", a[1]: "queued", a[2]: "queued", b1: "running", c1: "queued"}
    started = {j: v["started_at"] for j, v in ends.items()}
    assert started[c1] < started[a[1]] < started[a[2]], "a third caller goes before a's backlog"
    assert started[b1] < started[a[1]]


# --- the end-to-end deadline ----------------------------------------------------------------


def deadline_settings(media: Media, work: Path) -> ClipSettings:
    return ClipSettings(
        allow_private_networks=True,
        clip_extra_source_hosts=media.host,
        clip_work_dir=work,
        clip_concurrency=1,
        clip_deadline_seconds=600,
        webhook_backoff_seconds=0.05,
        webhook_backoff_max_seconds=0.3,
    )


def left_behind(
    media: Media,
    start: str,
    end: str,
    hook: Receiver,
    *,
    age: float,
    caller: str = "user:u1",
    **view: Any,
) -> StoredRecord:
    """A job as a process that died ``age`` seconds after accepting it left it."""
    spec = build_spec(
        youtube_url=media.url("s60.mp4"), start_time=start, end_time=end, name=None,
        extra_hosts=frozenset({media.host}), max_seconds=60, max_name_length=200,
        max_bytes=64 * 1024 * 1024,
    )  # fmt: skip
    fields: dict[str, Any] = {"status": JobStatus.queued, "progress": 0, "stage": "queued"}
    job = JobView(job_id=uuid.uuid4().hex, created_at=time.time() - age, **(fields | view))
    ouro = OuroHeaders(action_id=job.job_id, webhook_url=hook.url, webhook_token="tok")
    return StoredRecord(view=job, spec=asdict(spec), ouro=ouro, caller=caller)


def write_jobs(work: Path, *records: StoredRecord) -> None:
    async def write() -> None:
        db = await JobDatabase.open(work)
        await db.put(*records)
        await db.close()

    asyncio.run(write())


def test_jobs_end_within_the_deadline(media: Media, tmp_path: Path, hook: Receiver) -> None:
    work = tmp_path / "work"
    # Runs end 300 s before the 600 s deadline, deliveries at it. Once ``late`` has failed,
    # the only slot goes to ``slow``: its caller has not been served yet, ``due``'s has.
    slow = left_behind(media, "0:01", "0:40", hook, age=100, caller="user:u0")
    due = left_behind(media, "0:01", "0:02", hook, age=297)
    late = left_behind(media, "0:01", "0:02", hook, age=1000)
    with receiver() as refusing:
        refusing.statuses = [503] * 10_000
        failed = left_behind(
            media, "0:01", "0:02", refusing, age=597.5, status=JobStatus.failed,
            finished_at=time.time() - 500, webhook=WebhookState.pending,
            error=ErrorDetail(code="fetch_failed", message="The source could not be read."),
        )  # fmt: skip
        write_jobs(work, slow, due, late, failed)
        media.server.throttle = ThrottlePolicy(max_fast_bytes=0, slow_rate=8 * 1024)
        with client(create_app(deadline_settings(media, work))) as api:
            began = time.time()
            by_id = hook.wait(1, timeout=30)
            wait_until(lambda: view(api, due.view.job_id)["webhook"] != "pending", 10)
            ended = {j: view(api, j) for j in (due.view.job_id, late.view.job_id)}
            wait_until(lambda: view(api, failed.view.job_id)["webhook"] == "failed", 10)
            given_up = time.time()
            running = view(api, slow.view.job_id)
        attempts = len(refusing.deliveries)
        last_attempt = refusing.deliveries[-1]

    # Queued when its runs had to end: failed, never started, and its error webhook went out.
    assert ended[due.view.job_id]["error"]["code"] == "deadline_exceeded"
    assert ended[due.view.job_id]["tries"] == 0
    assert ended[due.view.job_id]["finished_at"] == pytest.approx(
        due.view.created_at + 300, abs=0.5
    )
    assert ended[due.view.job_id]["webhook"] == "delivered"
    assert running["status"] == "running", "the older job held the only slot"
    # Past its whole deadline: failed at once, and no webhook is sent any more.
    assert ended[late.view.job_id]["error"]["code"] == "deadline_exceeded"
    assert ended[late.view.job_id]["webhook"] == "failed"
    errors = {d.headers["webhook-id"]: d.body["response"]["error"]["code"] for d in by_id}
    assert errors == {due.view.job_id: "deadline_exceeded"}
    # A webhook being retried stops at the deadline (2.5 s after the start here).
    assert attempts > 1
    assert given_up - began < 5
    assert last_attempt.body["response"]["error"]["code"] == "fetch_failed"


def test_a_running_job_is_stopped_at_its_deadline(
    media: Media, tmp_path: Path, hook: Receiver
) -> None:
    work = tmp_path / "work"
    due = left_behind(media, "0:01", "0:40", hook, age=298)
    write_jobs(work, due)
    media.server.throttle = ThrottlePolicy(max_fast_bytes=0, slow_rate=8 * 1024)
    with client(create_app(deadline_settings(media, work))) as api:
        [delivery] = hook.wait(1, timeout=30)
        found = view(api, due.view.job_id)
    assert found["tries"] == 1
    assert found["error"]["code"] == "deadline_exceeded"
    assert delivery.body["response"]["error"]["code"] == "deadline_exceeded"
    assert found["finished_at"] == pytest.approx(due.view.created_at + 300, abs=0.5)


def test_a_job_the_process_keeps_dying_under_is_not_run_again(
    media: Media, tmp_path: Path, hook: Receiver
) -> None:
    work = tmp_path / "work"
    settings = deadline_settings(media, work)
    running: dict[str, Any] = {
        "status": JobStatus.running,
        "stage": "fetching",
        "started_at": time.time() - 5,
    }
    poison = left_behind(media, "0:01", "0:02", hook, age=10, tries=settings.clip_max_tries,
                         **running)  # fmt: skip
    once = left_behind(media, "0:01", "0:02", hook, age=9, tries=settings.clip_max_tries - 1,
                       **running)  # fmt: skip
    write_jobs(work, poison, once)
    with client(create_app(settings)) as api:
        deliveries = hook.wait(2, timeout=60)
        wait_until(lambda: view(api, once.view.job_id)["webhook"] == "delivered", 10)
        ended = {j: view(api, j) for j in (poison.view.job_id, once.view.job_id)}
    assert ended[poison.view.job_id]["error"]["code"] == "job_interrupted"
    assert ended[poison.view.job_id]["tries"] == settings.clip_max_tries
    assert ended[once.view.job_id]["status"] == "succeeded"
    assert ended[once.view.job_id]["tries"] == settings.clip_max_tries
    codes = {d.headers["webhook-id"]: d.body["status"] for d in deliveries}
    assert codes == {poison.view.job_id: "error", once.view.job_id: "success"}


# --- the database and the work directory ----------------------------------------------------


def test_a_damaged_or_newer_database_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / DATABASE).write_bytes(b"not a database" * 100)
    with pytest.raises(JobDatabaseError, match=r"cannot be used .*move it away"):
        asyncio.run(JobDatabase.open(work))
    (work / DATABASE).unlink()

    async def create() -> None:
        await (await JobDatabase.open(work)).close()

    asyncio.run(create())
    with sqlite3.connect(work / DATABASE) as db:
        db.execute("PRAGMA user_version=2")
    with pytest.raises(JobDatabaseError, match="schema version 2, newer"):
        asyncio.run(JobDatabase.open(work))


def test_a_finished_job_is_kept_until_retention_ends_across_a_restart(
    media: Media, tmp_path: Path, hook: Receiver
) -> None:
    work = tmp_path / "work"
    settings = deadline_settings(media, work).model_copy(update={"clip_retention_seconds": 4})
    with client(create_app(settings)) as api:
        job = ask(api, media.url("s60.mp4"), "0:01", "0:02", hook, action="r", user="u")
        job_id = job.json()["job_id"]
        wait_until(lambda: view(api, job_id)["webhook"] == "delivered", 60)
    assert (work / job_id / "clip.mp4").exists()
    with client(create_app(settings)) as api:
        assert api.get(f"/jobs/{job_id}/file").status_code == 200
        wait_until(lambda: api.get(f"/jobs/{job_id}").status_code == 404, 10)
    assert not (work / job_id).exists()
    with sqlite3.connect(work / DATABASE) as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


# --- settings limits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "lowest"),
    [
        ("clip_max_running_per_caller", 1),
        ("clip_max_queued_per_caller", 1),
        ("clip_deadline_seconds", 600),
    ],
)
def test_per_caller_and_deadline_settings_at_and_past_their_limit(name: str, lowest: int) -> None:
    at_limit: dict[str, Any] = {name: lowest}
    assert getattr(ClipSettings(**at_limit), name) == lowest
    past: dict[str, Any] = {name: lowest - 1}
    with pytest.raises(ValidationError):
        ClipSettings(**past)
