"""Delivering a finished job's webhook: one attempt, its outcome, and the retry schedule.

Any 2xx is delivered. A 4xx is final (410 in particular means the receiver no longer wants it).
A redirect is never followed and counts as a refusal: a webhook URL that moves is not one Ouro
gave us. Network errors, timeouts and 5xx are retried with exponential backoff and jitter until
the delivery window closes. Every attempt carries the same delivery id, and with a secret set,
Standard Webhooks signature headers.

A body is a ``Payload``: JSON around an optional file that is base64-encoded as it is read, so
a large result is never whole in memory. With a secret, a first pass over the body computes
the signature and a second one sends it, with its length known in advance.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from services.clip.jobs.storage import StorageUnavailable
from services.clip.settings import ClipSettings
from services.common.errors import AddressRefused, FetchFailed, HermesError
from services.common.http import GuardedClient, check_url

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    delivered = "delivered"
    refused = "refused"
    retry = "retry"


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def base64_chunks(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Base64 of the concatenated chunks, a chunk at a time: pieces are cut at multiples of 3."""
    rest = b""
    async for chunk in chunks:
        data = rest + chunk
        cut = len(data) - len(data) % 3
        rest = data[cut:]
        if cut:
            yield base64.b64encode(data[:cut])
    if rest:
        yield base64.b64encode(rest)


@dataclass(frozen=True)
class Payload:
    """A webhook body: ``head``, then the file's bytes as base64 if there is one, then ``tail``."""

    head: bytes
    tail: bytes = b""
    file: Callable[[], AsyncIterator[bytes]] | None = None
    file_size: int = 0

    @classmethod
    def of(cls, body: Any) -> Payload:
        return cls(head=compact_json(body))

    @classmethod
    def around(
        cls,
        build: Callable[[str], Any],
        file: Callable[[], AsyncIterator[bytes]],
        file_size: int,
    ) -> Payload:
        """The JSON ``build(marker)`` makes, its ``marker`` string replaced by the file's base64.

        The marker is random, so no user-given text in the body can contain it.
        """
        marker = f"hermes-file-{uuid.uuid4().hex}"
        head, found, tail = compact_json(build(marker)).partition(marker.encode())
        assert found, "the body must hold the marker"
        assert marker.encode() not in tail, "the body must hold the marker once"
        return cls(head=head, tail=tail, file=file, file_size=file_size)

    @property
    def length(self) -> int:
        return len(self.head) + 4 * -(-self.file_size // 3) + len(self.tail)

    async def parts(self) -> AsyncIterator[bytes]:
        yield self.head
        if self.file is not None:
            async for piece in base64_chunks(self.file()):
                yield piece
        yield self.tail


class StreamSigner:
    """Standard Webhooks signatures (HMAC-SHA256 of ``id.timestamp.body``) over a streamed body."""

    def __init__(self, secret: str) -> None:
        self._key = base64.b64decode(secret.removeprefix("whsec_"))

    async def sign(self, delivery_id: str, timestamp: int, payload: Payload) -> str:
        mac = hmac.new(self._key, f"{delivery_id}.{timestamp}.".encode(), hashlib.sha256)
        async for part in payload.parts():
            mac.update(part)
        return "v1," + base64.b64encode(mac.digest()).decode()


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
        self._signer = StreamSigner(secret) if secret else None
        self.outcomes: Counter[Outcome] = Counter()

    def delay(self, attempt: int) -> float:
        """Wait before attempt ``attempt + 1``: doubling from the first backoff, with jitter."""
        base = min(self.backoff_max_seconds, self.backoff_seconds * 2.0 ** (attempt - 1))
        return base * random.uniform(0.75, 1.25)

    async def attempt(
        self, url: str, body: Payload, *, token: str | None, delivery_id: str
    ) -> Outcome:
        outcome = await self._attempt(url, body, token=token, delivery_id=delivery_id)
        self.outcomes[outcome] += 1
        return outcome

    async def _attempt(
        self, url: str, body: Payload, *, token: str | None, delivery_id: str
    ) -> Outcome:
        try:
            check_url(url)
        except HermesError as exc:
            logger.warning("webhook %s refused: %s", delivery_id, exc.message)
            return Outcome.refused
        headers = {
            "content-type": "application/json",
            "content-length": str(body.length),
            "webhook-id": delivery_id,
        }
        if token is not None:
            headers["ouro-webhook-token"] = token
        try:
            if self._signer is not None:
                now = int(time.time())
                headers["webhook-timestamp"] = str(now)
                headers["webhook-signature"] = await self._signer.sign(delivery_id, now, body)
            async with asyncio.timeout(self.timeout):
                response = await self._client.post(url, body.parts(), headers=headers)
        except AddressRefused:
            logger.warning("webhook %s refused: the address is not allowed", delivery_id)
            return Outcome.refused
        except (httpx.HTTPError, FetchFailed, TimeoutError, StorageUnavailable) as exc:
            logger.info("webhook %s: %s", delivery_id, type(exc).__name__)
            return Outcome.retry
        if response.is_success:
            return Outcome.delivered
        logger.info("webhook %s: HTTP %d", delivery_id, response.status_code)
        return Outcome.retry if response.status_code >= 500 else Outcome.refused

    async def deliver(
        self,
        url: str,
        body: Payload,
        *,
        token: str | None,
        delivery_id: str,
        ends_by: float | None = None,
    ) -> bool:
        """Attempt until delivered, refused, or the window closes (the embedded queue's way).

        ``ends_by`` (wall-clock time, the job's ``deliveries_end_by``) closes the window sooner.
        """
        window = self.window_seconds
        if ends_by is not None:
            window = min(window, ends_by - time.time())
            if window <= 0:
                logger.warning("webhook %s: past the job's deadline, not sent", delivery_id)
                return False
        closes = time.monotonic() + window
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
