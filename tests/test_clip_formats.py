"""Format choice: the tallest rendition whose clip fits the byte budget, chosen before fetching.

One generated video at 144p, 240p and 360p at clearly different bitrates is served by the
standard library's file server (with Range added) as an HLS master playlist and as a DASH
manifest, and clipped through the real app, yt-dlp's generic extractor and ffmpeg. Each clip
is compared frame by frame with the rendition it was made from, decoded by ffmpeg. Budgets are
set at the size the service plans for a rendition (the documented arithmetic: the manifest's
bitrate, the cut's 128 kbit/s audio, 15% and 64 KiB), so the media can stay short.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from services.clip.app import create_app
from services.clip.errors import OutputTooLarge
from services.clip.fetch.source import Format, select
from services.clip.request import byte_budget
from services.clip.settings import ClipSettings
from tests.conftest import MEDIA_CACHE, Media
from tests.support.apps import client, finished_job
from tests.support.ladder import DASH_LADDER, HLS_LADDER, Ladder, Rendition, make_ladder
from tests.support.media import audio_seconds, decode_timed_frames, frame_number, grey_psnr
from tests.support.rangeserver import RangeServer
from tests.support.receiver import Receiver
from tests.support.strictorigin import StrictOrigin
from tests.test_clip_e2e import settings_for

SIZES = ((256, 144), (426, 240), (640, 360))
SECONDS = 12
# Frames are compared at this size, whatever the rendition's.
WIDTH, HEIGHT = 160, 90
EPSILON = 0.0005
MIN_PSNR = 30.0
MANIFESTS = {"hls": HLS_LADDER, "dash": DASH_LADDER}
# What the service plans a clip's size for (README, "Format choice").
CUT_AUDIO, MARGIN, OVERHEAD = 128_000, 0.15, 64 * 1024
# A span that fits at 144p under a budget set for it, and not at 240p.
LONG = ("0:01.3", "0:10.7")


@pytest.fixture(scope="module")
def ladder() -> Ladder:
    return make_ladder(MEDIA_CACHE, "ladder", sizes=SIZES, seconds=SECONDS)


@pytest.fixture(scope="module")
def origin(ladder: Ladder) -> Iterator[Media]:
    with StrictOrigin(MEDIA_CACHE) as server:
        yield Media(server=server, root=MEDIA_CACHE)


def video_rate(rendition: Rendition, container: str) -> int:
    """The video bitrate the manifest gives (HLS: the muxed variant, its audio included)."""
    return rendition.hls_bitrate if container == "hls" else rendition.video_bitrate


def manifest_rate(rendition: Rendition, container: str) -> int:
    """The formats' bitrate the service reports: the variant, or DASH's video and audio."""
    if container == "hls":
        return rendition.hls_bitrate
    return rendition.video_bitrate + rendition.audio_bitrate


def planned(rendition: Rendition, container: str, seconds: float) -> int:
    """The bytes the service plans for a clip of ``seconds`` of ``rendition``."""
    rate = video_rate(rendition, container) + CUT_AUDIO
    return round(rate / 8 * seconds * (1 + MARGIN)) + OVERHEAD


def seconds_of(text: str) -> float:
    minutes, seconds = text.split(":")
    return int(minutes) * 60 + float(seconds)


def ask(
    api: httpx.Client, url: str, span: tuple[str, str], hook: Receiver | None, **extra: Any
) -> httpx.Response:
    headers = {}
    if hook is not None:
        headers = {"ouro-webhook-url": hook.url, "ouro-webhook-token": "t", "ouro-action-id": "a"}
    body = {"youtube_url": url, "start_time": span[0], "end_time": span[1], **extra}
    return api.post("/download-a-clip-from-youtube", json=body, headers=headers)


def clip(
    settings: ClipSettings,
    url: str,
    span: tuple[str, str],
    hook: Receiver | None = None,
    **extra: Any,
) -> tuple[dict[str, Any], bytes | None]:
    """The finished job's view, and its MP4 as its caller gets it (webhook or file)."""
    with client(create_app(settings)) as api:
        response = ask(api, url, span, hook, **extra)
        assert response.status_code == 202, response.text
        view = finished_job(api, response.json()["job_id"])
        if view["status"] != "succeeded":
            return view, None
        if hook is not None:
            [delivery] = hook.wait(1)
            return view, base64.b64decode(delivery.body["response"]["file"]["base64"])
        return view, api.get(f"/jobs/{view['job_id']}/file").content


