"""The worker (taskframe.worker): runs handlers, serves lanes in priority order, holds the
queue's limits, feeds every subscriber group, runs exactly-once tasks once, stops cleanly.

Run in the test's loop (`running_worker`), several at once each on its own connection
(the `workers` fixture) where a guarantee spans workers."""

import asyncio
import threading
import time
from collections import Counter

import pytest

from taskframe import (
    App,
    Client,
    ConfigError,
    Context,
    Event,
    Task,
    TaskState,
    Worker,
    provision,
)
from taskframe import _topology as topology
from taskframe.testing import eventually, running_worker
from tests.apps import Add, Slow, build
from tests.conftest import Workers


class Job(Task[str], queue="lanes"):
    n: int


class Urgent(Task[str], queue="lanes", priority="high"):
    n: int


class Sleepy(Task[None], queue="limited", results=False):
    seconds: float = 0.05


class Charge(Task[str], queue="payments"):
    order: int
    seconds: float = 0.0


class OrderPlaced(Event):
    order: int


class InvoiceSent(Event, name="billing.invoice-sent"):
    order: int


# Running handlers -----------------------------------------------------------------------


async def test_handler_result_comes_back_typed(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(Add(a=2, b=3))
    async with running_worker(build(client.namespace, calls), client):
        assert await run.result(timeout=5) == 5
    status = await run.status()
    assert status.state is TaskState.SUCCEEDED
    assert status.attempt == 1
    assert calls == [f"add:{run.id}:1"]


async def test_plain_publish_without_headers_is_accepted(client: Client) -> None:
    """Another language's producer may send only the subject and the JSON body."""
    calls: list[str] = []
    app = build(client.namespace, calls)
    async with running_worker(app, client) as worker:
        await client.js.publish(f"{client.namespace}.tasks.math.Add", b'{"a": 40, "b": 2}')
        await eventually(lambda: worker.stats.succeeded == 1, "the plain message to run")
    assert calls == ["add:math-1:1"]  # named after its queue and stream sequence
    status = await client.status("math-1")
    assert status is not None
    assert status.result == 42


async def test_sync_handlers_run_in_threads_alongside_async_ones(client: Client) -> None:
    app = App(client.namespace)
    threads: set[str] = set()

    @app.handle(Add)
    def add(job: Add, ctx: Context) -> int:
        threads.add(threading.current_thread().name)
        return job.a + job.b

    runs = await client.enqueue_many(Add(a=i, b=0) for i in range(20))
    async with running_worker(app, client):
        assert [await r.result(timeout=5) for r in runs] == list(range(20))
    assert threads
    assert all(name.startswith("taskframe") for name in threads)


async def test_concurrency_bounds_running_tasks(client: Client) -> None:
    app = App(client.namespace)
    running = 0
    peak = 0

    @app.handle(Slow)
    async def slow(job: Slow, ctx: Context) -> float:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(job.seconds)
        running -= 1
        return job.seconds

    runs = await client.enqueue_many(Slow(seconds=0.05) for _ in range(40))
    async with running_worker(app, client, concurrency=4):
        for run in runs:
            await run.result(timeout=10)
    assert peak == 4


# Starting and stopping ------------------------------------------------------------------


async def test_stop_hands_unstarted_tasks_back_and_finishes_running_ones(client: Client) -> None:
    calls: list[str] = []
    app = build(client.namespace, calls)
    runs = await client.enqueue_many(Slow(seconds=0.3) for _ in range(10))
    worker = Worker(app, client, concurrency=2, prefetch=8, grace=5.0)
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.stats.running == 2, "two tasks running")
    worker.stop()
    await task
    assert worker.stats.succeeded == 2
    # Everything else went back to the queue at once and a new worker takes it.
    async with running_worker(app, client, concurrency=10):
        results = [await r.result(timeout=10) for r in runs]
    assert results == [0.3] * 10
    assert len([c for c in calls if c.startswith("slow")]) == 10


