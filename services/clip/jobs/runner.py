"""Running one clip job: its own locked directory, the job time limit, and its run log on Ouro."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from services.clip.errors import ClipFailed
from services.clip.fetch.gate import SourceGate
from services.clip.jobs.model import (
    DEADLINE_PASSED,
    ClipFacts,
    DeadlineExceeded,
    JobTimeout,
    facts_of,
)
from services.clip.jobs.ouro_log import RunLog
from services.clip.pipeline import make_clip
from services.clip.request import ClipSpec
from services.clip.settings import ClipSettings
from services.common.errors import HermesError
from services.common.ouro import OuroHeaders

LOCK_FILE = ".lock"


@contextlib.contextmanager
def job_directory(root: Path, job_id: str) -> Iterator[Path]:
    """The job's own directory, locked while the job runs so a restart can tell it is alive."""
    directory = root / job_id
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_FILE).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield directory


def remove_stale_directories(root: Path, prefix: str = "", keep: Collection[str] = ()) -> list[str]:
    """Remove job directories (those whose names start with ``prefix``) no running process
    holds the lock of (dead jobs' leftovers).

    Directories named in ``keep`` (jobs whose results are kept in them) stay.
    """
    removed: list[str] = []
    if not root.exists():
        return removed
    for directory in root.glob(f"{prefix}*"):
        lock_path = directory / LOCK_FILE
        if not directory.is_dir() or directory.name in keep:
            continue
        try:
            with lock_path.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        except OSError:
            pass
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory.name)
    return removed


async def run_job(
    spec: ClipSpec,
    workdir: Path,
    settings: ClipSettings,
    report: Callable[[str, float], None],
    ouro: OuroHeaders,
    gate: SourceGate | None = None,
    runs_end_by: float | None = None,
) -> tuple[ClipFacts, Path]:
    """One run of a clip job, within the job time limit; the MP4's facts and its path.

    Its steps also go to the run's log on Ouro when an API key is configured. ``gate`` is what
    the process's jobs share when asking the source (cool-down, extraction cache).
    ``runs_end_by`` (a job's ``runs_end_by``) cuts the time limit short near the job's deadline.
    """
    limit = settings.clip_job_timeout_seconds
    if runs_end_by is not None:
        if (remaining := runs_end_by - time.time()) <= 0:
            raise DeadlineExceeded(DEADLINE_PASSED)
        limit = min(limit, remaining)
    run_log = RunLog(settings, ouro)

    def step(stage: str, progress: float) -> None:
        report(stage, progress)
        run_log.step(stage, progress)

    try:
        async with asyncio.timeout(limit):
            result = await make_clip(spec, workdir, settings, step, gate)
        facts = facts_of(spec, result)
        run_log.note(f"Clip ready: {facts.clip_duration:.2f} s, {facts.bytes} bytes.")
        return facts, result.path
    except TimeoutError as exc:
        error: ClipFailed = JobTimeout(f"The job took longer than {limit:g} s.")
        if limit < settings.clip_job_timeout_seconds:
            error = DeadlineExceeded(DEADLINE_PASSED)
        run_log.note(error.message, "error")
        raise error from exc
    except HermesError as exc:
        run_log.note(exc.message, "error")
        raise
    finally:
        await run_log.aclose()
