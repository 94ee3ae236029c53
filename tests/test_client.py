"""The producer side (taskframe.client): connect, enqueue (now, later, once per key), status
and results, queue counts, dead letters and their replay."""

import asyncio
import dataclasses
import time
from datetime import UTC, datetime, timedelta

import pytest

from taskframe import (
    App,
    Client,
    ConfigError,
    ConnectError,
    Context,
    PayloadTooLargeError,
    QueueInfo,
    ResultTimeoutError,
    Retry,
    Task,
    TaskCancelledError,
    TaskState,
    connect,
    provision,
)
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._publish import publish_stored
from taskframe._results import status_record
from taskframe.testing import NatsServer, eventually, running_worker
from tests.apps import Add, AlwaysFails, Quiet, build


class Blob(Task[None], queue="blobs"):
    data: str


class Stamp(Task[float], queue="timed"):
    """Returns the time its handler started."""

    n: int = 0


class Job(Task[str], queue="lanes"):
    n: int


class Urgent(Task[str], queue="lanes", priority="high"):
    n: int


def stamp_app(namespace: str, headers: list[dict[str, str]] | None = None) -> App:
    app = App(namespace)

    @app.handle(Stamp)
    async def stamp(job: Stamp, ctx: Context) -> float:
        if headers is not None:
            headers.append(dict(ctx.headers))
        return time.time()

    return app


async def stored(client: Client, queue: str) -> int:
    """Messages the queue's stream holds."""
    info = await client.js.stream_info(topology.queue_stream(client.namespace, queue))
    return info.state.messages


# Connecting -----------------------------------------------------------------------------


async def test_connect_to_nothing_is_a_connect_error() -> None:
    with pytest.raises(ConnectError, match="cannot reach NATS"):
        async with connect("nats://127.0.0.1:1", namespace="x"):
            pass


async def test_producer_and_worker_on_separate_connections(
    nats_server: NatsServer, namespace: str
) -> None:
    async with (
        connect(nats_server.url, namespace=namespace) as producer,
        connect(nats_server.url, namespace=namespace) as consumer,
    ):
        runs = [await producer.enqueue(Add(a=i, b=1)) for i in range(3)]
        async with running_worker(build(namespace), consumer):
            results = await asyncio.gather(*(r.result(timeout=10) for r in runs))
        assert results == [1, 2, 3]
        assert (
            repr(producer) == f"<Client namespace='{namespace}' url='{nats_server.url}' connected>"
        )
    assert repr(producer).endswith(" closed>")


# Enqueueing -----------------------------------------------------------------------------


async def test_enqueue_returns_once_the_task_is_stored(client: Client) -> None:
    run = await client.enqueue(Add(a=1, b=2))
    assert await stored(client, "math") == 1
    assert len(run.id) == 36
    assert not run.duplicate
    assert repr(run) == f"<TaskRun Add id={run.id}>"
    assert (await run.status()).state is TaskState.QUEUED
    assert await client.status(run.id) is None


async def test_a_repeated_key_is_enqueued_once_and_names_the_same_task(client: Client) -> None:
    first = await client.enqueue(Add(a=1, b=2), key="order-42")
    again = await client.enqueue(Add(a=1, b=2), key="order-42")
    other = await client.enqueue(Add(a=1, b=2), key="order-43")
    assert again.duplicate
    assert not first.duplicate
    assert not other.duplicate
    assert again.id == first.id != other.id
    assert (first.id, other.id) == ("order-42", "order-43")  # the key is the id, in any language
    assert await stored(client, "math") == 2


@pytest.mark.parametrize("key", ["", "order:42", "a b", "a..b", ".a", "é", "k" * 257])
async def test_a_key_that_cannot_be_a_task_id_is_refused_before_sending(
    client: Client, key: str
) -> None:
    with pytest.raises(ConfigError, match="is the task id"):
        await client.enqueue(Add(a=1, b=2), key=key)
    await client.enqueue(Add(a=1, b=2), key="order/42.v2_=-")
    assert await stored(client, "math") == 1


async def test_enqueue_many_stores_every_task_in_order(client: Client) -> None:
    runs = await client.enqueue_many(Add(a=i, b=i) for i in range(500))
    assert len({r.id for r in runs}) == 500
    assert await stored(client, "math") == 500
    async with running_worker(build(client.namespace), client):
        assert [await r.result(timeout=10) for r in runs[:5]] == [0, 2, 4, 6, 8]


