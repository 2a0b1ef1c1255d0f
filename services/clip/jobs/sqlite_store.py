"""The embedded queue's memory across restarts: one SQLite database in the clip work directory.

It owns the work directory too: an exclusive lock file beside the database keeps a second
process off it (two processes would run each other's jobs and delete each other's files).
A row is one job: its view (status, result, whether its webhook is still pending), the
request that made it, Ouro's headers (the webhook URL and token) and the caller. Rows are
written when a job changes state, not on progress, so a write is rare; each one commits with
a full sync, because a 202 promises the job. All calls run on one thread of their own, so the
event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import IO, TypeVar

from services.clip.jobs.model import JobRecord, JobView, QueueUnavailable
from services.clip.request import ClipSpec
from services.common.ouro import OuroHeaders

DATABASE = "jobs.sqlite3"
LOCK = "jobs.lock"
# Bumped with every change of the table below; a database from a newer version is refused.
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    key TEXT UNIQUE,
    caller TEXT NOT NULL,
    status TEXT NOT NULL,
    webhook TEXT NOT NULL,
    created_at REAL NOT NULL,
    record TEXT NOT NULL
)
"""
T = TypeVar("T")


class JobDatabaseError(RuntimeError):
    """The work directory's job database cannot be used; the message says what to do."""


class StoredRecord(JobRecord):
    """Everything a restarted process needs to resume, deliver or show one job."""

    key: str | None = None

    @classmethod
    def new(
        cls, view: JobView, spec: ClipSpec, ouro: OuroHeaders, caller: str, key: str | None
    ) -> StoredRecord:
        return cls(view=view, spec=asdict(spec), ouro=ouro, caller=caller, key=key)


class JobDatabase:
    """The open database and the work directory's lock, both held until ``close``."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock: IO[str]) -> None:
        self.path = path
        self._connection = connection
        self._lock = lock
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-jobs-db")

    @classmethod
    async def open(cls, work_dir: Path) -> JobDatabase:
        connection, lock = await asyncio.to_thread(_open, work_dir)
        return cls(work_dir / DATABASE, connection, lock)

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._thread, work, self._connection
            )
        except sqlite3.Error as exc:
            raise QueueUnavailable(f"The clip job database {self.path} failed: {exc}.") from exc

    async def load(self) -> list[StoredRecord]:
        """Every job, oldest first."""
        rows = await self._call(
            lambda db: db.execute("SELECT record FROM jobs ORDER BY created_at").fetchall()
        )
        return [StoredRecord.model_validate_json(record) for (record,) in rows]

    async def put(self, *records: StoredRecord) -> None:
        rows = [
            (r.view.job_id, r.key, r.caller, r.view.status.value, r.view.webhook.value,
             r.view.created_at, r.model_dump_json())
            for r in records
        ]  # fmt: skip

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

        await self._call(write)

    async def delete(self, *job_ids: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            with db:
                db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])

        await self._call(write)

    async def close(self) -> None:
        await self._call(lambda db: db.close())
        self._thread.shutdown()
        self._lock.close()


def _open(work_dir: Path) -> tuple[sqlite3.Connection, IO[str]]:
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = (work_dir / LOCK).open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise JobDatabaseError(
            f"Another process is using the clip work directory {work_dir} (it holds {LOCK}): "
            "give each process its own HERMES_CLIP_WORK_DIR, or set HERMES_REDIS_URL to run "
            "several."
        ) from None
    path = work_dir / DATABASE
    try:
        connection = sqlite3.connect(path, check_same_thread=False)
        _prepare(connection, path)
    except (sqlite3.Error, JobDatabaseError) as exc:
        lock.close()
        if isinstance(exc, JobDatabaseError):
            raise
        raise JobDatabaseError(
            f"The clip job database {path} cannot be used ({exc}); move it away to start "
            "with an empty queue (the jobs in it are then forgotten)."
        ) from exc
    # Rows hold webhook tokens; SQLite gives its -wal and -shm files the same mode.
    os.chmod(path, 0o600)
    return connection, lock


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise JobDatabaseError(
            f"The clip job database {path} has schema version {version}, newer than this "
            f"hermes-media understands ({SCHEMA_VERSION}): run the newer version, or move the "
            "file away."
        )
    if version == 0:
        db.executescript(f"BEGIN; {SCHEMA}; PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
    # Reading one row now makes a damaged file fail here, at start, not at the first request.
    db.execute("SELECT record FROM jobs LIMIT 1").fetchall()
