"""Reading a video's facts and formats with yt-dlp, and naming its failures.

yt-dlp is used as a library for extraction only (``download=False``): config files are never
read that way, only the YouTube extractor (or, for admitted extra hosts, the generic one) is
loaded, and no option comes from the caller.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import yt_dlp
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import DownloadError, GeoRestrictedError, UnsupportedError

from services.clip.errors import (
    AgeRestricted,
    ClipFailed,
    GeoBlocked,
    LiveNotSupported,
    MembersOnly,
    RateLimited,
    SignInRequired,
    SourceUnreachable,
    UnsupportedSource,
    VideoUnavailable,
)
from services.clip.request import SourceUrl

logger = logging.getLogger(__name__)


# Checked in order: several messages carry more than one keyword ("Private video. Sign in…",
# "Video unavailable. This content isn't available, try again later…").
RULES: tuple[tuple[type[ClipFailed], tuple[str, ...], str], ...] = (
    (
        RateLimited,
        ("rate-limited", "try again later", "http error 429", "too many requests", "blocked"),
        "YouTube is rate-limiting this service; try again in an hour.",
    ),
    (
        SignInRequired,
        ("not a bot", "captcha"),
        "YouTube asks this service to sign in to prove it is not a bot; the operator must "
        "configure cookies, or try again later.",
    ),
    (
        GeoBlocked,
        ("available in your country", "from your location", "geo restrict"),
        "The video is not available in the country this service runs in.",
    ),
    (
        AgeRestricted,
        ("confirm your age", "age-restricted", "inappropriate for some users"),
        "The video is age-restricted and needs a signed-in account.",
    ),
    (
        MembersOnly,
        ("members-only", "join this channel", "channel's members"),
        "The video is for channel members only.",
    ),
    (
        LiveNotSupported,
        ("live event", "premieres in", "premiere will begin", "not currently live"),
        "The video is a live stream or premiere that has not ended; try once it is over.",
    ),
    (
        UnsupportedSource,
        ("unsupported url", "no suitable extractor", "no video formats", "requested format"),
        "No downloadable video was found at this URL.",
    ),
    (
        VideoUnavailable,
        (
            "private video",
            "video unavailable",
            "no longer available",
            "has been removed",
            "terminated",
            "copyright",
            "does not exist",
            "not available",
            "drm protected",
        ),
        "The video is private, removed or otherwise unavailable.",
    ),
    (
        SignInRequired,
        ("sign in", "--cookies", "login"),
        "YouTube requires signing in to watch this video.",
    ),
)


def classify(exc: BaseException) -> ClipFailed:
    """The stable failure for a yt-dlp error, with a message a person can act on."""
    cause = exc.exc_info[1] if isinstance(exc, DownloadError) and exc.exc_info else exc
    if isinstance(cause, GeoRestrictedError):
        return GeoBlocked("The video is not available in the country this service runs in.")
    if isinstance(cause, HTTPError) and cause.status == 429:
        return RateLimited("YouTube is rate-limiting this service; try again in an hour.")
    text = str(exc).lower().replace("\u2019", "'")
    for failure, keywords, message in RULES:
        if any(k in text for k in keywords):
            return failure(message)
    if isinstance(cause, UnsupportedError):
        return UnsupportedSource("No downloadable video was found at this URL.")
    if isinstance(cause, (HTTPError, TransportError)) or "unable to download" in text:
        return SourceUnreachable("The video source could not be reached; try again later.")
    return SourceUnreachable("The video could not be read from its source; try again later.")


@dataclass(frozen=True)
class Format:
    url: str
    vcodec: str | None
    acodec: str | None
    height: int | None
    bitrate: float
    protocol: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def has_video(self) -> bool:
        return self.vcodec != "none"

    @property
    def has_audio(self) -> bool:
        return self.acodec != "none"

    @property
    def is_h264(self) -> bool:
        return (self.vcodec or "").startswith(("avc1", "h264"))

    @property
    def is_aac(self) -> bool:
        return (self.acodec or "").startswith(("mp4a", "aac"))


@dataclass(frozen=True)
class VideoInfo:
    title: str
    duration: float | None
    live_status: str | None
    formats: tuple[Format, ...]


def ydl_options(source: SourceUrl, *, cookie_file: str | None, proxy: str | None) -> dict[str, Any]:
    """Everything yt-dlp is told. Nothing here comes from the request."""
    options: dict[str, Any] = {
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "color": "never",
        "noplaylist": True,
        "cachedir": False,
        "extractor_retries": 1,
        "socket_timeout": 20,
        "allowed_extractors": ["youtube"] if source.is_youtube else ["generic"],
        "logger": _YtDlpLogger(),
    }
    if cookie_file:
        options["cookiefile"] = cookie_file
    if proxy:
        options["proxy"] = proxy
    return options


class _YtDlpLogger:
    """Keeps yt-dlp off stderr; its warnings go to our log."""

    def debug(self, message: str) -> None:
        return

    def info(self, message: str) -> None:
        return

    def warning(self, message: str) -> None:
        logger.warning("yt-dlp: %s", message)

    def error(self, message: str) -> None:
        logger.info("yt-dlp: %s", message)


def extract(source: SourceUrl, options: dict[str, Any]) -> VideoInfo:
    """Blocking: read title, duration, live status and formats. Raises ``ClipFailed``."""
    if not source.is_youtube and (direct := _direct_media(source.url, options.get("proxy"))):
        return direct
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(source.url, download=False)
    except DownloadError as exc:
        raise classify(exc) from exc
    if not isinstance(info, dict) or info.get("_type") == "playlist":
        raise UnsupportedSource("The URL is a playlist or page, not one video.")
    formats = tuple(_format(f) for f in info.get("formats") or () if f.get("url"))
    return VideoInfo(
        title=str(info.get("title") or source.video_id or "clip"),
        duration=float(info["duration"]) if info.get("duration") else None,
        live_status=info.get("live_status"),
        formats=formats,
    )


def _direct_media(url: str, proxy: str | None) -> VideoInfo | None:
    """A direct link to a media file, known from a HEAD; None when it is anything else.

    yt-dlp's generic extractor tells the same from a GET it never reads, and the origin sends
    what its socket buffers hold (megabytes) for nothing. Its answer for such a link is this
    one: the file is the one format, its name the title; ffmpeg reads the facts.
    """
    try:
        with httpx.Client(proxy=proxy, trust_env=False, timeout=20) as client:
            response = client.head(url, headers={"accept-encoding": "identity"})
    except httpx.HTTPError:
        return None
    if response.status_code >= 500:
        raise SourceUnreachable("The video source could not be reached; try again later.")
    kind = response.headers.get("content-type", "").split("/")[0].strip().lower()
    if response.status_code != 200 or kind not in ("video", "audio"):
        return None
    name = unquote(os.path.splitext(urlsplit(url).path.rstrip("/").rpartition("/")[2])[0])
    media = Format(
        url=url,
        vcodec="none" if kind == "audio" else None,
        acodec=None,
        height=None,
        bitrate=0,
        protocol=urlsplit(url).scheme,
    )
    return VideoInfo(title=name or "clip", duration=None, live_status=None, formats=(media,))


def _format(raw: dict[str, Any]) -> Format:
    return Format(
        url=str(raw["url"]),
        vcodec=raw.get("vcodec"),
        acodec=raw.get("acodec"),
        height=raw.get("height"),
        bitrate=float(raw.get("tbr") or raw.get("vbr") or raw.get("abr") or 0),
        protocol=str(raw.get("protocol") or "https"),
        headers={str(k): str(v) for k, v in (raw.get("http_headers") or {}).items()},
    )


@dataclass(frozen=True)
class Selection:
    """What to read: one muxed format, or a video and an audio format."""

    video: Format
    audio: Format | None


def select(formats: tuple[Format, ...], max_height: int) -> Selection:
    """H.264 no taller than ``max_height`` and AAC where they exist, else the best there is."""
    fits = [f for f in formats if f.has_video and (f.height or 0) <= max_height]
    if not fits:
        fits = [f for f in formats if f.has_video]
    if not fits:
        raise UnsupportedSource("The source has no video stream.")

    def rank(f: Format) -> tuple[bool, int, bool, float]:
        return (f.is_h264, f.height or 0, f.protocol.startswith("http"), f.bitrate)

    video = max(fits, key=rank)
    if video.has_audio and video.acodec is not None:
        return Selection(video=video, audio=None)
    audios = [f for f in formats if f.has_audio and not f.has_video]
    if video.acodec is None and not audios:
        return Selection(video=video, audio=None)
    audio = max(audios, key=lambda f: (f.is_aac, f.bitrate), default=None)
    return Selection(video=video, audio=audio)
