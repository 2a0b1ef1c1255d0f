"""Progress on Ouro: with an API key a clip job writes its steps to the run's log."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from services.clip.app import create_app
from services.clip.settings import ClipSettings
from tests.conftest import Media
from tests.support.apps import client


class FakeOuro:
    """Records what the service sends to Ouro's API, answering as the backend does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.calls.append(
                    (self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                answer = {"access_token": "jwt-1", "refresh_token": "r-1"}
                payload = json.dumps(answer if self.path == "/users/get-token" else {}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ouro() -> Iterator[FakeOuro]:
    fake = FakeOuro()
    yield fake
    fake.close()


def run_clip(media: Media, tmp_path: Path, settings: ClipSettings, headers: dict[str, str]) -> None:
    with client(create_app(settings)) as api:
        body = {"youtube_url": media.url("s60.mp4"), "start_time": "2", "end_time": "8"}
        job = api.post("/download-a-clip-from-youtube", json=body, headers=headers).json()
        while api.get(f"/jobs/{job['job_id']}").json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.05)
        time.sleep(0.3)


def settings_for(media: Media, tmp_path: Path, **extra: Any) -> ClipSettings:
    return ClipSettings(
        allow_private_networks=True,
        clip_extra_source_hosts=media.host,
        clip_work_dir=tmp_path,
        **extra,
    )


RUN = {"ouro-action-id": "act-1", "ouro-route-id": "route-9"}


def test_steps_and_progress_reach_the_run_log(media: Media, tmp_path: Path, ouro: FakeOuro) -> None:
    settings = settings_for(media, tmp_path, ouro_api_key="pat_123", ouro_backend_url=ouro.url)
    run_clip(media, tmp_path, settings, RUN)
    (path, _, exchange), *logs = ouro.calls
    assert path == "/users/get-token"
    assert exchange == {"pat": "pat_123"}
    assert {p for p, _, _ in logs} == {"/actions/act-1/log"}
    assert {h["authorization"] for _, h, _ in logs} == {"jwt-1"}
    messages = [b["message"] for _, _, b in logs]
    assert messages[0] == "Reading video facts…"
    assert "Fetching…" in messages
    assert "50% done" in messages
    assert messages[-1].startswith("Clip ready: 6.00 s")
    assert {b["asset_id"] for _, _, b in logs} == {"route-9"}
    assert {b["level"] for _, _, b in logs} == {"info"}


def test_failures_are_logged_as_errors(media: Media, tmp_path: Path, ouro: FakeOuro) -> None:
    settings = settings_for(media, tmp_path, ouro_api_key="pat_123", ouro_backend_url=ouro.url)
    with client(create_app(settings)) as api:
        body = {"youtube_url": media.url("s60.mp4"), "start_time": "50", "end_time": "70"}
        job = api.post("/download-a-clip-from-youtube", json=body, headers=RUN).json()
        while api.get(f"/jobs/{job['job_id']}").json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.05)
        time.sleep(0.3)
    last = ouro.calls[-1][2]
    assert last["level"] == "error"
    assert "the clip must end by then" in last["message"]


def test_nothing_is_sent_without_a_key_or_without_a_run(
    media: Media, tmp_path: Path, ouro: FakeOuro
) -> None:
    run_clip(media, tmp_path, settings_for(media, tmp_path, ouro_backend_url=ouro.url), RUN)
    keyed = settings_for(media, tmp_path, ouro_api_key="pat_123", ouro_backend_url=ouro.url)
    run_clip(media, tmp_path, keyed, {})
    assert ouro.calls == []
