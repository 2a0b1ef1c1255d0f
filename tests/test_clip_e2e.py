"""download-a-clip end to end: the real app, yt-dlp and ffmpeg on media served from loopback,
and a real webhook receiver."""

from __future__ import annotations

import base64
import itertools
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.clip.app import create_app
from services.clip.ffmpeg import ffmpeg_exe, parse_banner
from services.clip.settings import ClipSettings
from tests.conftest import FPS, HEIGHT, ORIGINS, WIDTH, Media
from tests.support.apps import client, finished_job
from tests.support.media import beep_onsets, decode_frames, frame_number
from tests.support.receiver import Receiver

pytestmark = pytest.mark.parametrize("media", ORIGINS, indirect=True)
FRAME = 1 / FPS
SOURCES = {
    "progressive": "s60.mp4",
    "b-frames": "b60.mp4",
    "dash": "dash/manifest.mpd",
    "hls": "hls/master.m3u8",
}


def settings_for(media: Media, tmp_path: Path, **overrides: Any) -> ClipSettings:
    values: dict[str, Any] = {
        "allow_private_networks": True,
        "clip_extra_source_hosts": media.host,
        "clip_work_dir": tmp_path / "work",
        "webhook_backoff_seconds": 0.05,
        **overrides,
    }
    return ClipSettings(**values)


def ask(
    api: httpx.Client, url: str, start: str, end: str, hook: Receiver | None = None, **extra: Any
) -> httpx.Response:
    headers = {}
    if hook is not None:
        headers = {
            "ouro-webhook-url": hook.url,
            "ouro-webhook-token": "secret-token",
            "ouro-action-id": "action-1",
            "ouro-route-id": "route-1",
        }
    body = {"youtube_url": url, "start_time": start, "end_time": end, **extra}
    return api.post("/download-a-clip-from-youtube", json=body, headers=headers)


def assert_exact(clip: Path, *, first: int, count: int) -> None:
    """Every frame from the source's frame ``first`` on, in order, in any player."""
    for ignore_editlist in (False, True):
        frames = decode_frames(clip, width=WIDTH, height=HEIGHT, ignore_editlist=ignore_editlist)
        numbers = [frame_number(frame, WIDTH, HEIGHT) for frame in frames]
        assert numbers == list(range(first, first + count)), "frames must be the source's span"


def facts(path: Path) -> str:
    return subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    ).stderr


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_clip_is_frame_exact_in_sync_and_delivered(
    kind: str, media: Media, tmp_path: Path, hook: Receiver
) -> None:
    settings = settings_for(media, tmp_path)
    with client(create_app(settings)) as api:
        response = ask(api, media.url(SOURCES[kind]), "0:12.4", "0:20.4", hook, name="My clip")
        assert response.status_code == 202
        job_id = response.json()["job_id"]
        assert response.headers["location"] == f"/jobs/{job_id}"
        [delivery] = hook.wait(1)
        view = finished_job(api, job_id)

    assert delivery.headers["ouro-webhook-token"] == "secret-token"
    body = delivery.body
    assert body["status"] == "success"
    assert body["ouro_action_id"] == "action-1"
    assert body["ouro_route_id"] == "route-1"
    result = body["response"]
    assert result["file"]["name"] == "My clip"
    assert result["file"]["filename"] == "My clip.mp4"
    assert result["file"]["type"] == "video/mp4"
    assert result["file"]["extension"] == "mp4"
    assert (result["start"], result["end"]) == (12.4, 20.4)
    assert result["source_duration"] == pytest.approx(60, abs=0.1)
    assert (result["width"], result["height"]) == (WIDTH, HEIGHT)
    assert result["cut"] == "smart"
    assert view["status"] == "succeeded"
    assert view["webhook"] == "delivered"
    assert view["progress"] == 1

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(base64.b64decode(result["file"]["base64"]))
    assert result["bytes"] == clip.stat().st_size
    banner = facts(clip)
    assert "Video: h264" in banner
    assert "Audio: aac" in banner
    data = clip.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat"), "index must be at the front (faststart)"

    made = parse_banner(banner)
    assert made.duration == pytest.approx(8.0, abs=FRAME)
    assert_exact(clip, first=round(12.4 * FPS), count=round(8.0 * FPS))
    assert (
        "error"
        not in subprocess.run(
            [ffmpeg_exe(), "-v", "error", "-i", str(clip), "-f", "null", "-"],
            capture_output=True,
            text=True,
        ).stderr.lower()
    ), "every frame must decode cleanly"
    onsets = [t for t in beep_onsets(clip) if t > 0.05]
    expected = [second - 12.4 for second in range(13, 21)]
    assert len(onsets) == len(expected)
    for heard, due in zip(onsets, expected, strict=True):
        assert abs(heard - due) < FRAME, "audio out of sync with video"
    assert not (tmp_path / "work" / job_id).exists() or os.listdir(tmp_path / "work" / job_id) == [
        "clip.mp4"
    ]


