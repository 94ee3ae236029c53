"""taskframe, driven through its public API (models, ``App``, ``Client``, ``Worker``, CLI).

Topology is taskframe's own: ``reset`` deletes every stream of the benchmark namespace
(queue stream, dead letters, results bucket) and re-provisions it exactly as
``taskframe provision`` does (``taskframe.provision(app, client)``): stream
``TF_bench_bench`` (WorkQueue, file storage) with the durable pull consumer ``workers``.

Producer variants (enqueue):

* ``many``: ``Client.enqueue_many`` over all N tasks (pipelined publishes, every PubAck
  checked, unconfirmed ones resent). Also fills the backlogs of the other workloads;
* ``single``: ``await Client.enqueue(task)`` one task at a time.

Worker variants (process; RSS comes from these too):

* ``noresults``: in-process ``Worker`` (concurrency 256, see ``CONCURRENCY``), task model declared
  ``results=False`` (no result write: comparable to raw nats-py, which stores nothing);
* ``results``: the same with ``results=True`` (taskframe's default): a RUNNING status
  record and a stored SUCCEEDED record (awaited) per task before the ack;
* ``2proc``: ``taskframe worker bench.systems.taskframe_app:app --processes 2`` as a
  subprocess (supervisor + 2 workers), ``results=False``. Marks cross a FIFO.

Latency: ``inproc`` and ``2proc`` (both ``results=False``), idle worker. Mixed: in-process,
``concurrency`` = the mixed concurrency (100), ``results=False``.

Every worker has its own connection, as a separate worker process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from nats.js.errors import NotFoundError

import taskframe
from bench.model import Workload, sleep_ms_for
from bench.systems.base import BenchSystem, InProcessWorker, Worker, WorkerMode
from bench.systems.subprocess_worker import run_worker
from bench.systems.taskframe_app import (
    NAMESPACE_ENV,
    QUEUE,
    RESULTS_ENV,
    Noop,
    build_app,
    namespace_from_env,
)
from taskframe import Worker as TfWorker
from taskframe import _topology as topology

APP_REF = "bench.systems.taskframe_app:app"
CONCURRENCY_ENV = "BENCH_TASKFRAME_CONCURRENCY"
STORAGE = "file"  # as raw nats-py and taskiq; also taskframe's default
# Throughput/latency workers (per process). The CLI default is 64; a quick sweep draining
# 20,000 no-op tasks (results=False, 2 runs each, 2026-11-28) gave ~37k/s at 64, ~46k/s at
# 128 and 256, ~49k/s at 512: 256 is the harness's "best single-worker setting" without
# an extreme value. Prefetch stays taskframe's default, min(concurrency, 32).
CONCURRENCY = int(os.environ.get(CONCURRENCY_ENV) or 256)
PROCESSES = 2
GRACE_S = 5.0
STOP_TIMEOUT_S = 15.0

ENQUEUE_MANY = "many"
ENQUEUE_SINGLE = "single"
NO_RESULTS = "noresults"
RESULTS = "results"
IN_PROCESS = "inproc"
TWO_PROCESSES = "2proc"


class TaskframeSystem(BenchSystem):
    name = "taskframe"
    setup = (
        "taskframe: stream per queue (WorkQueue, file) and consumer as provisioned by"
        " taskframe; producer: enqueue_many() (variant single: enqueue() one at a time)"
    )
    variants = {
        Workload.ENQUEUE: (ENQUEUE_MANY, ENQUEUE_SINGLE),
        Workload.PROCESS: (NO_RESULTS, RESULTS, TWO_PROCESSES),
        Workload.LATENCY: (IN_PROCESS, TWO_PROCESSES),
    }

    async def open(self) -> None:
        self.namespace = namespace_from_env()
        self.client = await self._connect()

    async def close(self) -> None:
        await self.client.close()

    async def _connect(self) -> taskframe.Client:
        client = taskframe.connect(self.ctx.nats_url, namespace=self.namespace, storage=STORAGE)
        return await client.open()

    async def reset(self) -> None:
        js = self.client.js
        for info in await js.streams_info():
            metadata = info.config.metadata or {}
            if metadata.get(topology.META_NAMESPACE) == self.namespace:
                assert info.config.name is not None
                with contextlib.suppress(NotFoundError):
                    await js.delete_stream(info.config.name)
        # What `taskframe provision` does: streams, results bucket, the queue's consumer.
        await taskframe.provision(build_app(self.namespace, results=False), self.client)

    async def queued(self) -> int | None:
        info = await self.client.js.stream_info(topology.queue_stream(self.namespace, QUEUE))
        return info.state.messages

    async def enqueue(self, count: int, slow_every: int = 0) -> None:
        await self.enqueue_variant(ENQUEUE_MANY, count, slow_every)

    async def enqueue_variant(self, variant: str, count: int, slow_every: int = 0) -> None:
        slow_ms = self.ctx.mixed.slow_ms
        tasks = (Noop(index=i, sleep_ms=sleep_ms_for(i, slow_every, slow_ms)) for i in range(count))
        if variant == ENQUEUE_SINGLE:
            for task in tasks:
                await self.client.enqueue(task)
            return
        # enqueue_many raises PublishError unless the server confirmed every task.
        runs = await self.client.enqueue_many(tasks)
        if len(runs) != count:
            raise RuntimeError(f"enqueue_many returned {len(runs)} handles for {count} tasks")

    async def enqueue_one(self, index: int) -> None:
        await self.client.enqueue(Noop(index=index))

    def worker(self, mode: WorkerMode, variant: str) -> AbstractAsyncContextManager[Worker]:
        if variant == TWO_PROCESSES:
            return self._cli_worker()
        if mode is WorkerMode.MIXED:
            return self._in_process(self.ctx.mixed.concurrency, results=False)
        return self._in_process(CONCURRENCY, results=variant == RESULTS)

    @contextlib.asynccontextmanager
    async def _in_process(self, concurrency: int, *, results: bool) -> AsyncIterator[Worker]:
        client = await self._connect()
        try:
            tf_worker = TfWorker(
                build_app(self.namespace, results=results),
                client,
                concurrency=concurrency,
                grace=GRACE_S,
            )
            running = asyncio.create_task(tf_worker.run())
            kept = "results=True" if results else "results=False"
            worker = InProcessWorker(
                f"in-process Worker, concurrency {concurrency}, prefetch {tf_worker.prefetch},"
                f" {kept}"
            )
            worker.watch.append(running)
            try:
                yield worker
            finally:
                tf_worker.stop()
                with contextlib.suppress(TimeoutError):  # wait_for cancels it then
                    await asyncio.wait_for(running, STOP_TIMEOUT_S)
        finally:
            await client.close()

    @contextlib.asynccontextmanager
    async def _cli_worker(self) -> AsyncIterator[Worker]:
        argv = [
            sys.executable,
            "-m",
            "taskframe",
            "worker",
            APP_REF,
            f"--processes={PROCESSES}",
            f"--concurrency={CONCURRENCY}",
            f"--grace={GRACE_S}",
            "--log-level=warning",
        ]
        env = {
            "TASKFRAME_URL": self.ctx.nats_url,
            "TASKFRAME_STORAGE": STORAGE,
            NAMESPACE_ENV: self.namespace,
            RESULTS_ENV: "0",
        }
        description = (
            f"`taskframe worker --processes {PROCESSES} --concurrency {CONCURRENCY}` subprocess,"
            " results=False"
        )
        async with run_worker(self.ctx, argv, env, description, "taskframe-worker") as worker:
            yield worker


SYSTEM = TaskframeSystem
