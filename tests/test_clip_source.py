"""The YouTube path at its seams: yt-dlp's options, its real failures, and format choice."""

from __future__ import annotations

import time
from typing import Any

import pytest
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import DownloadError, ExtractorError, GeoRestrictedError

from services.clip.fetch.source import Format, classify, extract, select, ydl_options
from services.clip.request import parse_source
from services.clip.settings import ClipSettings

PREFIX = "ERROR: [youtube] dQw4w9WgXcQ: "
HINT = (
    " Use --cookies-from-browser or --cookies for the authentication. See  "
    "https://github.com/yt-dlp/yt-dlp/wiki/FAQ#how-do-i-pass-cookies-to-yt-dlp  for how to "
    "manually pass cookies."
)

# Messages as yt-dlp 2026.10.26 words them (YouTube's reason text joined by _video.py).
MESSAGES = [
    (
        "Private video. Sign in if you've been granted access to this video." + HINT,
        "video_unavailable",
    ),
    (
        "Video unavailable. This video is no longer available because the YouTube account "
        "associated with this video has been terminated.",
        "video_unavailable",
    ),
    ("Video unavailable. This video is not available", "video_unavailable"),
    (
        "This video has been removed for violating YouTube's policy on harassment.",
        "video_unavailable",
    ),
    (
        "Sign in to confirm your age. This video may be inappropriate for some users." + HINT,
        "age_restricted",
    ),
    (
        "Join this channel to get access to members-only content like this video, and other "
        "exclusive perks.",
        "members_only",
    ),
    (
        "This video is available to this channel's members on level: Gold (or any higher level).",
        "members_only",
    ),
    (
        "The uploader has not made this video available in your country\nThis video is available "
        "in United States.\nYou might want to use a VPN or a proxy server (with --proxy) to "
        "workaround.",
        "geo_blocked",
    ),
    ("This live event will begin in 2 days.", "live_not_supported"),
    ("Premieres in 6 hours", "live_not_supported"),
    ("Sign in to confirm you\u2019re not a bot." + HINT, "sign_in_required"),
    (
        "Video unavailable. This content isn't available, try again later. The current session "
        "has been rate-limited by YouTube for up to an hour.",
        "rate_limited",
    ),
    (
        "Unable to download webpage: [Errno -2] Name or service not known (caused by "
        "TransportError('[Errno -2] Name or service not known'))",
        "source_unreachable",
    ),
    (
        "Unable to download API page: HTTP Error 503: Service Unavailable (caused by "
        "<HTTPError 503: Service Unavailable>)",
        "source_unreachable",
    ),
    (
        "Requested format is not available. Use --list-formats for a list of available formats",
        "unsupported_source",
    ),
    (
        "Unable to download API page: HTTP Error 429: Too Many Requests (caused by "
        "<HTTPError 429: Too Many Requests>)",
        "rate_limited",
    ),
    (
        "Video unavailable. This video contains content from SME, who has blocked it in your "
        "country on copyright grounds.",
        "geo_blocked",
    ),
    # yt-dlp's own warning, capitalize()d, when YouTube hides every format from a suspected bot.
    ("Only images are available for download. use --list-formats to see them", "sign_in_required"),
]

FORMAT_MISSING = (
    "Requested format is not available. Use --list-formats for a list of available formats"
)
BOT_CHECK_WARNINGS = [
    "[youtube] dQw4w9WgXcQ: Sign in to confirm you\u2019re not a bot." + HINT,
    "Only images are available for download. use --list-formats to see them",
]


@pytest.mark.parametrize("warning", BOT_CHECK_WARNINGS)
def test_missing_formats_after_a_bot_check_mean_sign_in(warning: str) -> None:
    error = DownloadError(PREFIX + FORMAT_MISSING, (ExtractorError, ExtractorError("x"), None))
    assert classify(error, [warning]).code == "sign_in_required"
    assert "cookies" in classify(error, [warning]).message
    assert classify(error, ["Falling back to generic n function search"]).code == (
        "unsupported_source"
    )


def test_messages_say_what_to_do() -> None:
    """Codes an operator can fix name the setting that fixes it."""
    for message, setting in [
        ("Sign in to confirm your age.", "HERMES_YTDLP_COOKIE_FILE"),
        ("The current session has been rate-limited by YouTube", "HERMES_YTDLP_PROXY"),
        ("The uploader has not made this video available in your country", "HERMES_YTDLP_PROXY"),
    ]:
        error = DownloadError(PREFIX + message, (ExtractorError, ExtractorError(message), None))
        assert setting in classify(error).message


