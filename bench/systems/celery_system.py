"""Celery 5.5 with the Redis broker; the worker is the ``celery worker`` CLI.

Throughput/latency worker: prefork pool, concurrency 2 (one process per core,
plus the supervising main process), default prefetch multiplier (4). Mixed
workload: threads pool with 100 threads (tasks are sync, the 50 ms sleep is
I/O-bound). Logging at WARNING so per-task INFO lines are not written.
Producer: ``apply_async`` on one reused producer connection -- celery has no
batch publish for Redis.
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

REDIS_DB = 3


class CelerySystem(BenchSystem):
    name = "celery"
    setup = "celery worker subprocess, Redis broker; producer: apply_async() sequential"

    async def open(self) -> None:
        url = self.ctx.redis_db_url(REDIS_DB)
        self.env = {"BENCH_CELERY_BROKER": url}
        os.environ.update(self.env)  # celery_app reads its broker URL at import
        from bench.systems import celery_app

        self.app_module: ModuleType = celery_app
        self.redis = aioredis.Redis.from_url(url)

    async def close(self) -> None:
        await self.redis.aclose()
        self.app_module.app.close()

    async def reset(self) -> None:
        await self.redis.flushdb()

    async def queued(self) -> int | None:
        waiting: int = await self.redis.llen(self.app_module.QUEUE)
        unacked: int = await self.redis.hlen("unacked")
        return waiting + unacked

    async def enqueue(self, count: int, slow_every: int = 0) -> None:
        slow_ms = self.ctx.mixed.slow_ms
        task: Any = self.app_module.bench_task
        # Blocking calls on purpose: nothing else runs in this process meanwhile,
        # and a thread hop per task would only add overhead.
        with self.app_module.app.producer_or_acquire() as producer:
            for i in range(count):
                task.apply_async((i, sleep_ms_for(i, slow_every, slow_ms)), producer=producer)

    async def enqueue_one(self, index: int) -> None:
        self.app_module.bench_task.apply_async((index, 0))

    @contextlib.asynccontextmanager
    async def worker(self, mode: WorkerMode, variant: str) -> AsyncIterator[Worker]:
        if mode is WorkerMode.MIXED:
            pool = ["--pool=threads", f"--concurrency={self.ctx.mixed.concurrency}"]
        else:
            pool = ["--pool=prefork", "--concurrency=2"]
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.systems.celery_app",
            "worker",
            *pool,
            "--loglevel=WARNING",
            f"--queues={self.app_module.QUEUE}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--hostname=bench@%h",
        ]
        description = " ".join(pool).replace("--", "")
        async with run_worker(self.ctx, argv, self.env, description, "celery-worker") as worker:
            yield worker


SYSTEM = CelerySystem
