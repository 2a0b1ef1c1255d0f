"""Delivering a finished job's webhook: one attempt, its outcome, and the retry schedule.

Any 2xx is delivered. A 4xx is final (410 in particular means the receiver no longer wants it).
A redirect is never followed and counts as a refusal: a webhook URL that moves is not one Ouro
gave us. Network errors, timeouts and 5xx are retried with exponential backoff and jitter until
the delivery window closes. Every attempt carries the same delivery id, and with a secret set,
Standard Webhooks signature headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from services.clip.settings import ClipSettings
from services.common.errors import AddressRefused, FetchFailed, HermesError
from services.common.http import GuardedClient, check_url

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    delivered = "delivered"
    refused = "refused"
    retry = "retry"


class WebhookSender:
    def __init__(
        self,
        client: GuardedClient,
        *,
        timeout: float,
        window_seconds: float,
        backoff_seconds: float,
        backoff_max_seconds: float,
        secret: str | None,
    ) -> None:
        self._client = client
        self.timeout = timeout
        self.window_seconds = window_seconds
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self._signer = Webhook(secret) if secret else None
        self.outcomes: Counter[Outcome] = Counter()

    def delay(self, attempt: int) -> float:
        """Wait before attempt ``attempt + 1``: doubling from the first backoff, with jitter."""
        base = min(self.backoff_max_seconds, self.backoff_seconds * 2.0 ** (attempt - 1))
        return base * random.uniform(0.75, 1.25)

    async def attempt(
        self, url: str, body: dict[str, Any], *, token: str | None, delivery_id: str
    ) -> Outcome:
        outcome = await self._attempt(url, body, token=token, delivery_id=delivery_id)
        self.outcomes[outcome] += 1
        return outcome

    async def _attempt(
        self, url: str, body: dict[str, Any], *, token: str | None, delivery_id: str
    ) -> Outcome:
        try:
            check_url(url)
        except HermesError as exc:
            logger.warning("webhook %s refused: %s", delivery_id, exc.message)
            return Outcome.refused
        payload = json.dumps(body, separators=(",", ":"))
        headers = {"content-type": "application/json", "webhook-id": delivery_id}
        if token is not None:
            headers["ouro-webhook-token"] = token
        if self._signer is not None:
            now = datetime.now(tz=UTC)
            headers["webhook-timestamp"] = str(int(now.timestamp()))
            headers["webhook-signature"] = self._signer.sign(delivery_id, now, payload)
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.post(url, payload.encode(), headers=headers)
        except AddressRefused:
            logger.warning("webhook %s refused: the address is not allowed", delivery_id)
            return Outcome.refused
        except (httpx.HTTPError, FetchFailed, TimeoutError) as exc:
            logger.info("webhook %s: %s", delivery_id, type(exc).__name__)
            return Outcome.retry
        if response.is_success:
            return Outcome.delivered
        logger.info("webhook %s: HTTP %d", delivery_id, response.status_code)
        return Outcome.retry if response.status_code >= 500 else Outcome.refused

    async def deliver(
        self, url: str, body: dict[str, Any], *, token: str | None, delivery_id: str
    ) -> bool:
        """Attempt until delivered, refused, or the window closes (the embedded queue's way)."""
        closes = time.monotonic() + self.window_seconds
        attempt = 1
        while True:
            outcome = await self.attempt(url, body, token=token, delivery_id=delivery_id)
            if outcome is not Outcome.retry:
                return outcome is Outcome.delivered
            wait = self.delay(attempt)
            if time.monotonic() + wait > closes:
                logger.warning("webhook %s: window closed after %d attempts", delivery_id, attempt)
                return False
            await asyncio.sleep(wait)
            attempt += 1


def webhook_client(settings: ClipSettings) -> GuardedClient:
    """The guarded client webhooks go through: no redirect is ever followed."""
    return GuardedClient(
        allow_private=settings.allow_private_networks,
        timeout=settings.webhook_timeout_seconds,
        max_redirects=0,
    )


def webhook_sender(settings: ClipSettings, client: GuardedClient) -> WebhookSender:
    return WebhookSender(
        client,
        timeout=settings.webhook_timeout_seconds,
        window_seconds=settings.webhook_window_seconds,
        backoff_seconds=settings.webhook_backoff_seconds,
        backoff_max_seconds=settings.webhook_backoff_max_seconds,
        secret=settings.webhook_secret,
    )
