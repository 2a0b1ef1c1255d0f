"""Behaving well under YouTube's limits, against a loopback origin that behaves like it: media
URLs signed anew by each extraction and refused (403) once spent, a page that rate-limits (429),
and formats that must wait before they may be fetched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.clip.app import create_app
from services.clip.fetch.gate import ExtractionCache, RedisCooldown, SourceGate
from services.clip.fetch.source import Format, VideoInfo
from services.clip.pipeline import make_clip
from services.clip.request import build_spec
from services.clip.settings import ClipSettings
from tests.conftest import Media
from tests.support.apps import client
from tests.support.redis import redis_server
from tests.support.signed_origin import SignedOrigin


@pytest.fixture
def origin(media_root: Path) -> Iterator[SignedOrigin]:
    with SignedOrigin(media_root, "s20.mp4") as found:
        yield found


def settings_for(origin: SignedOrigin, tmp_path: Path, **overrides: Any) -> ClipSettings:
    values: dict[str, Any] = {
        "allow_private_networks": True,
        "clip_extra_source_hosts": origin.host,
        "clip_work_dir": tmp_path / "work",
        **overrides,
    }
    return ClipSettings(**values)


def run(api: httpx.Client, url: str, start: str = "2", end: str = "4") -> dict[str, Any]:
    body = {"youtube_url": url, "start_time": start, "end_time": end}
    job_id = api.post("/download-a-clip-from-youtube", json=body).json()["job_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        view: dict[str, Any] = api.get(f"/jobs/{job_id}").json()
        if view["status"] in ("succeeded", "failed"):
            return view
        time.sleep(0.05)
    raise TimeoutError(job_id)


def test_a_refused_media_url_is_extracted_again_once_and_the_clip_completes(
    origin: SignedOrigin, tmp_path: Path
) -> None:
    origin.refuse("1")
    with client(create_app(settings_for(origin, tmp_path))) as api:
        view = run(api, origin.page_url)
    assert view["status"] == "succeeded", view
    assert view["result"]["clip_duration"] == pytest.approx(2.0, abs=0.05)
    assert origin.page_visits() == 2
    media = origin.media_hits()
    assert (media[0].signature, media[0].status) == ("1", 403)
    assert {(h.signature, h.status) for h in media[1:]} == {("2", 206)}
    # The format's own HTTP headers (here the page as Referer) go with every media request.
    assert {h.referer for h in media} == {origin.page_url}


def test_refused_again_after_the_new_extraction_fails_without_a_third(
    origin: SignedOrigin, tmp_path: Path
) -> None:
    origin.refuse("1", "2", "3")
    with client(create_app(settings_for(origin, tmp_path))) as api:
        view = run(api, origin.page_url)
    assert view["error"]["code"] == "source_unreachable"
    assert origin.page_visits() == 2


@pytest.mark.parametrize(("cache_seconds", "visits"), [(300.0, 1), (0.0, 2)])
def test_repeated_clips_of_one_video_extract_once(
    origin: SignedOrigin, tmp_path: Path, cache_seconds: float, visits: int
) -> None:
    settings = settings_for(origin, tmp_path, ytdlp_extraction_cache_seconds=cache_seconds)
    with client(create_app(settings)) as api:
        first = run(api, origin.page_url, "1", "2")
        second = run(api, origin.page_url, "3", "4")
    assert (first["status"], second["status"]) == ("succeeded", "succeeded")
    assert origin.page_visits() == visits


def test_cached_extraction_expires(origin: SignedOrigin, tmp_path: Path) -> None:
    settings = settings_for(origin, tmp_path, ytdlp_extraction_cache_seconds=0.5)
    with client(create_app(settings)) as api:
        run(api, origin.page_url, "1", "2")
        time.sleep(0.6)
        run(api, origin.page_url, "3", "4")
    assert origin.page_visits() == 2


def test_rate_limited_source_cools_down_and_new_jobs_fail_fast(
    origin: SignedOrigin, tmp_path: Path
) -> None:
    origin.answer_page_with(429)
    settings = settings_for(origin, tmp_path, youtube_cooldown_seconds=1.0)
    with client(create_app(settings)) as api:
        first = run(api, origin.page_url)
        assert first["error"]["code"] == "rate_limited"
        assert origin.page_visits() == 1
        started = time.monotonic()
        refused = run(api, origin.page_url)
        assert time.monotonic() - started < 1.0
        assert refused["error"]["code"] == "rate_limited"
        assert "Retry-After: 1" in refused["error"]["message"]
        assert origin.page_visits() == 1, "no request during the cool-down"
        origin.answer_page_with(200)
        time.sleep(max(0.0, 1.05 - (time.monotonic() - started)))
        assert run(api, origin.page_url)["status"] == "succeeded"
    assert origin.page_visits() == 2


def test_without_a_cool_down_every_job_asks(origin: SignedOrigin, tmp_path: Path) -> None:
    origin.answer_page_with(429)
    with client(create_app(settings_for(origin, tmp_path, youtube_cooldown_seconds=0))) as api:
        assert run(api, origin.page_url)["error"]["code"] == "rate_limited"
        assert run(api, origin.page_url)["error"]["code"] == "rate_limited"
    assert origin.page_visits() == 2


def test_the_cool_down_is_shared_through_redis(origin: SignedOrigin, tmp_path: Path) -> None:
    """Two workers (two gates) on one Redis: one is rate-limited, the other does not ask."""
    origin.answer_page_with(429)
    settings = settings_for(origin, tmp_path, youtube_cooldown_seconds=30)
    spec = build_spec(
        youtube_url=origin.page_url, start_time="1", end_time="2", name=None,
        extra_hosts=settings.clip_extra_source_hosts, max_seconds=60, max_name_length=100,
        max_bytes=settings.clip_max_output_bytes,
    )  # fmt: skip

    async def both(url: str) -> list[str]:
        from redis.asyncio import Redis

        codes: list[str] = []
        redis = Redis.from_url(url)
        try:
            for _ in range(2):
                gate = SourceGate(RedisCooldown(redis, "test:cooldown"), ExtractionCache(0))
                work = tmp_path / f"w{len(codes)}"
                work.mkdir()
                try:
                    await make_clip(spec, work, settings, lambda s, p: None, gate)
                except Exception as exc:
                    codes.append(f"{getattr(exc, 'code', exc)}: {exc}")
            assert 29 < await gate.retry_after(settings, spec.source) <= 30
        finally:
            await redis.aclose()
        return codes

    with redis_server(tmp_path / "redis") as redis:
        first, second = asyncio.run(both(redis.url))
    assert first.startswith("rate_limited")
    assert second.startswith("rate_limited")
    assert "Retry-After: 30" in second
    assert origin.page_visits() == 1


def test_formats_are_fetched_once_available(media: Media, tmp_path: Path) -> None:
    """yt-dlp's ``available_at`` (YouTube's wait before some clients' media) is waited out."""
    settings = ClipSettings(
        allow_private_networks=True, clip_extra_source_hosts=media.host, clip_work_dir=tmp_path
    )
    url = media.url("s20.mp4")
    spec = build_spec(
        youtube_url=url, start_time="1", end_time="2", name=None,
        extra_hosts=settings.clip_extra_source_hosts, max_seconds=60, max_name_length=100,
        max_bytes=settings.clip_max_output_bytes,
    )  # fmt: skip
    stages: list[tuple[str, float]] = []

    async def clip() -> float:
        gate = SourceGate.local(settings)
        ready = time.time() + 1.0
        fmt = Format(url, "avc1.64000d", "mp4a.40.2", 180, 500, "http", {}, available_at=ready)

        async def facts() -> VideoInfo:
            return VideoInfo("waits", 20.0, "not_live", (fmt,))

        await gate.cache.get(url, facts)
        started = time.monotonic()

        def report(stage: str, share: float) -> None:
            stages.append((stage, time.monotonic()))

        await make_clip(spec, tmp_path, settings, report, gate)
        return time.monotonic() - started

    assert asyncio.run(clip()) >= 0.9
    names = [s for s, _ in stages]
    assert names.index("waiting for the source") < names.index("fetching")
    waited = stages[names.index("fetching")][1] - stages[names.index("waiting for the source")][1]
    assert 0.8 < waited < 1.5