@functools.cache
def rendition_frames(path: Path) -> list[tuple[float, bytes]]:
    return decode_timed_frames(path, width=WIDTH, height=HEIGHT)


def assert_frame_exact(
    data: bytes, rendition: Rendition, container: str, span: tuple[str, str], work: Path
) -> None:
    """The clip holds exactly the rendition's frames in [start, end), in order, at their times,
    with audio from its first frame to its end."""
    made_path = work / "made.mp4"
    made_path.write_bytes(data)
    start, end = (seconds_of(t) for t in span)
    source = rendition.hls_playlist if container == "hls" else rendition.source
    expected = [(t, f) for t, f in rendition_frames(source) if start - EPSILON <= t < end - EPSILON]
    made = decode_timed_frames(made_path, width=WIDTH, height=HEIGHT)
    assert len(made) == len(expected), f"{len(made)} frames instead of {len(expected)}"
    for index, ((want_t, want), (got_t, got)) in enumerate(zip(expected, made, strict=True)):
        wanted, seen = frame_number(want, WIDTH, HEIGHT), frame_number(got, WIDTH, HEIGHT)
        assert seen == wanted, f"frame {index} is source frame {seen}, not {wanted}"
        assert grey_psnr(want, got) >= MIN_PSNR, f"frame {index} does not look like the source"
        assert round(got_t - (want_t - expected[0][0]), 3) == 0, "frames keep the source's times"
    assert audio_seconds(made_path) == pytest.approx(end - expected[0][0], abs=0.05)


def media_requests(server: StrictOrigin | RangeServer) -> list[str]:
    """Requests for media bytes (not playlists or manifests)."""
    return [r.path for r in server.requests if not r.path.endswith((".m3u8", ".mpd"))]


@pytest.mark.parametrize("container", sorted(MANIFESTS))
def test_a_short_clip_takes_the_tallest(
    container: str, ladder: Ladder, origin: Media, tmp_path: Path
) -> None:
    span = ("0:03.3", "0:06.7")
    url = origin.url(ladder.path(MANIFESTS[container]))
    view, data = clip(settings_for(origin, tmp_path), url, span)
    result = view["result"]
    assert result is not None, view
    tallest = ladder.at(360)
    assert (result["format_height"], result["height"]) == (360, 360)
    assert result["format_bitrate"] == round(manifest_rate(tallest, container) / 1000)
    assert result["reduced_to_fit"] is False
    assert data is not None
    assert_frame_exact(data, tallest, container, span, tmp_path)


# Each delivery's budget setting, each container once.
@pytest.mark.parametrize(("container", "delivery"), [("hls", "webhook"), ("dash", "direct")])
def test_a_long_clip_fits_at_the_smallest_and_not_one_byte_under(
    container: str, delivery: str, ladder: Ladder, origin: Media, tmp_path: Path, hook: Receiver
) -> None:
    """The budget setting of each delivery at the size planned for 144p: taken and reported;
    one byte less: refused before any media byte is fetched."""
    smallest = ladder.at(144)
    seconds = seconds_of(LONG[1]) - seconds_of(LONG[0])
    limit = planned(smallest, container, seconds)
    assert limit < planned(ladder.at(240), container, seconds)
    setting = "clip_max_output_bytes" if delivery == "webhook" else "clip_max_file_bytes"
    url = origin.url(ladder.path(MANIFESTS[container]))
    caller = hook if delivery == "webhook" else None

    view, data = clip(settings_for(origin, tmp_path, **{setting: limit}), url, LONG, caller)
    result = view["result"]
    assert result is not None, view
    assert (result["format_height"], result["height"]) == (144, 144)
    assert result["format_bitrate"] == round(manifest_rate(smallest, container) / 1000)
    assert result["reduced_to_fit"] is True
    assert data is not None
    assert len(data) == result["bytes"] <= limit
    assert_frame_exact(data, smallest, container, LONG, tmp_path)

    origin.server.reset()
    # Another work directory: the first job's action id is kept across the restart in this one.
    again = settings_for(origin, tmp_path / "again", **{setting: limit - 1})
    view, _ = clip(again, url, LONG, caller)
    assert view["error"]["code"] == "output_too_large"
    assert media_requests(origin.server) == []


