"""Raw nats-py JetStream: the "physical limit" reference.

No framework, minimal payload (``b"<index>:<sleep_ms>"``), a WorkQueue-retention
stream with file storage, one durable pull consumer with explicit acks.

Producer: ``js.publish_async`` pipelined, then every PubAck future is checked
(``publish_async_completed()`` only waits; it never reports a failed publish,
and nothing times the futures out, so we bound the wait ourselves).

Worker variants:

* ``fetch``: the nats-py API -- ``fetch(100)`` then ``msg.ack()`` each;
* ``pull`` / ``pull500``: :class:`~bench.systems.nats_pull.ContinuousPull`
  with batch 100 / 500, requests kept outstanding so the server never waits
  for the client to ask again. The handler runs inline; in the mixed workload
  each message gets its own task, at most 100 in flight.

The worker uses its own connection, as a separate worker process would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from bench.model import Workload, sleep_ms_for
from bench.probe import mark
from bench.systems.base import BenchSystem, InProcessWorker, Worker, WorkerMode
from bench.systems.nats_pull import ContinuousPull

STREAM = "BENCH_RAW"
SUBJECT = "bench.raw.tasks"
CONSUMER = "raw-worker"
BATCH = 100  # fetch(100) and the "pull" variant
BIG_BATCH = 500  # "pull500": fewer pull requests per message (measured faster)
# publish_async blocks once this many PubAcks are outstanding (nats-py default: 4000).
MAX_PENDING_ACKS = 4000
STALL_TIMEOUT_S = 10.0  # bound for waiting on the oldest outstanding PubAck
ACK_TIMEOUT_S = 60.0
FETCH_TIMEOUT_S = 1.0


def encode(index: int, sleep_ms: int) -> bytes:
    return b"%d:%d" % (index, sleep_ms)


def decode(data: bytes) -> tuple[int, int]:
    index, _, sleep_ms = data.partition(b":")
    return int(index), int(sleep_ms)


async def handle(msg: Msg) -> None:
    index, sleep_ms = decode(msg.data)
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    mark(index)
    await msg.ack()


async def connect(url: str, name: str) -> NATS:
    # No reconnects: a benchmark should fail loudly, not silently stall.
    return await nats.connect(url, name=name, allow_reconnect=False, connect_timeout=5)


class RawNats(BenchSystem):
    name = "raw"
    setup = "nats-py JetStream, WorkQueue stream (file), durable pull consumer, explicit ack"
    variants = {
        Workload.PROCESS: ("fetch", "pull", "pull500"),
        Workload.LATENCY: ("pull", "fetch"),
        Workload.MIXED: ("pull",),
    }

    async def open(self) -> None:
        self.nc = await connect(self.ctx.nats_url, "bench-raw-producer")
        self.js: JetStreamContext = self.nc.jetstream(publish_async_max_pending=MAX_PENDING_ACKS)

    async def close(self) -> None:
        await self.nc.close()

    async def reset(self) -> None:
        # Deleting and recreating is the cleanest slate: purge alone would keep
        # the consumer's sequence state and any unacked deliveries.
        with contextlib.suppress(NotFoundError):
            await self.js.delete_stream(STREAM)
        await self.js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=[SUBJECT],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
        await self.js.add_consumer(
            STREAM,
            ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=60),
        )

    async def enqueue(self, count: int, slow_every: int = 0) -> None:
        slow_ms = self.ctx.mixed.slow_ms
        futures: list[asyncio.Future[PubAck]] = []
        for i in range(count):
            if i >= MAX_PENDING_ACKS:
                # Keep fewer than MAX_PENDING_ACKS PubAcks outstanding ourselves,
                # so publish_async never blocks in its semaphore (which has no
                # timeout unless wait_stall is set -- and setting wait_stall
                # wraps every call in asyncio.wait_for, which yields to the loop
                # on each publish so the flusher sends one message per syscall:
                # ~4x slower). Only yield when the window is really full.
                oldest = futures[i - MAX_PENDING_ACKS]
                if not oldest.done():
                    await asyncio.wait_for(oldest, STALL_TIMEOUT_S)
            payload = encode(i, sleep_ms_for(i, slow_every, slow_ms))
            futures.append(await self.js.publish_async(SUBJECT, payload))
        # gather() raises the first failed PubAck; the timeout covers lost replies
        # (nothing else ever times these futures out).
        acks = await asyncio.wait_for(asyncio.gather(*futures), ACK_TIMEOUT_S)
        bad = [ack for ack in acks if ack.stream != STREAM or ack.duplicate]
        if bad:
            raise RuntimeError(f"{len(bad)} unexpected PubAcks, e.g. {bad[0]}")

    async def queued(self) -> int | None:
        info = await self.js.stream_info(STREAM)
        return info.state.messages

    async def enqueue_one(self, index: int) -> None:
        await self.js.publish(SUBJECT, encode(index, 0), timeout=5)

    @contextlib.asynccontextmanager
    async def worker(self, mode: WorkerMode, variant: str) -> AsyncIterator[Worker]:
        nc = await connect(self.ctx.nats_url, "bench-raw-worker")
        try:
            if variant == "fetch":
                async with self._fetch_worker(nc) as worker:
                    yield worker
            else:
                async with self._pull_worker(nc, mode, variant) as worker:
                    yield worker
        finally:
            await nc.close()

    @contextlib.asynccontextmanager
    async def _fetch_worker(self, nc: NATS) -> AsyncIterator[Worker]:
        psub = await nc.jetstream().pull_subscribe_bind(durable=CONSUMER, stream=STREAM)

        async def loop() -> None:
            while True:
                try:
                    msgs = await psub.fetch(BATCH, timeout=FETCH_TIMEOUT_S)
                except TimeoutError:  # nats' TimeoutError subclasses it; idle queue
                    continue
                for msg in msgs:
                    await handle(msg)

        task = asyncio.create_task(loop())
        worker = InProcessWorker(f"fetch({BATCH}) + ack, handler inline")
        worker.watch.append(task)
        try:
            yield worker
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await psub.unsubscribe()

    @contextlib.asynccontextmanager
    async def _pull_worker(self, nc: NATS, mode: WorkerMode, variant: str) -> AsyncIterator[Worker]:
        if mode is WorkerMode.MIXED:
            limit = self.ctx.mixed.concurrency
            pull = ContinuousPull(nc, STREAM, CONSUMER, handle, max_in_flight=limit)
            description = f"continuous pull, {limit} handler tasks in flight"
        else:
            batch = BIG_BATCH if variant == "pull500" else BATCH
            pull = ContinuousPull(nc, STREAM, CONSUMER, handle, batch=batch)
            description = f"continuous pull (batch {batch}), handler inline"
        await pull.start()
        worker = InProcessWorker(description)
        worker.watch.append(pull.failed)
        try:
            yield worker
        finally:
            await pull.stop()


SYSTEM = RawNats
