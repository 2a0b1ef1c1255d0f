"""Making one clip, as the steps it is: read the video's facts, fetch only its span, cut it.

1. yt-dlp reads the facts and formats (``fetch.source``, through ``fetch.gate``'s cool-down
   and cache); the tallest H.264 and AAC no taller than the limits whose clip is expected to
   fit the job's byte budget are picked, once they are available. When none fits, the job
   fails here, before any media byte is fetched.
2. One ffmpeg copies the span from the keyframe before ``start`` to ``end`` into a local file
   (``fetch.span``), through the egress proxy (``fetch.egress``). When the source stops
   serving the media URLs (expired, 403), they are extracted again once and the fetch rerun.
3. The span is cut to exactly the source's frames in ``[start, end)`` (``cut.smart``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from services.clip import ffmpeg
from services.clip.cut.smart import Bounds, cut
from services.clip.errors import (
    LiveNotSupported,
    OutputTooLarge,
    SourceRefused,
    SourceUnreachable,
)
from services.clip.fetch.egress import egress_url
from services.clip.fetch.gate import SourceGate
from services.clip.fetch.source import Selection, VideoInfo, select
from services.clip.fetch.span import Span, fetch_span
from services.clip.request import ClipSpec
from services.clip.settings import ClipSettings
from services.common.errors import AddressRefused, FetchFailed
from services.common.http import AddressGuard, check_url

logger = logging.getLogger(__name__)
CLIP_FILE = "clip.mp4"
SPAN_FILE = "span.mp4"
LIVE_STATES = frozenset({"is_live", "is_upcoming", "post_live"})
FETCH_SHARE = 0.7


@dataclass(frozen=True)
class ClipResult:
    path: Path
    title: str
    source_duration: float
    start: float
    end: float
    clip_duration: float
    bytes: int
    width: int
    height: int
    cut: str
    format_height: int | None
    format_bitrate: int | None
    reduced_to_fit: bool


async def make_clip(
    spec: ClipSpec,
    workdir: Path,
    settings: ClipSettings,
    report: ffmpeg.Report,
    gate: SourceGate | None = None,
) -> ClipResult:
    gate = gate or SourceGate.local(settings)
    report("reading video facts", 0.0)
    await _check_address(spec.source.url, settings)
    # Without an operator's proxy, yt-dlp and ffmpeg reach the source only through the egress
    # proxy, which resolves each host once and refuses private addresses. With one, both use
    # it, since YouTube binds its media URLs to the address that asked for them.
    proxy = settings.ytdlp_proxy or await egress_url(
        settings.allow_private_networks, settings.clip_proxy_buffer_bytes
    )
    info, selection = await _read_source(spec, settings, gate, proxy, report)

    report("fetching", 0.05)
    span = workdir / SPAN_FILE

    async def fetch(selection: Selection) -> Span:
        return await fetch_span(
            spec,
            selection,
            settings,
            span,
            proxy,
            on_progress=lambda s: report("fetching", 0.05 + (FETCH_SHARE - 0.05) * _share(s, spec)),
        )

    try:
        fetched = await fetch(selection)
    except SourceUnreachable:
        # Media URLs expire, and YouTube refuses (403) those whose token it no longer accepts:
        # with fresh ones from a new extraction, the fetch starts once more.
        logger.info("the source stopped serving its media URLs; extracting again")
        info, selection = await _read_source(spec, settings, gate, proxy, report, fresh=True)
        fetched = await fetch(selection)
    duration = info.duration or fetched.source.duration

    max_height = _max_height(spec, settings)
    # The span keeps the source's timestamps, which start at the source's own start time
    # (not always 0: HLS segments often start at 1.4 s); the clip's times are relative to it.
    output = workdir / CLIP_FILE
    origin = fetched.source.start
    how = await cut(
        span,
        Bounds(origin + spec.start, origin + spec.end, fetched.audio_shift),
        workdir,
        output,
        settings,
        max_height,
        lambda stage, share: report(stage, FETCH_SHARE + (1 - FETCH_SHARE) * share),
    )
    span.unlink()

    size = output.stat().st_size
    if size > spec.max_bytes:
        raise OutputTooLarge(
            f"The clip is {size} bytes, over the limit of {spec.max_bytes}; "
            "choose a shorter range or a smaller max_height."
        )
    made = await ffmpeg.file_facts(output)
    report("done", 1.0)
    return ClipResult(
        path=output,
        title=info.title,
        source_duration=duration or spec.end,
        start=spec.start,
        end=spec.end,
        clip_duration=made.duration or spec.duration,
        bytes=size,
        width=made.width or 0,
        height=made.height or 0,
        cut=how,
        format_height=selection.video.height,
        format_bitrate=round(selection.bitrate / 1000) if selection.bitrate else None,
        reduced_to_fit=selection.reduced,
    )


def _max_height(spec: ClipSpec, settings: ClipSettings) -> int:
    """The tallest video the clip may have: the service's limit, or the caller's lower one."""
    return min(settings.clip_max_height, spec.max_height or settings.clip_max_height)


async def _check_address(url: str, settings: ClipSettings) -> None:
    """Refuse a source whose host resolves to a private or reserved address.

    yt-dlp and ffmpeg resolve the host again themselves; this check stops a source that
    points inside the network on purpose, not one whose DNS answers change between lookups.
    """
    try:
        host = check_url(url).host
    except FetchFailed as exc:
        raise SourceRefused(f"The video source is not allowed: {exc.message}") from exc
    try:
        await AddressGuard(allow_private=settings.allow_private_networks).addresses(host)
    except AddressRefused as exc:
        raise SourceRefused(f"The video source is not allowed: {exc.message}") from exc
    except FetchFailed as exc:
        raise SourceUnreachable(f"The video source could not be reached: {exc.message}") from exc


async def _read_source(
    spec: ClipSpec,
    settings: ClipSettings,
    gate: SourceGate,
    proxy: str,
    report: ffmpeg.Report,
    *,
    fresh: bool = False,
) -> tuple[VideoInfo, Selection]:
    """Extract the video's facts, check them against the clip, and pick its formats."""
    info = await gate.extract(spec.source, settings, proxy, fresh=fresh)
    if info.live_status in LIVE_STATES:
        raise LiveNotSupported(
            "The video is a live stream or premiere that has not ended; try once it is over."
        )
    if info.duration is not None:
        spec.check_within(info.duration)
    selection = select(
        info.formats,
        _max_height(spec, settings),
        seconds=spec.duration,
        duration=info.duration,
        max_bytes=spec.max_bytes,
    )
    for chosen in (selection.video, selection.audio):
        if chosen is not None:
            await _check_address(chosen.url, settings)
    # YouTube makes some clients wait (the length of an ad) before their media may be fetched.
    chosen_formats = (selection.video, selection.audio)
    available_at = max(f.available_at or 0.0 for f in chosen_formats if f is not None)
    if (wait := available_at - time.time()) > 0:
        report("waiting for the source", 0.0)
        await asyncio.sleep(wait)
    return info, selection


def _share(seconds: float, spec: ClipSpec) -> float:
    return min(1.0, max(0.0, seconds - spec.start) / spec.duration)
