"""The ``hermes-media`` command: serve the routes, write the OpenAPI specs, compress images and
cut clips without a server, and register the services on Ouro."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypeAlias
from urllib.parse import urlsplit

import httpx
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from services.clip.app import create_app as create_clip_app
from services.clip.canary import CANARY_SECONDS, CANARY_START, CanaryResult, run_canary
from services.clip.fetch.gate import SourceGate
from services.clip.fetch.source import extractor_args
from services.clip.jobs.distributed.worker import run_worker
from services.clip.jobs.model import ClipFacts, new_job_id
from services.clip.jobs.runner import job_directory, run_job
from services.clip.request import ClipSpec, build_spec, byte_budget
from services.clip.settings import ClipSettings
from services.clip.toolchain import POT_PLUGIN, YT_DLP_VERSION, Check, youtube_toolchain
from services.common.errors import HermesError, PayloadTooLarge
from services.common.observability import configure_logging
from services.common.ouro import OuroHeaders
from services.common.settings import CommonSettings
from services.compress.app import create_app as create_compress_app
from services.compress.codecs import DEFAULT_QUALITY, Limits
from services.compress.formats import ACCEPTED_EXTENSIONS
from services.compress.pool import CodecPool
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


def _one_line(error: ValidationError) -> str:
    """A settings error as one line: what each failed check says."""
    return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in error.errors())


def _run_worker() -> None:
    try:
        settings = ClipSettings()
    except ValidationError as exc:
        raise SystemExit(f"hermes-media worker: {_one_line(exc)}") from None
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
            aliases = getattr(field.validation_alias, "choices", None)
            env = f"`{aliases[0]}`" if aliases else f"`HERMES_{name.upper()}`"
            rows.append(f"| {env} | {owner} | {shown} | {field.description} |")
    return "\n".join(rows) + "\n"


class CommandError(Exception):
    """A command cannot go on; the message says why in one line."""


def _error(command: str, message: str) -> None:
    print(f"hermes-media {command}: {message}", file=sys.stderr)


def write_atomically(target: Path, data: bytes, *, mode_of: Path | None = None) -> None:
    """Write ``target`` whole or not at all (it may be the input being replaced), with the
    permissions of ``mode_of`` when given."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("xb") as f:
            f.write(data)
        if mode_of is not None:
            shutil.copymode(mode_of, temporary)
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


# compress

IMAGE_SUFFIXES = frozenset(f".{extension}" for extension in ACCEPTED_EXTENSIONS)


@dataclass(frozen=True)
class CompressJob:
    source: Path
    target: Path
    label: str


