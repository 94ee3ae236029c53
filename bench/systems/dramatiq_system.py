"""Dramatiq 2.x with the Redis broker; the worker is the ``dramatiq`` CLI.

Worker: 2 processes x 50 threads for every workload, i.e. the mixed
workload's 100 concurrent tasks. With the CLI default of 8 threads a no-op
backlog drained at about half the rate (each thread adds prefetch), so 50 is
dramatiq's better single-worker setting here. Producer: ``actor.send``
sequentially (no batch enqueue for Redis).

Dramatiq's Redis consumer polls (a Lua fetch script) and, when it finds
nothing, backs off exponentially from 5 ms up to the worker timeout (1 s).
Latency samples are taken back to back (a worker idle for only ~ms), so they
catch it early in that backoff; after a long idle spell it reacts slower.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import redis.asyncio as aioredis

from bench.model import sleep_ms_for
from bench.systems.base import BenchSystem, Worker, WorkerMode
from bench.systems.subprocess_worker import run_worker

REDIS_DB = 4
PROCESSES = 2
THREADS = 50  # CLI default 8 drains a no-op backlog at ~half this rate


class DramatiqSystem(BenchSystem):
    name = "dramatiq"
    setup = "dramatiq worker subprocess, Redis broker; producer: actor.send() sequential"

    async def open(self) -> None:
        url = self.ctx.redis_db_url(REDIS_DB)
        self.env = {"BENCH_DRAMATIQ_BROKER": url}
        os.environ.update(self.env)  # dramatiq_app reads its broker URL at import
        from bench.systems import dramatiq_app

        self.app_module: ModuleType = dramatiq_app
        self.redis = aioredis.Redis.from_url(url)

    async def close(self) -> None:
        await self.redis.aclose()
        self.app_module.broker.close()

    async def reset(self) -> None:
        await self.redis.flushdb()

    async def queued(self) -> int | None:
        # Message bodies stay in this hash until acknowledged.
        count: int = await self.redis.hlen(f"dramatiq:{self.app_module.QUEUE}.msgs")
        return count

    async def enqueue(self, count: int, slow_every: int = 0) -> None:
        slow_ms = self.ctx.mixed.slow_ms
        actor: Any = self.app_module.bench_task
        # Blocking calls on purpose: nothing else runs in this process meanwhile.
        for i in range(count):
            actor.send(i, sleep_ms_for(i, slow_every, slow_ms))

    async def enqueue_one(self, index: int) -> None:
        self.app_module.bench_task.send(index, 0)

    @contextlib.asynccontextmanager
    async def worker(self, mode: WorkerMode, variant: str) -> AsyncIterator[Worker]:
        threads = THREADS
        if mode is WorkerMode.MIXED:
            threads = self.ctx.mixed.concurrency // PROCESSES
        argv = [
            sys.executable,
            "-m",
            "dramatiq",
            "bench.systems.dramatiq_app",
            f"--processes={PROCESSES}",
            f"--threads={threads}",
            f"--queues={self.app_module.QUEUE}",
        ]
        description = f"{PROCESSES} processes x {threads} threads"
        async with run_worker(self.ctx, argv, self.env, description, "dramatiq-worker") as worker:
            yield worker


SYSTEM = DramatiqSystem
