"""The pytest plugin and helpers users test their handlers with (taskframe.testing)."""

import asyncio
import re
import time

import pytest
from nats.js import api as js_api

from taskframe import App, Client, ConfigError, Context
from taskframe import _topology as topology
from taskframe.testing import NatsServer, eventually, running_worker
from tests.apps import Add, Slow, build


async def test_the_fixtures_give_a_server_with_jetstream_and_a_client_of_the_tests_own(
    nats_server: NatsServer, namespace: str, client: Client
) -> None:
    assert nats_server.running
    assert re.fullmatch(r"nats://127\.0\.0\.1:\d+", nats_server.url)
    assert re.fullmatch(r"t[0-9a-f]{12}", namespace)
    assert (client.namespace, client.settings.url) == (namespace, nats_server.url)
    assert client.nc.is_connected
    assert (await client.js.account_info()).streams >= 0  # JetStream answers
    assert await client.queues() == []  # nothing of another test's in this namespace


async def test_eventually_returns_the_first_true_value_of_a_plain_condition() -> None:
    calls = []

    def third_time() -> list[int]:
        calls.append(1)
        return calls if len(calls) == 3 else []

    started = time.monotonic()
    assert await eventually(third_time, "three calls", interval=0.01) == [1, 1, 1]
    assert time.monotonic() - started < 1.0


async def test_eventually_awaits_an_async_condition(client: Client) -> None:
    run = await client.enqueue(Add(a=1, b=2))
    async with running_worker(build(client.namespace), client):
        status = await eventually(lambda: client.status(run.id), "a status record")
    assert status is not None  # (eventually returned it because it is)
    assert status.id == run.id


async def test_eventually_fails_with_what_it_waited_for() -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"^timed out after 0\.2s waiting for the moon$"):
        await eventually(lambda: False, "the moon", timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 1.0


async def test_an_error_in_the_condition_ends_the_wait_at_once() -> None:
    def broken() -> bool:
        raise ValueError("not like this")

    started = time.monotonic()
    with pytest.raises(ValueError, match="not like this"):
        await eventually(broken, "anything", timeout=10)
    assert time.monotonic() - started < 1.0


async def test_running_worker_runs_until_the_block_ends_then_stops_gracefully(
    client: Client,
) -> None:
    app = App(client.namespace)
    finished: list[float] = []

    @app.handle(Slow)
    async def slow(job: Slow, ctx: Context) -> float:
        await asyncio.sleep(job.seconds)
        finished.append(job.seconds)
        return job.seconds

    async with running_worker(app, client, concurrency=3) as worker:
        assert worker.ready.is_set()
        assert worker.concurrency == 3
        runs = await client.enqueue_many(Slow(seconds=0.3) for _ in range(3))
        await eventually(lambda: worker.stats.running == 3, "three tasks running")
    assert not worker.ready.is_set()
    assert finished == [0.3] * 3  # stopping let the running tasks finish
    assert [await r.result(timeout=1) for r in runs] == [0.3] * 3


async def test_a_worker_that_cannot_start_raises_its_error(client: Client) -> None:
    await client.js.add_stream(
        js_api.StreamConfig(
            name=topology.queue_stream(client.namespace, "math"),
            subjects=[f"{client.namespace}.tasks.math.>"],
            storage=js_api.StorageType.MEMORY,  # taskframe's queues keep files
        )
    )
    with pytest.raises(ConfigError, match="storage"):
        async with running_worker(build(client.namespace), client):
            pytest.fail("the block must not run")