async def test_oversize_payload_is_refused_before_sending_when_offloading_is_off(
    nats_server: NatsServer, namespace: str, client: Client
) -> None:
    async with connect(nats_server.url, namespace=namespace, offload_over=0) as plain:
        with pytest.raises(PayloadTooLargeError, match="over the server's max_payload") as info:
            await plain.enqueue(Blob(data="x" * 1_100_000))
        assert info.value.size > info.value.max_payload
        # The connection survived: the next enqueue works.
        await plain.enqueue(Add(a=1, b=1))
        assert plain.nc.is_connected


async def test_delayed_task_runs_no_earlier_than_asked(client: Client) -> None:
    async with running_worker(stamp_app(client.namespace), client):
        asked = time.time()
        run = await client.enqueue(Stamp(), delay=1.0)
        assert (await run.status()).state is TaskState.QUEUED
        started = await run.result(timeout=10)
    assert asked + 1.0 <= started <= asked + 2.0


async def test_run_at_a_time_in_the_past_runs_at_once(client: Client) -> None:
    headers: list[dict[str, str]] = []
    async with running_worker(stamp_app(client.namespace, headers), client):
        asked = time.time()
        run = await client.enqueue(Stamp(), at=datetime.now(UTC) - timedelta(minutes=5))
        started = await run.result(timeout=10)
    assert started - asked < 1.0
    # What the server puts on the task it publishes (docs/wire-format.md, "Delayed tasks")
    scheduler = wire.once_subject(client.namespace, "timed", run.id)
    assert headers == [
        {wire.ID: run.id, "Nats-Scheduler": scheduler, "Nats-Schedule-Next": "purge"}
    ]


async def test_naive_datetimes_are_refused(client: Client) -> None:
    with pytest.raises(ConfigError, match="timezone-aware"):
        await client.enqueue(Stamp(), at=datetime.now())


async def test_delayed_task_survives_a_server_crash(own_server: NatsServer) -> None:
    async with connect(own_server.url, namespace="delay") as tf:
        run_id = (await tf.enqueue(Stamp(n=1), delay=1.5)).id
    own_server.kill()
    own_server.start()  # the same port and store
    async with (
        connect(own_server.url, namespace="delay") as tf,
        running_worker(stamp_app("delay"), tf),
    ):
        assert await tf.handle(Stamp, run_id).result(timeout=10) > 0


# Status and results ---------------------------------------------------------------------


async def test_result_times_out_without_a_worker(client: Client) -> None:
    run = await client.enqueue(Add(a=1, b=2))
    with pytest.raises(ResultTimeoutError):
        await run.result(timeout=0.3)


async def test_result_of_a_task_without_results_is_a_clear_error(client: Client) -> None:
    run = await client.enqueue(Quiet(n=1))
    with pytest.raises(ConfigError, match="results=False"):
        await run.result(timeout=1)


async def test_a_late_progress_record_never_replaces_a_final_one(client: Client) -> None:
    await provision(App(client.namespace), client)  # the results bucket
    ns, task_id = client.namespace, "late-running"
    progress = topology.progress_subject(ns, task_id)
    running = status_record(task_id, "Add", TaskState.RUNNING, 1)
    await publish_stored(client.nc, client.settings, progress, running)
    status = await client.status(task_id)
    assert status is not None
    assert status.state is TaskState.RUNNING

    done = status_record(task_id, "Add", TaskState.SUCCEEDED, 2, result_json=b"3")
    await publish_stored(client.nc, client.settings, topology.result_subject(ns, task_id), done)
    # A `running` write of attempt 1 that sat in a cut connection arrives after the success.
    await publish_stored(client.nc, client.settings, progress, running)
    status = await client.status(task_id)
    assert status is not None
    assert (status.state, status.attempt, status.result) == (TaskState.SUCCEEDED, 2, 3)


# Queue counts ---------------------------------------------------------------------------


