"""Reading a video's facts and formats with yt-dlp, naming its failures, and choosing the
formats a clip is made from: the tallest that fits the clip's byte budget.

yt-dlp is used as a library for extraction only (``download=False``): config files are never
read that way, only the YouTube extractor (or, for admitted extra hosts, the generic one) is
loaded, and no option comes from the caller.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import yt_dlp
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import DownloadError, GeoRestrictedError, UnsupportedError

from services.clip.cut.smart import AUDIO_BITRATE
from services.clip.errors import (
    AgeRestricted,
    ClipFailed,
    GeoBlocked,
    LiveNotSupported,
    MembersOnly,
    OutputTooLarge,
    RateLimited,
    SignInRequired,
    SourceUnreachable,
    UnsupportedSource,
    VideoUnavailable,
)
from services.clip.fetch.ytdlp_cli import js_runtimes, parse_extractor_args
from services.clip.request import SourceUrl, clock
from services.clip.settings import ClipSettings

logger = logging.getLogger(__name__)


# What each failure tells the person who sees it: the caller, or the operator when only
# configuration can help.
RATE_LIMITED = (
    "YouTube is rate-limiting this service's address; try again later (operator: wait for the "
    "cool-down, or set a proxy with HERMES_YTDLP_PROXY)."
)
BOT_CHECK = (
    "YouTube asks this service to prove it is not a bot; try again later (operator: configure "
    "cookies, a PO-token provider or a proxy, see README)."
)
GEO_BLOCKED = (
    "The video is not available in the country this service runs in (operator: a proxy "
    "elsewhere, HERMES_YTDLP_PROXY)."
)
NO_VIDEO = "No downloadable video was found at this URL."

# Checked in order: several messages carry more than one keyword ("Private video. Sign in…",
# "Video unavailable. This content isn't available, try again later…"). Texts are YouTube's
# reasons as yt-dlp 2026.10.26 passes them on, apostrophes straightened.
RULES: tuple[tuple[type[ClipFailed], tuple[str, ...], str], ...] = (
    (
        RateLimited,
        ("rate-limited", "try again later", "http error 429", "too many requests"),
        RATE_LIMITED,
    ),
    (SignInRequired, ("not a bot", "captcha", "only images are available"), BOT_CHECK),
    (
        GeoBlocked,
        ("available in your country", "from your location", "geo restrict", "in your country"),
        GEO_BLOCKED,
    ),
    (
        AgeRestricted,
        ("confirm your age", "age-restricted", "inappropriate for some users"),
        "The video is age-restricted and needs a signed-in account (operator: cookies of an "
        "adult account, HERMES_YTDLP_COOKIE_FILE).",
    ),
    (
        MembersOnly,
        ("members-only", "join this channel", "channel's members"),
        "The video is for channel members only (operator: cookies of a member's account).",
    ),
    (
        LiveNotSupported,
        ("live event", "premieres in", "premiere will begin", "not currently live"),
        "The video is a live stream or premiere that has not ended; try once it is over.",
    ),
    (
        UnsupportedSource,
        ("unsupported url", "no suitable extractor", "no video formats", "requested format"),
        NO_VIDEO,
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
        "The video is private, removed or otherwise unavailable; check the link.",
    ),
    (
        SignInRequired,
        ("sign in", "--cookies", "login"),
        "YouTube requires signing in to watch this video (operator: HERMES_YTDLP_COOKIE_FILE).",
    ),
)
# Warnings after which "Requested format is not available" means YouTube withheld the formats
# from a suspected bot, not that the video has none.
BOT_WARNINGS = ("not a bot", "only images are available", "captcha")


def _plain(text: str) -> str:
    return text.lower().replace("\u2019", "'")


def classify(exc: BaseException, warnings: Sequence[str] = ()) -> ClipFailed:
    """The stable failure for a yt-dlp error, with a message a person can act on.

    ``warnings`` are what yt-dlp warned about before the error, during the same extraction.
    """
    cause = exc.exc_info[1] if isinstance(exc, DownloadError) and exc.exc_info else exc
    if isinstance(cause, GeoRestrictedError):
        return GeoBlocked(GEO_BLOCKED)
    if isinstance(cause, HTTPError) and cause.status == 429:
        return RateLimited(RATE_LIMITED)
    text = _plain(str(exc))
    if "requested format" in text and any(k in _plain(w) for w in warnings for k in BOT_WARNINGS):
        return SignInRequired(BOT_CHECK)
    for failure, keywords, message in RULES:
        if any(k in text for k in keywords):
            return failure(message)
    if isinstance(cause, UnsupportedError):
        return UnsupportedSource(NO_VIDEO)
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
    # When the source allows fetching it (YouTube makes some clients wait out an ad first).
    available_at: float | None = None
    # Bytes of the whole format, when the source says (YouTube does for its DASH formats).
    filesize: int | None = None

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

    def rate(self, duration: float | None) -> float:
        """Bits per second: from the whole format's size when known, else its bitrate (0 when
        the source says neither)."""
        if self.filesize and duration:
            return self.filesize * 8 / duration
        return self.bitrate * 1000


@dataclass(frozen=True)
class VideoInfo:
    title: str
    duration: float | None
    live_status: str | None
    formats: tuple[Format, ...]


def ydl_options(source: SourceUrl, settings: ClipSettings, proxy: str | None) -> dict[str, Any]:
    """Everything yt-dlp is told: the operator's settings, never anything from the request.

    No remote components: the challenge solver comes from the installed ``yt-dlp-ejs``.
    """
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
        "js_runtimes": js_runtimes(settings.ytdlp_js_runtime),
    }
    if arguments := extractor_args(settings):
        options["extractor_args"] = arguments
    if settings.ytdlp_cookie_file:
        options["cookiefile"] = settings.ytdlp_cookie_file
    if proxy:
        options["proxy"] = proxy
    return options


def extractor_args(settings: ClipSettings) -> dict[str, dict[str, list[str]]]:
    """The operator's extractor arguments, with the PO-token provider's base URL."""
    arguments = {key: dict(value) for key, value in parse_extractor_args(
        settings.ytdlp_extractor_args
    ).items()}  # fmt: skip
    if settings.ytdlp_pot_provider_url:
        provider = arguments.setdefault(POT_PROVIDER_KEY, {})
        provider.setdefault("base_url", [settings.ytdlp_pot_provider_url])
    return arguments


POT_PROVIDER_KEY = "youtubepot-bgutilhttp"


class _YtDlpLogger:
    """Keeps yt-dlp off stderr; its warnings go to our log, and are kept to explain errors."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def debug(self, message: str) -> None:
        return

    def info(self, message: str) -> None:
        return

    def warning(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("yt-dlp: %s", message)

    def error(self, message: str) -> None:
        logger.info("yt-dlp: %s", message)


def extract(source: SourceUrl, options: dict[str, Any]) -> VideoInfo:
    """Blocking: read title, duration, live status and formats. Raises ``ClipFailed``."""
    if not source.is_youtube and (direct := _direct_media(source.url, options.get("proxy"))):
        return direct
    recorder = _YtDlpLogger()
    try:
        with yt_dlp.YoutubeDL({**options, "logger": recorder}) as ydl:
            info = ydl.extract_info(source.url, download=False)
    except DownloadError as exc:
        raise classify(exc, recorder.warnings) from exc
    if not isinstance(info, dict) or info.get("_type") == "playlist":
        raise UnsupportedSource("The URL is a playlist or page, not one video.")
    # A page that names one media URL gives it as the video itself, as yt-dlp then reads it.
    raw = info.get("formats") or ([info] if info.get("url") else [])
    formats = tuple(_format(f) for f in raw if f.get("url"))
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
    # A server that does not do HEAD (501) leaves the question to yt-dlp.
    if response.status_code >= 500 and response.status_code != HTTPStatus.NOT_IMPLEMENTED:
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
        available_at=float(raw["available_at"]) if raw.get("available_at") else None,
        filesize=int(size) if (size := raw.get("filesize") or raw.get("filesize_approx")) else None,
    )


