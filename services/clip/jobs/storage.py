"""Where finished clips are kept: one small interface, three places, nothing read whole.

- ``LocalStore``: a directory; the embedded default is each job's own directory under the work
  directory (a result stays where it was made). Downloads are streamed from the file.
- ``S3Store``: an S3-compatible bucket (AWS, MinIO, R2, Ceph) through boto3, run in threads;
  uploads are multipart past one part, downloads are presigned URLs. boto3 was chosen by
  measurement (docs/benchmarks-storage.md): the lowest peak memory while uploading and
  streaming of the three candidates, at the same speed.
- ``RedisStore``: distributed mode without object storage, as before, but capped: a larger
  result fails with ``output_too_large`` naming the setting. Written and read in chunks.

A result is keyed by its job id. ``put`` consumes the file it is given (moved or deleted).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from services.clip.errors import OutputTooLarge
from services.clip.settings import ClipSettings
from services.common.errors import Unavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

CLIP_FILE = "clip.mp4"
CHUNK = 1024 * 1024
# Multipart part size and parts in flight: an upload holds at most about their product.
PART = 8 * 1024 * 1024
PARTS_AT_ONCE = 2
MIME = "video/mp4"
REDIS_CAP_SETTING = "HERMES_CLIP_REDIS_RESULT_MAX_BYTES"


class StorageUnavailable(Unavailable):
    code = "storage_unavailable"


def content_disposition(filename: str) -> str:
    """``safe_filename`` names are ASCII letters, digits, ``-_.`` and spaces: quoting suffices."""
    return f'attachment; filename="{filename}"'


class ResultStore(Protocol):
    async def put(self, job_id: str, source: Path, filename: str) -> None:
        """Keep the file at ``source`` as the job's result; ``source`` is gone afterwards."""
        ...

    async def size(self, job_id: str) -> int | None:
        """The stored result's size, or None when there is none."""
        ...

    def chunks(self, job_id: str) -> AsyncIterator[bytes]:
        """The stored result, a chunk at a time."""
        ...

    async def presign(self, job_id: str, expires_in: float) -> str | None:
        """A URL callers can GET the result from for ``expires_in`` s; None: stream it."""
        ...

    async def delete(self, job_id: str) -> None: ...

    async def ping(self) -> bool: ...


@dataclass(frozen=True)
class LocalStore:
    root: Path

    def path(self, job_id: str) -> Path:
        return self.root / job_id / CLIP_FILE

    async def put(self, job_id: str, source: Path, filename: str) -> None:
        target = self.path(job_id)
        if source != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            await asyncio.to_thread(shutil.move, source, partial)
            partial.replace(target)

    async def size(self, job_id: str) -> int | None:
        try:
            return self.path(job_id).stat().st_size
        except FileNotFoundError:
            return None

    async def chunks(self, job_id: str) -> AsyncIterator[bytes]:
        with self.path(job_id).open("rb") as file:
            while chunk := await asyncio.to_thread(file.read, CHUNK):
                yield chunk

    async def presign(self, job_id: str, expires_in: float) -> str | None:
        return None

    async def delete(self, job_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.root / job_id, True)

    async def ping(self) -> bool:
        return os.access(self.root, os.W_OK) or not self.root.exists()