def compress_jobs(path: Path, output: Path | None, *, recursive: bool) -> list[CompressJob]:
    """What to read and where to write: a file's output, or a folder's images mirrored in
    ``output``. Hidden files and folders are skipped, and so is ``output`` inside ``path``."""
    if path.is_file():
        if output is None:
            target = path.with_name(f"{path.stem}.min{path.suffix}")
        elif output.is_dir():
            target = output / path.name
        else:
            target = output
        return [CompressJob(path, target, path.name)]
    if not path.is_dir():
        raise CommandError(f"{path}: no such file or folder")
    if output is None:
        raise CommandError(f"{path} is a folder: give -o OUT, the folder to write the images to")
    if output.exists() and not output.is_dir():
        raise CommandError(f"{output} is not a folder")
    root, out = path.resolve(), output.resolve()
    skip_out = out != root and out.is_relative_to(root)
    jobs = []
    for source in sorted(path.rglob("*") if recursive else path.iterdir()):
        relative = source.relative_to(path)
        if (
            source.suffix.lower() not in IMAGE_SUFFIXES
            or any(part.startswith(".") for part in relative.parts)
            or (skip_out and source.resolve().is_relative_to(out))
            or not source.is_file()
        ):
            continue
        jobs.append(CompressJob(source, output / relative, str(relative)))
    if not jobs:
        raise CommandError(f"{path} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return jobs


@dataclass(frozen=True)
class CompressOutcome:
    job: CompressJob
    original_bytes: int
    new_bytes: int
    compressed: bool

    def line(self) -> str:
        if not self.compressed:
            return f"{self.job.label}: {self.original_bytes} bytes, kept (not smaller)"
        return f"{self.job.label}: {_sizes(self.original_bytes, self.new_bytes)}"


def _sizes(before: int, after: int) -> str:
    return f"{before} -> {after} bytes ({after / before:.1%})"


def _read_image(path: Path, max_bytes: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"The file is larger than the limit of {max_bytes} bytes.")
    return data


async def compress_all(
    jobs: Sequence[CompressJob],
    *,
    quality: int,
    strip_metadata: bool,
    keep_location: bool,
    settings: CompressSettings,
) -> list[CompressOutcome | None]:
    """Compress every job in the codec pool, printing each line as it finishes; ``None`` for
    each job that failed (its reason is on stderr)."""
    limits = Limits(
        max_pixels=settings.compress_max_pixels, max_frames=settings.compress_max_frames
    )
    pool = CodecPool(min(settings.compress_workers or os.cpu_count() or 1, len(jobs)))
    # Holding at most one input per worker in memory, however large the folder.
    slots = asyncio.Semaphore(pool.workers)

    async def one(job: CompressJob) -> CompressOutcome | None:
        async with slots:
            try:
                data = await asyncio.to_thread(
                    _read_image, job.source, settings.compress_max_input_bytes
                )
                result = await pool.compress(
                    data,
                    quality=quality,
                    strip_metadata=strip_metadata,
                    keep_location=keep_location,
                    limits=limits,
                )
                if result.compressed or job.target.resolve() != job.source.resolve():
                    await asyncio.to_thread(
                        write_atomically, job.target, result.data, mode_of=job.source
                    )
                outcome = CompressOutcome(job, len(data), len(result.data), result.compressed)
            except HermesError as exc:
                _error("compress", f"{job.label}: {exc.code}: {exc.message}")
                return None
            except OSError as exc:
                _error("compress", f"{job.label}: {_os_reason(exc)}")
                return None
        print(outcome.line(), flush=True)
        return outcome

    try:
        return await asyncio.gather(*(one(job) for job in jobs))
    finally:
        pool.close()


def _compress(args: argparse.Namespace) -> int:
    try:
        jobs = compress_jobs(args.path, args.output, recursive=args.recursive)
    except CommandError as exc:
        _error("compress", str(exc))
        return 1
    outcomes = asyncio.run(
        compress_all(
            jobs,
            quality=args.quality,
            strip_metadata=args.strip_metadata,
            keep_location=args.keep_location,
            settings=CompressSettings(),
        )
    )
    done = [o for o in outcomes if o is not None]
    failed = len(outcomes) - len(done)
    if args.path.is_dir():
        before = sum(o.original_bytes for o in done)
        after = sum(o.new_bytes for o in done)
        total = f"{len(done)} images: {_sizes(before, after)}" if done else "no images written"
        print(total + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def _quality(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"quality must be a whole number from 1 to 100: {text!r}")
    return value


# clip


class ProgressBar:
    """The job's stage and percent on a stream: one line redrawn in place on a terminal, and
    a line per stage otherwise (so logs stay readable)."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._interactive = stream.isatty()
        self._stage: str | None = None
        self._percent = 0

    def __call__(self, stage: str, progress: float) -> None:
        percent = max(self._percent, min(100, int(progress * 100)))
        if (stage, percent) == (self._stage, self._percent):
            return
        if self._interactive:
            filled = self.WIDTH * percent // 100
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self._stream.write(f"\r[{bar}] {percent:3d}% {stage:<20}")
        elif stage != self._stage:
            self._stream.write(f"{stage} ({percent}%)\n")
        self._stage, self._percent = stage, percent
        self._stream.flush()

    def close(self) -> None:
        """End the redrawn line, so what follows starts on its own."""
        if self._interactive and self._stage is not None:
            self._stream.write("\n")
            self._stream.flush()


async def make_clip(
    spec: ClipSpec,
    settings: ClipSettings,
    report: Callable[[str, float], None],
    gate: SourceGate | None = None,
) -> tuple[ClipFacts, bytes]:
    """The service's job, run here: in its own directory, removed however the job ends."""
    with job_directory(settings.clip_work_dir, new_job_id()) as workdir:
        try:
            facts, clip = await run_job(spec, workdir, settings, report, OuroHeaders(), gate)
            return facts, await asyncio.to_thread(clip.read_bytes)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def timecode(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS``, with milliseconds when there are any (``1:02.5``)."""
    whole, millis = divmod(round(seconds * 1000), 1000)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return f"{text}.{millis:03d}".rstrip("0") if millis else text


def _clip(args: argparse.Namespace) -> int:
    settings = ClipSettings()
    bar = ProgressBar(sys.stderr)
    try:
        spec = build_spec(
            youtube_url=args.url,
            start_time=args.start,
            end_time=args.end,
            name=args.name,
            extra_hosts=settings.clip_extra_source_hosts,
            max_seconds=settings.clip_max_seconds,
            max_name_length=settings.clip_name_max_length,
            max_bytes=byte_budget(settings, webhook=False),
        )
        try:
            facts, data = asyncio.run(make_clip(spec, settings, bar))
        finally:
            bar.close()
        target: Path = args.output or Path(facts.filename)
        if target.is_dir():
            target /= facts.filename
        write_atomically(target, data)
    except HermesError as exc:
        _error("clip", f"{exc.code}: {exc.message}")
        return 1
    except OSError as exc:
        _error("clip", _os_reason(exc))
        return 1
    except KeyboardInterrupt:
        _error("clip", "cancelled")
        return 130
    print(
        f"saved {target}: {facts.bytes} bytes, {facts.clip_duration:.3f} s "
        f"({timecode(facts.start)} to {timecode(facts.end)} of {facts.title!r}), "
        f"{facts.width}x{facts.height}, {facts.cut} cut"
    )
    return 0


# doctor


def doctor_lines(settings: ClipSettings) -> tuple[list[str], bool]:
    """What the YouTube toolchain is, check by check, and whether every check passes."""
    checks = youtube_toolchain(settings)
    if settings.ytdlp_pot_provider_url:
        checks.append(pot_server(settings.ytdlp_pot_provider_url))
    lines = [f"{'yt_dlp':<12} ok    {YT_DLP_VERSION}"]
    lines += [f"{c.name:<12} {'ok' if c.ok else 'FAIL':<5} {c.detail}" for c in checks]
    for key, values in extractor_args(settings).items():
        shown = ";".join(f"{k}={','.join(v)}" for k, v in values.items())
        lines.append(f"{'extractor':<12} {'':<5} {key}:{shown}")
    return lines, all(c.ok for c in checks)


def pot_server(base_url: str) -> Check:
    """The PO-token provider answers, at the plugin's version (the two must match)."""
    try:
        answer = httpx.get(f"{base_url.rstrip('/')}/ping", timeout=5)
        answer.raise_for_status()
        version = str(answer.json().get("version", ""))
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return Check("pot_server", False, f"{base_url}/ping: {type(exc).__name__}: {exc}")
    try:
        plugin = importlib.metadata.version(POT_PLUGIN)
    except importlib.metadata.PackageNotFoundError:
        plugin = "not installed"
    if version != plugin:
        return Check("pot_server", False, f"{base_url}: server {version}, plugin {plugin}")
    return Check("pot_server", True, f"{base_url}: server {version}, same as the plugin")


def canary_line(url: str, result: CanaryResult) -> str:
    steps = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.steps.items())
    if result.ok:
        return f"canary {url}: ok in {result.seconds:.2f} s ({steps}), {result.clip_bytes} bytes"
    return f"canary {url}: {result.error} after {result.seconds:.2f} s ({steps}): {result.message}"


def _doctor(args: argparse.Namespace) -> int:
    settings = ClipSettings()
    lines, ok = doctor_lines(settings)
    print("\n".join(lines), flush=True)
    if args.canary:
        result = asyncio.run(run_canary(args.canary, settings))
        print(canary_line(args.canary, result))
        ok = ok and result.ok
    return 0 if ok else 1


# register


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text.rstrip("/")


def _register(args: argparse.Namespace) -> int:
    try:
        from services import register
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "ouro":
            raise
        _error("register", "needs the Ouro SDK: pip install 'hermes-media[ouro]'")
        return 1
    wanted = register.targets(
        args.clip_url or f"{args.base_url}/clip", args.compress_url or f"{args.base_url}/compress"
    )
    try:
        registered = register.run(wanted, args.auth_secret)
    except register.RegisterError as exc:
        _error("register", str(exc))
        return 1
    for one in registered:
        print("\n".join(register.describe(one)))
    return 0


Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_compress(commands: Subcommands) -> None:
    compress = commands.add_parser(
        "compress",
        help="Compress an image, or the images in a folder, each in its own format.",
        description=(
            "Compress an image, or every image in a folder, as the compress-an-image route "
            "does (same encoders, same limits). An image that does not get smaller is kept "
            "as it is. The exit status is 1 when any image failed."
        ),
    )
    compress.add_argument("path", type=Path, metavar="PATH", help="An image file or a folder.")
    compress.add_argument(
        "-q",
        "--quality",
        type=_quality,
        default=DEFAULT_QUALITY,
        help=f"1 to 100, higher is better (default {DEFAULT_QUALITY}); per format, see README.",
    )
    compress.add_argument(
        "--strip-metadata",
        action="store_true",
        help="Drop EXIF, XMP and comments (the ICC profile and the orientation stay).",
    )
    compress.add_argument(
        "--keep-location",
        action="store_true",
        help="Keep the GPS coordinates in EXIF and XMP (removed by default).",
    )
    compress.add_argument(
        "-r", "--recursive", action="store_true", help="With a folder, its subfolders too."
    )
    compress.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT",
        help=(
            "For a file: the file to write, or a folder to write it into (default: "
            "<stem>.min<ext> beside it). For a folder (required): the folder to write the "
            "images to, made if needed, with the same names. The input is replaced only "
            "when OUT is the input itself."
        ),
    )


def _add_clip(commands: Subcommands) -> None:
    clip = commands.add_parser(
        "clip",
        help="Cut a frame-exact MP4 clip from a YouTube video, without a server.",
        description=(
            "Run the download-a-clip-from-youtube job here: the same checks, pipeline and "
            "HERMES_ settings as the service. Progress goes to stderr; errors are one line "
            "with the route's error code, and exit status 1."
        ),
    )
    clip.add_argument("url", metavar="URL", help="A YouTube video link or an 11-character id.")
    clip.add_argument(
        "--start", required=True, help="Start time: HH:MM:SS, MM:SS or seconds (1:02.5)."
    )
    clip.add_argument("--end", required=True, help="End time, in the same forms.")
    clip.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT",
        help="The MP4 to write, or a folder (default: <name or title>.mp4 here).",
    )
    clip.add_argument("--name", help="The clip's name (default: the video's title).")