# A clip's expected size: its video's bitrate and the audio the cut writes, over the span, and
# this much more: the span may be busier than the video's average, and the MP4's index and the
# re-encoded head and tail add a little. The real size is checked after the cut.
SIZE_MARGIN = 0.15
SIZE_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class Selection:
    """What to read: one muxed format, or a video and an audio format; their bitrates as the
    source gives them (bit/s, 0 when it does not), and whether they were taken instead of a
    taller or richer format so the clip fits its budget."""

    video: Format
    audio: Format | None
    video_rate: float
    audio_rate: float
    reduced: bool = False

    @property
    def bitrate(self) -> float:
        """The formats' bitrate together."""
        return self.video_rate + self.audio_rate

    @property
    def output_rate(self) -> float:
        """Bits per second the clip is planned for: the video format's (all of a muxed one,
        whose own audio the cut replaces: this errs on the large side) and the cut's audio."""
        has_audio = self.audio is not None or self.video.acodec != "none"
        return self.video_rate + (AUDIO_BITRATE if has_audio else 0)


def expected_bytes(rate: float, seconds: float) -> int:
    """The size a clip of ``seconds`` at ``rate`` bit/s is planned for."""
    return round(rate / 8 * seconds * (1 + SIZE_MARGIN)) + SIZE_OVERHEAD


