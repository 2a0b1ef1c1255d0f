"""Readiness says the truth about the YouTube toolchain: in the API (embedded jobs), in each
worker's record in Redis (distributed jobs), and from ``hermes-media doctor``."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_client

from services import cli
from services.clip import toolchain
from services.clip.app import create_app
from services.clip.settings import ClipSettings
from tests.support.apps import client
from tests.support.redis import RedisServer, redis_server
from tests.support.signed_origin import SignedOrigin


def fake_runtime(tmp_path: Path, banner: str) -> Path:
    """An executable that answers ``--version`` as a deno of that version would."""
    path = tmp_path / "deno"
    path.write_text(f"#!/bin/sh\necho '{banner}'\n")
    path.chmod(0o755)
    return path


def test_ready_with_the_runtime_yt_dlp_finds(tmp_path: Path) -> None:
    with client(create_app(ClipSettings(clip_work_dir=tmp_path))) as api:
        ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["youtube_js_runtime"] is True
    assert ready.json()["checks"]["youtube_yt_dlp_ejs"] is True


@pytest.mark.parametrize(
    "runtime",
    [
        lambda tmp: f"deno:{tmp / 'nothing-here'}",
        lambda tmp: f"deno:{fake_runtime(tmp, 'deno 2.2.9 (stable)')}",
    ],
    ids=["absent", "older-than-yt-dlp-accepts"],
)
def test_not_ready_without_a_runtime_yt_dlp_accepts(
    tmp_path: Path, runtime: Callable[[Path], str]
) -> None:
    settings = ClipSettings(clip_work_dir=tmp_path, ytdlp_js_runtime=runtime(tmp_path))
    with client(create_app(settings)) as api:
        down = api.get("/readyz")
    assert down.status_code == 503
    assert down.json()["checks"]["youtube_js_runtime"] is False
    assert down.json()["checks"]["ffmpeg"] is True


def test_the_minimum_version_itself_is_accepted(tmp_path: Path) -> None:
    check = toolchain.js_runtime(f"deno:{fake_runtime(tmp_path, 'deno 2.3.0 (stable)')}")
    assert check.ok, check.detail
    assert "2.3.0" in check.detail


def test_not_ready_until_the_cookies_file_is_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(toolchain, "RECHECK_SECONDS", 0.0)
    cookies = tmp_path / "cookies.txt"
    settings = ClipSettings(clip_work_dir=tmp_path, ytdlp_cookie_file=str(cookies))
    with client(create_app(settings)) as api:
        down = api.get("/readyz")
        cookies.write_text("# Netscape HTTP Cookie File\n")
        up = api.get("/readyz")
    assert (down.status_code, down.json()["checks"]["youtube_cookies"]) == (503, False)
    assert (up.status_code, up.json()["checks"]["youtube_cookies"]) == (200, True)


def test_not_ready_without_yt_dlp_ejs(monkeypatch: pytest.MonkeyPatch) -> None:
    """As yt-dlp sees it when the package is not installed (its optional import is None)."""
    monkeypatch.setattr(toolchain, "ejs", None)
    check = toolchain.challenge_solver()
    assert not check.ok
    assert "not installed" in check.detail


def test_po_token_plugin_is_checked_when_a_provider_is_set(tmp_path: Path) -> None:
    settings = ClipSettings(clip_work_dir=tmp_path, ytdlp_pot_provider_url="http://p:4416")
    [check] = [c for c in toolchain.youtube_toolchain(settings) if c.name == "pot_plugin"]
    try:
        installed = importlib.metadata.version(toolchain.POT_PLUGIN)
    except importlib.metadata.PackageNotFoundError:
        assert (check.ok, check.detail) == (False, "not installed: pip install 'hermes-media[pot]'")
    else:
        assert (check.ok, check.detail) == (True, f"{toolchain.POT_PLUGIN} {installed}")


def test_doctor_prints_each_check_with_versions(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HERMES_YTDLP_EXTRACTOR_ARGS", "youtube:player_client=default,mweb")
    cli.main(["doctor"])
    out = capsys.readouterr().out
    assert "yt_dlp       ok    2026." in out
    assert "js_runtime   ok    deno 2." in out
    assert "yt_dlp_ejs   ok    0.8" in out
    assert "youtube:player_client=default,mweb" in out


def test_doctor_fails_and_names_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HERMES_YTDLP_JS_RUNTIME", f"deno:{tmp_path}/none")
    monkeypatch.setenv("HERMES_YTDLP_POT_PROVIDER_URL", "http://127.0.0.1:9")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["doctor"])
    assert stopped.value.code == 1
    out = capsys.readouterr().out
    assert f"js_runtime   FAIL  deno not found in {tmp_path}/none" in out
    assert "pot_server   FAIL  http://127.0.0.1:9/ping" in out


# Distributed: each worker checks its own toolchain and records it in Redis.


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def start_worker(
    redis: RedisServer, queue: str, root: Path, name: str, **extra: str
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    env.update(
        HERMES_REDIS_URL=redis.url,
        HERMES_CLIP_QUEUE_NAME=queue,
        HERMES_CLIP_WORK_DIR=str(root / "work"),
        HERMES_CLIP_STORAGE_URL=str(root / "results"),
        HERMES_WORKER_SHUTDOWN_GRACE_SECONDS="0",
        **extra,
    )
    return subprocess.Popen(
        [sys.executable, "-c", "from services.cli import main; main(['worker'])"],
        env=env,
        stdout=(root / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


def wait_for(api: httpx.Client, status: int, timeout: float = 20) -> dict[str, bool]:
    deadline = time.monotonic() + timeout
    while True:
        answer = api.get("/readyz")
        if answer.status_code == status or time.monotonic() > deadline:
            assert answer.status_code == status, answer.json()
            checks: dict[str, bool] = answer.json()["checks"]
            return checks
        time.sleep(0.1)


def test_api_is_ready_while_a_live_worker_passes(redis: RedisServer, tmp_path: Path) -> None:
    queue = f"hermes-test:{uuid.uuid4().hex[:8]}"
    settings = ClipSettings(
        redis_url=redis.url,
        clip_queue_name=queue,
        clip_work_dir=tmp_path,
        clip_storage_url=str(tmp_path / "results"),
    )
    workers = []
    try:
        with client(create_app(settings)) as api:
            checks = wait_for(api, 503)
            assert checks == {
                "ffmpeg": True,
                "redis": True,
                "worker_youtube_toolchain": False,
                "storage": True,
            }
            broken = start_worker(
                redis, queue, tmp_path, "broken", HERMES_YTDLP_JS_RUNTIME="deno:/nowhere"
            )
            workers.append(broken)
            records = redis_client.Redis.from_url(redis.url)
            deadline = time.monotonic() + 20
            while not records.keys(f"{queue}:worker:*"):
                assert time.monotonic() < deadline, "the worker wrote no record"
                time.sleep(0.1)
            records.close()
            assert wait_for(api, 503)["worker_youtube_toolchain"] is False
            good = start_worker(redis, queue, tmp_path, "good")
            workers.append(good)
            assert wait_for(api, 200)["worker_youtube_toolchain"] is True
            good.terminate()
            good.wait(timeout=20)
            wait_for(api, 503, timeout=10)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=10)


def test_a_rate_limited_job_runs_again_after_the_cool_down(
    redis: RedisServer, tmp_path: Path, media_root: Path
) -> None:
    """Not after the 0.2 s backoff: after the cool-down, shared by the workers in Redis."""
    queue = f"hermes-test:{uuid.uuid4().hex[:8]}"
    with SignedOrigin(media_root, "s20.mp4") as origin:
        origin.answer_page_with(429, times=1)
        extra = {
            "HERMES_ALLOW_PRIVATE_NETWORKS": "true",
            "HERMES_CLIP_EXTRA_SOURCE_HOSTS": origin.host,
            "HERMES_CLIP_RETRY_BACKOFF_SECONDS": "0.2",
            "HERMES_YOUTUBE_COOLDOWN_SECONDS": "2",
        }
        worker = start_worker(redis, queue, tmp_path, "worker", **extra)
        settings = ClipSettings(
            redis_url=redis.url,
            clip_queue_name=queue,
            clip_work_dir=tmp_path,
            clip_storage_url=str(tmp_path / "results"),
            allow_private_networks=True,
            clip_extra_source_hosts=origin.host,
        )
        try:
            with client(create_app(settings)) as api:
                body = {"youtube_url": origin.page_url, "start_time": "1", "end_time": "2"}
                job = api.post("/download-a-clip-from-youtube", json=body).json()["job_id"]
                deadline = time.monotonic() + 40
                view = api.get(f"/jobs/{job}").json()
                while view["status"] not in ("succeeded", "failed"):
                    assert time.monotonic() < deadline, view
                    time.sleep(0.1)
                    view = api.get(f"/jobs/{job}").json()
        finally:
            worker.kill()
            worker.wait(timeout=10)
        visits = origin.hits("/watch")
    assert view["status"] == "succeeded", view
    assert view["tries"] == 2
    assert [v.status for v in visits] == [429, 200]
    gap = visits[1].at - visits[0].at
    assert 1.8 < gap < 6, f"the second run came {gap:.1f} s after the rate limit"
