"""A bitrate ladder: one generated video at several heights, served as HLS and as DASH.

This module owns ``make_ladder``. Each rendition is ``make_source`` at its own size, so every
rendition has the same frames, numbered and timed alike, and a clip of any of them can be
checked against that rendition decoded. Over the renditions' own HLS (``make_hls``) and DASH
files (``make_dash``) it writes the two manifests a streaming site serves: an HLS master
playlist with one variant per height (``AVERAGE-BANDWIDTH``, ``BANDWIDTH``, ``RESOLUTION``,
``CODECS``) and a DASH MPD with one video ``Representation`` per height and one audio
``Representation``. Bandwidths are the renditions' measured average bitrates, as real
manifests give them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.media import (
    AUDIO_RATE,
    DASH_AUDIO,
    DASH_VIDEO,
    HLS_MEDIA,
    _avc_codecs,
    _cached,
    _duration_seconds,
    _fingerprint,
    _read_box,
    _segment_base,
    make_dash,
    make_hls,
    make_source,
)

HLS_LADDER = "master.m3u8"
DASH_LADDER = "manifest.mpd"


@dataclass(frozen=True)
class Rendition:
    """One height of the ladder: its files, and the bitrates (bit/s) its manifests give."""

    width: int
    height: int
    source: Path
    hls_bitrate: int
    video_bitrate: int
    audio_bitrate: int

    @property
    def name(self) -> str:
        return f"r{self.height}"

    @property
    def hls_playlist(self) -> Path:
        """What ffmpeg decodes as the HLS rendition: its media playlist (MPEG-TS shifts the
        times, so the progressive source is not the same timeline)."""
        return self.source.parent / self.name / HLS_MEDIA


@dataclass(frozen=True)
class Ladder:
    root: Path
    renditions: tuple[Rendition, ...]
    seconds: float
    fps: int

    def at(self, height: int) -> Rendition:
        return next(r for r in self.renditions if r.height == height)

    def path(self, manifest: str) -> str:
        """A manifest's path relative to ``root``, as the origin serves it."""
        return str((self.renditions[0].source.parent / manifest).relative_to(self.root))


def make_ladder(
    root: Path,
    name: str,
    *,
    sizes: Sequence[tuple[int, int]],
    seconds: float,
    fps: int = 25,
    gop_seconds: float = 2,
    crf: int = 23,
) -> Ladder:
    """Write (or reuse) the ladder under ``root/name``: a rendition per (width, height)."""
    folder = root / name
    renditions = []
    for width, height in sizes:
        source = make_source(
            folder, seconds=seconds, width=width, height=height, fps=fps,
            gop=round(fps * gop_seconds), crf=crf, preset="veryfast", name=f"r{height}",
        )  # fmt: skip
        make_hls(folder / f"r{height}", source, segment_seconds=gop_seconds)
        make_dash(folder / f"r{height}-dash", source)
        renditions.append(_measured(source, width, height, seconds))
    ladder = Ladder(root=root, renditions=tuple(renditions), seconds=seconds, fps=fps)
    fingerprints = {r.name: _fingerprint(r.source) for r in renditions}
    _cached(folder / HLS_LADDER, fingerprints, lambda: _write_hls(folder, renditions))
    _cached(folder / DASH_LADDER, fingerprints, lambda: _write_dash(folder, renditions))
    return ladder


def _measured(source: Path, width: int, height: int, seconds: float) -> Rendition:
    folder = source.parent
    segments = sum(p.stat().st_size for p in (folder / f"r{height}").glob("segment_*.ts"))
    dash = folder / f"r{height}-dash"
    return Rendition(
        width=width,
        height=height,
        source=source,
        hls_bitrate=round(segments * 8 / seconds),
        video_bitrate=round((dash / DASH_VIDEO).stat().st_size * 8 / seconds),
        audio_bitrate=round((dash / DASH_AUDIO).stat().st_size * 8 / seconds),
    )


def _write_hls(folder: Path, renditions: list[Rendition]) -> None:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3"]
    for r in renditions:
        codecs = _avc_codecs(_read_box(r.source, b"moov")[1])
        lines.append(
            f"#EXT-X-STREAM-INF:BANDWIDTH={round(r.hls_bitrate * 1.2)},"
            f"AVERAGE-BANDWIDTH={r.hls_bitrate},RESOLUTION={r.width}x{r.height},"
            f'CODECS="{codecs},mp4a.40.2"'
        )
        lines.append(f"{r.name}/{HLS_MEDIA}")
    (folder / HLS_LADDER).write_text("\n".join(lines) + "\n")


def _write_dash(folder: Path, renditions: list[Rendition]) -> None:
    duration = _duration_seconds(_read_box(renditions[0].source, b"moov")[1])
    videos = []
    for r in renditions:
        video = folder / f"{r.name}-dash" / DASH_VIDEO
        codecs = _avc_codecs(_read_box(video, b"moov")[1])
        videos.append(
            f'   <Representation id="{r.name}" codecs="{codecs}" bandwidth="{r.video_bitrate}"'
            f' width="{r.width}" height="{r.height}">\n'
            f"    <BaseURL>{r.name}-dash/{DASH_VIDEO}</BaseURL>{_segment_base(video)}\n"
            "   </Representation>\n"
        )
    first = renditions[0]
    audio = folder / f"{first.name}-dash" / DASH_AUDIO
    (folder / DASH_LADDER).write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static"'
        ' profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"'
        f' mediaPresentationDuration="PT{duration:.3f}S" minBufferTime="PT2S">\n'
        " <Period>\n"
        '  <AdaptationSet contentType="video" mimeType="video/mp4" subsegmentAlignment="true">\n'
        + "".join(videos)
        + "  </AdaptationSet>\n"
        '  <AdaptationSet contentType="audio" mimeType="audio/mp4" subsegmentAlignment="true">\n'
        f'   <Representation id="audio" codecs="mp4a.40.2" bandwidth="{first.audio_bitrate}"'
        f' audioSamplingRate="{AUDIO_RATE}">\n'
        '    <AudioChannelConfiguration value="1"'
        ' schemeIdUri="urn:mpeg:dash:23003:3:audio_channel_configuration:2011"/>\n'
        f"    <BaseURL>{first.name}-dash/{DASH_AUDIO}</BaseURL>{_segment_base(audio)}\n"
        "   </Representation>\n"
        "  </AdaptationSet>\n"
        " </Period>\n"
        "</MPD>\n"
    )
