"""Clip results in object storage: a real S3 endpoint (moto), real Redis, real worker processes.

What a deployment relies on: results land in the bucket and nowhere else, callers get them
through presigned URLs, they expire and are deleted, DELETE removes them, a worker killed
between upload and state update leaves nothing behind for good, and neither the API nor a
worker ever holds a whole result in memory (peak resident size measured, VmHWM).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from services.clip.app import create_app
from services.clip.jobs.distributed.records import Store, StoredJob, redis_connection, webhook_of
from services.clip.jobs.model import ClipFacts, JobStatus, WebhookState, queued_view
from services.clip.jobs.storage import S3Store
from services.clip.settings import ClipSettings
from services.common.ouro import OuroHeaders
from tests.conftest import Media
from tests.support.apps import client, wait_until
from tests.support.holdproxy import hold_proxy
from tests.support.receiver import Receiver
from tests.support.redis import redis_server
from tests.support.s3 import S3Server, s3_server
from tests.test_distributed import SECRET, Cluster, ask, view

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
def cluster(media: Media, tmp_path: Path) -> Iterator[Cluster]:
    with redis_server(tmp_path / "redis") as redis:
        found = Cluster(redis=redis, media=media, root=tmp_path)
        try:
            yield found
        finally:
            found.stop()


@pytest.fixture
def bucket(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with the AWS variables set for the API running in this process."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3.create_bucket()


def storage_env(s3: S3Server, bucket: str) -> dict[str, str]:
    """A worker's environment for the bucket: the storage URL and the usual AWS variables."""
    return {"HERMES_CLIP_STORAGE_URL": f"s3://{bucket}/results", **s3.env()}


def s3_settings(cluster: Cluster, bucket: str, **extra: object) -> ClipSettings:
    return cluster.settings().model_copy(
        update={"clip_storage_url": f"s3://{bucket}/results", **extra}
    )


def test_clip_in_s3_presigned_then_expired_and_deleted(
    cluster: Cluster, s3: S3Server, bucket: str, hook: Receiver
) -> None:
    public = f"http://localhost:{s3.port}"
    cluster.start_worker(HERMES_CLIP_RETENTION_SECONDS="3", **storage_env(s3, bucket))
    settings = s3_settings(
        cluster, bucket, clip_retention_seconds=3, clip_storage_public_endpoint=public
    )
    with client(create_app(settings)) as api:
        job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:03", hook).json()["job_id"]
        [delivery] = hook.wait(1, timeout=60)
        done = wait_until(lambda: (v := view(api, job))["webhook"] == "delivered" and v)
        [key] = s3.keys(bucket)
        answer = api.get(f"/jobs/{job}/file", follow_redirects=False)
        assert answer.status_code == 307
        location = answer.headers["location"]
        assert key == f"results/{job}-1.mp4", "the key of the job's first run"
        assert location.startswith(f"{public}/{bucket}/{key}?")
        fetched = httpx.get(location)
        ready = api.get("/readyz").json()
        wait_until(lambda: api.get(f"/jobs/{job}/file").status_code == 404, timeout=15)
        wait_until(lambda: s3.keys(bucket) == [], timeout=15)
        assert httpx.get(location).status_code in (403, 404)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "video/mp4"
    assert 's60.mp4"' in fetched.headers["content-disposition"]
    assert len(fetched.content) == done["result"]["bytes"]
    assert fetched.content[4:8] == b"ftyp"
    assert base64.b64decode(delivery.body["response"]["file"]["base64"]) == fetched.content
    Webhook(SECRET).verify(json.dumps(delivery.body, separators=(",", ":")), delivery.headers)
    assert ready["checks"]["storage"] is True
    assert "warnings" not in ready
    assert not list((cluster.root / "work").glob("*/clip.mp4")), "the local copy is deleted"


def test_delete_removes_the_object(cluster: Cluster, s3: S3Server, bucket: str) -> None:
    cluster.start_worker(**storage_env(s3, bucket))
    with client(create_app(s3_settings(cluster, bucket))) as api:
        body = {"youtube_url": cluster.media.url("s60.mp4"), "start_time": "1", "end_time": "2"}
        job = api.post("/download-a-clip-from-youtube", json=body).json()["job_id"]
        wait_until(lambda: view(api, job)["status"] == "succeeded")
        assert len(s3.keys(bucket)) == 1
        deleted = api.delete(f"/jobs/{job}")
        gone = api.get(f"/jobs/{job}")
    assert deleted.status_code == 200
    assert deleted.json()["status"] == "succeeded"
    assert gone.status_code == 404
    assert s3.keys(bucket) == []


def test_worker_killed_between_upload_and_state_update(
    cluster: Cluster, s3: S3Server, bucket: str, hook: Receiver
) -> None:
    """The upload reaches the bucket, the worker never hears back and dies: the job runs
    again elsewhere under a key of its own run, and both objects are deleted in time (the
    dead run's as soon as the job ends, the result when it expires)."""
    with hold_proxy(s3.port) as proxy:
        proxy.hold.set()
        first = cluster.start_worker(**{**storage_env(s3, bucket), "AWS_ENDPOINT_URL": proxy.url})
        with client(create_app(s3_settings(cluster, bucket, clip_retention_seconds=2))) as api:
            job = ask(api, cluster.media.url("s60.mp4"), "0:01", "0:02", hook).json()["job_id"]
            wait_until(lambda: s3.keys(bucket) == [f"results/{job}-1.mp4"], timeout=60)
            assert view(api, job)["status"] == "running"
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            cluster.start_worker(HERMES_CLIP_RETENTION_SECONDS="2", **storage_env(s3, bucket))
            [delivery] = hook.wait(1, timeout=90)
            final = wait_until(lambda: (v := view(api, job))["webhook"] == "delivered" and v)
            answer = api.get(f"/jobs/{job}/file", follow_redirects=False)
            served = httpx.get(answer.headers["location"])
            wait_until(lambda: s3.keys(bucket) == [], timeout=30)
    assert delivery.body["status"] == "success"
    assert final["status"] == "succeeded"
    assert final["tries"] == 2
    assert served.status_code == 200
    assert base64.b64decode(delivery.body["response"]["file"]["base64"]) == served.content


