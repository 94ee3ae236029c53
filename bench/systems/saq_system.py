"""saq 0.26 on Redis.

Producer: ``Queue.enqueue`` (one Lua-script call per job; saq has no bulk
enqueue -- ``Queue.batch`` only groups jobs for abort-on-error), 64 calls in
flight. Worker: ``saq.Worker`` in-process with ``concurrency=100``. Each of
its job slots blocks on ``BLMOVE``, so an idle worker reacts without any poll
delay to tune.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from saq import Queue
from saq import Worker as SaqWorker
from saq.queue.redis import RedisQueue

from bench.model import sleep_ms_for
from bench.probe import mark
from bench.systems.base import BenchSystem, InProcessWorker, Worker, WorkerMode
from bench.systems.pipelining import windowed

REDIS_DB = 2
CONCURRENCY = 100
PRODUCER_WINDOW = 64
STOP_TIMEOUT_S = 15.0


async def bench_task(ctx: dict[str, Any], *, index: int, sleep_ms: int) -> None:
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    mark(index)


class SaqSystem(BenchSystem):
    name = "saq"
    setup = (
        f"saq Worker in-process, concurrency={CONCURRENCY};"
        f" producer: Queue.enqueue(), {PRODUCER_WINDOW} in flight"
    )

    async def open(self) -> None:
        self.queue: Queue = Queue.from_url(self.ctx.redis_db_url(REDIS_DB))
        await self.queue.connect()

    async def close(self) -> None:
        await self.queue.disconnect()

    async def reset(self) -> None:
        assert isinstance(self.queue, RedisQueue)
        await self.queue.redis.flushdb()

    async def queued(self) -> int | None:
        return await self.queue.count("queued") + await self.queue.count("active")

    async def enqueue(self, count: int, slow_every: int = 0) -> None:
        slow_ms = self.ctx.mixed.slow_ms

        async def submit(i: int) -> None:
            sleep_ms = sleep_ms_for(i, slow_every, slow_ms)
            if await self.queue.enqueue("bench_task", index=i, sleep_ms=sleep_ms) is None:
                raise RuntimeError(f"saq refused job {i} (duplicate key)")

        await windowed(count, submit, PRODUCER_WINDOW)

    async def enqueue_one(self, index: int) -> None:
        await self.queue.enqueue("bench_task", index=index, sleep_ms=0)

    @contextlib.asynccontextmanager
    async def worker(self, mode: WorkerMode, variant: str) -> AsyncIterator[Worker]:
        queue = Queue.from_url(self.ctx.redis_db_url(REDIS_DB))
        saq_worker: SaqWorker[Any] = SaqWorker(
            queue, functions=[("bench_task", bench_task)], concurrency=CONCURRENCY
        )
        # saq would install its own SIGINT/SIGTERM handlers and later remove
        # them, taking ours (which cancels the step cleanly) with them.
        saq_worker.SIGNALS = []
        running = asyncio.create_task(saq_worker.start())
        worker = InProcessWorker()
        worker.watch.append(running)
        try:
            yield worker
        finally:
            await asyncio.wait_for(saq_worker.stop(), STOP_TIMEOUT_S)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(running, STOP_TIMEOUT_S)
            await queue.disconnect()


SYSTEM = SaqSystem
