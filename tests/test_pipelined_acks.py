"""Acks after pipelined status records (taskframe._confirmation.Confirmation).

A runner sends its task's final record and takes the next task at once; the task is acked
when the server's confirmation of that record arrives. The guarantee is unchanged: a task
is acked only after its own record was confirmed stored. These tests hold confirmations
back (the worker's reply subscription keeps them) or make the results stream refuse every
record, and watch the acks that reach the server.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import pytest
from nats.js.api import StreamConfig

from taskframe import Client, Worker, connect
from taskframe import _topology as topology
from taskframe._publish import publisher
from taskframe.testing import NatsServer, eventually
from tests.apps import Add, build
from tests.faultkit import AckTap

ACKS = ("+ACK",)


Reply = tuple[bytes, bytes, dict[str, str] | None]  # what the publisher's listener gets


class HeldConfirmations:
    """Keeps the confirmations a connection's publisher gets until `release()`."""

    def __init__(self, client: Client) -> None:
        self._publisher = publisher(client.nc)
        self._deliver: Callable[..., None] = self._publisher._on_reply
        self.held: list[Reply] = []
        self.holding = True
        self._publisher._on_reply = self._on_reply  # type: ignore[method-assign]

    def _on_reply(self, subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        if self.holding:
            self.held.append((subject, data, headers))
        else:
            self._deliver(subject, data, headers)

    def records(self) -> int:
        """How many records the held replies confirm: one for each record's own, and a
        fast-ingest batch's final count for its final frame."""
        count = 0
        for subject, data, _ in self.held:
            if subject.rsplit(b".", 1)[-1].isdigit():
                count += 1
            elif b'"count"' in data:
                count += json.loads(data)["count"]
        return count

    async def release(self) -> None:
        """Hand over what was held, and from now on every confirmation as it comes."""
        self.holding = False
        held, self.held = self.held, []
        for reply in held:
            self._deliver(*reply)


@contextlib.asynccontextmanager
async def worker_client(nats_server: NatsServer, namespace: str) -> AsyncIterator[Client]:
    """A connection of the worker's own (ack_wait 2 s), so its confirmations can be held
    (for up to 20 s before its records are sent again)."""
    async with connect(
        nats_server.url, namespace=namespace, ack_wait=2.0, publish_timeout=20.0
    ) as client:
        yield client


async def results_stored(client: Client) -> int:
    info = await client.js.stream_info(topology.results_stream(client.namespace))
    return int(info.state.messages)


async def test_no_ack_before_the_record_is_confirmed_and_drain_waits_for_it(
    client: Client, nats_server: NatsServer
) -> None:
    calls: list[str] = []
    app = build(client.namespace, calls)
    stream = topology.queue_stream(client.namespace, "math")
    async with worker_client(nats_server, client.namespace) as own:
        confirmations = HeldConfirmations(own)
        worker = Worker(app, own, concurrency=4, prefetch=2)
        running = asyncio.create_task(worker.run())
        await worker.ready.wait()
        async with AckTap(client, stream) as acks:
            runs = [await client.enqueue(Add(a=i, b=1)) for i in range(30)]
            # Every task ran and its record is stored, while 4 runners and a credit of 6
            # took all 30: a message whose ack waits for its confirmation holds no runner.
            await eventually(lambda: len(calls) == 30, "every task to run")
            await eventually(lambda: results_stored(client), "the records")
            await eventually(
                lambda: confirmations.records() == 30, "the server to confirm every record"
            )
            # Beyond 16 awaiting, records went in a fast-ingest batch (_batching.py).
            assert any(s.endswith(b".$FI") for s, _, _ in confirmations.held)
            assert [await run.result(timeout=1) for run in runs] == [i + 1 for i in range(30)]
            await asyncio.sleep(0.3)
            assert acks.seen(kinds=ACKS) == []
            assert (worker.stats.succeeded, worker.stats.confirming) == (0, 30)

            worker.stop()
            await asyncio.sleep(0.5)
            assert not running.done()  # the drain waits for the confirmations
            assert acks.seen() == []

            await confirmations.release()
            await asyncio.wait_for(running, 5)
            await eventually(lambda: len(acks.seen(kinds=ACKS)) == 30, "30 acks")
        assert (worker.stats.succeeded, worker.stats.confirming) == (30, 0)
        assert [s.delivered for s in acks.seen()] == [1] * 30  # nothing ran twice


async def test_confirmations_that_do_not_come_within_grace_are_handed_back(
    client: Client, nats_server: NatsServer
) -> None:
    calls: list[str] = []
    app = build(client.namespace, calls)
    stream = topology.queue_stream(client.namespace, "math")
    async with worker_client(nats_server, client.namespace) as own:
        HeldConfirmations(own)  # never released
        worker = Worker(app, own, concurrency=4, grace=1.0)
        running = asyncio.create_task(worker.run())
        await worker.ready.wait()
        async with AckTap(client, stream) as acks:
            runs = [await client.enqueue(Add(a=i, b=2)) for i in range(5)]
            await eventually(lambda: worker.stats.confirming == 5, "5 records sent")
            worker.stop()
            await asyncio.wait_for(running, 5)
            await eventually(lambda: len(acks.seen()) == 5, "5 settles")
            assert {s.kind for s in acks.seen()} == {"-NAK"}  # handed back, never acked
        assert (worker.stats.succeeded, worker.stats.confirming) == (0, 0)

    async with worker_client(nats_server, client.namespace) as other:
        second = Worker(app, other)
        task = asyncio.create_task(second.run())
        try:
            assert [await run.result(timeout=10) for run in runs] == [i + 2 for i in range(5)]
            await eventually(lambda: second.stats.succeeded == 5, "the second worker's acks")
        finally:
            second.stop()
            await task


async def test_a_refused_record_is_never_acked_and_is_stored_once_the_stream_takes_it(
    client: Client, nats_server: NatsServer
) -> None:
    calls: list[str] = []
    app = build(client.namespace, calls)
    stream = topology.queue_stream(client.namespace, "math")
    results = topology.results_stream(client.namespace)
    async with worker_client(nats_server, client.namespace) as own:
        worker = Worker(app, own, concurrency=4)
        running = asyncio.create_task(worker.run())
        try:
            await worker.ready.wait()
            config: StreamConfig = (await client.js.stream_info(results)).config
            await client.js.update_stream(config.evolve(max_msg_size=8))  # refuses every record
            async with AckTap(client, stream) as acks:
                runs = [await client.enqueue(Add(a=i, b=3)) for i in range(10)]
                await eventually(lambda: len(calls) >= 10, "every task to run")
                await asyncio.sleep(1.0)  # past the refusals and the awaited path's try
                assert acks.seen(kinds=ACKS) == []
                assert worker.stats.succeeded == 0
                assert await results_stored(client) == 0

                await client.js.update_stream(config)  # room again: redelivered and stored
                assert [await run.result(timeout=15) for run in runs] == [i + 3 for i in range(10)]
                await eventually(lambda: len(acks.seen(kinds=ACKS)) == 10, "10 acks")
                for ack in acks.seen(kinds=ACKS):
                    assert ack.delivered >= 2  # the first deliveries were never acked
        finally:
            worker.stop()
            await running
        assert worker.stats.succeeded == 10


@pytest.mark.parametrize("confirming", [8])
async def test_messages_awaiting_confirmation_are_bounded_per_pool(
    client: Client, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, confirming: int
) -> None:
    import taskframe.worker

    monkeypatch.setattr(taskframe.worker, "CONFIRMING", confirming)
    calls: list[str] = []
    app = build(client.namespace, calls)
    async with worker_client(nats_server, client.namespace) as own:
        confirmations = HeldConfirmations(own)
        worker = Worker(app, own, concurrency=2, prefetch=2)
        running = asyncio.create_task(worker.run())
        try:
            await worker.ready.wait()
            runs = [await client.enqueue(Add(a=i, b=4)) for i in range(40)]
            # A pool holds at most concurrency + prefetch + CONFIRMING messages: once all
            # of them wait for a confirmation, it asks for no more.
            limit = 2 + 2 + confirming
            await eventually(lambda: worker.stats.confirming == limit, "the pool full")
            await asyncio.sleep(0.5)
            assert worker.stats.confirming == len(calls) == limit
            await confirmations.release()
            assert [await run.result(timeout=10) for run in runs] == [i + 4 for i in range(40)]
            await eventually(lambda: worker.stats.succeeded == 40, "40 acks")
        finally:
            worker.stop()
            await running


async def test_a_confirmation_that_does_not_come_in_time_is_awaited_again_before_the_ack(
    client: Client, nats_server: NatsServer
) -> None:
    app = build(client.namespace)
    stream = topology.queue_stream(client.namespace, "math")
    async with connect(
        nats_server.url, namespace=client.namespace, ack_wait=5.0, publish_timeout=0.5
    ) as own:
        confirmations = HeldConfirmations(own)
        worker = Worker(app, own, concurrency=4)
        running = asyncio.create_task(worker.run())
        try:
            await worker.ready.wait()
            async with AckTap(client, stream) as acks:
                runs = [await client.enqueue(Add(a=i, b=5)) for i in range(8)]
                # past the pipelined wait (0.5 s, swept every 0.25 s): publish_stored's
                # second attempt is sent, and waits as well
                await eventually(lambda: len(confirmations.held) >= 16, "records sent twice")
                assert acks.seen(kinds=ACKS) == []
                assert worker.stats.confirming == 8
                await confirmations.release()
                assert [await run.result(timeout=5) for run in runs] == [i + 5 for i in range(8)]
                await eventually(lambda: worker.stats.succeeded == 8, "8 acks")
                assert [s.delivered for s in acks.seen()] == [1] * 8
        finally:
            worker.stop()
            await running
