"""Steering a queue from the client (taskframe.client): pause, resume and purge, on every
lane, against a real server. The CLI's pause across worker processes and a server restart
is in tests/test_cli_control.py."""

import asyncio
from datetime import timedelta

import pytest

from taskframe import App, Client, ConfigError, Context, Task, provision
from taskframe import _topology as topology
from taskframe.testing import eventually, running_worker


class Job(Task[int], queue="steer"):
    n: int = 0


class Hold(Task[int], queue="held"):
    n: int = 0


def lanes_app(namespace: str, started: list[int]) -> App:
    app = App(namespace)
    app.queue("steer", priorities=("high", "default", "low"))

    @app.handle(Job)
    async def job(task: Job, ctx: Context) -> int:
        started.append(task.n)
        return task.n

    return app


async def test_pause_and_purge_cover_every_lane_and_provisioning_keeps_the_pause(
    client: Client,
) -> None:
    started: list[int] = []
    app = lanes_app(client.namespace, started)
    await provision(app, client)
    await client.pause("steer")
    await provision(app, client)  # what every worker does when it starts: keeps the pause
    stream = topology.queue_stream(client.namespace, "steer")
    consumers = await client.js.consumers_info(stream)
    assert sorted(c.name for c in consumers) == ["workers", "workers-high", "workers-low"]
    assert all(c.paused for c in consumers)
    [info] = await client.queues()
    assert info.paused

    async with running_worker(app, client, concurrency=4):
        lanes = ("high", "default", "low")
        runs = [await client.enqueue(Job(n=n), priority=p) for n, p in enumerate(lanes)]
        await asyncio.sleep(1.0)  # a paused queue must stay quiet: only waiting shows it
        assert started == []
        [info] = await client.queues()
        assert (info.waiting, info.in_flight, info.paused) == (3, 0, True)
        assert await client.purge("steer") == 3  # every lane's
        assert [q.waiting for q in await client.queues()] == [0]
        runs = [await client.enqueue(Job(n=n), priority=p) for n, p in enumerate(lanes)]
        await client.resume("steer")
        assert sorted([await r.result(timeout=10) for r in runs]) == [0, 1, 2]
    [info] = await client.queues()
    assert not info.paused


async def test_pause_of_a_queue_without_consumers_is_a_clear_error(client: Client) -> None:
    with pytest.raises(ConfigError, match="has no queue 'nowhere'"):
        await client.pause("nowhere")
    await client.enqueue(Job())  # the stream exists, no worker made its consumers yet
    with pytest.raises(ConfigError, match="no consumers yet"):
        await client.resume("steer")


async def test_purge_removes_waiting_tasks_and_spares_held_delayed_and_periodic(
    client: Client,
) -> None:
    app = App(client.namespace)
    holding, release = asyncio.Event(), asyncio.Event()

    @app.handle(Hold)
    async def hold(task: Hold, ctx: Context) -> int:
        holding.set()
        await release.wait()
        return task.n

    app.schedule(task=Hold(n=-1), every=timedelta(hours=1), name="hourly")
    async with running_worker(app, client, concurrency=1, prefetch=0) as worker:
        first = await client.enqueue(Hold(n=0))
        await asyncio.wait_for(holding.wait(), 10)
        await client.enqueue_many(Hold(n=n) for n in range(1, 6))
        later = await client.enqueue(Hold(n=99), delay=3600)
        await eventually(lambda: _waiting(client, 5), "5 tasks waiting")

        assert await client.purge("held") == 5
        [info] = await client.queues()
        assert (info.waiting, info.in_flight, info.paused) == (0, 1, False)
        release.set()
        assert await first.result(timeout=10) == 0
        await eventually(lambda: worker.stats.succeeded == 1, "the held task to succeed")
    stream = topology.queue_stream(client.namespace, "held")
    kept = await client.js.stream_info(stream, subjects_filter=f"{client.namespace}.sched.>")
    assert sorted(kept.state.subjects or {}) == sorted(
        [
            f"{client.namespace}.sched.held.at.{later.id}",
            f"{client.namespace}.sched.held.cron.hourly",
        ]
    )
    assert await client.purge("held") == 0


async def _waiting(client: Client, count: int) -> bool:
    return [q.waiting for q in await client.queues()] == [count]


async def test_purge_of_a_queue_no_worker_served_removes_all_its_tasks(client: Client) -> None:
    await client.enqueue_many(Job(n=n) for n in range(3))
    assert await client.purge("steer") == 3
    assert [q.waiting for q in await client.queues()] == [0]
    with pytest.raises(ConfigError, match="has no queue 'nowhere'"):
        await client.purge("nowhere")