async def test_a_worker_refuses_what_it_cannot_run(client: Client) -> None:
    with pytest.raises(ConfigError, match="is not the client's"):
        Worker(build("elsewhere"), client)
    with pytest.raises(ConfigError, match=r"no handlers for queue\(s\) \['nope'\]"):
        Worker(build(client.namespace), client, queues=["nope"])
    with pytest.raises(ConfigError, match="nothing to run"):
        Worker(App(client.namespace), client)
    with pytest.raises(ConfigError, match="concurrency"):
        Worker(build(client.namespace), client, concurrency=0)
    with pytest.raises(ConfigError, match="max_tasks"):
        Worker(build(client.namespace), client, max_tasks=0)


async def test_a_worker_with_max_tasks_starts_that_many_then_stops_by_itself(
    client: Client,
) -> None:
    runs = await client.enqueue_many(Add(a=i, b=1) for i in range(8))
    app = build(client.namespace)
    limited = Worker(app, client, queues=["math"], concurrency=2, max_tasks=3)
    await asyncio.wait_for(limited.run(), 10)
    assert (limited.stats.started, limited.stats.succeeded) == (3, 3)
    async with running_worker(app, client, queues=["math"]):  # takes what it handed back
        assert [await r.result(timeout=10) for r in runs] == [i + 1 for i in range(8)]


async def test_worker_repr_reads_well(client: Client) -> None:
    worker = Worker(build(client.namespace), client, queues=["math"])
    assert repr(worker) == (
        f"<Worker {client.namespace} id={worker.id} queues=['math'] groups=[] "
        "concurrency=64 running=0 succeeded=0 retried=0 dead=0 lost=0>"
    )


# Priorities -----------------------------------------------------------------------------


async def test_a_high_task_overtakes_a_backlog_of_low_ones(client: Client) -> None:
    order: list[str] = []
    app = App(client.namespace)
    app.queue("lanes", priorities=("high", "default", "low"))

    @app.handle(Job)
    async def job(task: Job, ctx: Context) -> str:
        order.append(f"job-{task.n}")
        return "job"

    @app.handle(Urgent)
    async def urgent(task: Urgent, ctx: Context) -> str:
        order.append("urgent")
        return "urgent"

    await provision(app, client)
    await client.enqueue_many(Job(n=i) for i in range(1000))  # the default lane
    lows = await client.enqueue_many((Job(n=1000 + i) for i in range(1000)), priority="low")
    urgent_run = await client.enqueue(Urgent(n=0))  # the model's default lane: high
    async with running_worker(app, client, concurrency=1, prefetch=4):
        assert await urgent_run.result(timeout=20) == "urgent"
        await lows[-1].result(timeout=30)
    position = order.index("urgent")
    assert position <= 5, position  # only what the worker already held went first
    assert len(order) == 2001  # the lower lanes still drained once higher ones were empty
    # The default lane ran before the low lane.
    assert max(order.index(f"job-{i}") for i in range(1000)) < order.index("job-1000")


# Limits across workers ------------------------------------------------------------------


async def test_max_in_flight_holds_across_workers(
    namespace: str, client: Client, workers: Workers
) -> None:
    running = 0
    peak = 0
    done = 0
    app = App(namespace)
    app.queue("limited", max_in_flight=5)

    @app.handle(Sleepy)
    async def sleepy(job: Sleepy, ctx: Context) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(job.seconds)
        running -= 1
        done += 1

    async with workers(app, 3, concurrency=10, prefetch=0):
        await client.enqueue_many(Sleepy() for _ in range(50))
        await eventually(lambda: done == 50, "50 tasks done", timeout=20)
    assert peak == 5


async def test_rate_limit_holds_across_workers(
    namespace: str, client: Client, workers: Workers
) -> None:
    starts: list[float] = []
    app = App(namespace)
    app.queue("limited", rate_limit="20/s")

    @app.handle(Sleepy)
    async def sleepy(job: Sleepy, ctx: Context) -> None:
        starts.append(time.time())

    async with workers(app, 3, concurrency=10):
        await client.enqueue_many(Sleepy(seconds=0) for _ in range(80))
        await eventually(lambda: len(starts) == 80, "80 tasks started", timeout=20)
    per_second = Counter(int(t) for t in starts)
    assert max(per_second.values()) <= 20, per_second
    full = sorted(per_second)[1:-1]  # whole seconds only
    assert full, per_second
    assert all(per_second[s] >= 18 for s in full), per_second


