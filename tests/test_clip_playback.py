"""A smart-cut clip plays in strict players: every parameter set declared in ``avcC``, and a
real browser plays it to its end.

The smart cut joins frames x264 encoded (parameter sets of their own) to frames copied from the
source. Chromium decodes with parameter sets found in band; Apple's decoders read only the
sample entry's ``avcC``. The second is simulated with ffmpeg on a copy of the clip whose in-band
parameter sets are removed: it decodes only when ``avcC`` lists them all.
"""

from __future__ import annotations

import functools
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.clip.pipeline import ClipResult
from tests.conftest import Media
from tests.support.chromium import chromium, open_page
from tests.support.media import decode_timed_frames, ffmpeg_exe
from tests.support.rangeserver import RangeServer
from tests.test_clip_frames import HEIGHT, WIDTH, clip_of, served

PAGE = """<!doctype html>
<video id="clip" src="clip.mp4" muted playsinline></video>
<script>
  const video = document.getElementById("clip");
  window.outcome = "playing";
  video.addEventListener("ended", () => { window.outcome = "ended"; });
  video.addEventListener("error", () => { window.outcome = "error " + video.error.code; });
  video.playbackRate = 4;
  video.play().catch((e) => { window.outcome = "refused " + e; });
</script>
"""


@contextmanager
def static_site(root: Path) -> Iterator[str]:
    """The standard library's file server on loopback, serving ``root``."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def smart_clip(tmp_path_factory: pytest.TempPathFactory, media_root: Path) -> ClipResult:
    """A clip of a B-frame source whose head and tail are encoded and middle copied."""
    _, relpath = served("b-frames")
    work = tmp_path_factory.mktemp("work")
    with RangeServer(media_root) as server:
        result = clip_of(Media(server=server, root=media_root), relpath, "0:03.3", "0:09.7", work)
    assert result.cut == "smart"
    return result


def test_every_parameter_set_is_declared_in_avcc(smart_clip: ClipResult, tmp_path: Path) -> None:
    stripped = tmp_path / "stripped.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(smart_clip.path), "-map", "0:v:0", "-c", "copy",
         "-bsf:v", "filter_units=remove_types=7-8", str(stripped)],
        check=True,
    )  # fmt: skip
    decoded = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(stripped), "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    assert "PPS" not in decoded.stderr, decoded.stderr[:500]
    assert "SPS" not in decoded.stderr, decoded.stderr[:500]
    frames = decode_timed_frames(stripped, width=WIDTH, height=HEIGHT)
    assert len(frames) == len(decode_timed_frames(smart_clip.path, width=WIDTH, height=HEIGHT))
    assert b"avc1" in smart_clip.path.read_bytes()[:65536], "the track must stay avc1"


def test_smart_cut_clip_plays_to_its_end_in_chromium(
    smart_clip: ClipResult, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "clip.mp4").write_bytes(smart_clip.path.read_bytes())
    (site / "index.html").write_text(PAGE)
    frames = len(decode_timed_frames(smart_clip.path, width=WIDTH, height=HEIGHT))
    log = tmp_path / "chromium.log"
    with static_site(site) as base, chromium(tmp_path / "profile", log) as devtools:
        page = open_page(devtools, f"{base}/index.html")
        deadline = time.monotonic() + 60
        outcome = "playing"
        while outcome == "playing" and time.monotonic() < deadline:
            time.sleep(0.2)
            outcome = page.call(
                "Runtime.evaluate", {"expression": "window.outcome", "returnByValue": True}
            )["result"].get("value", "playing")
        quality = page.call(
            "Runtime.evaluate",
            {
                "expression": "(() => { const q = document.getElementById('clip')"
                ".getVideoPlaybackQuality(); return [q.totalVideoFrames, q.droppedVideoFrames,"
                " document.getElementById('clip').currentTime]; })()",
                "returnByValue": True,
            },
        )["result"]
    assert outcome == "ended", f"{outcome}; chromium log:\n{log.read_text()[-2000:]}"
    total, dropped, position = quality["value"]
    assert total == frames, f"chromium saw {total} frames of {frames} ({dropped} dropped)"
    assert position == pytest.approx(smart_clip.clip_duration, abs=0.05)