async def test_queues_counts_every_lane_of_a_queue(client: Client, nats_server: NatsServer) -> None:
    ns = client.namespace
    release = asyncio.Event()
    app = App(ns)
    app.queue("lanes", priorities=("high", "default", "low"))

    @app.handle(Job)
    async def job(task: Job, ctx: Context) -> str:
        await release.wait()
        return "job"

    @app.handle(Urgent)
    async def urgent(task: Urgent, ctx: Context) -> str:
        await release.wait()
        return "urgent"

    await provision(app, client)
    runs = await client.enqueue_many(Job(n=i) for i in range(3))  # the default lane
    runs += await client.enqueue_many((Job(n=i) for i in range(2)), priority="low")
    runs.append(await client.enqueue(Urgent(n=0)))  # its model's lane: high
    await client.js.publish(f"{ns}.tasks.lanes.Job.high", b"not json")  # one dead letter
    lanes = ("workers", "workers-high", "workers-low")
    assert await client.queues() == [QueueInfo(ns, "lanes", 7, 0, 0, 0, False, lanes)]

    async with running_worker(app, client, concurrency=2, prefetch=0) as worker:
        await eventually(lambda: worker.stats.running == 2 and worker.stats.dead == 1, "2 running")
        [held] = await client.queues()
        assert (held.waiting, held.in_flight, held.redelivered, held.dead) == (4, 2, 0, 1)
        release.set()
        assert [await r.result(timeout=10) for r in runs][-1] == "urgent"
    [after] = await client.queues()
    assert (after.waiting, after.in_flight, after.dead) == (0, 0, 1)
    async with connect(nats_server.url, namespace=f"{ns}x") as elsewhere:
        await elsewhere.enqueue(Add(a=1, b=1))
        assert [(q.namespace, q.queue) for q in await elsewhere.queues()] == [(f"{ns}x", "math")]
        everywhere = await elsewhere.queues(every_namespace=True)
    assert {after, *await client.queues()} <= set(everywhere)
    assert (f"{ns}x", "math", 1) in {(q.namespace, q.queue, q.waiting) for q in everywhere}


async def test_queues_are_found_among_more_streams_than_one_page_lists(
    own_server: NatsServer,
) -> None:
    async with connect(own_server.url, namespace="paged") as client:
        for n in range(257):  # named to sort before every TF_ stream
            await client.js.add_stream(name=f"A{n:03}", subjects=[f"a.{n}"], storage="memory")
        await client.enqueue(Add(a=1, b=1))
        assert [(q.namespace, q.queue) for q in await client.queues()] == [("paged", "math")]


# Dead letters ---------------------------------------------------------------------------


async def test_dead_letters_are_filtered_by_queue_task_and_reason_and_read_in_pages(
    client: Client,
) -> None:
    ns = client.namespace
    app = build(ns)
    await provision(app, client)
    await client.enqueue(AlwaysFails(note="reject"))  # rejected
    await client.js.publish(f"{ns}.tasks.math.Add", b"{")  # invalid
    await client.js.publish(f"{ns}.tasks.slow.Slow", b"{")  # invalid, another queue
    await client.js.publish(f"{ns}.tasks.math.Nope", b"{}")  # unknown-task
    async with running_worker(app, client) as worker:
        await eventually(lambda: worker.stats.dead == 4, "four dead letters")

    every = await client.dead_letters()
    assert sorted(letter.reason for letter in every) == [
        "invalid",
        "invalid",
        "rejected",
        "unknown-task",
    ]
    assert [letter.seq for letter in every] == sorted(letter.seq for letter in every)
    assert [x.original_subject for x in await client.dead_letters(queue="slow")] == [
        f"{ns}.tasks.slow.Slow"
    ]
    assert {x.reason for x in await client.dead_letters(task="Add")} == {"invalid"}
    assert len(await client.dead_letters(reason="invalid")) == 2
    assert await client.dead_letters(queue="math", reason="nothing-like-it") == []
    first = await client.dead_letters(limit=3)
    rest = await client.dead_letters(after=first[-1].seq)
    assert first + rest == every
    assert await client.dead_letters(after=every[-1].seq) == []


async def test_replay_enqueues_again_with_the_same_id_and_removes_the_letter(
    client: Client,
) -> None:
    app = build(client.namespace)
    await provision(app, client)
    await client.js.publish(f"{client.namespace}.tasks.math.Add", b'{"a": "x", "b": 1}')
    async with running_worker(app, client) as worker:
        await eventually(lambda: worker.stats.dead == 1, "the bad task to be dead")
        [letter] = await client.dead_letters()
        assert letter.reason == "invalid"
        # Fix the payload by hand, as an operator would, then replay it.
        fixed = dataclasses.replace(letter, body=Add(a=41, b=1).model_dump_json().encode())
        await client.replay(fixed)
        assert await client.dead_letters() == []
        await eventually(lambda: worker.stats.succeeded == 1, "the fixed task to succeed")
    assert worker.stats.dead == 1
    status = await client.status(letter.task_id)
    assert status is not None
    assert (status.state, status.result) == (TaskState.SUCCEEDED, 42)


