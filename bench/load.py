"""Load on loopback: compress requests under concurrency with health latency, and clip jobs.

Run: ``.venv/bin/python -m bench.load [--out docs/benchmarks-load.md]``.
1. 200 compress uploads of a real photo at 16 concurrent clients; meanwhile ``/healthz`` is
   polled every 20 ms. Reported: errors, throughput, p50/p95 of the uploads and of health.
   Baseline in the same run: ``/healthz`` on the idle server.
2. 20 clip jobs at ``HERMES_CLIP_CONCURRENCY=2`` with a webhook receiver: all delivered, and no
   file left in the work directory afterwards.
Every count and time is bounded; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from services.clip.app import create_app as create_clip_app
from services.clip.settings import ClipSettings
from services.compress.app import create_app as create_compress_app
from services.compress.settings import CompressSettings
from tests.support.apps import serve
from tests.support.images import photo
from tests.support.media import make_source
from tests.support.rangeserver import RangeServer
from tests.support.receiver import receiver

UPLOADS = 200
CLIENTS = 16
CLIP_JOBS = 20


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def health_latencies(base: str, stop: asyncio.Event) -> list[float]:
    timings = []
    async with httpx.AsyncClient(base_url=base) as http:
        while not stop.is_set():
            started = time.perf_counter()
            response = await http.get("/healthz")
            assert response.status_code == 200
            timings.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
    return timings


async def compress_load(base: str, image: bytes) -> dict[str, float]:
    idle_stop = asyncio.Event()
    idle_task = asyncio.create_task(health_latencies(base, idle_stop))
    await asyncio.sleep(2)
    idle_stop.set()
    idle = await idle_task

    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(UPLOADS):
        queue.put_nowait(index)
    durations: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                response = await http.post(
                    "/compress-an-image/upload",
                    files={"file": ("photo.jpg", image, "image/jpeg")},
                    data={"quality": "80"},
                )
                durations.append(time.perf_counter() - started)
                errors += response.status_code != 200

    stop = asyncio.Event()
    health_task = asyncio.create_task(health_latencies(base, stop))
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - started
    stop.set()
    health = await health_task
    return {
        "errors": errors,
        "per_second": UPLOADS / elapsed,
        "upload_p50": statistics.median(durations),
        "upload_p95": percentile(durations, 0.95),
        "health_p50": statistics.median(health),
        "health_p95": percentile(health, 0.95),
        "idle_p95": percentile(idle, 0.95),
        "health_samples": len(health),
    }


def clip_load(root: Path) -> dict[str, float]:
    source = make_source(root, seconds=60, name="load60")
    work = root / "work"
    with RangeServer(root) as files, receiver() as hook:
        settings = ClipSettings(
            allow_private_networks=True,
            clip_extra_source_hosts=files.base_url.removeprefix("http://"),
            clip_work_dir=work,
            clip_concurrency=2,
        )
        with serve(create_clip_app(settings)) as base, httpx.Client(base_url=base) as http:
            started = time.perf_counter()
            for index in range(CLIP_JOBS):
                body = {
                    "youtube_url": files.url(source.name),
                    "start_time": f"{index * 2}",
                    "end_time": f"{index * 2 + 5}",
                }
                response = http.post(
                    "/download-a-clip-from-youtube",
                    json=body,
                    headers={"ouro-webhook-url": hook.url, "ouro-webhook-token": "t"},
                )
                assert response.status_code == 202
            deliveries = hook.wait(CLIP_JOBS, timeout=600)
            elapsed = time.perf_counter() - started
        succeeded = sum(d.body["status"] == "success" for d in deliveries)
    leftovers = [p for p in work.rglob("*") if p.is_file()] if work.exists() else []
    return {
        "delivered": len(deliveries),
        "succeeded": succeeded,
        "seconds": elapsed,
        "leftover_files": len(leftovers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = io.BytesIO()
    photo("coffee.png").resize((1800, 1200)).save(out, "JPEG", quality=92)
    with serve(create_compress_app(CompressSettings())) as base:
        compress = asyncio.run(compress_load(base, out.getvalue()))
    with tempfile.TemporaryDirectory() as tmp:
        clip = clip_load(Path(tmp))
    report = "\n".join(
        [
            "# Load on loopback",
            "",
            "Command: `.venv/bin/python -m bench.load`",
            "",
            f"## {UPLOADS} compress uploads (2 MP JPEG, quality 80) at {CLIENTS} concurrent",
            "",
            "| errors | uploads/s | upload p50 | upload p95 | /healthz p50 | /healthz p95 "
            "| idle /healthz p95 |",
            "|---|---|---|---|---|---|---|",
            f"| {compress['errors']:.0f} | {compress['per_second']:.1f} "
            f"| {compress['upload_p50'] * 1000:.0f} ms | {compress['upload_p95'] * 1000:.0f} ms "
            f"| {compress['health_p50'] * 1000:.1f} ms | {compress['health_p95'] * 1000:.1f} ms "
            f"| {compress['idle_p95'] * 1000:.1f} ms |",
            "",
            f"/healthz p95 under load: goal < 50 ms: "
            f"**{'PASS' if compress['health_p95'] < 0.05 else 'FAIL'}** "
            f"({compress['health_samples']:.0f} samples).",
            "",
            f"## {CLIP_JOBS} clip jobs (5 s each of a 60 s source) at concurrency 2",
            "",
            "| delivered | succeeded | seconds | files left in the work directory |",
            "|---|---|---|---|",
            f"| {clip['delivered']:.0f} | {clip['succeeded']:.0f} | {clip['seconds']:.1f} "
            f"| {clip['leftover_files']:.0f} |",
            "",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