class S3Store:
    """A bucket and key prefix; one boto3 client, plus one that signs for the public endpoint."""

    def __init__(self, bucket: str, prefix: str, public_endpoint: str | None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        # MinIO and most S3-compatible stores answer on one host: path-style addressing.
        style = "path" if endpoint or public_endpoint else "auto"
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": style},
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=20,
        )
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._client: Any = boto3.client(
            "s3", endpoint_url=endpoint, region_name=region, config=config
        )
        self._signer: Any = (
            boto3.client("s3", endpoint_url=public_endpoint, region_name=region, config=config)
            if public_endpoint
            else self._client
        )
        self._transfer = TransferConfig(
            multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=PARTS_AT_ONCE
        )

    def key(self, job_id: str) -> str:
        name = f"{job_id}.mp4"
        return f"{self.prefix}/{name}" if self.prefix else name

    async def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(getattr(self._client, method), **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(kwargs.get("Key")) from exc
            raise StorageUnavailable(f"The object store refused the request: {exc}.") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"The object store is unreachable: {exc}.") from exc

    async def put(self, job_id: str, source: Path, filename: str) -> None:
        extra = {"ContentType": MIME, "ContentDisposition": content_disposition(filename)}
        await self._call(
            "upload_file", Filename=str(source), Bucket=self.bucket, Key=self.key(job_id),
            ExtraArgs=extra, Config=self._transfer,
        )  # fmt: skip
        await asyncio.to_thread(source.unlink)

    async def size(self, job_id: str) -> int | None:
        try:
            head = await self._call("head_object", Bucket=self.bucket, Key=self.key(job_id))
        except FileNotFoundError:
            return None
        return int(head["ContentLength"])

    async def chunks(self, job_id: str) -> AsyncIterator[bytes]:
        answer = await self._call("get_object", Bucket=self.bucket, Key=self.key(job_id))
        body = answer["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, CHUNK):
                yield chunk
        except BotoCoreError as exc:
            raise StorageUnavailable(f"The object store stopped sending: {exc}.") from exc
        finally:
            body.close()

    async def presign(self, job_id: str, expires_in: float) -> str | None:
        params = {"Bucket": self.bucket, "Key": self.key(job_id)}
        url: str = self._signer.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=max(1, int(expires_in))
        )
        return url

    async def delete(self, job_id: str) -> None:
        await self._call("delete_object", Bucket=self.bucket, Key=self.key(job_id))

    async def ping(self) -> bool:
        try:
            await self._call("head_bucket", Bucket=self.bucket)
        except (StorageUnavailable, FileNotFoundError):
            return False
        return True


@dataclass(frozen=True)
class RedisStore:
    """Results as Redis strings, written with APPEND to a side key and renamed when whole."""

    redis: Redis
    prefix: str
    max_bytes: int
    ttl_seconds: int

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:file:{job_id}"

    async def put(self, job_id: str, source: Path, filename: str) -> None:
        size = (await asyncio.to_thread(source.stat)).st_size
        if size > self.max_bytes:
            await asyncio.to_thread(source.unlink)
            raise OutputTooLarge(
                f"The clip is {size} bytes, over {REDIS_CAP_SETTING} ({self.max_bytes}) for "
                "results kept in Redis; choose a shorter range, or have the operator set "
                "HERMES_CLIP_STORAGE_URL to object storage."
            )
        partial = f"{self._key(job_id)}:partial"
        try:
            await self.redis.delete(partial)
            with source.open("rb") as file:
                while chunk := await asyncio.to_thread(file.read, CHUNK):
                    await self.redis.append(partial, chunk)
            await self.redis.expire(partial, self.ttl_seconds)
            if size == 0:
                await self.redis.set(partial, b"", ex=self.ttl_seconds)
            await self.redis.rename(partial, self._key(job_id))
        except (RedisError, OSError) as exc:
            raise StorageUnavailable("Redis could not take the result.") from exc
        await asyncio.to_thread(source.unlink)

    async def size(self, job_id: str) -> int | None:
        key = self._key(job_id)
        if not await self.redis.exists(key):
            return None
        return int(await self.redis.strlen(key))

    async def chunks(self, job_id: str) -> AsyncIterator[bytes]:
        key, offset = self._key(job_id), 0
        while chunk := await self.redis.getrange(key, offset, offset + CHUNK - 1):
            yield bytes(chunk)
            offset += len(chunk)

    async def presign(self, job_id: str, expires_in: float) -> str | None:
        return None

    async def delete(self, job_id: str) -> None:
        await self.redis.delete(self._key(job_id))

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False


def parse_s3_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.strip("/")


def open_store(settings: ClipSettings, redis: Redis | None = None) -> ResultStore:
    """The store ``HERMES_CLIP_STORAGE_URL`` names; without one, Redis when given, else local."""
    url = settings.clip_storage_url
    if url is not None and url.startswith("s3://"):
        bucket, prefix = parse_s3_url(url)
        return S3Store(bucket, prefix, settings.clip_storage_public_endpoint)
    if url is not None:
        return LocalStore(Path(url))
    if redis is not None:
        return RedisStore(
            redis,
            settings.clip_queue_name,
            settings.clip_redis_result_max_bytes or settings.clip_max_output_bytes,
            result_lifetime(settings),
        )
    return LocalStore(settings.clip_work_dir)


def result_lifetime(settings: ClipSettings) -> int:
    """Longest a result can be needed: a late retry, its webhook window, then retention."""
    s = settings
    return int(s.clip_job_timeout_seconds + s.webhook_window_seconds + s.clip_retention_seconds)
