"""Asking a source for a video's facts without hammering it: a cool-down and a cache.

When a source rate-limits (``rate_limited``), no request goes to it from the same egress
address for ``HERMES_YOUTUBE_COOLDOWN_SECONDS``: new jobs fail at once with ``rate_limited`` and
a Retry-After, instead of making it worse. The cool-down lives in this process (``LocalCooldown``)
or in Redis, shared by every worker of the deployment (``RedisCooldown``).

A video's extraction is reused for ``HERMES_YTDLP_EXTRACTION_CACHE_SECONDS`` by the same
process: YouTube binds its media URLs to the address that asked, so a cache is only valid where
it was filled. Concurrent jobs for one video wait for one extraction.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.clip.errors import RateLimited
from services.clip.fetch.source import VideoInfo, extract, ydl_options
from services.clip.request import SourceUrl
from services.clip.settings import ClipSettings

CACHE_ENTRIES = 256


class CoolingDown(RateLimited):
    """A job refused without asking the source, during a cool-down: retrying it soon is futile,
    so it is not transient; the message says when to try again."""

    transient = False


class Cooldown(Protocol):
    async def remaining(self, key: str) -> float:
        """Seconds left of the cool-down of ``key``; 0 when there is none."""
        ...

    async def begin(self, key: str, seconds: float) -> None: ...


@dataclass
class LocalCooldown:
    """Cool-downs of this process only."""

    _until: dict[str, float] = field(default_factory=dict)

    async def remaining(self, key: str) -> float:
        return max(0.0, self._until.get(key, 0.0) - time.monotonic())

    async def begin(self, key: str, seconds: float) -> None:
        self._until[key] = max(self._until.get(key, 0.0), time.monotonic() + seconds)


@dataclass
class RedisCooldown:
    """Cool-downs shared by every worker on one Redis, as keys that expire when they end."""

    redis: Redis
    prefix: str

    async def remaining(self, key: str) -> float:
        try:
            left = int(await self.redis.pttl(f"{self.prefix}:{key}"))
        except (RedisError, OSError):
            return 0.0
        return left / 1000 if left > 0 else 0.0

    async def begin(self, key: str, seconds: float) -> None:
        if seconds > await self.remaining(key):
            await self.redis.set(f"{self.prefix}:{key}", b"1", px=max(1, int(seconds * 1000)))


@dataclass
class ExtractionCache:
    """Extractions by source URL, for ``seconds``; the oldest go past ``CACHE_ENTRIES``."""

    seconds: float
    _entries: OrderedDict[str, tuple[float, VideoInfo]] = field(default_factory=OrderedDict)
    _pending: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def get(
        self, key: str, make: Callable[[], Awaitable[VideoInfo]], *, fresh: bool = False
    ) -> VideoInfo:
        if self.seconds <= 0:
            return await make()
        lock = self._pending.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                found = self._entries.get(key)
                if found is not None and not fresh and time.monotonic() < found[0]:
                    return found[1]
                info = await make()
                self._entries[key] = (time.monotonic() + self.seconds, info)
                self._entries.move_to_end(key)
                while len(self._entries) > CACHE_ENTRIES:
                    self._entries.popitem(last=False)
                return info
        finally:
            if not lock.locked() and self._pending.get(key) is lock:
                del self._pending[key]


def cooldown_key(settings: ClipSettings, source: SourceUrl) -> str:
    """The egress address (the operator's proxy, or this host's own) and the source's host.

    Without a proxy, every worker of a deployment is taken to leave from one address (one NAT);
    a proxy's URL is hashed, since it may carry credentials.
    """
    proxy = settings.ytdlp_proxy
    egress = hashlib.sha256(proxy.encode()).hexdigest()[:16] if proxy else "direct"
    host = "youtube" if source.is_youtube else (urlsplit(source.url).netloc or "unknown")
    return f"{egress}:{host}"


@dataclass
class SourceGate:
    """What a process shares between clip jobs when reading a video's facts."""

    cooldown: Cooldown
    cache: ExtractionCache

    @classmethod
    def local(cls, settings: ClipSettings) -> SourceGate:
        return cls(LocalCooldown(), ExtractionCache(settings.ytdlp_extraction_cache_seconds))

    async def retry_after(self, settings: ClipSettings, source: SourceUrl) -> float:
        """Seconds until the source may be asked again from this egress address."""
        return await self.cooldown.remaining(cooldown_key(settings, source))

    async def extract(
        self, source: SourceUrl, settings: ClipSettings, proxy: str, *, fresh: bool = False
    ) -> VideoInfo:
        """The video's facts, from the cache unless ``fresh``. Raises ``ClipFailed``."""
        key = cooldown_key(settings, source)
        if (left := await self.cooldown.remaining(key)) > 0:
            wait = math.ceil(left)
            raise CoolingDown(
                "The video source rate-limited this service's address; no request is made to "
                f"it for another {wait} s (Retry-After: {wait})."
            )
        options = ydl_options(source, settings, proxy)
        try:
            return await self.cache.get(
                source.url, lambda: asyncio.to_thread(extract, source, options), fresh=fresh
            )
        except RateLimited:
            if settings.youtube_cooldown_seconds > 0:
                await self.cooldown.begin(key, settings.youtube_cooldown_seconds)
            raise
