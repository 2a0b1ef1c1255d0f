"""Distributed clip queue: throughput with one worker against two, and request-to-start latency.

Run: ``.venv/bin/python -m bench.queue [--jobs 20] [--out docs/benchmarks-queue.md]``.
Everything runs on loopback: a redis-server, the clip API in-process, worker subprocesses, and
a range-honouring file server with a generated 60 s source. Each job is a 3 s clip.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from services.clip.app import create_app
from services.clip.settings import ClipSettings
from tests.support.apps import client
from tests.support.media import make_source
from tests.support.rangeserver import RangeServer
from tests.support.redis import redis_server

CACHE = Path(tempfile.gettempdir()) / "hermes-media-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    source = make_source(CACHE, seconds=60, width=640, height=360, name="queue60")
    lines = [
        "# Distributed queue benchmark",
        "",
        f"Command: `.venv/bin/python -m bench.queue --jobs {args.jobs}`; "
        f"{os.cpu_count()} cores; each job a 3 s clip of a 60 s 640x360 source.",
        "",
    ]
    with (
        tempfile.TemporaryDirectory() as tmp,
        redis_server(Path(tmp) / "redis") as redis,
        RangeServer(source.parent) as files,
    ):
        host = files.base_url.removeprefix("http://")
        url = files.url(source.name)
        results: dict[int, dict[str, float]] = {}
        for workers in (1, 2):
            queue = f"bench:{uuid.uuid4().hex[:8]}"
            settings = ClipSettings(
                redis_url=redis.url,
                clip_queue_name=queue,
                allow_private_networks=True,
                clip_extra_source_hosts=host,
                clip_work_dir=Path(tmp) / "work",
            )
            with client(create_app(settings)) as api:
                results[workers] = run_queue(api, settings, url, workers, args.jobs, Path(tmp))
        latency = measure_latency(redis.url, host, url, Path(tmp))
    one, two = results[1], results[2]
    lines += [
        "| workers | jobs | seconds | jobs/s | failed |",
        "|---|---|---|---|---|",
        *(
            f"| {w} | {args.jobs} | {r['seconds']:.1f} | {r['jobs_per_s']:.2f} "
            f"| {r['failed']:.0f} |"
            for w, r in results.items()
        ),
        "",
        f"Throughput, two workers / one: **{two['jobs_per_s'] / one['jobs_per_s']:.2f}x** "
        "(2 cores; each worker runs one job at a time, and ffmpeg itself uses both cores).",
        "",
        "Request to job start on an idle worker (median of 10, `started_at - created_at`): "
        f"**{statistics.median(latency) * 1000:.0f} ms** (min {min(latency) * 1000:.0f}, "
        f"max {max(latency) * 1000:.0f}); the worker polls every 0.1 s.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


def start_workers(settings: ClipSettings, count: int, root: Path) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    env.update(
        HERMES_REDIS_URL=str(settings.redis_url),
        HERMES_CLIP_QUEUE_NAME=settings.clip_queue_name,
        HERMES_ALLOW_PRIVATE_NETWORKS="true",
        HERMES_CLIP_EXTRA_SOURCE_HOSTS=",".join(settings.clip_extra_source_hosts),
        HERMES_CLIP_WORK_DIR=str(root / "work"),
        HERMES_CLIP_CONCURRENCY="1",
    )
    return [
        subprocess.Popen(
            [sys.executable, "-c", "from services.cli import main; main(['worker'])"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def wait_all(api: httpx.Client, ids: list[str]) -> list[dict[str, Any]]:
    views: list[dict[str, Any]] = []
    for job in ids:
        while True:
            found: dict[str, Any] = api.get(f"/jobs/{job}").json()
            if found["status"] in ("succeeded", "failed"):
                views.append(found)
                break
            time.sleep(0.02)
    return views


def submit(api: httpx.Client, url: str, index: int) -> str:
    body = {"youtube_url": url, "start_time": f"{index % 50}", "end_time": f"{index % 50 + 3}"}
    job: str = api.post("/download-a-clip-from-youtube", json=body).json()["job_id"]
    return job


def run_queue(
    api: httpx.Client, settings: ClipSettings, url: str, workers: int, jobs: int, root: Path
) -> dict[str, float]:
    processes = start_workers(settings, workers, root)
    try:
        warm = wait_all(api, [submit(api, url, 0) for _ in range(workers)])
        assert all(v["status"] == "succeeded" for v in warm)
        started = time.monotonic()
        views = wait_all(api, [submit(api, url, i) for i in range(jobs)])
        elapsed = time.monotonic() - started
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=60)
    failed = sum(v["status"] != "succeeded" for v in views)
    return {"seconds": elapsed, "jobs_per_s": jobs / elapsed, "failed": failed}


def measure_latency(redis_url: str, host: str, url: str, root: Path) -> list[float]:
    settings = ClipSettings(
        redis_url=redis_url,
        clip_queue_name=f"bench:{uuid.uuid4().hex[:8]}",
        allow_private_networks=True,
        clip_extra_source_hosts=host,
        clip_work_dir=root / "work",
    )
    with client(create_app(settings)) as api:
        processes = start_workers(settings, 1, root)
        try:
            wait_all(api, [submit(api, url, 0)])
            delays = []
            for index in range(10):
                [found] = wait_all(api, [submit(api, url, index)])
                delays.append(found["started_at"] - found["created_at"])
                time.sleep(0.3)
            return delays
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=60)


if __name__ == "__main__":
    main()