@pytest.mark.parametrize("container", sorted(MANIFESTS))
def test_a_span_that_fits_nowhere_fails_before_any_media_byte(
    container: str, ladder: Ladder, origin: Media, tmp_path: Path, hook: Receiver
) -> None:
    budget = 150_000
    span = ("0:00", "0:11")
    origin.server.reset()
    settings = settings_for(origin, tmp_path, clip_max_output_bytes=budget)
    view, _ = clip(settings, origin.url(ladder.path(MANIFESTS[container])), span, hook)
    [delivery] = hook.wait(1)
    error = delivery.body["response"]["error"]
    assert view["error"] == error
    assert error["code"] == "output_too_large"
    assert "\n" not in error["message"]
    # The longest span that fits at the smallest format, to the second.
    rate = video_rate(ladder.at(144), container) + CUT_AUDIO
    longest = math.floor((budget - OVERHEAD) / (rate / 8 * (1 + MARGIN)))
    assert "144p" in error["message"]
    assert f"at most 00:00:{longest:02d}." in error["message"], error["message"]
    requested = [r.path for r in origin.server.requests]
    assert requested, "the manifest was read"
    assert media_requests(origin.server) == []


@pytest.mark.parametrize("container", sorted(MANIFESTS))
def test_max_height_caps_the_choice(
    container: str, ladder: Ladder, origin: Media, tmp_path: Path
) -> None:
    span = ("0:05.2", "0:08.6")
    url = origin.url(ladder.path(MANIFESTS[container]))
    view, data = clip(settings_for(origin, tmp_path), url, span, None, max_height=240)
    result = view["result"]
    assert result is not None, view
    assert (result["format_height"], result["height"]) == (240, 240)
    assert result["reduced_to_fit"] is False
    assert data is not None
    assert_frame_exact(data, ladder.at(240), container, span, tmp_path)


def test_max_height_must_be_a_usual_height(ladder: Ladder, origin: Media, tmp_path: Path) -> None:
    url = origin.url(ladder.path(HLS_LADDER))
    with client(create_app(settings_for(origin, tmp_path))) as api:
        for wrong in (500, "abc", 0, -360, 360.5):
            response = ask(api, url, ("0:01", "0:02"), None, max_height=wrong)
            assert response.status_code == 422, (wrong, response.text)
            body = response.json()
            assert body["error"]["code"] == "invalid_input"
            assert body["detail"] == body["error"]["message"]
            assert "max_height" in body["detail"]
            assert "\n" not in body["detail"]


def test_ten_minutes_by_default_and_not_a_frame_more(origin: Media, tmp_path: Path) -> None:
    """The default HERMES_CLIP_MAX_SECONDS: 600 s is accepted, 600.04 s is not."""
    settings = settings_for(origin, tmp_path)
    assert settings.clip_max_seconds == 600
    # Over a source of 12 s, so the accepted job ends at once: the range is past its end.
    url = origin.url("ladder/r144.mp4")
    with client(create_app(settings)) as api:
        accepted = ask(api, url, ("0:00", "10:00"), None)
        assert accepted.status_code == 202, accepted.text
        refused = ask(api, url, ("0:00", "10:00.04"), None)
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "clip_too_long"
        view = finished_job(api, accepted.json()["job_id"])
    assert view["error"]["code"] == "range_out_of_bounds"


