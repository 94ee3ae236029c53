"""taskiq 0.13 + taskiq-nats 0.7, ``PullBasedJetStreamBroker`` with batch 100.

The worker is taskiq's own ``Receiver`` run in-process (exactly what
``taskiq worker`` runs in each worker process, minus the CLI and the process
supervisor), with the CLI defaults: ``max_async_tasks=100``, no extra
prefetch, ack once the result is saved, a thread pool for sync tasks (none
here). The stream is set up like the raw baseline: WorkQueue retention, file
storage.

``pull_consume_timeout`` must be finite: with taskiq-nats' default ``None``,
nats-py's ``fetch(100)`` on an idle queue returns nothing until 100 messages
have arrived, so a lone task can wait forever. With a finite timeout it
returns a partial batch promptly, so the value (1 s) does not add latency.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nats
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from taskiq import AsyncTaskiqDecoratedTask
from taskiq.receiver import Receiver
from taskiq_nats import PullBasedJetStreamBroker

from bench.model import sleep_ms_for
from bench.probe import mark
from bench.systems.base import BenchSystem, InProcessWorker, Worker, WorkerMode
from bench.systems.pipelining import windowed

STREAM = "BENCH_TASKIQ"
SUBJECT = "bench.taskiq.tasks"
DURABLE = "taskiq-worker"
TASK_NAME = "bench_task"
BATCH = 100
FETCH_TIMEOUT_S = 1.0
MAX_ASYNC_TASKS = 100  # the `taskiq worker` default
PRODUCER_WINDOW = 256
STOP_TIMEOUT_S = 15.0


async def bench_task(index: int, sleep_ms: int) -> None:
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    mark(index)


def make_broker(url: str) -> tuple[PullBasedJetStreamBroker, AsyncTaskiqDecoratedTask[Any, Any]]:
    broker = PullBasedJetStreamBroker(
        servers=url,
        subject=SUBJECT,
        stream_name=STREAM,
        durable=DURABLE,
        stream_config=StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        ),
        pull_consume_batch=BATCH,
        pull_consume_timeout=FETCH_TIMEOUT_S,
        allow_reconnect=False,
    )
    task = broker.task(task_name=TASK_NAME)(bench_task)
    return broker, task


class TaskiqSystem(BenchSystem):
    name = "taskiq"
    setup = (
        f"taskiq-nats PullBasedJetStreamBroker (batch {BATCH}, fetch timeout {FETCH_TIMEOUT_S} s),"
        f" in-process Receiver, max_async_tasks={MAX_ASYNC_TASKS}; producer: kiq(),"
        f" {PRODUCER_WINDOW} in flight"
    )

    async def open(self) -> None:
        self.broker: PullBasedJetStreamBroker | None = None

    async def close(self) -> None:
        if self.broker is not None:
            await self.broker.shutdown()

    async def reset(self) -> None:
        await self.close()
        nc = await nats.connect(self.ctx.nats_url, allow_reconnect=False)
        try:
            with contextlib.suppress(NotFoundError):
                await nc.jetstream().delete_stream(STREAM)
        finally:
            await nc.close()
        # The broker's startup creates the stream and the durable consumer.
        self.broker, self.task = make_broker(self.ctx.nats_url)
        await self.broker.startup()

    async def queued(self) -> int | None:
        await self._producer()
        assert self.broker is not None
        info = await self.broker.js.stream_info(STREAM)
        return info.state.messages

    async def _producer(self) -> AsyncTaskiqDecoratedTask[Any, Any]:
        if self.broker is None:
            self.broker, self.task = make_broker(self.ctx.nats_url)
            await self.broker.startup()
        return self.task

    async def enqueue(self, count: int, slow_every: int = 0) -> None:
        task = await self._producer()
        slow_ms = self.ctx.mixed.slow_ms
        # kiq() awaits the PubAck of one js.publish; no batch API exists.
        await windowed(
            count,
            lambda i: task.kiq(i, sleep_ms_for(i, slow_every, slow_ms)),
            PRODUCER_WINDOW,
        )

    async def enqueue_one(self, index: int) -> None:
        task = await self._producer()
        await task.kiq(index, 0)

    @contextlib.asynccontextmanager
    async def worker(self, mode: WorkerMode, variant: str) -> AsyncIterator[Worker]:
        broker, _ = make_broker(self.ctx.nats_url)
        broker.is_worker_process = True
        finish = asyncio.Event()
        with ThreadPoolExecutor(max_workers=2) as pool:
            receiver = Receiver(broker, executor=pool, max_async_tasks=MAX_ASYNC_TASKS)
            listening = asyncio.create_task(receiver.listen(finish))
            worker = InProcessWorker()
            worker.watch.append(listening)
            try:
                yield worker
            finally:
                finish.set()
                try:
                    await asyncio.wait_for(listening, STOP_TIMEOUT_S)
                except TimeoutError:
                    pass  # wait_for has cancelled it
                finally:
                    await broker.shutdown()


SYSTEM = TaskiqSystem