@pytest.mark.parametrize(("message", "code"), MESSAGES)
def test_real_messages_map_to_stable_codes(message: str, code: str) -> None:
    error = DownloadError(PREFIX + message, (ExtractorError, ExtractorError(message), None))
    failure = classify(error)
    assert failure.code == code
    assert "yt-dlp" not in failure.message
    assert "--cookies" not in failure.message


def test_exception_classes_take_precedence() -> None:
    geo = GeoRestrictedError("blocked", countries=["US"])
    assert classify(DownloadError("ERROR: x", (type(geo), geo, None))).code == "geo_blocked"
    transport = TransportError("timed out")
    error = DownloadError("ERROR: [youtube] x: oops", (TransportError, transport, None))
    assert classify(error).code == "source_unreachable"
    assert classify(error).transient


def test_http_429_is_rate_limited() -> None:
    class Response:
        status = 429
        reason = "Too Many Requests"
        headers: dict[str, str] = {}  # noqa: RUF012

        def close(self) -> None:
            return

    error = HTTPError(Response())
    assert classify(DownloadError("ERROR: x", (HTTPError, error, None))).code == "rate_limited"


def test_options_allow_only_the_youtube_extractor_and_nothing_from_the_caller() -> None:
    source = parse_source("https://youtu.be/dQw4w9WgXcQ?si=$(touch /tmp/x)", frozenset())
    options = ydl_options(source, ClipSettings(), proxy=None)
    assert options == {
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "color": "never",
        "noplaylist": True,
        "cachedir": False,
        "extractor_retries": 1,
        "socket_timeout": 20,
        "allowed_extractors": ["youtube"],
        "js_runtimes": {"deno": {"path": None}},
    }
    assert source.url == "https://www.youtube.com/watch?v=dQw4w9WgXcQ"


def test_extra_hosts_use_only_the_generic_extractor() -> None:
    source = parse_source("http://127.0.0.1:1/v.mp4", frozenset({"127.0.0.1:1"}))
    settings = ClipSettings(ytdlp_cookie_file="c.txt")
    assert ydl_options(source, settings, "http://p:1")["allowed_extractors"] == ["generic"]


def test_youtube_unreachable_fails_fast_with_a_code() -> None:
    source = parse_source("https://www.youtube.com/watch?v=dQw4w9WgXcQ", frozenset())
    options = ydl_options(source, ClipSettings(), proxy=None)
    options["socket_timeout"] = 5
    started = time.monotonic()
    with pytest.raises(Exception) as caught:  # noqa: PT011
        extract(source, options)
    assert getattr(caught.value, "code", None) == "source_unreachable"
    assert time.monotonic() - started < 15


def fmt(vcodec: str, acodec: str, height: int | None, tbr: float) -> Format:
    return Format(
        url=f"https://x/{vcodec}{height}{acodec}",
        vcodec=vcodec,
        acodec=acodec,
        height=height,
        bitrate=tbr,
        protocol="https",
    )


# A budget every format fits: the choice is by height and codec alone.
ROOMY: dict[str, Any] = {"seconds": 10.0, "duration": 60.0, "max_bytes": 1 << 30}


def test_select_prefers_h264_within_the_height_and_aac() -> None:
    formats = (
        fmt("vp9", "none", 2160, 9000),
        fmt("avc1.640033", "none", 2160, 8000),
        fmt("avc1.640028", "none", 1080, 4000),
        fmt("vp9", "none", 1080, 2500),
        fmt("avc1.4d401f", "none", 720, 2000),
        fmt("none", "opus", None, 160),
        fmt("none", "mp4a.40.2", None, 128),
        fmt("avc1.42001E", "mp4a.40.2", 360, 600),
    )
    chosen = select(formats, 1080, **ROOMY)
    assert chosen.video.vcodec == "avc1.640028"
    assert chosen.audio is not None
    assert chosen.audio.acodec == "mp4a.40.2"
    assert select(formats, 720, **ROOMY).video.height == 720


def test_select_without_h264_takes_the_best_to_reencode() -> None:
    formats = (
        fmt("vp9", "none", 1080, 2500),
        fmt("av01", "none", 720, 900),
        fmt("none", "opus", None, 160),
    )
    chosen = select(formats, 1080, **ROOMY)
    assert chosen.video.vcodec == "vp9"
    assert chosen.audio is not None
    assert chosen.audio.acodec == "opus"
