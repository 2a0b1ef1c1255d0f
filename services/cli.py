"""The ``hermes-media`` command: serve the routes, write the OpenAPI specs."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from pydantic_settings import BaseSettings

from services.clip.app import create_app as create_clip_app
from services.clip.distributed import run_worker
from services.clip.settings import ClipSettings
from services.common.observability import configure_logging
from services.common.settings import CommonSettings
from services.compress.app import create_app as create_compress_app
from services.compress.settings import CompressSettings


@dataclass(frozen=True)
class Service:
    name: str
    default_port: int
    create_app: Callable[[], FastAPI]


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        Service("clip", 8001, create_clip_app),
        Service("compress", 8002, create_compress_app),
    )
}


def _server(service: Service, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(service.create_app(), host=host, port=port, log_config=None)
    return uvicorn.Server(config)


async def _serve_all(servers: Sequence[uvicorn.Server]) -> None:
    await asyncio.gather(*(server.serve() for server in servers))


def write_openapi(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for service in SERVICES.values():
        path = directory / f"{service.name}.json"
        spec = service.create_app().openapi()
        path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def _run_worker() -> None:
    settings = ClipSettings()
    if not settings.redis_url:
        raise SystemExit("hermes-media worker needs HERMES_REDIS_URL")
    configure_logging()
    asyncio.run(run_worker(settings))


def settings_table() -> str:
    """The Markdown table of every setting, as the README shows it."""
    rows = ["| variable | service | default | what it does |", "|---|---|---|---|"]
    owners: list[tuple[str, type[BaseSettings], set[str]]] = [
        ("both", CommonSettings, set()),
        ("clip", ClipSettings, set(CommonSettings.model_fields)),
        ("compress", CompressSettings, set(CommonSettings.model_fields)),
    ]
    for owner, cls, inherited in owners:
        for name, field in cls.model_fields.items():
            if name in inherited:
                continue
            default = None if field.default_factory is not None else field.default
            if isinstance(default, frozenset):
                default = ",".join(sorted(default))
            shown = "" if default is None else f"`{default}`"
            env = f"`HERMES_{name.upper()}`"
            rows.append(f"| {env} | {owner} | {shown} | {field.description} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hermes-media", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Serve every service, or the one named.")
    serve.add_argument("service", nargs="?", choices=sorted(SERVICES))
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, help="Port of the one service named.")
    for service in SERVICES.values():
        serve.add_argument(f"--{service.name}-port", type=int, default=service.default_port)
    openapi = commands.add_parser("openapi", help="Write openapi/<service>.json.")
    openapi.add_argument("--out", type=Path, default=Path("openapi"))
    commands.add_parser("settings", help="Print the table of settings (Markdown).")
    commands.add_parser("worker", help="Run an arq worker for clip jobs (needs HERMES_REDIS_URL).")
    args = parser.parse_args(argv)

    if args.command == "worker":
        _run_worker()
        return
    if args.command == "settings":
        print(settings_table(), end="")
        return
    if args.command == "openapi":
        for path in write_openapi(args.out):
            print(path)
        return
    configure_logging()
    chosen = [SERVICES[args.service]] if args.service else list(SERVICES.values())
    servers = [
        _server(
            s,
            args.host,
            args.port if args.service and args.port else getattr(args, f"{s.name}_port"),
        )
        for s in chosen
    ]
    asyncio.run(_serve_all(servers))