# Events ---------------------------------------------------------------------------------


async def test_every_group_gets_every_event_once(
    namespace: str, client: Client, workers: Workers
) -> None:
    seen: dict[str, list[int]] = {"billing": [], "search": [], "audit": []}
    app = App(namespace)

    @app.subscribe(OrderPlaced, group="billing")
    async def bill(event: OrderPlaced, ctx: Context) -> None:
        seen["billing"].append(event.order)
        await ctx.publish(InvoiceSent(order=event.order))

    @app.subscribe(OrderPlaced, group="search")
    async def index(event: OrderPlaced, ctx: Context) -> None:
        seen["search"].append(event.order)

    @app.subscribe(InvoiceSent, group="audit")
    async def audit(event: InvoiceSent, ctx: Context) -> None:
        seen["audit"].append(event.order)

    async with workers(app, 2) as running:
        for order in range(30):
            await client.publish(OrderPlaced(order=order))
        await eventually(
            lambda: sum(w.stats.succeeded for w in running) == 90, "every group to ack each"
        )
        assert {group: sorted(orders) for group, orders in seen.items()} == {
            "billing": list(range(30)),
            "search": list(range(30)),
            "audit": list(range(30)),
        }

        async def stream_empty() -> bool:  # acks are applied by the server after they arrive
            info = await client.js.stream_info(topology.events_stream(namespace))
            return info.state.messages == 0

        await eventually(stream_empty, "every group's acks to empty the event stream")


# Exactly-once ---------------------------------------------------------------------------


def charge_app(namespace: str, runs: list[int], live: list[int]) -> App:
    app = App(namespace)
    app.queue("payments", duplicate_window=1.0)

    @app.handle(Charge, exactly_once=True)
    async def charge(job: Charge, ctx: Context) -> str:
        live.append(job.order)
        assert live.count(job.order) == 1, "ran on two workers at once"
        runs.append(job.order)
        await asyncio.sleep(job.seconds)
        live.remove(job.order)
        return f"charged {job.order}"

    return app


async def test_exactly_once_task_never_runs_again_after_it_completed(client: Client) -> None:
    runs: list[int] = []
    app = charge_app(client.namespace, runs, [])
    first = await client.enqueue(Charge(order=1), key="charge-1")
    async with running_worker(app, client):
        assert await first.result(timeout=5) == "charged 1"
    # As if storing its status had failed after the claim was marked done (broker away):
    # the redelivery that finds it done stores the status again from the claim.
    results = await client.js.key_value(topology.results_bucket(client.namespace))
    await results.purge(first.id)
    assert await client.status(first.id) is None

    async def stored_again() -> bool:  # past the duplicate window the stream takes it again
        return not (await client.enqueue(Charge(order=1), key="charge-1")).duplicate

    async with running_worker(app, client) as worker:
        await eventually(stored_again, "the 1 s duplicate window to pass")
        await eventually(lambda: worker.stats.skipped == 1, "the repeat to be skipped")
        assert worker.stats.succeeded == 0
    assert runs == [1]
    assert await first.result(timeout=5) == "charged 1"


async def test_exactly_once_task_never_runs_on_two_workers_at_once(
    namespace: str, client: Client, workers: Workers
) -> None:
    runs: list[int] = []
    live: list[int] = []
    app = charge_app(namespace, runs, live)
    async with workers(app, 3) as running:
        # Three copies of one task (one id, three message ids), as a retrying producer
        # outside the dedupe window would make.
        for copy in range(3):
            await client.js.publish(
                f"{namespace}.tasks.payments.Charge",
                Charge(order=9, seconds=0.5).model_dump_json().encode(),
                headers={"Tf-Id": "charge-9", "Nats-Msg-Id": f"copy-{copy}"},
            )
        await eventually(
            lambda: sum(w.stats.skipped + w.stats.succeeded for w in running) == 3,
            "every copy to be settled",
        )
    assert runs == [9]
