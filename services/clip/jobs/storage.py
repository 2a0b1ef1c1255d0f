"""Where finished clips are kept: one small interface, two places, nothing read whole.

- ``LocalStore``: a directory; the embedded default is each job's own directory under the work
  directory (a result stays where it was made). Downloads are streamed from the file.
- ``S3Store``: an S3-compatible bucket (AWS, MinIO, R2, Ceph) through boto3, run in threads;
  uploads are multipart past one part, downloads are presigned URLs. boto3 was chosen by
  measurement (docs/benchmarks-storage.md): the lowest peak memory while uploading and
  streaming of the three candidates, at the same speed.

Distributed mode needs one of them configured (S3 or a directory every replica and worker
mounts): results are never kept in Redis.

A result is keyed by its job id (embedded) or by its run's own key (distributed). ``put``
consumes the file it is given (moved or deleted).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from services.clip.settings import ClipSettings
from services.common.errors import Unavailable

CLIP_FILE = "clip.mp4"
CHUNK = 1024 * 1024
# Multipart part size and parts in flight: an upload holds at most about their product.
PART = 8 * 1024 * 1024
PARTS_AT_ONCE = 2
MIME = "video/mp4"


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


def parse_s3_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.strip("/")


def open_store(settings: ClipSettings) -> ResultStore:
    """The store ``HERMES_CLIP_STORAGE_URL`` names; without one (embedded), the work directory."""
    url = settings.clip_storage_url
    if url is not None and url.startswith("s3://"):
        bucket, prefix = parse_s3_url(url)
        return S3Store(bucket, prefix, settings.clip_storage_public_endpoint)
    if url is not None:
        return LocalStore(Path(url))
    return LocalStore(settings.clip_work_dir)


def result_lifetime(settings: ClipSettings) -> int:
    """Longest a result can be needed: its job's deadline (webhook included), then retention."""
    return int(settings.clip_deadline_seconds + settings.clip_retention_seconds)
