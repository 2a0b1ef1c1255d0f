"""The Docker image as its users run it: built from this tree, checked from outside.

Run by ``make test-image`` (``.ci/run`` runs it after ``make test``), never by ``make test``:
it needs a Docker engine with BuildKit. Containers run with ``--network host``, so they serve
on 127.0.0.1 and reach this test's origin and webhook receiver there. Where no registry
answers, the base image is made from Debian packages (``debian-base.sh``) and cached by name;
Redis is a stand-in image built from Debian's redis-server package.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.image.conftest import (
    CLIP_PORT,
    COMPRESS_PORT,
    Docker,
    container,
    port_is_free,
    wait_ready,
)
from tests.support.apps import free_port
from tests.support.images import encode, photo
from tests.support.media import make_source
from tests.support.rangeserver import RangeServer
from tests.support.receiver import Receiver

pytestmark = pytest.mark.image

SOURCE_SECONDS = 12
# Where the distributed test's containers mount their shared results directory.
RESULTS_DIR = "/srv/hermes-results"


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangeServer]:
    root = tmp_path_factory.mktemp("origin")
    make_source(root, seconds=SOURCE_SECONDS, name="source")
    with RangeServer(root) as server:
        yield server


def clip_env(origin: RangeServer, **extra: str) -> dict[str, str]:
    return {
        "HERMES_ALLOW_PRIVATE_NETWORKS": "true",
        "HERMES_CLIP_EXTRA_SOURCE_HOSTS": origin.base_url.removeprefix("http://"),
        **extra,
    }


def clip_and_wait(base: str, origin: RangeServer, hook: Receiver) -> dict[str, Any]:
    """Ask for seconds 2 to 5 of the origin's video; return the success webhook's response."""
    with httpx.Client(base_url=base, timeout=30) as api:
        accepted = api.post(
            "/download-a-clip-from-youtube",
            json={"youtube_url": origin.url("source.mp4"), "start_time": "0:02",
                  "end_time": "0:05", "name": "image test"},
            headers={"ouro-webhook-url": hook.url, "ouro-webhook-token": "t",
                     "ouro-action-id": f"a-{uuid.uuid4().hex}", "ouro-route-id": "r"},
        )  # fmt: skip
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        body = hook.wait(1, timeout=120)[0].body
        assert body["status"] == "success", body
        clip = api.get(f"/jobs/{job_id}/file")
        assert clip.status_code == 200
        assert clip.content[4:8] == b"ftyp"
    response: dict[str, Any] = body["response"]
    assert response["clip_duration"] == pytest.approx(3.0, abs=0.05)
    assert response["bytes"] == len(clip.content)
    return response


@pytest.fixture(scope="module")
def served(docker: Docker, image: str, origin: RangeServer) -> Iterator[str]:
    """The image's default command, as `docker run IMAGE` starts it."""
    busy = [p for p in (CLIP_PORT, COMPRESS_PORT) if not port_is_free(p)]
    assert not busy, f"ports {busy} are in use; the image's default command needs them"
    with container(docker, image, env=clip_env(origin)) as name:
        wait_ready(
            docker, name, [f"http://127.0.0.1:{p}/readyz" for p in (CLIP_PORT, COMPRESS_PORT)]
        )
        yield name


def test_default_command_serves_both_routes_ready(served: str) -> None:
    for port, route in (
        (CLIP_PORT, "/download-a-clip-from-youtube"),
        (COMPRESS_PORT, "/compress-an-image"),
    ):
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).json()
        assert route in spec["paths"]


def test_runs_as_non_root_and_writes_its_work_directory(docker: Docker, served: str) -> None:
    status = docker.run("exec", served, "cat", "/proc/1/status")
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert uid != "0"
    # The directory the clip service makes its jobs' directories in, as its settings say.
    probe = (
        "from services.clip.settings import ClipSettings; d = ClipSettings().clip_work_dir; "
        "d.mkdir(parents=True, exist_ok=True); (d / 'probe').write_text('x'); "
        "(d / 'probe').unlink(); print(d)"
    )
    assert docker.run("exec", served, "python", "-c", probe).strip().endswith("/hermes-clip")


def test_compress_upload(served: str) -> None:
    original = encode(photo(), "JPEG", quality=95)
    answer = httpx.post(
        f"http://127.0.0.1:{COMPRESS_PORT}/compress-an-image/upload",
        files={"file": ("photo.jpg", original, "image/jpeg")},
        data={"quality": "60"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.content) < len(original)
    with Image.open(io.BytesIO(answer.content)) as out:
        assert out.format == "JPEG"
        assert out.size == photo().size


def test_clip_job(served: str, origin: RangeServer, hook: Receiver) -> None:
    response = clip_and_wait(f"http://127.0.0.1:{CLIP_PORT}", origin, hook)
    assert response["cut"] == "smart"


def test_worker_container_completes_a_distributed_job(
    docker: Docker,
    image: str,
    redis_image: str,
    origin: RangeServer,
    hook: Receiver,
    tmp_path: Path,
) -> None:
    """API and worker in containers of their own, sharing Redis and a results directory
    (distributed mode's ``HERMES_CLIP_STORAGE_URL`` as a volume both mount)."""
    redis_port, api_port = free_port(), free_port()
    shared = tmp_path / "results"
    shared.mkdir()
    # The image's user (not root) writes results there; the host's test user reads them back.
    shared.chmod(0o1777)
    env = clip_env(
        origin,
        HERMES_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        HERMES_CLIP_QUEUE_NAME=f"hermes:clip:image-test:{uuid.uuid4().hex[:8]}",
        HERMES_CLIP_STORAGE_URL=RESULTS_DIR,
    )
    mounts = [(shared, RESULTS_DIR)]
    redis_cmd = ("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "")
    api_cmd = ("hermes-media", "serve", "clip", "--host", "127.0.0.1", "--port", str(api_port))
    with (
        container(docker, redis_image, *redis_cmd, env={}),
        container(docker, image, "hermes-media", "worker", env=env, mounts=mounts),
        container(docker, image, *api_cmd, env=env, mounts=mounts) as api,
    ):
        wait_ready(docker, api, [f"http://127.0.0.1:{api_port}/readyz"])
        clip_and_wait(f"http://127.0.0.1:{api_port}", origin, hook)
    # The worker stored the clip in the shared directory, where the API read it from.
    assert len(list(shared.glob("*/clip.mp4"))) == 1
