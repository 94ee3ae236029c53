"""The Context a handler gets (taskframe.context): who it is running, a logger that says
so, a heartbeat the server hears, and the worker's connection to enqueue and publish."""

import asyncio
import logging

import pytest

from taskframe import App, Client, Context, Event, Retry, Task, connect
from taskframe import _topology as topology
from taskframe.testing import NatsServer, eventually, running_worker
from tests.faultkit import TASKFRAME, AckTap, Procs


class Greet(Task[str], queue="ctx"):
    name: str


class Followed(Task[str], queue="ctx"):
    parent: str


class Greeted(Event):
    name: str


async def test_a_handler_sees_its_run_and_reaches_the_broker_through_its_context(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskframe.task")
    seen: list[Context] = []
    reprs: list[str] = []
    follow_ups: list[str] = []
    events: list[tuple[str, str]] = []
    published: list[str] = []
    app = App(client.namespace)

    @app.handle(Greet, max_attempts=2)
    async def greet(job: Greet, ctx: Context) -> str:
        seen.append(ctx)
        reprs.append(repr(ctx))
        if ctx.attempt == 1:
            raise Retry(delay=0.01)
        ctx.log.info("greeting %s", job.name)
        await ctx.heartbeat()
        follow_up = await ctx.enqueue(Followed(parent=ctx.task_id), key=f"after-{ctx.task_id}")
        follow_ups.append(follow_up.id)
        published.append(await ctx.publish(Greeted(name=job.name)))
        return f"hello {job.name}"

    @app.handle(Followed)
    async def followed(job: Followed, ctx: Context) -> str:
        return job.parent

    @app.subscribe(Greeted, group="audit")
    async def audit(event: Greeted, ctx: Context) -> None:
        events.append((ctx.task_id, event.name))

    async with (
        AckTap(client, topology.queue_stream(client.namespace, "ctx")) as acks,
        running_worker(app, client) as worker,
    ):
        run = await client.enqueue(Greet(name="ada"))
        assert await run.result(timeout=10) == "hello ada"
        [follow_up] = follow_ups
        assert await client.handle(Followed, follow_up).result(timeout=10) == run.id
        await eventually(lambda: events, "the subscriber to get the event")

    first, second = seen
    assert (second.task_id, second.task, second.queue) == (run.id, "Greet", "ctx")
    assert (first.attempt, second.attempt, second.max_attempts) == (1, 2, 2)
    assert reprs == [f"<Context Greet id={run.id} attempt={n}/2>" for n in (1, 2)]
    assert second.client is worker.client
    [record] = [r for r in caplog.records if r.name == "taskframe.task"]
    assert record.getMessage() == "greeting ada"
    assert (record.task_id, record.task) == (run.id, "Greet")  # type: ignore[attr-defined]
    assert acks.seen(delivered=2, kinds=("+WPI",)), "the heartbeat reached the server"
    assert events == [(published[0], "ada")]  # the event's id is the one publish returned
    again = await client.enqueue(Followed(parent=run.id), key=f"after-{run.id}")
    assert again.duplicate  # the handler's key was used
    assert again.id == follow_up


class Count(Task[int], queue="ctx-progress"):
    to: int


async def test_progress_is_seen_from_another_client_and_a_tight_loop_writes_a_handful(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    release = asyncio.Event()
    app = App(client.namespace)

    @app.handle(Count)
    async def count(job: Count, ctx: Context) -> int:
        await ctx.progress(0, job.to, note="starting")
        await release.wait()
        for done in range(1, job.to + 1):
            await ctx.progress(done, job.to)
        return job.to

    run = await client.enqueue(Count(to=10_000))
    writes = await client.nc.subscribe(topology.report_subject(client.namespace, run.id))
    assert await run.progress() is None
    async with (
        connect(nats_server.url, namespace=client.namespace) as own,
        running_worker(app, own),
    ):
        first = await eventually(run.progress, "the first report")
        assert first is not None
        assert (first.done, first.total, first.note, first.attempt) == (0, 10_000, "starting", 1)
        scope = ("--namespace", client.namespace, "--url", nats_server.url)
        shown = await procs.run(*TASKFRAME, "status", run.id, *scope)
        assert shown.returncode == 0, shown.stderr
        assert "STATE    running" in shown.stdout
        assert "PROGRESS 0/10000 (starting)" in shown.stdout
        release.set()
        assert await run.result(timeout=5) == 10_000
    last = await run.progress()
    assert last is not None
    assert (last.done, last.total, last.note) == (10_000, 10_000, None)
    await client.nc.flush()
    written = writes.pending_msgs
    await writes.unsubscribe()
    assert 2 <= written <= 4  # the first, the last, and one per 0.5 s between