def test_direct_caller_polls_progress_and_downloads_the_file(media: Media, tmp_path: Path) -> None:
    settings = settings_for(media, tmp_path)
    with client(create_app(settings)) as api:
        job_id = ask(api, media.url("s60.mp4"), "00:00:05", "00:00:35").json()["job_id"]
        seen: list[tuple[str, float]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            view = api.get(f"/jobs/{job_id}").json()
            seen.append((view["status"], view["progress"]))
            if view["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.02)
        assert view["status"] == "succeeded", view
        assert any(s == "running" and 0 < p < 1 for s, p in seen), seen
        progress = [p for _, p in seen]
        assert progress == sorted(progress)
        assert view["result"]["title"] == "s60"
        assert view["result"]["clip_duration"] == pytest.approx(30, abs=FRAME)
        assert view["webhook"] == "none"
        download = api.get(f"/jobs/{job_id}/file")
        assert download.status_code == 200
        assert download.headers["content-type"] == "video/mp4"
        assert "s60.mp4" in download.headers["content-disposition"]
        assert len(download.content) == view["result"]["bytes"]


def test_only_the_clip_span_is_fetched_in_bounded_ranges(media: Media, tmp_path: Path) -> None:
    """A 30 s clip of a 10-minute source: at most 2x the clip's share of the source's bytes,
    every media request a range no larger than the bound, none of them throttled."""
    from tests.conftest import MEDIA_CACHE
    from tests.support.media import make_source
    from tests.support.rangeserver import ThrottlePolicy

    # At crf 8 the small picture carries about 1.2 Mbit/s, as real video does, so the few
    # hundred KiB that socket buffers read ahead weigh as they would in production.
    long_source = make_source(
        MEDIA_CACHE, seconds=600, width=WIDTH, height=HEIGHT, fps=FPS, crf=8, name="s600"
    )
    bound = 1024 * 1024
    settings = settings_for(media, tmp_path, clip_max_range_bytes=bound)
    media.server.throttle = ThrottlePolicy(max_fast_bytes=bound, slow_rate=64 * 1024)
    with client(create_app(settings)) as api:
        media.server.reset()
        job_id = ask(api, media.url("s600.mp4"), "5:00", "5:30").json()["job_id"]
        assert finished_job(api, job_id)["status"] == "succeeded"
    share = long_source.stat().st_size * 30 / 600
    fetched = media.server.bytes_sent("s600.mp4")
    assert fetched <= 2 * share, f"fetched {fetched} bytes for a share of {share:.0f}"
    ranged = [r for r in media.server.requests if r.range_header is not None]
    assert ranged
    assert all(r.requested_length is not None for r in ranged), "no open-ended range"
    assert max(r.requested_length or 0 for r in ranged) <= bound
    assert not any(r.throttled for r in ranged)
    # yt-dlp's generic extractor sniffs a direct link with one plain GET and hangs up.
    plain = [r for r in media.server.requests if r.range_header is None]
    assert len(plain) <= 1
    assert sum(r.bytes_sent for r in plain) <= 256 * 1024


def error_of(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["detail"] == body["error"]["message"]
    return str(body["error"]["code"])


def test_bad_requests_are_refused_before_the_202(media: Media, tmp_path: Path) -> None:
    settings = settings_for(media, tmp_path, clip_max_seconds=30, clip_name_max_length=10)
    good = media.url("s60.mp4")
    cases: list[tuple[tuple[str, str, str], dict[str, Any], str | None]] = [
        (("https://vimeo.com/123", "0:01", "0:02"), {}, "invalid_url"),
        (
            ("https://youtube.com.evil.example/watch?v=dQw4w9WgXcQ", "0:01", "0:02"),
            {},
            "invalid_url",
        ),
        (("https://www.youtube.com/playlist?list=PL1", "0:01", "0:02"), {}, "invalid_url"),
        ((good, "1:75", "2:00"), {}, "invalid_time"),
        ((good, "0:10", "0:05"), {}, "invalid_range"),
        ((good, "0:00", "0:30"), {}, None),
        ((good, "0:00", "0:30.04"), {}, "clip_too_long"),
        ((good, "0:00", "0:01"), {"name": "x" * 10}, None),
        ((good, "0:00", "0:01"), {"name": "x" * 11}, "invalid_input"),
    ]
    with client(create_app(settings)) as api:
        for (url, start, end), extra, code in cases:
            response = ask(api, url, start, end, None, **extra)
            if code is None:
                assert response.status_code == 202, response.text
            else:
                assert error_of(response) == code, (url, start, end)
        missing = api.post("/download-a-clip-from-youtube", json={"youtube_url": good})
        assert error_of(missing) == "invalid_input"
        assert "start_time" in missing.json()["detail"]
        assert api.get("/jobs/" + "0" * 32).status_code == 404
        assert api.get("/jobs/not-a-job").status_code == 422


@pytest.mark.parametrize(
    ("path", "start", "end", "code"),
    [
        ("s60.mp4", "0:50", "1:05", "range_out_of_bounds"),
        ("s60.mp4", "2:00", "2:10", "range_out_of_bounds"),
        ("dash/manifest.mpd", "0:55", "1:02", "range_out_of_bounds"),
        ("hls/master.m3u8", "0:55", "1:02", "range_out_of_bounds"),
        ("missing.mp4", "0:01", "0:02", "source_unreachable"),
        ("not-a-video.mp4", "0:01", "0:02", "unsupported_source"),
        ("live/master.m3u8", "0:01", "0:02", "live_not_supported"),
    ],
)
def test_failures_reach_the_webhook_with_a_code(
    media: Media, tmp_path: Path, hook: Receiver, path: str, start: str, end: str, code: str
) -> None:
    settings = settings_for(media, tmp_path)
    with client(create_app(settings)) as api:
        response = ask(api, media.url(path), start, end, hook)
        assert response.status_code == 202
        [delivery] = hook.wait(1)
        view = finished_job(api, response.json()["job_id"])
    assert delivery.body["status"] == "error"
    error = delivery.body["response"]["error"]
    assert error["code"] == code, error
    assert "\n" not in error["message"]
    assert view["error"] == error
    assert not (tmp_path / "work" / response.json()["job_id"]).exists()


def test_output_limit_timeout_and_cancel(media: Media, tmp_path: Path, hook: Receiver) -> None:
    with client(create_app(settings_for(media, tmp_path))) as api:
        job = ask(api, media.url("s60.mp4"), "0:01", "0:06").json()["job_id"]
        size = finished_job(api, job)["result"]["bytes"]
    # A direct caller's budget (the webhook's is tested with the formats' choice).
    for limit, code in ((size, None), (size - 1, "output_too_large")):
        with client(create_app(settings_for(media, tmp_path, clip_max_file_bytes=limit))) as api:
            job = ask(api, media.url("s60.mp4"), "0:01", "0:06").json()["job_id"]
            assert (finished_job(api, job)["error"] or {}).get("code") == code
    slow = settings_for(media, tmp_path, clip_job_timeout_seconds=0.3)
    with client(create_app(slow)) as api:
        job = ask(api, media.url("s60.mp4"), "0:01", "0:50").json()["job_id"]
        assert finished_job(api, job)["error"]["code"] == "job_timeout"
        assert not (tmp_path / "work" / job).exists()
        assert not ffmpeg_running(tmp_path)
    with client(create_app(settings_for(media, tmp_path))) as api:
        job = ask(api, media.url("s60.mp4"), "0:01", "0:50", hook).json()["job_id"]
        while api.get(f"/jobs/{job}").json()["stage"] != "cutting":
            time.sleep(0.01)
        cancelled = api.delete(f"/jobs/{job}").json()
        assert cancelled["status"] == "failed"
        assert cancelled["error"]["code"] == "cancelled"
        assert hook.wait(1)[0].body["response"]["error"]["code"] == "cancelled"
        assert not (tmp_path / "work" / job).exists()
        assert not ffmpeg_running(tmp_path)
        assert api.get(f"/jobs/{job}/file").status_code == 409


def ffmpeg_running(tmp_path: Path) -> bool:
    """Any ffmpeg still writing into this test's work directory."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp_path / "work").encode() in cmdline:
            return True
    return False


def test_webhook_retries_5xx_then_delivers_with_the_same_body(
    media: Media, tmp_path: Path, hook: Receiver
) -> None:
    hook.statuses = [500, 503]
    with client(create_app(settings_for(media, tmp_path))) as api:
        job = ask(api, media.url("s60.mp4"), "0:01", "0:02", hook).json()["job_id"]
        deliveries = hook.wait(3)
        time.sleep(0.3)
        assert api.get(f"/jobs/{job}").json()["webhook"] == "delivered"
    assert len(hook.deliveries) == 3
    assert deliveries[0].body == deliveries[2].body
    assert {d.headers["webhook-id"] for d in deliveries} == {job}
    gaps = [b.at - a.at for a, b in itertools.pairwise(deliveries)]
    assert gaps[1] > gaps[0]


@pytest.mark.parametrize(("status", "location"), [(400, None), (410, None), (302, "/elsewhere")])
def test_webhook_is_not_retried_on_4xx_or_redirect(
    media: Media, tmp_path: Path, hook: Receiver, status: int, location: str | None
) -> None:
    hook.statuses = [status]
    hook.location = location
    with client(create_app(settings_for(media, tmp_path))) as api:
        job = ask(api, media.url("s60.mp4"), "0:01", "0:02", hook).json()["job_id"]
        hook.wait(1)
        deadline = time.monotonic() + 10
        while api.get(f"/jobs/{job}").json()["webhook"] == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert api.get(f"/jobs/{job}").json()["webhook"] == "failed"
        time.sleep(0.3)
    assert len(hook.deliveries) == 1


def test_retention_removes_the_file(media: Media, tmp_path: Path) -> None:
    settings = settings_for(media, tmp_path, clip_retention_seconds=0)
    with client(create_app(settings)) as api:
        job = ask(api, media.url("s60.mp4"), "0:01", "0:02").json()["job_id"]
        while api.get(f"/jobs/{job}").status_code == 200:
            time.sleep(0.05)
        assert api.get(f"/jobs/{job}/file").status_code == 404
    assert not (tmp_path / "work" / job).exists()


def test_queue_bound_gives_503(media: Media, tmp_path: Path) -> None:
    settings = settings_for(media, tmp_path, clip_max_queued=1, clip_concurrency=1)
    with client(create_app(settings)) as api:
        assert ask(api, media.url("s60.mp4"), "0:01", "0:30").status_code == 202
        busy = ask(api, media.url("s60.mp4"), "0:01", "0:30")
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "queue_full"


def test_ouro_authentication(media: Media, tmp_path: Path) -> None:
    settings = settings_for(media, tmp_path, ouro_service_secret="s3cret")
    with client(create_app(settings)) as api:
        url = media.url("s60.mp4")
        assert ask(api, url, "0:01", "0:02").status_code == 401
        wrong = {"authorization": "Basic s3cre"}
        body = {"youtube_url": url, "start_time": "0:01", "end_time": "0:02"}
        denied = api.post("/download-a-clip-from-youtube", json=body, headers=wrong)
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "unauthorized"
        right = {"authorization": "Basic s3cret"}
        assert (
            api.post("/download-a-clip-from-youtube", json=body, headers=right).status_code == 202
        )
        assert api.get("/openapi.json").status_code == 200
        assert api.get("/healthz").status_code == 200


def test_sources_that_cannot_be_smart_cut_are_reencoded_exactly(
    media: Media, tmp_path: Path
) -> None:
    with client(create_app(settings_for(media, tmp_path))) as api:
        job = ask(api, media.url("mpeg4.mp4"), "0:03.2", "0:07.2").json()["job_id"]
        view = finished_job(api, job)
        clip = tmp_path / "clip.mp4"
        clip.write_bytes(api.get(f"/jobs/{job}/file").content)
    assert view["result"]["cut"] == "reencode"
    assert "Video: h264" in facts(clip)
    assert_exact(clip, first=round(3.2 * FPS), count=round(4.0 * FPS))


def test_disk_per_job_at_and_past_the_limit(media: Media, tmp_path: Path) -> None:
    def run(limit: int) -> dict[str, Any]:
        settings = settings_for(media, tmp_path, clip_max_job_disk_bytes=limit)
        with client(create_app(settings)) as api:
            return finished_job(
                api, ask(api, media.url("s60.mp4"), "0:10", "0:14").json()["job_id"]
            )

    spans: list[int] = []
    original = Path.unlink

    def measure(path: Path, missing_ok: bool = False) -> None:
        if path.name == "span.mp4":
            spans.append(path.stat().st_size)
        original(path, missing_ok)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "unlink", measure)
        assert run(10**9)["status"] == "succeeded"
    [size] = spans
    assert run(size)["status"] == "succeeded"
    past = run(size - 1)
    assert past["error"]["code"] == "job_disk_exceeded"
    assert not list((tmp_path / "work").glob("*/span.mp4"))
