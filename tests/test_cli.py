"""The ``hermes-media`` commands end to end: compress on real photos, clip on generated media
served from loopback, and register against a fake Ouro backend driven by the real SDK."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException, Request
from ouro.client import PERSONAL_ORG_ID
from PIL import Image

from services.cli import ProgressBar, main, timecode
from services.clip.app import create_app as create_clip_app
from services.clip.ffmpeg import ffmpeg_exe, parse_banner
from services.clip.settings import ClipSettings
from services.compress.app import create_app as create_compress_app
from tests.conftest import FPS, HEIGHT, WIDTH, Media
from tests.support.apps import serve
from tests.support.images import write_samples
from tests.support.media import decode_frames, frame_number

FRAME = 1 / FPS
ROOT = Path(__file__).resolve().parent.parent
SIZE_LINE = re.compile(r"^(?P<name>\S+): (?P<before>\d+) -> (?P<after>\d+) bytes \(\d+\.\d%\)$")
KEPT_LINE = re.compile(r"^(?P<name>\S+): (?P<before>\d+) bytes, kept \(not smaller\)$")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command in its own process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-c", "from services.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


def exit_code(*args: str) -> int:
    """``main`` in this process; its exit status."""
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("samples"))


# compress


def test_compress_folder_writes_every_image_in_its_own_format(
    samples: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = next(iter(samples.values())).parent
    out = tmp_path / "out" / "nested"
    assert exit_code("compress", str(source), "-q", "70", "-o", str(out)) == 0

    lines = capsys.readouterr().out.splitlines()
    *per_file, total = lines
    seen: dict[str, tuple[int, int]] = {}
    for line in per_file:
        match = SIZE_LINE.match(line) or KEPT_LINE.match(line)
        assert match, line
        after = int(match["after"]) if "after" in match.groupdict() else int(match["before"])
        seen[match["name"]] = (int(match["before"]), after)
    assert sorted(seen) == sorted(samples)
    for name, path in samples.items():
        written = out / name
        before, after = seen[name]
        assert before == path.stat().st_size
        assert written.stat().st_size == after <= before
        with Image.open(path) as original, Image.open(written) as result:
            assert result.format == original.format
            assert result.size == original.size
    before = sum(b for b, _ in seen.values())
    after = sum(a for _, a in seen.values())
    assert total == f"{len(samples)} images: {before} -> {after} bytes ({after / before:.1%})"


def test_compress_file_writes_min_beside_it_and_replaces_only_when_asked(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(samples["photo.jpg"].read_bytes())
    photo.chmod(0o640)
    original = photo.read_bytes()

    result = run_cli("compress", str(photo), "-q", "60", "--strip-metadata")
    assert result.returncode == 0, result.stderr
    minified = tmp_path / "photo.min.jpg"
    match = SIZE_LINE.match(result.stdout.strip())
    assert match, result.stdout
    assert (match["name"], int(match["before"])) == ("photo.jpg", len(original))
    assert int(match["after"]) == minified.stat().st_size < len(original)
    assert photo.read_bytes() == original, "the input is never touched without -o"
    with Image.open(minified) as image:
        assert image.format == "JPEG"
        assert image.getexif().get(0x010F) is None, "--strip-metadata drops the camera make"
    assert result.stdout.count("\n") == 1, "one line for one file, no total"

    into = tmp_path / "into"
    into.mkdir()
    assert run_cli("compress", str(photo), "-o", str(into)).returncode == 0
    assert (into / "photo.jpg").stat().st_size < len(original)

    in_place = run_cli("compress", str(photo), "-o", str(photo))
    assert in_place.returncode == 0, in_place.stderr
    assert photo.stat().st_size < len(original)
    assert photo.stat().st_mode & 0o777 == 0o640, "replacing keeps the permissions"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_compress_keeps_an_image_that_does_not_shrink(
    samples: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "small.jpg"
    small.write_bytes(samples["photo.jpg"].read_bytes())
    # At 100 a JPEG is only optimised losslessly; its own output cannot be optimised again.
    assert exit_code("compress", str(small), "-q", "100", "-o", str(small)) == 0
    once = small.read_bytes()
    capsys.readouterr()
    assert exit_code("compress", str(small), "-q", "100", "-o", str(small)) == 0
    assert capsys.readouterr().out == f"small.jpg: {len(once)} bytes, kept (not smaller)\n"
    assert small.read_bytes() == once


def test_compress_recursive_mirrors_the_tree_and_skips_its_own_output(
    samples: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / ".hidden").mkdir()
    (tree / "top.png").write_bytes(samples["screenshot.png"].read_bytes())
    (tree / "sub" / "pic.gif").write_bytes(samples["animated.gif"].read_bytes())
    (tree / "sub" / "deeper" / "pic.webp").write_bytes(samples["photo.webp"].read_bytes())
    (tree / ".hidden" / "secret.png").write_bytes(samples["screenshot.png"].read_bytes())
    (tree / "notes.txt").write_text("not an image")
    out = tree / "min"

    assert exit_code("compress", str(tree), "-o", str(out)) == 0
    assert sorted(p.name for p in out.rglob("*")) == ["top.png"], "not recursive by default"
    capsys.readouterr()
    for _ in range(2):  # the second run must not pick up the first run's output
        assert exit_code("compress", str(tree), "--recursive", "-o", str(out)) == 0
        lines = capsys.readouterr().out.splitlines()
        names = sorted(line.split(":")[0] for line in lines[:-1])
        assert names == ["sub/deeper/pic.webp", "sub/pic.gif", "top.png"]
        assert lines[-1].startswith("3 images: ")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["sub/deeper/pic.webp", "sub/pic.gif", "top.png"]
    with Image.open(out / "sub" / "pic.gif") as gif:
        assert gif.format == "GIF"
        assert getattr(gif, "n_frames", 1) == 6


def test_compress_reports_each_failure_and_exits_non_zero(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes(samples["screenshot.png"].read_bytes())
    (folder / "text.png").write_bytes(b"this is not an image at all" * 10)
    (folder / "cut.jpg").write_bytes(samples["photo.jpg"].read_bytes()[:400])

    result = run_cli("compress", str(folder), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    cut, text = sorted(result.stderr.splitlines())
    assert cut.startswith("hermes-media compress: cut.jpg: invalid_input: ")
    assert "damaged or truncated" in cut
    assert text == (
        "hermes-media compress: text.png: unsupported_media_type: The file is not an image "
        "in an accepted format (JPEG, PNG, WebP, GIF, AVIF, TIFF, BMP, ICO, HEIC/HEIF)."
    )
    assert SIZE_LINE.match(result.stdout.splitlines()[0])
    assert result.stdout.splitlines()[-1].endswith("; 2 failed")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


def test_compress_uses_the_service_limits(
    samples: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = samples["photo.jpg"]
    size = photo.stat().st_size
    env = {"HERMES_COMPRESS_MAX_INPUT_BYTES": str(size - 1)}
    result = run_cli("compress", str(photo), "-o", str(tmp_path / "x.jpg"), env=env)
    assert result.returncode == 1
    assert result.stderr == (
        f"hermes-media compress: photo.jpg: payload_too_large: The file is larger than the "
        f"limit of {size - 1} bytes.\n"
    )
    assert not (tmp_path / "x.jpg").exists()

    pixels = {"HERMES_COMPRESS_MAX_PIXELS": "1000"}
    result = run_cli("compress", str(photo), "-o", str(tmp_path / "x.jpg"), env=pixels)
    assert result.returncode == 1
    assert "payload_too_large: The image is larger than the limit of 1000 pixels" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "missing.png"], "missing.png: no such file or folder"),
        (["compress", "{folder}"], "is a folder: give -o OUT"),
        (["compress", "{folder}", "-o", "{file}"], "is not a folder"),
        (["compress", "{empty}", "-o", "{out}"], "has no images"),
    ],
)
def test_compress_refuses_what_it_cannot_do(
    args: list[str],
    message: str,
    samples: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    places = {
        "folder": str(samples["photo.jpg"].parent),
        "file": str(samples["photo.jpg"]),
        "empty": str(empty),
        "out": str(tmp_path / "out"),
    }
    assert exit_code(*(arg.format(**places) for arg in args)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("hermes-media compress: ")
    assert message in captured.err
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize("quality", ["0", "101", "high"])
def test_compress_quality_is_checked_by_the_parser(
    quality: str, samples: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code("compress", str(samples["photo.jpg"]), "-q", quality) == 2
    assert "quality must be a whole number from 1 to 100" in capsys.readouterr().err


# clip


def clip_env(media: Media, tmp_path: Path) -> dict[str, str]:
    return {
        "HERMES_ALLOW_PRIVATE_NETWORKS": "true",
        "HERMES_CLIP_EXTRA_SOURCE_HOSTS": media.host,
        "HERMES_CLIP_WORK_DIR": str(tmp_path / "work"),
    }


def test_clip_writes_a_frame_exact_mp4_and_shows_progress(media: Media, tmp_path: Path) -> None:
    target = tmp_path / "clips" / "clip.mp4"
    result = run_cli(
        "clip", media.url("s60.mp4"), "--start", "0:12.4", "--end", "0:20.4",
        "-o", str(target), "--name", "My clip",
        env=clip_env(media, tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    size = target.stat().st_size
    assert result.stdout == (
        f"saved {target}: {size} bytes, 8.000 s (0:12.4 to 0:20.4 of 's60'), "
        f"{WIDTH}x{HEIGHT}, smart cut\n"
    )
    stages = result.stderr.splitlines()
    assert stages[0] == "reading video facts (0%)"
    assert stages[-1] == "done (100%)"
    assert any(line.startswith("fetching (") for line in stages)
    assert any(line.startswith("cutting (") for line in stages)

    banner = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-i", str(target)], capture_output=True, text=True
    ).stderr
    facts = parse_banner(banner)
    assert facts.duration == pytest.approx(8.0, abs=FRAME)
    assert "Video: h264" in banner
    assert "Audio: aac" in banner
    frames = decode_frames(target, width=WIDTH, height=HEIGHT, ignore_editlist=True)
    numbers = [frame_number(frame, WIDTH, HEIGHT) for frame in frames]
    first = round(12.4 * FPS)
    assert numbers == list(range(first, first + round(8.0 * FPS)))
    assert list((tmp_path / "work").iterdir()) == [], "the job's directory is removed"


def test_clip_names_the_file_after_the_clip_by_default(
    media: Media,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in clip_env(media, tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    url = media.url("s20.mp4")
    assert exit_code("clip", url, "--start", "2", "--end", "4", "--name", "Two: seconds") == 0
    assert exit_code("clip", url, "--start", "4", "--end", "5", "-o", str(tmp_path)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("saved Two_seconds.mp4: ")
    assert out[1].startswith(f"saved {tmp_path / 's20.mp4'}: ")
    assert "1.000 s (0:04 to 0:05 of 's20')" in out[1]
    assert (tmp_path / "Two_seconds.mp4").stat().st_size > 0


@pytest.mark.parametrize(
    ("url", "start", "end", "code"),
    [
        ("https://vimeo.com/123", "0:01", "0:02", "invalid_url"),
        ("{media}/s20.mp4", "0:05", "0:02", "invalid_range"),
        ("{media}/s20.mp4", "1:75", "2:00", "invalid_time"),
        ("{media}/s20.mp4", "0:00", "10:01", "clip_too_long"),
        ("{media}/s20.mp4", "0:25", "0:30", "range_out_of_bounds"),
        ("{media}/not-a-video.mp4", "0:01", "0:02", "unsupported_source"),
    ],
)
def test_clip_errors_are_one_line_with_the_code(
    url: str,
    start: str,
    end: str,
    code: str,
    media: Media,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in clip_env(media, tmp_path).items():
        monkeypatch.setenv(name, value)
    target = tmp_path / "clip.mp4"
    source = url.format(media=media.server.base_url)
    assert exit_code("clip", source, "--start", start, "--end", end, "-o", str(target)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hermes")]
    assert len(errors) == 1
    assert errors[0].startswith(f"hermes-media clip: {code}: ")
    assert not target.exists()
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_one_line_on_a_terminal() -> None:
    stream = Terminal()
    bar = ProgressBar(stream)
    for stage, progress in [("fetching", 0.05), ("fetching", 0.051), ("fetching", 0.5)]:
        bar(stage, progress)
    bar("cutting", 0.4)  # progress never goes back
    bar("done", 1.0)
    bar.close()
    text = stream.getvalue()
    draws = text.split("\r")[1:]
    assert len(draws) == 4, "a redraw only when the percent or the stage changes"
    assert draws[0].startswith("[#-----------------------------]   5% fetching")
    assert draws[2].startswith("[###############---------------]  50% cutting")
    assert draws[3] == "[##############################] 100% done                \n"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0:00"),
        (12.4, "0:12.4"),
        (61.25, "1:01.25"),
        (3600, "1:00:00"),
        (3723.001, "1:02:03.001"),
    ],
)
def test_timecode(seconds: float, text: str) -> None:
    assert timecode(seconds) == text


# register


USER_ID = "5c1f4a43-94f6-4a47-9d76-1e0c1f7c3d20"
TEAM_ID = "7d0c1a57-2b9b-4f0c-8a5f-9e6b0c7d1e21"
API_KEY = "ouro-test-key"
TOKEN = "access-token-1"


@dataclass
class FakeOuro:
    """Ouro's backend as far as ``ouro.services`` uses it; records every call."""

    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    routes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    def asset(self, asset_type: str, name: str, **extra: Any) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        return {
            "id": str(uuid.uuid4()), "user_id": USER_ID, "org_id": PERSONAL_ORG_ID,
            "team_id": TEAM_ID, "visibility": "public", "asset_type": asset_type,
            "created_at": now, "last_updated": now, "name": name,
            "user": {"user_id": USER_ID, "username": "hermes"}, **extra,
        }  # fmt: skip

    def sync_routes(self, service: dict[str, Any]) -> None:
        """One route per operation of the spec, as Ouro makes them; kept ids for kept paths."""
        spec = httpx.get(service["metadata"]["spec_url"], timeout=10).raise_for_status().json()
        old = {
            (r["route"]["method"], r["route"]["path"]): r
            for r in self.routes.get(service["id"], [])
        }
        routes = []
        for path, operations in spec["paths"].items():
            for method, operation in operations.items():
                key = (method.upper(), path)
                route = old.get(key) or self.asset("route", operation["summary"])
                route.update(parent_id=service["id"], route={"method": key[0], "path": path})
                routes.append(route)
        self.routes[service["id"]] = routes


