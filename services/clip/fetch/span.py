"""Fetching the clip's span: one ffmpeg copies it from the remote source into a local file.

ffmpeg seeks in the remote file with bounded range requests on one kept-alive connection, from
the keyframe before ``start`` to ``end``, keeping the source's timestamps, so only the span and
the container index are fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ffmpeg as ffmpeg_python

from services.clip import ffmpeg
from services.clip.errors import DiskLimitExceeded
from services.clip.fetch.source import Selection
from services.clip.request import ClipSpec
from services.clip.settings import ClipSettings


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
    """Copy the span into ``span``, with the remote source's facts read from its banner."""
    code, log = await ffmpeg.run(
        _span_args(spec, selection, settings, span, proxy), on_progress=on_progress
    )
    remote = ffmpeg.parse_banner(log)
    if remote.duration is not None:
        spec.check_within(remote.duration)
    size = _size(span)
    if code != 0 or size is None:
        raise ffmpeg.failure(log)
    if size > settings.clip_max_job_disk_bytes:
        raise DiskLimitExceeded(
            f"The clip needs more than {settings.clip_max_job_disk_bytes} bytes of working "
            "space; choose a shorter range."
        )
    # A separate audio format has a clock of its own, which starts at its own first sample.
    shift = 0.0
    if selection.audio is not None and "Input #1" in log:
        shift = ffmpeg.parse_banner(log[log.index("Input #1") :]).start - remote.start
    return Span(source=remote, audio_shift=shift)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _span_args(
    spec: ClipSpec, selection: Selection, settings: ClipSettings, span: Path, proxy: str
) -> list[str]:
    """Copy from the keyframe before the start to the end, keeping the source's timestamps."""

    def source(url: str, headers: dict[str, str]) -> ffmpeg_python.nodes.FilterableStream:
        options: dict[str, object] = {
            "ss": f"{spec.start:.3f}",
            "to": f"{spec.end:.3f}",
            "http_proxy": proxy,
            **ffmpeg.http_options(settings.clip_max_range_bytes),
        }
        if headers:
            options["headers"] = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return ffmpeg_python.input(url, **options)

    main = source(selection.video.url, selection.video.headers)
    streams = [main["v:0"]]
    if selection.audio is not None:
        streams.append(source(selection.audio.url, selection.audio.headers)["a:0"])
    else:
        streams.append(main["a:0?"])
    # ffmpeg stops writing past the limit; the size check after the fetch names the failure.
    limit = settings.clip_max_job_disk_bytes + 1
    out = ffmpeg_python.output(*streams, str(span), c="copy", copyts=None, fs=limit, f="mp4")
    return list(out.global_args(*ffmpeg.GLOBAL).overwrite_output().get_args())
