"""The canary: ``hermes-media doctor --canary URL`` clips past the first minute and prints what
each step took; with ``HERMES_CLIP_CANARY_URL`` the service runs it and exports the result."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services import cli
from services.clip.app import create_app
from services.clip.canary import CANARY_SECONDS, CANARY_START
from services.clip.settings import ClipSettings
from tests.conftest import MEDIA_CACHE
from tests.support.apps import client
from tests.support.media import make_source
from tests.support.rangeserver import RangeServer

# Past the canary's end, at a low frame rate so it is quick to make.
SOURCE_SECONDS = CANARY_START + CANARY_SECONDS + 2


@pytest.fixture(scope="module")
def long_source() -> Path:
    MEDIA_CACHE.mkdir(parents=True, exist_ok=True)
    return make_source(MEDIA_CACHE, seconds=SOURCE_SECONDS, fps=10, gop=20, name="canary66")


@pytest.fixture
def origin(long_source: Path) -> Iterator[RangeServer]:
    with RangeServer(long_source.parent) as server:
        yield server


def local_source_env(monkeypatch: pytest.MonkeyPatch, origin: RangeServer, tmp: Path) -> None:
    monkeypatch.setenv("HERMES_ALLOW_PRIVATE_NETWORKS", "true")
    monkeypatch.setenv("HERMES_CLIP_EXTRA_SOURCE_HOSTS", origin.base_url.removeprefix("http://"))
    monkeypatch.setenv("HERMES_CLIP_WORK_DIR", str(tmp / "work"))


def test_doctor_canary_clips_past_the_first_minute_and_times_each_step(
    origin: RangeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    local_source_env(monkeypatch, origin, tmp_path)
    url = origin.url("canary66.mp4")
    cli.main(["doctor", "--canary", url])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("canary"))
    assert re.fullmatch(
        rf"canary {re.escape(url)}: ok in [\d.]+ s \(reading video facts [\d.]+ s, "
        r"fetching [\d.]+ s, cutting [\d.]+ s\), \d+ bytes",
        line,
    ), line
    # Only the span past the first minute was fetched, not the minute before it.
    whole = (MEDIA_CACHE / "canary66.mp4").stat().st_size
    assert origin.bytes_sent("canary66.mp4") < 0.5 * whole
    assert not list((tmp_path / "work").iterdir()), "the canary leaves nothing behind"


def test_doctor_canary_failure_exits_1_with_the_code(
    media_root: Path,
    origin: RangeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    local_source_env(monkeypatch, origin, tmp_path)
    url = origin.url("s20.mp4")  # too short: the canary starts at 61 s
    with pytest.raises(SystemExit) as stopped:
        cli.main(["doctor", "--canary", url])
    assert stopped.value.code == 1
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"canary {url}: range_out_of_bounds after ")


def test_the_service_runs_the_canary_and_exports_it(origin: RangeServer, tmp_path: Path) -> None:
    settings = ClipSettings(
        allow_private_networks=True,
        clip_extra_source_hosts=origin.base_url.removeprefix("http://"),
        clip_work_dir=tmp_path / "work",
        clip_canary_url=origin.url("canary66.mp4"),
        clip_canary_interval_seconds=3600,
    )
    with client(create_app(settings)) as api:
        deadline = time.monotonic() + 60
        text = api.get("/metrics").text
        while 'hermes_clip_canary_ok{worker="local"}' not in text:
            assert time.monotonic() < deadline, "the canary did not run"
            time.sleep(0.2)
            text = api.get("/metrics").text
    assert 'hermes_clip_canary_ok{worker="local"} 1.0' in text
    assert re.search(r'hermes_clip_canary_step_seconds\{step="fetching",worker="local"\} ', text)
    assert re.search(r'hermes_clip_canary_last_run_timestamp_seconds\{worker="local"\} 1\.', text)
