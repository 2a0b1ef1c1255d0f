"""Fetching the clip's span: one ffmpeg copies it from the source into a local file.

An MP4 source whose index says where its samples are (``fetch.ranges``) is first fetched as
exactly those byte ranges into a sparse local copy, which ffmpeg reads. Any other source (HLS,
other containers) ffmpeg reads itself, seeking with bounded range requests on one kept-alive
connection. Either way the copy runs from the keyframe before ``start`` to ``end`` and keeps the
source's timestamps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import ffmpeg as ffmpeg_python
import httpx

from services.clip import ffmpeg
from services.clip.errors import DiskLimitExceeded
from services.clip.fetch.ranges import ANALYZE_SECONDS, NotPlannable, fetch_span_bytes
from services.clip.fetch.source import Format, Selection
from services.clip.request import ClipSpec
from services.clip.settings import ClipSettings

Timeline = tuple[float, float] | None


@dataclass(frozen=True)
class Span:
    """The fetched source's facts, and how far the span's audio timestamps run ahead of its
    video's for the same moment (a separate audio format counts from its own start)."""

    source: ffmpeg.MediaFacts
    audio_shift: float


async def fetch_span(
    spec: ClipSpec,
    selection: Selection,
    settings: ClipSettings,
    span: Path,
    proxy: str,
    on_progress: ffmpeg.Progress,
) -> Span:
    """Copy the span into ``span``, with the source's facts read from its banner."""
    async with _local_copies(spec, selection, settings, span, proxy) as inputs:
        code, log = await ffmpeg.run(
            _span_args(spec, selection, settings, span, proxy, inputs), on_progress=on_progress
        )
        video, audio = (
            _facts(log, number, inputs.get(chosen.url, (span, None))[1])
            for number, chosen in enumerate((selection.video, selection.audio or selection.video))
        )
    if video.duration is not None:
        spec.check_within(video.duration)
    size = _size(span)
    if code != 0 or size is None:
        raise ffmpeg.failure(log)
    if size > settings.clip_max_job_disk_bytes:
        raise DiskLimitExceeded(
            f"The clip needs more than {settings.clip_max_job_disk_bytes} bytes of working "
            "space; choose a shorter range."
        )
    # A separate audio format has a clock of its own, which starts at its own first sample.
    shift = audio.start - video.start if selection.audio is not None else 0.0
    return Span(source=video, audio_shift=shift)


def _facts(log: str, number: int, timeline: Timeline) -> ffmpeg.MediaFacts:
    """Input ``number``'s facts from the banner; a copy of only the span has the source's own
    start and duration from the source's index instead."""
    marker = f"Input #{number}"
    facts = ffmpeg.parse_banner(log[log.index(marker) :] if marker in log else log)
    if timeline is None:
        return facts
    return dataclasses.replace(facts, start=timeline[0], duration=timeline[1])


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


@contextlib.asynccontextmanager
async def _local_copies(
    spec: ClipSpec, selection: Selection, settings: ClipSettings, span: Path, proxy: str
) -> AsyncIterator[dict[str, tuple[Path, Timeline]]]:
    """Local copies of the span's bytes, by source URL, for the MP4 sources, each with the
    source's timeline when it holds only the span; removed once ffmpeg has copied the span
    out of them."""
    copies: dict[str, tuple[Path, Timeline]] = {}
    # The copy holds the span and a little around it (the opening samples, ffmpeg's read past
    # the end); it is gone before the cut starts.
    budget = 2 * settings.clip_max_job_disk_bytes
    try:
        async with httpx.AsyncClient(
            proxy=proxy,
            trust_env=False,
            timeout=httpx.Timeout(30.0),
            headers={"accept-encoding": "identity"},
        ) as client:
            formats = [f for f in (selection.video, selection.audio) if f is not None]
            for number, chosen in enumerate(formats):
                target = span.with_name(f"source-{number}.mp4")
                try:
                    copy = await fetch_span_bytes(
                        client,
                        chosen.url,
                        chosen.headers,
                        spec.start,
                        spec.end,
                        target,
                        max_range_bytes=settings.clip_max_range_bytes,
                        max_bytes=budget,
                    )
                except NotPlannable:
                    target.unlink(missing_ok=True)
                    continue
                budget -= copy.fetched
                copies[chosen.url] = (target, copy.timeline)
        yield copies
    finally:
        for path, _ in copies.values():
            path.unlink(missing_ok=True)


def _span_args(
    spec: ClipSpec,
    selection: Selection,
    settings: ClipSettings,
    span: Path,
    proxy: str,
    local: dict[str, tuple[Path, Timeline]],
) -> list[str]:
    """Copy from the keyframe before the start to the end, keeping the source's timestamps."""

    def source(chosen: Format) -> ffmpeg_python.nodes.FilterableStream:
        options: dict[str, object] = {"ss": f"{spec.start:.3f}", "to": f"{spec.end:.3f}"}
        if chosen.url in local:
            path, timeline = local[chosen.url]
            if timeline is not None:
                options = {}
            # The copy holds the opening seconds the plan gave ffmpeg to learn the streams.
            options["analyzeduration"] = round(ANALYZE_SECONDS * 1_000_000)
            return ffmpeg_python.input(str(path), **options)
        options |= {"http_proxy": proxy, **ffmpeg.http_options(settings.clip_max_range_bytes)}
        if chosen.headers:
            options["headers"] = "".join(f"{k}: {v}\r\n" for k, v in chosen.headers.items())
        return ffmpeg_python.input(chosen.url, **options)

    main = source(selection.video)
    streams = [main["v:0"]]
    if selection.audio is not None:
        streams.append(source(selection.audio)["a:0"])
    else:
        streams.append(main["a:0?"])
    # ffmpeg stops writing past the limit; the size check after the fetch names the failure.
    limit = settings.clip_max_job_disk_bytes + 1
    out = ffmpeg_python.output(*streams, str(span), c="copy", copyts=None, fs=limit, f="mp4")
    return list(out.global_args(*ffmpeg.GLOBAL).overwrite_output().get_args())