@pytest.mark.parametrize("setting", ["clip_max_file_bytes", "clip_max_seconds"])
def test_budget_and_length_settings_must_be_positive(setting: str) -> None:
    at_limit: dict[str, Any] = {setting: 1}
    assert getattr(ClipSettings(**at_limit), setting) == 1
    past: dict[str, Any] = {setting: 0}
    with pytest.raises(ValidationError, match=setting):
        ClipSettings(**past)


def youtube_format(itag_height: int | None, vcodec: str, acodec: str, kbps: float) -> Format:
    """A YouTube DASH format of a 20-minute video, its size given and its bitrate not."""
    return Format(
        url=f"https://r.googlevideo.com/{vcodec}/{itag_height}",
        vcodec=vcodec,
        acodec=acodec,
        height=itag_height,
        bitrate=0,
        protocol="https",
        filesize=round(kbps * 1000 / 8 * 1200),
    )


YOUTUBE = (
    youtube_format(1080, "vp09.00.40.08", "none", 2500),
    youtube_format(1080, "avc1.640028", "none", 4000),
    youtube_format(720, "avc1.4d401f", "none", 2100),
    youtube_format(480, "avc1.4d401e", "none", 1000),
    youtube_format(360, "avc1.4d401e", "none", 600),
    youtube_format(240, "avc1.4d4015", "none", 280),
    youtube_format(144, "avc1.4d400c", "none", 130),
    youtube_format(None, "none", "opus", 140),
    youtube_format(None, "none", "mp4a.40.2", 130),
)


@pytest.mark.parametrize(
    ("max_bytes", "max_height", "height", "reduced"),
    [
        (512 * 2**20, 1080, 1080, False),  # a direct caller's ten minutes: 1080p
        (64 * 2**20, 1080, 360, True),  # the webhook's: 360p, as README's arithmetic says
        (64 * 2**20, 240, 240, False),  # the caller asked for 240p at most
    ],
)
def test_ten_minutes_of_youtube_by_file_size(
    max_bytes: int, max_height: int, height: int, reduced: bool
) -> None:
    chosen = select(YOUTUBE, max_height, seconds=600, duration=1200, max_bytes=max_bytes)
    assert (chosen.video.height, chosen.video.is_h264, chosen.reduced) == (height, True, reduced)
    assert chosen.audio is not None
    assert chosen.audio.is_aac
    kbps = {1080: 4000, 360: 600, 240: 280}[height]
    assert chosen.bitrate == pytest.approx((kbps + 130) * 1000)


def test_ten_minutes_fit_the_webhook_at_the_smallest_usual_height() -> None:
    """The default HERMES_CLIP_MAX_SECONDS at the default webhook budget: YouTube's richest
    usual 144p (130 kbit/s) with the cut's 128 kbit/s audio fits with room; the budget holds
    (64 MiB - 64 KiB) / (258 kbit/s / 8 * 1.15) = 1807.7 s of it."""
    settings = ClipSettings()
    smallest = (YOUTUBE[6], YOUTUBE[8])
    budget = {"duration": 1200, "max_bytes": settings.clip_max_output_bytes}
    for seconds in (settings.clip_max_seconds, 1807):
        assert select(smallest, 1080, seconds=seconds, **budget).video.height == 144
    with pytest.raises(OutputTooLarge, match=r"at most 00:30:07\.$"):
        select(smallest, 1080, seconds=1808, **budget)


def test_each_delivery_has_its_own_budget() -> None:
    settings = ClipSettings(clip_max_output_bytes=1000, clip_max_file_bytes=5000)
    assert byte_budget(settings, webhook=True) == 1000
    assert byte_budget(settings, webhook=False) == 5000