def test_distributed_mode_without_storage_fails_at_start(cluster: Cluster) -> None:
    """Results are never kept in Redis: without HERMES_CLIP_STORAGE_URL a worker refuses to
    start with one line, and so do the settings the API is made from."""
    env = cluster.env()
    del env["HERMES_CLIP_STORAGE_URL"]
    started = subprocess.run(
        [sys.executable, "-c", "from services.cli import main; main(['worker'])"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    with pytest.raises(ValidationError, match="HERMES_CLIP_STORAGE_URL"):
        ClipSettings(redis_url=cluster.redis.url)
    assert started.returncode == 1
    [line] = started.stderr.strip().splitlines()
    assert line.startswith("hermes-media worker: distributed mode (HERMES_REDIS_URL) needs ")
    assert "HERMES_CLIP_STORAGE_URL" in line


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak(pid: int) -> int:
    """Reset the process's VmHWM to its resident size now, and return that size (KiB)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _kib(pid, "VmRSS")


async def _succeeded_job(
    settings: ClipSettings, size: int, ouro: OuroHeaders, job_id: str | None = None
) -> str:
    """A finished job whose result is stored, as a worker leaves it; its webhook queued."""
    job_view = queued_view()
    job_view.job_id = job_id or job_view.job_id
    job_view.status, job_view.finished_at = JobStatus.succeeded, time.time()
    job_view.result = ClipFacts(
        name="big", filename="big.mp4", title="big", source_duration=1, start=0, end=1,
        clip_duration=1, bytes=size, width=320, height=180, cut="smart",
    )  # fmt: skip
    if ouro.webhook_url:
        job_view.webhook = WebhookState.pending
    redis = redis_connection(settings)
    store = Store(redis, settings)
    job = StoredJob(
        view=job_view,
        spec={},
        ouro=ouro,
        caller="address:127.0.0.1",
        webhook_started_at=time.time(),
        result_key=job_view.job_id,
    )
    enqueue = webhook_of(job_view.job_id) if ouro.webhook_url else None
    assert await store.commit(job, 0, enqueue=enqueue)
    await redis.aclose()
    return job_view.job_id


DELIVERY_MIB = 50
DELIVERY_BOUND_MIB = 32


def test_large_webhook_is_streamed_from_storage_in_bounded_memory(
    cluster: Cluster, s3: S3Server, bucket: str, hook: Receiver, tmp_path: Path
) -> None:
    """A 50 MiB result is 67 MiB of base64: the worker's peak grows by far less than one copy."""
    data = os.urandom(DELIVERY_MIB * MIB)
    worker = cluster.start_worker(HERMES_WEBHOOK_TIMEOUT_SECONDS="60", **storage_env(s3, bucket))
    wait_until(lambda: "Starting worker" in cluster.log(0), timeout=30)
    time.sleep(0.5)
    job_id = uuid.uuid4().hex
    source = tmp_path / "big.mp4"
    source.write_bytes(data)
    asyncio.run(S3Store(bucket, "results", None).put(job_id, source, "big.mp4"))
    base = _reset_peak(worker.pid)
    ouro = OuroHeaders(action_id="a1", webhook_url=hook.url)
    asyncio.run(_succeeded_job(s3_settings(cluster, bucket), len(data), ouro, job_id))
    [delivery] = hook.wait(1, timeout=60)
    grown_mib = (_kib(worker.pid, "VmHWM") - base) / 1024
    assert base64.b64decode(delivery.body["response"]["file"]["base64"]) == data
    assert delivery.body["response"]["bytes"] == len(data)
    Webhook(SECRET).verify(json.dumps(delivery.body, separators=(",", ":")), delivery.headers)
    print(f"worker peak grew by {grown_mib:.1f} MiB delivering {DELIVERY_MIB} MiB")
    assert grown_mib < DELIVERY_BOUND_MIB, grown_mib


SERVE_MIB = 500
SERVE_BOUND_MIB = 32


def test_api_streams_a_500_mib_result_in_bounded_memory(cluster: Cluster, tmp_path: Path) -> None:
    """A shared results directory: the API streams the file, its peak grows by a few MiB."""
    shared = tmp_path / "results"
    settings = cluster.settings().model_copy(update={"clip_storage_url": str(shared)})
    job_id = asyncio.run(_succeeded_job(settings, SERVE_MIB * MIB, OuroHeaders()))
    (shared / job_id).mkdir(parents=True)
    with (shared / job_id / "clip.mp4").open("wb") as sparse:
        sparse.truncate(SERVE_MIB * MIB)
    with client(create_app(settings)) as api:
        base = _reset_peak(os.getpid())
        received = 0
        with api.stream("GET", f"/jobs/{job_id}/file") as answer:
            assert answer.status_code == 200
            assert answer.headers["content-length"] == str(SERVE_MIB * MIB)
            for chunk in answer.iter_raw():
                received += len(chunk)
        grown_mib = (_kib(os.getpid(), "VmHWM") - base) / 1024
    assert received == SERVE_MIB * MIB
    print(f"API (and client) peak grew by {grown_mib:.1f} MiB serving {SERVE_MIB} MiB")
    assert grown_mib < SERVE_BOUND_MIB, grown_mib
