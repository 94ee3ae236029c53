"""arq 0.28 on Redis.

Producer: ``ArqRedis.enqueue_job`` (one WATCH/MULTI/EXEC round trip per job;
no batch API), 64 calls in flight. Worker: ``arq.worker.Worker`` in-process,
``poll_delay`` lowered from 0.5 s to 2 ms (arq polls a sorted set; it has no
blocking pop), ``max_jobs=100`` (default 10), everything else default --
results are kept for an hour, as arq does unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import default_queue_name
from arq.worker import Worker as ArqWorker
from arq.worker import func

from bench.model import sleep_ms_for
from bench.probe import mark
from bench.systems.base import BenchSystem, InProcessWorker, Worker, WorkerMode
from bench.systems.pipelining import windowed

REDIS_DB = 1
POLL_DELAY_S = 0.002
MAX_JOBS = 100
PRODUCER_WINDOW = 64
STOP_TIMEOUT_S = 15.0


async def bench_task(ctx: dict[str, Any], index: int, sleep_ms: int) -> None:
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    mark(index)


class ArqSystem(BenchSystem):
    name = "arq"
    setup = (
        f"arq Worker in-process, poll_delay={POLL_DELAY_S * 1000:g} ms, max_jobs={MAX_JOBS};"
        f" producer: enqueue_job(), {PRODUCER_WINDOW} in flight"
    )

    def _settings(self) -> RedisSettings:
        return RedisSettings.from_dsn(self.ctx.redis_db_url(REDIS_DB))

    async def open(self) -> None:
        self.pool: ArqRedis = await create_pool(self._settings())

    async def close(self) -> None:
        await self.pool.aclose()

    async def reset(self) -> None:
        await self.pool.flushdb()

    async def queued(self) -> int | None:
        count: int = await self.pool.zcard(default_queue_name)
        return count

    async def enqueue(self, count: int, slow_every: int = 0) -> None:
        slow_ms = self.ctx.mixed.slow_ms

        async def submit(i: int) -> None:
            job = await self.pool.enqueue_job("bench_task", i, sleep_ms_for(i, slow_every, slow_ms))
            if job is None:
                raise RuntimeError(f"arq refused job {i} (duplicate id)")

        await windowed(count, submit, PRODUCER_WINDOW)

    async def enqueue_one(self, index: int) -> None:
        await self.pool.enqueue_job("bench_task", index, 0)

    @contextlib.asynccontextmanager
    async def worker(self, mode: WorkerMode, variant: str) -> AsyncIterator[Worker]:
        arq_worker = ArqWorker(
            functions=[func(bench_task, name="bench_task")],
            redis_settings=self._settings(),
            handle_signals=False,
            poll_delay=POLL_DELAY_S,
            max_jobs=MAX_JOBS,
        )
        running = asyncio.create_task(arq_worker.async_run())
        worker = InProcessWorker()
        worker.watch.append(running)
        try:
            yield worker
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            # Without its own signal handlers, arq's close() cancels jobs still
            # finishing (e.g. storing their result) and re-raises that
            # CancelledError from its gather(); that is expected here.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(arq_worker.close(), STOP_TIMEOUT_S)


SYSTEM = ArqSystem