def fake_ouro_app(state: FakeOuro) -> FastAPI:
    app = FastAPI()

    def authorized(authorization: str | None) -> None:
        if authorization != TOKEN:
            raise HTTPException(401, "no user")

    @app.post("/users/get-token")
    async def get_token(request: Request) -> dict[str, Any]:
        body = await request.json()
        state.calls.append(("POST", "/users/get-token", body))
        if body.get("pat") != API_KEY:
            raise HTTPException(401, "Invalid API key")
        return {"access_token": TOKEN, "refresh_token": "refresh-1", "api_key_org_id": None}

    @app.get("/user")
    def user(authorization: str | None = Header(None)) -> dict[str, Any]:
        authorized(authorization)
        state.calls.append(("GET", "/user", None))
        return {"data": {"id": USER_ID, "email": "hermes@example.com", "username": "hermes"}}

    @app.get("/services")
    def list_services(authorization: str | None = Header(None)) -> dict[str, Any]:
        authorized(authorization)
        state.calls.append(("GET", "/services", None))
        return {"data": list(state.services.values())}

    @app.post("/services/create/from-file")
    async def create(request: Request, authorization: str | None = Header(None)) -> dict[str, Any]:
        authorized(authorization)
        body = (await request.json())["service"]
        state.calls.append(("POST", "/services/create/from-file", body))
        service = state.asset(
            "service", body["name"], description=body["description"], metadata=body["metadata"]
        )
        state.sync_routes(service)
        state.services[service["id"]] = service
        return {"data": service}

    @app.put("/services/{service_id}/update/from-file")
    async def update(
        service_id: str, request: Request, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        authorized(authorization)
        body = (await request.json())["service"]
        state.calls.append(("PUT", f"/services/{service_id}/update/from-file", body))
        service = state.services[service_id]
        service["metadata"] = {**service["metadata"], **body["metadata"]}
        service.update(name=body["name"], description=body["description"])
        state.sync_routes(service)
        return {"data": service}

    @app.put("/services/{service_id}/authentication")
    async def authentication(
        service_id: str, request: Request, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        authorized(authorization)
        body = await request.json()
        state.calls.append(("PUT", f"/services/{service_id}/authentication", body))
        rotated = state.secrets.get(service_id) != body["secret"]
        state.secrets[service_id] = body["secret"]
        return {
            "data": {"id": service_id, "secret_id": str(uuid.uuid4()), "method": body["method"],
                     "rotated": rotated},
        }  # fmt: skip

    @app.get("/services/{service_id}/routes")
    def routes(service_id: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        authorized(authorization)
        state.calls.append(("GET", f"/services/{service_id}/routes", None))
        return {"data": state.routes[service_id]}

    return app


@pytest.fixture
def hermes(tmp_path: Path) -> Iterator[str]:
    """Both real apps under one public URL, at /clip and /compress, as behind a proxy."""
    app = FastAPI()
    app.mount("/clip", create_clip_app(ClipSettings(clip_work_dir=tmp_path / "work")))
    app.mount("/compress", create_compress_app())
    with serve(app) as base:
        yield base


@pytest.fixture
def ouro(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOuro]:
    state = FakeOuro()
    with serve(fake_ouro_app(state)) as base:
        monkeypatch.setenv("OURO_BACKEND_URL", base)
        monkeypatch.setenv("OURO_API_KEY", API_KEY)
        monkeypatch.delenv("OURO_ORG_ID", raising=False)
        monkeypatch.delenv("HERMES_OURO_SERVICE_SECRET", raising=False)
        yield state


def test_register_creates_then_refreshes_both_services(
    ouro: FakeOuro, hermes: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code("register", "--base-url", hermes + "/") == 0
    first = capsys.readouterr().out
    clip, compress = ouro.services.values()
    ids = {s["name"]: s["id"] for s in ouro.services.values()}
    assert [(method, path) for method, path, _ in ouro.calls] == [
        ("POST", "/users/get-token"),
        ("GET", "/user"),
        ("GET", "/services"),
        ("POST", "/services/create/from-file"),
        ("GET", f"/services/{clip['id']}/routes"),
        ("POST", "/services/create/from-file"),
        ("GET", f"/services/{compress['id']}/routes"),
    ]
    created = ouro.calls[3][2]
    assert created["name"] == "hermes-media clip"
    assert created["asset_type"] == "service"
    assert created["description"].startswith("Download a specific time range")
    assert created["metadata"] == {
        "base_url": f"{hermes}/clip",
        "spec_url": f"{hermes}/clip/ouro/openapi.json",
        "authentication": "None",
    }
    assert ouro.calls[5][2]["metadata"]["spec_url"] == f"{hermes}/compress/ouro/openapi.json"

    clip_route = next(
        r for r in ouro.routes[clip["id"]] if r["route"]["path"] == "/download-a-clip-from-youtube"
    )
    compress_route = next(
        r for r in ouro.routes[compress["id"]] if r["route"]["path"] == "/compress-an-image"
    )
    lines = first.splitlines()
    assert lines[0] == (
        f"created service 'hermes-media clip' (id {clip['id']}) from "
        f"{hermes}/clip/ouro/openapi.json, authentication None"
    )
    assert (
        f"  hermes/download-a-clip-from-youtube  id {clip_route['id']}  "
        "POST /download-a-clip-from-youtube"
    ) in lines
    assert (
        f"  hermes/compress-an-image  id {compress_route['id']}  POST /compress-an-image" in lines
    )
    assert f"created service 'hermes-media compress' (id {compress['id']})" in first

    ouro.calls.clear()
    assert exit_code("register", "--base-url", hermes, "--auth-secret", "s3cret") == 0
    second = capsys.readouterr().out
    assert {s["name"]: s["id"] for s in ouro.services.values()} == ids, "nothing new created"
    assert [(method, path) for method, path, _ in ouro.calls] == [
        ("POST", "/users/get-token"),
        ("GET", "/user"),
        ("GET", "/services"),
        ("PUT", f"/services/{clip['id']}/update/from-file"),
        ("PUT", f"/services/{clip['id']}/authentication"),
        ("GET", f"/services/{clip['id']}/routes"),
        ("PUT", f"/services/{compress['id']}/update/from-file"),
        ("PUT", f"/services/{compress['id']}/authentication"),
        ("GET", f"/services/{compress['id']}/routes"),
    ]
    assert ouro.calls[3][2]["metadata"] == {
        "base_url": f"{hermes}/clip",
        "spec_url": f"{hermes}/clip/ouro/openapi.json",
        "authentication": "Ouro",
    }
    assert ouro.calls[4][2] == {"method": "Ouro", "secret": "s3cret"}
    assert ouro.secrets == {clip["id"]: "s3cret", compress["id"]: "s3cret"}
    assert second.startswith(f"refreshed service 'hermes-media clip' (id {clip['id']})")
    assert "authentication Ouro" in second
    assert f"  hermes/download-a-clip-from-youtube  id {clip_route['id']}  " in second, (
        "the route keeps its id"
    )


def test_register_with_one_url_per_service(
    ouro: FakeOuro, hermes: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--clip-url", f"{hermes}/clip", "--compress-url", f"{hermes}/compress"]
    assert exit_code("register", *args) == 0
    metadata = [body["metadata"] for _, path, body in ouro.calls if path.endswith("from-file")]
    assert [m["base_url"] for m in metadata] == [f"{hermes}/clip", f"{hermes}/compress"]
    assert capsys.readouterr().out.count("created service") == 2


def test_register_failures_are_one_line(
    ouro: FakeOuro, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OURO_API_KEY", "wrong")
    assert exit_code("register", "--base-url", "https://media.example.com") == 1
    err = capsys.readouterr().err
    assert err.startswith("hermes-media register: Ouro: Client error '401 Unauthorized'")
    assert err.count("\n") == 1
    assert [path for _, path, _ in ouro.calls] == ["/users/get-token"]

    monkeypatch.delenv("OURO_API_KEY")
    assert exit_code("register", "--base-url", "https://media.example.com") == 1
    err = capsys.readouterr().err
    assert err.startswith("hermes-media register: Ouro: The api_key client option must be set")
    assert "OURO_API_KEY" in err


@pytest.mark.parametrize(
    "args",
    [[], ["--clip-url", "https://a.example"], ["--base-url", "ftp://a.example"]],
)
def test_register_needs_its_urls(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code("register", *args) == 2
    assert "usage: hermes-media register" in capsys.readouterr().err


def test_register_says_how_to_install_the_sdk() -> None:
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.modules['ouro'] = None; from services.cli import main; main()",
         "register", "--base-url", "https://media.example.com"],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "hermes-media register: needs the Ouro SDK: pip install 'hermes-media[ouro]'\n"
    )
