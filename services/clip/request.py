"""Checking a clip request before the 202: the source URL, the time range, the name, the
tallest format the caller wants, and the byte budget of the clip.

Nothing a caller sends reaches yt-dlp or ffmpeg as given: a YouTube link is rebuilt from its
video id, times become numbers, and the name only ever becomes asset metadata.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from services.clip.errors import RangeOutOfBounds
from services.clip.settings import ClipSettings
from services.common.errors import InvalidInput

VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{11}")
YOUTUBE_HOSTS = frozenset(
    {
        "youtube.com",
        "www.youtube.com",
        "m.youtube.com",
        "music.youtube.com",
        "youtube-nocookie.com",
        "www.youtube-nocookie.com",
        "youtu.be",
        "www.youtu.be",
    }
)
PATH_PREFIXES = ("shorts", "embed", "live", "v", "e")
TIMECODE = re.compile(r"^(?:(?:(\d+):)?(\d{1,2}):)?(\d+(?:\.\d+)?)$")


class InvalidUrl(InvalidInput):
    code = "invalid_url"


class InvalidTime(InvalidInput):
    code = "invalid_time"


class InvalidRange(InvalidInput):
    code = "invalid_range"


class ClipTooLong(InvalidInput):
    code = "clip_too_long"


@dataclass(frozen=True)
class SourceUrl:
    """Where the video comes from: a rebuilt YouTube URL, or an admitted extra host's URL."""

    url: str
    video_id: str | None

    @property
    def is_youtube(self) -> bool:
        return self.video_id is not None


@dataclass(frozen=True)
class ClipSpec:
    """A checked request. Plain fields: the distributed queue keeps it as a dict."""

    source: SourceUrl
    start: float
    end: float
    name: str | None
    # The largest MP4 the clip may be, decided when the job is accepted (``byte_budget``).
    max_bytes: int
    # The tallest format the caller asked for; the service's own limit applies too.
    max_height: int | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start

    def check_within(self, video_duration: float) -> None:
        """Refuse a clip that ends after the video does."""
        if self.end > video_duration:
            raise RangeOutOfBounds(
                f"The video is {clock(video_duration)} long; the clip must end by then, "
                f"not at {clock(self.end)}."
            )


def clock(seconds: float) -> str:
    whole = int(seconds)
    text = f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
    fraction = seconds - whole
    return f"{text}.{round(fraction * 1000):03d}" if fraction > 0.0005 else text


def parse_source(raw: str, extra_hosts: frozenset[str]) -> SourceUrl:
    """A YouTube video link rebuilt as watch?v=<id>, or a URL on an admitted extra host."""
    text = raw.strip()
    if VIDEO_ID.fullmatch(text):
        return _youtube(text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidUrl("youtube_url is not a valid URL.") from exc
    if parts.scheme not in ("http", "https"):
        raise InvalidUrl("youtube_url must be an http or https YouTube link.")
    if parts.username is not None or parts.password is not None:
        raise InvalidUrl("youtube_url must not carry a user name or password.")
    host = (parts.hostname or "").lower().rstrip(".")
    netloc = f"{host}:{port}" if port else host
    if host in YOUTUBE_HOSTS:
        if port not in (None, 80, 443):
            raise InvalidUrl("youtube_url has an unexpected port for a YouTube link.")
        return _youtube(_video_id(host, parts.path, parts.query))
    if host in extra_hosts or netloc in extra_hosts:
        return SourceUrl(url=text, video_id=None)
    raise InvalidUrl(f"youtube_url must be a YouTube link; {host or 'this host'} is not YouTube.")


def _video_id(host: str, path: str, query: str) -> str:
    segments = [s for s in path.split("/") if s]
    params = parse_qs(query)
    if host.endswith("youtu.be"):
        candidate = segments[0] if segments else ""
    elif segments[:1] == ["watch"]:
        candidate = params.get("v", [""])[0]
    elif segments[:1] == ["clip"]:
        raise InvalidUrl("YouTube /clip/ links are not supported; use the video's own link.")
    elif segments[:1] == ["playlist"] or (not segments and "list" in params):
        raise InvalidUrl("youtube_url is a playlist; use the link of one video.")
    elif len(segments) >= 2 and segments[0] in PATH_PREFIXES:
        candidate = segments[1]
    else:
        raise InvalidUrl("youtube_url does not point to a YouTube video.")
    if not VIDEO_ID.fullmatch(candidate):
        raise InvalidUrl("youtube_url does not contain a valid 11-character video id.")
    return candidate


def _youtube(video_id: str) -> SourceUrl:
    return SourceUrl(url=f"https://www.youtube.com/watch?v={video_id}", video_id=video_id)


def parse_time(raw: str, field: str) -> float:
    """HH:MM:SS, MM:SS or seconds, each with an optional fraction (1:02.5)."""
    match = TIMECODE.match(raw.strip())
    if not match:
        raise InvalidTime(f"{field} must look like HH:MM:SS, MM:SS or seconds; got {raw!r}.")
    hours, minutes, seconds = match.groups()
    value = float(seconds)
    if minutes is not None and (int(minutes) >= 60 or value >= 60):
        raise InvalidTime(f"{field}: minutes and seconds must be under 60; got {raw!r}.")
    try:
        total = int(hours or 0) * 3600 + int(minutes or 0) * 60 + value
    except (OverflowError, ValueError) as exc:
        raise InvalidTime(f"{field} is too large; got {raw[:20]!r}…") from exc
    if not math.isfinite(total):
        raise InvalidTime(f"{field} is too large; got {raw[:20]!r}…")
    return total


def clean_name(raw: str | None, max_length: int) -> str | None:
    """The asset name: trimmed, without control characters, at most ``max_length`` long."""
    if raw is None:
        return None
    text = "".join(ch for ch in raw if unicodedata.category(ch)[0] != "C").strip()
    if len(text) > max_length:
        raise InvalidInput(f"name is longer than {max_length} characters.")
    return text or None


def safe_filename(name: str, extension: str, max_length: int = 120) -> str:
    """A file name any file system and any header takes: letters, digits, - _ . and spaces."""
    normalized = unicodedata.normalize("NFKD", name)
    kept = re.sub(r"[^\w\- .]+", "_", normalized, flags=re.ASCII)
    stem = re.sub(r"[_ .]{2,}", "_", kept).strip(" ._-")[:max_length] or "clip"
    return f"{stem}.{extension}"


def build_spec(
    *,
    youtube_url: str,
    start_time: str,
    end_time: str,
    name: str | None,
    extra_hosts: frozenset[str],
    max_seconds: float,
    max_name_length: int,
    max_bytes: int,
    max_height: int | None = None,
) -> ClipSpec:
    source = parse_source(youtube_url, extra_hosts)
    start = parse_time(start_time, "start_time")
    end = parse_time(end_time, "end_time")
    if end <= start:
        raise InvalidRange("end_time must be after start_time.")
    if end - start > max_seconds:
        raise ClipTooLong(f"The clip is {end - start:g} s long; the limit is {max_seconds:g} s.")
    return ClipSpec(
        source=source,
        start=start,
        end=end,
        name=clean_name(name, max_name_length),
        max_bytes=max_bytes,
        max_height=max_height,
    )


def byte_budget(settings: ClipSettings, *, webhook: bool) -> int:
    """The largest MP4 a clip may be: what one webhook body carries, or, for a direct caller
    who reads it from /jobs/{id}/file, what the result store takes."""
    return settings.clip_max_output_bytes if webhook else settings.clip_max_file_bytes
