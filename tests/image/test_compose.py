"""docker-compose.yml checked with the image: the file is valid, and the project's own
services start from the image just built, with stand-ins for the registry images no registry
here serves; the test prints which services it did not start."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.image.conftest import CLIP_PORT, COMPRESS_PORT, REDIS_IMAGE, ROOT, Docker, port_is_free

pytestmark = pytest.mark.image

# Stand-ins for the compose file's registry images, built here from Debian packages.
COMPOSE_STAND_INS = {"redis": REDIS_IMAGE}
# A path inside the containers, not on this machine.
RESULTS_DIR = "/tmp/hermes-results"  # noqa: S108


def _compose(docker: Docker) -> list[str]:
    if docker.ok("compose", "version"):
        return [docker.executable, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no Compose: install Debian's docker-compose or Docker's compose plugin")


def test_compose_file_is_valid_and_its_services_start(
    docker: Docker, image: str, redis_image: str, tmp_path: Path
) -> None:
    compose = _compose(docker)
    project = f"hermes-test-{uuid.uuid4().hex[:8]}"
    files = ["-f", str(ROOT / "docker-compose.yml")]
    config = yaml.safe_load(
        subprocess.run(
            [*compose, *files, "config"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    )
    services: dict[str, Any] = config["services"]
    ours = [name for name, svc in services.items() if "build" in svc]
    stand_ins = {name: COMPOSE_STAND_INS[name] for name in services if name in COMPOSE_STAND_INS}
    not_started = sorted(set(services) - set(ours) - set(stand_ins))
    assert {"clip", "compress", "worker"} <= set(ours)
    # The project's services run the image just built; registry images get stand-ins. MinIO
    # has none here: results go to a directory instead, and the services start without the
    # dependencies on it (Redis is started first, in their place).
    override = {
        "services": {
            **{
                name: {"image": image, "environment": {"HERMES_CLIP_STORAGE_URL": RESULTS_DIR}}
                for name in ours
            },
            **{name: {"image": tag} for name, tag in stand_ins.items()},
        }
    }
    (tmp_path / "override.yml").write_text(yaml.safe_dump(override))
    files += ["-f", str(tmp_path / "override.yml")]
    busy = [p for p in (CLIP_PORT, COMPRESS_PORT) if not port_is_free(p)]
    assert not busy, f"ports {busy} are in use; the compose file publishes them"
    up = [*compose, "-p", project, *files, "up", "-d", "--no-build", "--no-deps"]
    try:
        for group in (list(stand_ins), ours):
            started = subprocess.run([*up, *group], capture_output=True, text=True, timeout=180)
            assert started.returncode == 0, started.stderr[-2000:]
        for port in (CLIP_PORT, COMPRESS_PORT):
            deadline = time.monotonic() + 90
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).is_success:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"compose service on {port} not ready"
                time.sleep(0.5)
        running = subprocess.run(
            [*compose, "-p", project, *files, "ps", "--services", "--filter", "status=running"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.split()  # fmt: skip
        assert set(ours) | set(stand_ins) <= set(running), running
        print(
            f"\ncompose: started {', '.join(ours)} (image {image}); "
            + ", ".join(f"{name} as {tag}" for name, tag in stand_ins.items())
            + f"; not started: {', '.join(not_started) or 'none'}"
        )
    finally:
        subprocess.run(
            [*compose, "-p", project, *files, "down", "-v", "--remove-orphans"],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
