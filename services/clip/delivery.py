"""Delivering a finished job's webhook to Ouro: retried on network errors and 5xx only.

Any 2xx is delivered. A 4xx is final (the receiver refused it). A redirect is never followed:
it is treated as a refusal, since a webhook URL that moves is not one Ouro gave us.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any

import httpx

from services.common.errors import AddressRefused, FetchFailed
from services.common.http import GuardedClient

logger = logging.getLogger(__name__)


class WebhookSender:
    def __init__(
        self, client: GuardedClient, *, attempts: int, backoff_seconds: float, timeout: float
    ) -> None:
        self._client = client
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.timeout = timeout

    async def deliver(
        self, url: str, body: Mapping[str, Any], *, token: str | None, job_id: str
    ) -> bool:
        headers = {"content-type": "application/json", "idempotency-key": job_id}
        if token is not None:
            headers["ouro-webhook-token"] = token
        for attempt in range(1, self.attempts + 1):
            try:
                async with asyncio.timeout(self.timeout):
                    response = await self._client.post_json(url, body, headers=headers)
            except AddressRefused:
                logger.warning("webhook for job %s refused: address not allowed", job_id)
                return False
            except (httpx.HTTPError, FetchFailed, TimeoutError) as exc:
                logger.info("webhook for job %s, try %d: %s", job_id, attempt, type(exc).__name__)
            else:
                if response.is_success:
                    return True
                if response.status_code < 500:
                    logger.warning(
                        "webhook for job %s refused with HTTP %d", job_id, response.status_code
                    )
                    return False
                logger.info(
                    "webhook for job %s, try %d: HTTP %d", job_id, attempt, response.status_code
                )
            if attempt < self.attempts:
                delay = self.backoff_seconds * 2 ** (attempt - 1)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        return False