def select(
    formats: tuple[Format, ...],
    max_height: int,
    *,
    seconds: float,
    duration: float | None,
    max_bytes: int,
) -> Selection:
    """The tallest H.264 (with AAC where there is) no taller than ``max_height`` whose clip of
    ``seconds`` is expected to fit ``max_bytes``; without H.264, the best there is, re-encoded.

    ``duration`` (the whole video's) turns a format's file size into a bitrate. A format whose
    bitrate the source does not give is expected to fit. Raises ``OutputTooLarge`` when no
    format fits, so a clip that cannot be delivered fails before any media byte is fetched.
    """
    videos = [f for f in formats if f.has_video]
    if not videos:
        raise UnsupportedSource("The source has no video stream.")
    # With none short enough, the shortest is taken and re-encoded down to the limit.
    short = [f for f in videos if (f.height or 0) <= max_height] or [
        min(videos, key=lambda f: (f.height or 0, f.bitrate))
    ]
    if any(f.is_h264 for f in short):
        short = [f for f in short if f.is_h264]
    audios = [f for f in formats if f.has_audio and not f.has_video]
    ranked = sorted(short, key=_rank, reverse=True)
    options = [_with_audio(video, audios, duration) for video in ranked]
    for index, option in enumerate(options):
        # Of a format whose bitrate the source does not give, only the real size can tell.
        if not option.video_rate or expected_bytes(option.output_rate, seconds) <= max_bytes:
            return replace(option, reduced=index > 0)
    smallest = min(options, key=lambda o: o.output_rate)
    raise OutputTooLarge(_too_large(smallest, seconds, max_bytes))


def _rank(f: Format) -> tuple[int, bool, float]:
    """Taller first; of one height, what ffmpeg reads with ranges, then the richer."""
    return (f.height or 0, f.protocol.startswith("http"), f.bitrate)


def _with_audio(video: Format, audios: list[Format], duration: float | None) -> Selection:
    """``video`` and the audio to go with it: its own, else the best separate one (AAC first)."""
    rate = video.rate(duration)
    if (video.has_audio and video.acodec is not None) or (video.acodec is None and not audios):
        return Selection(video=video, audio=None, video_rate=rate, audio_rate=0.0)
    audio = max(audios, key=lambda f: (f.is_aac, f.bitrate), default=None)
    sound = 0.0 if audio is None else audio.rate(duration)
    return Selection(video=video, audio=audio, video_rate=rate, audio_rate=sound)


def _too_large(smallest: Selection, seconds: float, max_bytes: int) -> str:
    """Why no format fits, and the longest span that would, at the smallest format."""
    height = f"{smallest.video.height}p, " if smallest.video.height else ""
    per_second = smallest.output_rate / 8 * (1 + SIZE_MARGIN)
    longest = max(0.0, (max_bytes - SIZE_OVERHEAD) / per_second)
    size = expected_bytes(smallest.output_rate, seconds) / 2**20
    return (
        f"Even at its smallest format ({height}{smallest.bitrate / 1000:.0f} kbit/s) a clip of "
        f"{clock(seconds)} would be about {size:.1f} MiB, over the {max_bytes / 2**20:.1f} MiB "
        f"this clip may be; choose a range of at most {clock(math.floor(longest))}."
    )
