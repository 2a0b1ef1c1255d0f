"""Health, readiness, metrics and logs: what an operator reads."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from services.clip.app import create_app as create_clip_app
from services.clip.settings import ClipSettings
from services.common.observability import JsonFormatter
from services.compress.app import create_app as create_compress_app
from services.compress.settings import CompressSettings
from tests.conftest import Media
from tests.support.apps import client, free_port


def test_metrics_count_requests_by_route_and_status(tmp_path: Path) -> None:
    with client(create_compress_app(CompressSettings(compress_workers=1))) as api:
        api.get("/healthz")
        api.get("/healthz")
        refused = api.post("/compress-an-image/upload", files={"file": ("x.png", b"not an image")})
        assert refused.status_code == 415, refused.text
        text = api.get("/metrics").text
    counted = [line for line in text.splitlines() if line.startswith("hermes_http_requests_total")]
    assert 'hermes_http_requests_total{method="GET",route="/healthz",status="200"} 2.0' in counted
    assert (
        'hermes_http_requests_total{method="POST",route="/compress-an-image/upload",status="415"}'
        " 1.0" in counted
    ), counted
    assert 'hermes_http_request_bytes_total{route="/compress-an-image/upload"}' in text
    assert "hermes_http_request_duration_seconds_bucket" in text


def test_clip_metrics_show_jobs_and_webhooks(media: Media, tmp_path: Path) -> None:
    settings = ClipSettings(
        allow_private_networks=True,
        clip_extra_source_hosts=media.host,
        clip_work_dir=tmp_path,
    )
    with client(create_clip_app(settings)) as api:
        body = {"youtube_url": media.url("s60.mp4"), "start_time": "1", "end_time": "2"}
        job = api.post("/download-a-clip-from-youtube", json=body).json()["job_id"]
        while api.get(f"/jobs/{job}").json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.05)
        text = api.get("/metrics").text
    assert 'hermes_clip_jobs{status="succeeded"} 1.0' in text


def test_readiness(tmp_path: Path) -> None:
    with client(create_compress_app(CompressSettings(compress_workers=1))) as api:
        ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"codec_pool": True}}
    with client(create_clip_app(ClipSettings(clip_work_dir=tmp_path))) as api:
        assert api.get("/readyz").json()["checks"] == {
            "ffmpeg": True,
            "youtube_js_runtime": True,
            "youtube_yt_dlp_ejs": True,
        }
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    distributed = ClipSettings(
        redis_url=unreachable, clip_work_dir=tmp_path, clip_storage_url=str(tmp_path / "results")
    )
    with client(create_clip_app(distributed)) as api:
        down = api.get("/readyz")
    assert down.status_code == 503
    assert down.json()["checks"] == {
        "ffmpeg": True,
        "redis": False,
        "worker_youtube_toolchain": False,
        "storage": True,
    }
    assert "warnings" not in down.json()


def test_logs_are_json_lines_with_the_action_and_job_ids(
    media: Media, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ClipSettings(
        allow_private_networks=True,
        clip_extra_source_hosts=media.host,
        clip_work_dir=tmp_path,
    )
    caplog.set_level(logging.INFO, logger="services")
    with client(create_clip_app(settings)) as api:
        body = {"youtube_url": media.url("s60.mp4"), "start_time": "1", "end_time": "2"}
        headers = {"ouro-action-id": "action-42"}
        job = api.post("/download-a-clip-from-youtube", json=body, headers=headers).json()
        while api.get(f"/jobs/{job['job_id']}").json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.05)
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(record)) for record in caplog.records]
    finished = [line for line in lines if "succeeded" in line["message"]]
    assert finished, lines
    assert finished[0]["ouro_action_id"] == "action-42"
    assert finished[0]["job_id"] == job["job_id"]
    assert {"time", "level", "logger", "message"} <= set(finished[0])