def _add_doctor(commands: Subcommands) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="Check this machine's YouTube toolchain; with --canary, clip a real video.",
        description=(
            "Print the YouTube toolchain yt-dlp uses here (JavaScript runtime, yt-dlp-ejs, "
            "cookies, PO-token provider, extractor arguments) with the versions found, as the "
            "service's readiness checks them. Exit status 1 when a check fails."
        ),
    )
    doctor.add_argument(
        "--canary",
        metavar="URL",
        help=(
            f"Also clip {CANARY_SECONDS:g} s of this video from {CANARY_START:g} s in (past "
            "the first minute, where YouTube refuses clients without a PO token) and print "
            "what each step took."
        ),
    )


def _add_register(commands: Subcommands) -> argparse.ArgumentParser:
    register = commands.add_parser(
        "register",
        help="Create or refresh both services on Ouro (needs the ouro extra and OURO_API_KEY).",
        description=(
            "Create both services on Ouro from their OpenAPI specs (<service URL>/openapi.json), "
            "or refresh those already there under the same name: Ouro reads the spec again "
            "and syncs the routes. Authenticates with OURO_API_KEY against OURO_BACKEND_URL "
            "(Ouro's API by default)."
        ),
    )
    register.add_argument(
        "--base-url",
        type=_http_url,
        metavar="URL",
        help="Public URL the services are under, clip at URL/clip and compress at URL/compress.",
    )
    register.add_argument(
        "--clip-url", type=_http_url, metavar="URL", help="Public URL of the clip service."
    )
    register.add_argument(
        "--compress-url", type=_http_url, metavar="URL", help="Public URL of the compress service."
    )
    register.add_argument(
        "--auth-secret",
        metavar="S",
        default=os.environ.get("HERMES_OURO_SERVICE_SECRET") or None,
        help=(
            "Turn on Ouro authentication and store this secret on Ouro; the services must run "
            "with the same HERMES_OURO_SERVICE_SECRET (the default)."
        ),
    )
    return register


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
    _add_compress(commands)
    _add_clip(commands)
    _add_doctor(commands)
    register = _add_register(commands)
    args = parser.parse_args(argv)

    if args.command == "register" and not (args.base_url or (args.clip_url and args.compress_url)):
        register.error("give --base-url, or both --clip-url and --compress-url")
    command = {
        "compress": _compress,
        "clip": _clip,
        "doctor": _doctor,
        "register": _register,
    }.get(args.command)
    if command is not None:
        code = command(args)
        if code:
            raise SystemExit(code)
        return
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
    try:
        servers = [
            _server(
                s,
                args.host,
                args.port if args.service and args.port else getattr(args, f"{s.name}_port"),
            )
            for s in chosen
        ]
    except ValidationError as exc:
        raise SystemExit(f"hermes-media serve: {_one_line(exc)}") from None
    asyncio.run(_serve_all(servers))
