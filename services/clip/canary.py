"""The canary: one real clip of a known video, timed step by step, so an operator learns that
YouTube broke before users do.

It starts past the first minute, since YouTube serves a client that lacks a PO token about a
minute of media and then refuses it (403). ``hermes-media doctor --canary URL`` runs it once;
with ``HERMES_CLIP_CANARY_URL`` the service runs it every ``HERMES_CLIP_CANARY_INTERVAL_SECONDS``
and exports the last result at /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable

from pydantic import BaseModel, Field

from services.clip.fetch.gate import SourceGate
from services.clip.jobs.model import new_job_id
from services.clip.jobs.runner import job_directory, run_job
from services.clip.request import build_spec, byte_budget
from services.clip.settings import ClipSettings
from services.common.errors import HermesError
from services.common.ouro import OuroHeaders

logger = logging.getLogger(__name__)
CANARY_START = 61.0
CANARY_SECONDS = 3.0


class CanaryResult(BaseModel):
    ok: bool
    finished_at: float = Field(description="Unix time the run ended.")
    seconds: float = Field(description="Whole run, seconds.")
    steps: dict[str, float] = Field(description="Seconds spent in each stage, in order.")
    error: str | None = Field(default=None, description="The failure's stable code.")
    message: str | None = None
    clip_bytes: int | None = None


class _StepTimer:
    """Seconds spent in each stage, from the job's progress reports."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self._stage: str | None = None
        self._since = time.monotonic()

    def __call__(self, stage: str, progress: float) -> None:
        if stage != self._stage:
            self._close()
            self._stage = stage

    def _close(self) -> None:
        now = time.monotonic()
        if self._stage is not None and self._stage != "done":
            self.steps[self._stage] = round(self.steps.get(self._stage, 0) + now - self._since, 3)
        self._since = now

    def finish(self) -> dict[str, float]:
        self._close()
        return self.steps


async def run_canary(
    url: str, settings: ClipSettings, gate: SourceGate | None = None
) -> CanaryResult:
    """One clip from ``CANARY_START``, as a job runs it; never raises for the job's failures."""
    started = time.monotonic()
    timer = _StepTimer()
    error: HermesError | None = None
    size = None
    try:
        spec = build_spec(
            youtube_url=url,
            start_time=f"{CANARY_START:g}",
            end_time=f"{CANARY_START + CANARY_SECONDS:g}",
            name="canary",
            extra_hosts=settings.clip_extra_source_hosts,
            max_seconds=settings.clip_max_seconds,
            max_name_length=settings.clip_name_max_length,
            max_bytes=byte_budget(settings, webhook=True),
        )
        with job_directory(settings.clip_work_dir, new_job_id()) as workdir:
            try:
                facts, _ = await run_job(spec, workdir, settings, timer, OuroHeaders(), gate)
                size = facts.bytes
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    except HermesError as exc:
        error = exc
    return CanaryResult(
        ok=error is None,
        finished_at=time.time(),
        seconds=round(time.monotonic() - started, 3),
        steps=timer.finish(),
        error=error.code if error else None,
        message=error.message if error else None,
        clip_bytes=size,
    )


async def run_periodically(
    settings: ClipSettings, gate: SourceGate, on_result: Callable[[CanaryResult], None]
) -> None:
    """Run the canary now and then every interval, until cancelled."""
    assert settings.clip_canary_url is not None
    while True:
        try:
            result = await run_canary(settings.clip_canary_url, settings, gate)
        except Exception:
            logger.exception("the canary could not run")
        else:
            level = logging.INFO if result.ok else logging.WARNING
            logger.log(level, "canary: %s in %.1f s %s", result.error or "ok", result.seconds,
                       result.steps)  # fmt: skip
            on_result(result)
        await asyncio.sleep(settings.clip_canary_interval_seconds)