async def test_a_replayed_task_is_queued_again_until_it_runs(client: Client) -> None:
    run = await client.enqueue(AlwaysFails(note="reject"))
    calls: list[str] = []
    async with running_worker(build(client.namespace, calls), client) as worker:
        await eventually(lambda: worker.stats.dead == 1, "the task to be dead")
    assert (await run.status()).state is TaskState.DEAD
    [letter] = await client.dead_letters()
    await client.replay(letter)
    status = await run.status()
    assert (status.state, status.attempt) == (TaskState.QUEUED, 0)
    async with running_worker(build(client.namespace, calls), client) as worker:
        await eventually(lambda: worker.stats.dead == 1, "the replayed task to be dead again")
    assert (await run.status()).state is TaskState.DEAD
    assert calls == ["fails:1", "fails:1"]  # attempt 1 again


async def test_a_non_ascii_error_reads_back_as_written_and_replays(client: Client) -> None:
    run = await client.enqueue(AlwaysFails(note="unicode"))
    async with running_worker(build(client.namespace), client) as worker:
        await eventually(lambda: worker.stats.dead == 1, "the task to be dead")
    [letter] = await client.dead_letters()
    assert letter.error == "café ü: handler always raises"
    assert all(isinstance(value, str) for value in letter.headers.values())
    await client.replay(letter)
    assert (await run.status()).state is TaskState.QUEUED


class Nap(Task[str], queue="naps"):
    """Sleeps a minute unless `fail_first`, which retries its first attempt after 1 s."""

    fail_first: bool = False


def nap_app(namespace: str, started: list[str]) -> App:
    app = App(namespace)

    @app.handle(Nap)
    async def nap(job: Nap, ctx: Context) -> str:
        started.append(ctx.task_id)
        if job.fail_first and ctx.attempt == 1:
            raise Retry(delay=1.0)
        if not job.fail_first:
            await asyncio.sleep(60)
        return "woke"

    return app


async def test_cancel_stops_a_running_handler_on_the_worker_holding_it_for_good(
    client: Client, nats_server: NatsServer
) -> None:
    started: list[str] = []
    app = nap_app(client.namespace, started)
    ns, url = client.namespace, nats_server.url
    async with (
        connect(url, namespace=ns, ack_wait=1.0) as one,
        connect(url, namespace=ns, ack_wait=1.0) as two,
        running_worker(app, one) as first,
        running_worker(app, two) as second,
    ):
        run = await client.enqueue(Nap())
        await eventually(lambda: started, "the handler to start")
        holder = first if first.stats.running else second
        began = time.monotonic()
        assert await run.cancel() is True
        await eventually(lambda: holder.stats.cancelled == 1, "the attempt to stop", timeout=1.0)
        assert time.monotonic() - began < 1.0
        with pytest.raises(TaskCancelledError) as caught:
            await run.result(timeout=5)
        assert caught.value.state == "cancelled"
        await asyncio.sleep(2.5)  # over two ack_waits: a message left unsettled comes back
        assert started == [run.id]
        assert (first.stats.running, second.stats.running) == (0, 0)
        assert first.stats.cancelled + second.stats.cancelled == 1
    assert (await run.status()).state is TaskState.CANCELLED
    assert await run.cancel() is False  # finished: nothing to cancel


async def test_a_cancelled_waiting_delayed_or_retrying_task_never_runs(
    client: Client, nats_server: NatsServer
) -> None:
    started: list[str] = []
    app = nap_app(client.namespace, started)
    retrying = await client.enqueue(Nap(fail_first=True))
    async with running_worker(app, client) as early:
        await eventually(lambda: early.stats.retried == 1, "its first attempt to fail")
    waiting = await client.enqueue(Nap())
    delayed = await client.enqueue(Nap(), delay=0.5)
    control = await client.enqueue(Nap(fail_first=True), delay=0.5)
    for run in (waiting, delayed, retrying):
        assert await run.cancel() is True
    async with (
        connect(nats_server.url, namespace=client.namespace) as late,
        running_worker(app, late) as worker,  # started after the cancel requests
    ):
        assert await control.result(timeout=10) == "woke"  # due after the delayed one
        await eventually(lambda: worker.stats.cancelled == 1, "the retry to be dropped")
    assert started == [retrying.id, control.id, control.id]
    for run in (waiting, delayed, retrying):
        assert (await run.status()).state is TaskState.CANCELLED
        with pytest.raises(TaskCancelledError):
            await run.result(timeout=1)
    assert [(q.waiting, q.in_flight) for q in await client.queues()] == [(0, 0)]
    assert await client.cancel(wire.new_task_id()) is False  # never enqueued
