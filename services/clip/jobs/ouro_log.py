"""A clip job's steps and progress, written to the run's log on Ouro.

Only with ``OURO_API_KEY`` set: the key is exchanged for an access token at
``POST /users/get-token`` (as the Ouro SDK does), and lines go to
``POST /actions/{action_id}/log``. Without a key, or for direct callers (no action id),
nothing is tried. A log that cannot be written never fails the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

import httpx

from services.clip.settings import ClipSettings
from services.common.ouro import OuroHeaders

logger = logging.getLogger(__name__)
Level = Literal["info", "warning", "error"]
QUARTERS = (0.25, 0.5, 0.75)


class RunLog:
    """Queues lines in order and sends them from one background task."""

    def __init__(self, settings: ClipSettings, ouro: OuroHeaders) -> None:
        self._enabled = bool(settings.ouro_api_key and ouro.action_id)
        self._settings = settings
        self._ouro = ouro
        self._lines: asyncio.Queue[tuple[str, Level] | None] = asyncio.Queue()
        self._stage = ""
        self._quarter = 0
        self._sender: asyncio.Task[None] | None = None
        if self._enabled:
            self._sender = asyncio.create_task(self._send_all())

    def step(self, stage: str, progress: float) -> None:
        """A line when the stage changes, and one at each quarter of the way."""
        if not self._enabled:
            return
        if stage != self._stage:
            self._stage = stage
            self.note(f"{stage.capitalize()}…")
        while self._quarter < len(QUARTERS) and progress >= QUARTERS[self._quarter]:
            self.note(f"{round(QUARTERS[self._quarter] * 100)}% done")
            self._quarter += 1

    def note(self, message: str, level: Level = "info") -> None:
        if self._enabled:
            self._lines.put_nowait((message, level))

    async def aclose(self) -> None:
        """Send what is queued, within a few seconds, then stop."""
        if self._sender is None:
            return
        self._lines.put_nowait(None)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._sender), timeout=10)
        self._sender.cancel()

    async def _send_all(self) -> None:
        settings = self._settings
        base = settings.ouro_backend_url.rstrip("/")
        async with httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as http:
            token = await self._token(http)
            while (line := await self._lines.get()) is not None:
                if token is None:
                    continue
                message, level = line
                body = {"message": message, "level": level, "asset_id": self._ouro.route_id}
                try:
                    response = await http.post(
                        f"/actions/{self._ouro.action_id}/log",
                        json=body,
                        headers={"authorization": token},
                    )
                    response.raise_for_status()
                except httpx.HTTPError as exc:
                    logger.warning("could not write to the Ouro run log: %s", type(exc).__name__)

    async def _token(self, http: httpx.AsyncClient) -> str | None:
        try:
            response = await http.post(
                "/users/get-token", json={"pat": self._settings.ouro_api_key}
            )
            response.raise_for_status()
            token = response.json().get("access_token")
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("could not sign in to Ouro for run logs: %s", type(exc).__name__)
            return None
        return str(token) if token else None
