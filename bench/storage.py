"""S3 client libraries for clip results: upload a file (multipart), stream it back, presign.

Run: ``.venv/bin/python -m bench.storage [--mb 200] [--rounds 5] [--out FILE.md]``.
Each candidate runs in a fresh process against one moto S3 server on loopback, so its peak
memory (VmHWM) is its own; memory is reported above the process's resident size after the
client is imported and created. Baseline: boto3 in a thread (``upload_file``, ``get_object``
streamed in 1 MiB reads), the usual choice, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.support.s3 import s3_server

CANDIDATES = ("boto3", "aioboto3", "obstore")
CHUNK = 1024 * 1024
PART = 8 * 1024 * 1024
CONCURRENCY = 2


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


BASE: list[int] = []
SIZE: list[int] = []


def _reset_peak() -> None:
    """Start measuring: the resident size now, with the client imported and made, is the base.

    Writing 5 to clear_refs resets VmHWM to the current resident size (Linux >= 4.0).
    """
    Path("/proc/self/clear_refs").write_text("5")
    BASE.append(_kib("VmRSS"))


def _boto3(bucket: str, path: Path) -> dict[str, float]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3")
    config = TransferConfig(
        multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=CONCURRENCY
    )

    async def run() -> dict[str, float]:
        _reset_peak()
        started = time.perf_counter()
        await asyncio.to_thread(client.upload_file, str(path), bucket, "clip.mp4", Config=config)
        upload = time.perf_counter() - started

        def download() -> int:
            body = client.get_object(Bucket=bucket, Key="clip.mp4")["Body"]
            return sum(len(chunk) for chunk in iter(lambda: body.read(CHUNK), b""))

        started = time.perf_counter()
        size = await asyncio.to_thread(download)
        fetch = time.perf_counter() - started
        started = time.perf_counter()
        client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "clip.mp4"}, ExpiresIn=3600
        )
        sign = time.perf_counter() - started
        assert size == SIZE[0]
        return {"upload": upload, "download": fetch, "sign": sign}

    return asyncio.run(run())


def _aioboto3(bucket: str, path: Path) -> dict[str, float]:
    import aioboto3
    from boto3.s3.transfer import TransferConfig

    async def run() -> dict[str, float]:
        session = aioboto3.Session()
        async with session.client("s3") as client:
            config = TransferConfig(
                multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=CONCURRENCY
            )
            _reset_peak()
            started = time.perf_counter()
            await client.upload_file(str(path), bucket, "clip.mp4", Config=config)
            upload = time.perf_counter() - started
            started = time.perf_counter()
            answer = await client.get_object(Bucket=bucket, Key="clip.mp4")
            size = 0
            async for chunk in answer["Body"].iter_chunks(CHUNK):
                size += len(chunk)
            fetch = time.perf_counter() - started
            started = time.perf_counter()
            await client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": "clip.mp4"}, ExpiresIn=3600
            )
            sign = time.perf_counter() - started
        assert size == SIZE[0]
        return {"upload": upload, "download": fetch, "sign": sign}

    return asyncio.run(run())


def _obstore(bucket: str, path: Path) -> dict[str, float]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, client_options={"allow_http": True})

    async def run() -> dict[str, float]:
        _reset_peak()
        started = time.perf_counter()
        await obstore.put_async(
            store, "clip.mp4", path, chunk_size=PART, max_concurrency=CONCURRENCY
        )
        upload = time.perf_counter() - started
        started = time.perf_counter()
        answer = await obstore.get_async(store, "clip.mp4")
        size = 0
        async for chunk in answer.stream(min_chunk_size=CHUNK):
            size += len(chunk)
        fetch = time.perf_counter() - started
        started = time.perf_counter()
        await obstore.sign_async(store, "GET", "clip.mp4", timedelta(hours=1))
        sign = time.perf_counter() - started
        assert size == SIZE[0]
        return {"upload": upload, "download": fetch, "sign": sign}

    return asyncio.run(run())


def one(name: str, bucket: str, path: Path) -> dict[str, float]:
    """Run one candidate in this process; figures in seconds and KiB."""
    started = time.perf_counter()
    runner = {"boto3": _boto3, "aioboto3": _aioboto3, "obstore": _obstore}[name]
    SIZE.append(path.stat().st_size)
    figures = runner(bucket, path)
    figures["peak_kib"] = _kib("VmHWM") - BASE[0]
    figures["resident_kib"] = BASE[0]
    figures["total"] = time.perf_counter() - started
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=CANDIDATES)
    parser.add_argument("--bucket")
    parser.add_argument("--file", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.bucket, args.file)))
        return
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CANDIDATES}
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3:
        path = Path(tmp) / "clip.mp4"
        with path.open("wb") as out:
            for _ in range(args.mb):
                out.write(os.urandom(1024 * 1024))
        env = {**os.environ, **s3.env()}
        for _ in range(args.rounds):
            for name in CANDIDATES:
                bucket = s3.create_bucket()
                command = [sys.executable, "-m", "bench.storage", "--one", name,
                           "--bucket", bucket, "--file", str(path)]  # fmt: skip
                answer = subprocess.run(command, env=env, capture_output=True)
                figures = json.loads(answer.stdout)
                figures["exit"] = answer.returncode
                results[name].append(figures)
    report(results, args)


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    def median(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in results[name]))

    base = {key: median("boto3", key) for key in ("upload", "download", "peak_kib")}
    lines = [
        "# S3 client benchmark",
        "",
        f"Command: `.venv/bin/python -m bench.storage --mb {args.mb} --rounds {args.rounds}`; "
        f"{os.cpu_count()} cores; moto S3 server on loopback; a {args.mb} MiB file uploaded "
        f"(multipart, {PART // 2**20} MiB parts, {CONCURRENCY} at once), streamed back in 1 MiB "
        "reads, and presigned. Medians of the rounds; each candidate in a fresh process. Peak "
        "memory is VmHWM above the resident size once the client is made; ratios against "
        "boto3 in a thread.",
        "",
        "| client | upload s | download s | presign ms | peak MiB over base "
        "| resident MiB with client | upload ratio | download ratio | peak ratio "
        "| runs that crashed at exit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in CANDIDATES:
        up, down, peak = (median(name, k) for k in ("upload", "download", "peak_kib"))
        lines.append(
            f"| {name} | {up:.2f} | {down:.2f} | {median(name, 'sign') * 1000:.2f} "
            f"| {peak / 1024:.1f} | {median(name, 'resident_kib') / 1024:.0f} "
            f"| {up / base['upload']:.2f}x | {down / base['download']:.2f}x "
            f"| {peak / base['peak_kib']:.2f}x "
            f"| {sum(r['exit'] != 0 for r in results[name])} of {len(results[name])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
