"""Fixtures of the image test: a Docker client with BuildKit, the base image, the image built
from this tree, a Redis stand-in image, and containers on the host's network."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("HERMES_TEST_IMAGE", "hermes-media:test")
REDIS_IMAGE = "hermes-media-redis:test"
DEBIAN_BASE = "hermes-media-base:bookworm"
UPSTREAM_BASE = "python:3.11-slim"
CLIP_PORT, COMPRESS_PORT = 8001, 8002


@dataclass(frozen=True)
class Docker:
    """A client that builds with BuildKit, and the environment it needs for that."""

    executable: str

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run(
            [self.executable, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
        return proc.stdout

    def ok(self, *args: str) -> bool:
        proc = subprocess.run(
            [self.executable, *args], capture_output=True, timeout=120, check=False
        )
        return proc.returncode == 0


def _find_docker() -> Docker:
    """The first client with BuildKit: buildx, or a client before 23 (BuildKit built in).

    Debian's docker.io (20.10) builds with DOCKER_BUILDKIT=1; a newer client without the
    buildx plugin cannot, so it is passed over for one that can.
    """
    candidates = dict.fromkeys(
        c for c in (os.environ.get("DOCKER", "docker"), "/usr/bin/docker") if shutil.which(c)
    )
    for candidate in candidates:
        docker = Docker(candidate)
        if docker.ok("buildx", "version"):
            return docker
        version = docker.run("version", "--format", "{{.Client.Version}}", check=False)
        if version.strip() and int(version.split(".")[0]) < 23:
            return docker
    pytest.fail(
        "no Docker client that builds with BuildKit: install Debian's docker.io "
        "(apt-get install docker.io) or Docker's buildx plugin"
    )


@pytest.fixture(scope="session")
def docker() -> Docker:
    found = _find_docker()
    if not found.ok("info"):
        pytest.fail("no Docker engine answers: start one (dockerd &), as .ci/run does")
    return found


@pytest.fixture(scope="session")
def base_image(docker: Docker) -> str:
    """python:3.11-slim when it is here or can be pulled; else one made from Debian packages."""
    chosen = os.environ.get("HERMES_TEST_BASE_IMAGE")
    if chosen:
        return chosen
    if docker.ok("image", "inspect", UPSTREAM_BASE) or docker.ok("pull", "-q", UPSTREAM_BASE):
        return UPSTREAM_BASE
    subprocess.run(
        [str(ROOT / "tests/image/debian-base.sh"), DEBIAN_BASE],
        env={**os.environ, "DOCKER": docker.executable},
        check=True,
        timeout=600,
    )
    return DEBIAN_BASE


@pytest.fixture(scope="session")
def image(docker: Docker, base_image: str) -> str:
    """The image built from this tree; the CA bundle, when the environment names one, is a
    build secret and must not be left in the image."""
    secret: list[str] = []
    bundle = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if bundle:
        secret = ["--secret", f"id=ca-bundle,src={bundle}"]
    docker.run(
        "build", "--build-arg", f"BASE_IMAGE={base_image}", *secret, "-t", IMAGE, str(ROOT),
        timeout=480,
    )  # fmt: skip
    if bundle:
        assert_bundle_not_in_image(docker, Path(bundle))
    return IMAGE


def _pem_blocks(text: str) -> set[str]:
    return {
        block.split("-----END CERTIFICATE-----")[0].strip()
        for block in text.split("-----BEGIN CERTIFICATE-----")[1:]
    }


def assert_bundle_not_in_image(docker: Docker, bundle: Path) -> None:
    """Certificates of the build's bundle that Debian does not ship appear in no file."""
    system = docker.run("run", "--rm", IMAGE, "cat", "/etc/ssl/certs/ca-certificates.crt")
    extra = _pem_blocks(bundle.read_text()) - _pem_blocks(system)
    # One line of each certificate's body is unique to it.
    patterns = [arg for cert in extra for arg in ("-e", cert.splitlines()[2])]
    if not patterns:
        return
    found = docker.run(
        "run", "--rm", "--user", "0", IMAGE, "grep", "-rlsF", *patterns, "/",
        "--exclude-dir=proc", "--exclude-dir=sys", check=False, timeout=300,
    )  # fmt: skip
    assert found.strip() == "", f"the build's CA bundle was left in the image: {found}"


@pytest.fixture(scope="session")
def redis_image(docker: Docker, base_image: str) -> str:
    # Like the official image: no protected mode (other containers connect), data in /data,
    # options from the compose file's command kept.
    dockerfile = (
        f"FROM {base_image}\n"
        "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "--no-install-recommends redis-server >/dev/null && rm -rf /var/lib/apt/lists/* "
        "&& mkdir /data\n"
        "WORKDIR /data\n"
        'ENTRYPOINT ["sh", "-c", "exec \\"$@\\" --protected-mode no", "redis"]\n'
        'CMD ["redis-server"]\n'
    )
    proc = subprocess.run(
        [docker.executable, "build", "-q", "-t", REDIS_IMAGE, "-"],
        input=dockerfile,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return REDIS_IMAGE


@contextmanager
def container(
    docker: Docker,
    image: str,
    *command: str,
    env: dict[str, str],
    mounts: Sequence[tuple[Path, str]] = (),
) -> Iterator[str]:
    """A detached container on the host's network, with ``mounts`` (host directory, path in
    the container) bound; removed on exit, its log shown on failure."""
    name = f"hermes-test-{uuid.uuid4().hex[:8]}"
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    mount_args = [arg for host, inside in mounts for arg in ("-v", f"{host}:{inside}")]
    docker.run(
        "run", "-d", "--name", name, "--network", "host", *env_args, *mount_args, image, *command
    )  # fmt: skip
    try:
        yield name
    except BaseException as exc:
        logs = docker.run("logs", "--tail", "40", name, check=False)
        raise AssertionError(f"{exc}\n--- log of {image} {' '.join(command)}:\n{logs}") from exc
    finally:
        docker.run("rm", "-f", name, check=False)


def wait_ready(docker: Docker, name: str, urls: Sequence[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        if docker.run("inspect", "-f", "{{.State.Running}}", name).strip() != "true":
            raise AssertionError(f"{name} exited")
        try:
            if httpx.get(pending[0], timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready in {timeout} s: {pending[0]}")
        time.sleep(0.25)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            # The default command binds every address: check the same.
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True
