"""The process pool that runs the codecs, so encoding uses every core and never the event loop.

Pillow holds the GIL while encoding into memory; separate processes do not share it. A worker
that dies on a hostile file breaks the pool: it is replaced and the request gets a 422.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

from services.common.errors import InvalidInput
from services.compress.codecs import Compressed, Limits, compress


def _warm() -> None:
    """Loaded on start so the first request does not pay for imports."""


class CodecPool:
    def __init__(self, workers: int) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("forkserver")
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, _warm) for _ in range(self.workers))
        )

    async def compress(
        self,
        data: bytes,
        *,
        quality: int,
        strip_metadata: bool,
        keep_location: bool,
        limits: Limits,
    ) -> Compressed:
        loop = asyncio.get_running_loop()
        executor = self._executor
        try:
            job = partial(
                compress,
                data,
                quality=quality,
                strip_metadata=strip_metadata,
                keep_location=keep_location,
                limits=limits,
            )
            return await loop.run_in_executor(executor, job)
        except BrokenProcessPool as exc:
            if executor is self._executor:
                executor.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()
            raise InvalidInput("The image could not be decoded.") from exc

    def worker_pids(self) -> list[int]:
        """The worker processes' ids, to tell a replaced worker and to read their memory."""
        return sorted(self._executor._processes)

    def alive(self) -> bool:
        """Whether the pool can take work (a broken pool is replaced on its next use)."""
        return not getattr(self._executor, "_broken", False)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
