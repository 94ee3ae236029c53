"""Delivery features: delays, periodic schedules, events, priorities, dedupe, exactly-once
claims, and global limits, each against a real server with several workers."""

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from taskframe import App, Client, Context, Event, Task, Worker, connect, provision
from taskframe._server import NatsServer
from taskframe._topology import events_stream, queue_stream, results_bucket
from taskframe.schedules import stored_schedules
from taskframe.testing import running_worker, work_until
from tests.faultkit import until_async


class Stamp(Task[float], queue="timed"):
    """Returns the time its handler started."""

    n: int = 0


class Ping(Task[None], queue="cron", results=False):
    note: str = ""


class Job(Task[str], queue="lanes"):
    n: int


class Urgent(Task[str], queue="lanes", priority="high"):
    n: int


class OrderPlaced(Event):
    order: int


class InvoiceSent(Event, name="billing.invoice-sent"):
    order: int


class Charge(Task[str], queue="payments"):
    order: int
    seconds: float = 0.0


class Sleepy(Task[None], queue="limited", results=False):
    seconds: float = 0.05


class Tally:
    """Counts handler calls and wakes the test when a target is reached."""

    def __init__(self, target: int) -> None:
        self.count = 0
        self.target = target
        self._reached = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self._reached.set()

    async def reached(self, timeout: float) -> None:
        await asyncio.wait_for(self._reached.wait(), timeout)


async def settled(
    running: list[Worker], condition: Callable[[], bool], timeout: float = 20
) -> None:
    """Wait until `condition()` holds, checking each time one of the workers settles a message."""
    async with asyncio.timeout(timeout):
        while not condition():
            for worker in running:
                worker.progress.clear()
            if condition():
                return
            waits = [asyncio.ensure_future(w.progress.wait()) for w in running]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()


def stamp_app(namespace: str) -> App:
    app = App(namespace)

    @app.handle(Stamp)
    async def stamp(job: Stamp, ctx: Context) -> float:
        return time.time()

    return app


@asynccontextmanager
async def workers(app: App, url: str, count: int, **options: object) -> AsyncIterator[list[Worker]]:
    """`count` workers, each with its own connection, as separate processes would have."""
    async with AsyncExitStack() as stack:
        started = []
        for _ in range(count):
            client = await stack.enter_async_context(
                connect(url, namespace=app.namespace, ack_wait=2.0)
            )
            started.append(await stack.enter_async_context(running_worker(app, client, **options)))
        yield started


# Delays -------------------------------------------------------------------------------


async def test_delayed_task_runs_no_earlier_than_asked(client: Client) -> None:
    async with running_worker(stamp_app(client.namespace), client):
        asked = time.time()
        run = await client.enqueue(Stamp(), delay=1.0)
        assert (await run.status()).state.value == "queued"
        started = await run.result(timeout=10)
    assert asked + 1.0 <= started <= asked + 2.0


async def test_run_at_a_time_in_the_past_runs_at_once(client: Client) -> None:
    async with running_worker(stamp_app(client.namespace), client):
        asked = time.time()
        run = await client.enqueue(Stamp(), at=datetime.now(UTC) - timedelta(minutes=5))
        started = await run.result(timeout=10)
    assert started - asked < 1.0


async def test_naive_datetimes_are_refused(client: Client) -> None:
    from taskframe import ConfigError

    with pytest.raises(ConfigError, match="timezone-aware"):
        await client.enqueue(Stamp(), at=datetime.now())


async def test_delayed_task_survives_a_server_crash(tmp_path: Path) -> None:
    server = NatsServer(port=-1, store_dir=tmp_path).start()
    try:
        async with connect(server.url, namespace="delay") as tf:
            run_id = (await tf.enqueue(Stamp(n=1), delay=1.5)).id
        port = server.port
        server.kill()
        server = NatsServer(port=port, store_dir=tmp_path).start()
        async with (
            connect(server.url, namespace="delay") as tf,
            running_worker(stamp_app("delay"), tf),
        ):
            assert await tf.handle(Stamp, run_id).result(timeout=10) > 0
    finally:
        server.stop()


# Periodic schedules ---------------------------------------------------------------------


async def test_a_schedule_fires_once_per_tick_with_three_workers(
    nats_server: NatsServer, namespace: str
) -> None:
    fired: list[float] = []
    ticks = Tally(4)
    app = App(namespace)
    app.schedule(task=Ping(note="tick"), every=1.0, name="heartbeat")

    @app.handle(Ping)
    async def ping(job: Ping, ctx: Context) -> None:
        fired.append(time.time())
        ticks.hit()

    async with workers(app, nats_server.url, 3):
        await ticks.reached(timeout=10)
    assert len(fired) >= 4
    gaps = [b - a for a, b in itertools.pairwise(fired)]
    assert all(0.8 < gap < 1.2 for gap in gaps), gaps  # one per tick: no doubles, no misses


async def test_schedules_are_reconciled_and_listed(client: Client) -> None:
    app = App(client.namespace)
    app.schedule("0 0 3 * * *", Ping(note="nightly"), name="nightly")
    app.schedule(task=Ping(note="often"), every=300.0, name="often")

    @app.handle(Ping)
    async def ping(job: Ping, ctx: Context) -> None: ...

    await provision(app, client)
    listed = {s.name: s for s in await stored_schedules(client.js, client.namespace)}
    assert set(listed) == {"nightly", "often"}
    assert listed["nightly"].expression == "0 0 3 * * *"
    nightly = listed["nightly"].next_fire
    assert nightly is not None
    assert (nightly.hour, nightly.minute, nightly.second) == (3, 0, 0)
    often = listed["often"].next_fire
    assert often is not None
    assert 0 < (often - datetime.now(UTC)).total_seconds() <= 300

    # Provisioning again changes nothing; dropping a declaration removes its schedule.
    await provision(app, client)
    del app.schedules["often"]
    await provision(app, client)
    assert [s.name for s in await stored_schedules(client.js, client.namespace)] == ["nightly"]


# Events --------------------------------------------------------------------------------


async def test_every_group_gets_every_event_once(nats_server: NatsServer, namespace: str) -> None:
    seen: dict[str, list[int]] = {"billing": [], "search": []}
    app = App(namespace)

    @app.subscribe(OrderPlaced, group="billing")
    async def bill(event: OrderPlaced, ctx: Context) -> None:
        seen["billing"].append(event.order)
        await ctx.publish(InvoiceSent(order=event.order))

    @app.subscribe(OrderPlaced, group="search")
    async def index(event: OrderPlaced, ctx: Context) -> None:
        seen["search"].append(event.order)

    invoices: list[int] = []
    audited = Tally(30)

    @app.subscribe(InvoiceSent, group="audit")
    async def audit(event: InvoiceSent, ctx: Context) -> None:
        invoices.append(event.order)
        audited.hit()

    async with (
        workers(app, nats_server.url, 2) as running,
        connect(nats_server.url, namespace=namespace) as producer,
    ):
        for order in range(30):
            await producer.publish(OrderPlaced(order=order))
        await audited.reached(timeout=10)
        assert sorted(seen["billing"]) == list(range(30))
        assert sorted(seen["search"]) == list(range(30))
        assert sorted(invoices) == list(range(30))
        await settled(running, lambda: sum(w.stats.succeeded for w in running) == 90)

        async def stream_empty() -> bool:  # acks are applied by the server after they arrive
            info = await producer.js.stream_info(events_stream(namespace))
            return info.state.messages == 0

        await until_async(stream_empty, "every group's acks to empty the event stream")


async def test_events_before_any_group_are_not_kept_unless_provisioned(client: Client) -> None:
    got: list[int] = []
    app = App(client.namespace)

    @app.subscribe(OrderPlaced, group="late")
    async def late(event: OrderPlaced, ctx: Context) -> None:
        got.append(event.order)

    await client.publish(OrderPlaced(order=1))  # no group yet: nobody keeps it
    await provision(app, client)  # what `taskframe provision` does before a deploy
    await client.publish(OrderPlaced(order=2))
    await work_until(app, client, lambda w: w.stats.succeeded == 1)
    assert got == [2]


async def test_a_failing_subscriber_retries_then_dead_letters(client: Client) -> None:
    from taskframe._retry import Backoff

    attempts: list[int] = []
    app = App(client.namespace)

    @app.subscribe(OrderPlaced, group="flaky", max_attempts=2, backoff=Backoff(0.05))
    async def flaky(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("subscriber down")

    await provision(app, client)
    await client.publish(OrderPlaced(order=7))
    await work_until(app, client, lambda w: w.stats.dead == 1)
    assert attempts == [1, 2]
    info = await client.js.stream_info(
        f"TF_{client.namespace}_DEAD", subjects_filter=f"{client.namespace}.dead._events.>"
    )
    assert info.state.subjects == {f"{client.namespace}.dead._events.flaky.OrderPlaced": 1}


# Priorities ----------------------------------------------------------------------------


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
    await client.enqueue_many(Job(n=i) for i in range(1000))  # the low lane, by default
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


# Dedupe --------------------------------------------------------------------------------


async def test_duplicate_window_is_set_per_queue(client: Client) -> None:
    app = stamp_app(client.namespace)
    app.queue("timed", duplicate_window=1.0)
    await provision(app, client)
    info = await client.js.stream_info(queue_stream(client.namespace, "timed"))
    assert info.config.duplicate_window == 1.0
    first = await client.enqueue(Stamp(), key="k")
    assert (await client.enqueue(Stamp(), key="k")).duplicate
    await asyncio.sleep(1.2)  # let the (server-side) window pass
    again = await client.enqueue(Stamp(), key="k")
    assert not again.duplicate
    assert again.id == first.id


# Exactly-once claims --------------------------------------------------------------------


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
    worker = await work_until(app, client, lambda w: w.stats.succeeded == 1)
    assert await first.result(timeout=5) == "charged 1"
    # As if storing its status had failed after the claim was marked done (broker away):
    # the redelivery that finds it done stores the status again from the claim.
    results = await client.js.key_value(results_bucket(client.namespace))
    await results.purge(first.id)
    assert await client.status(first.id) is None
    await asyncio.sleep(1.2)  # past the duplicate window: the stream takes it again
    again = await client.enqueue(Charge(order=1), key="charge-1")
    assert not again.duplicate
    worker = await work_until(app, client, lambda w: w.stats.skipped == 1)
    assert runs == [1]
    assert worker.stats.succeeded == 0
    assert await again.result(timeout=5) == "charged 1"


async def test_exactly_once_task_never_runs_on_two_workers_at_once(
    nats_server: NatsServer, namespace: str
) -> None:
    runs: list[int] = []
    live: list[int] = []
    app = charge_app(namespace, runs, live)
    async with (
        workers(app, nats_server.url, 3) as running,
        connect(nats_server.url, namespace=namespace) as producer,
    ):
        # Three copies of one task (one id, three message ids), as a retrying producer
        # outside the dedupe window would make.
        for copy in range(3):
            await producer.js.publish(
                f"{namespace}.tasks.payments.Charge",
                Charge(order=9, seconds=0.5).model_dump_json().encode(),
                headers={"Tf-Id": "charge-9", "Nats-Msg-Id": f"copy-{copy}"},
            )
        await settled(
            running, lambda: sum(w.stats.skipped + w.stats.succeeded for w in running) == 3
        )
    assert runs == [9]


# Limits --------------------------------------------------------------------------------


async def test_max_in_flight_holds_across_workers(nats_server: NatsServer, namespace: str) -> None:
    running = 0
    peak = 0
    done = Tally(50)
    app = App(namespace)
    app.queue("limited", max_in_flight=5)

    @app.handle(Sleepy)
    async def sleepy(job: Sleepy, ctx: Context) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(job.seconds)
        running -= 1
        done.hit()

    async with (
        workers(app, nats_server.url, 3, concurrency=10, prefetch=0),
        connect(nats_server.url, namespace=namespace) as producer,
    ):
        await producer.enqueue_many(Sleepy() for _ in range(50))
        await done.reached(timeout=20)
    assert done.count == 50
    assert peak == 5


async def test_rate_limit_holds_across_workers(nats_server: NatsServer, namespace: str) -> None:
    starts: list[float] = []
    started = Tally(80)
    app = App(namespace)
    app.queue("limited", rate_limit="20/s")

    @app.handle(Sleepy)
    async def sleepy(job: Sleepy, ctx: Context) -> None:
        starts.append(time.time())
        started.hit()

    async with (
        workers(app, nats_server.url, 3, concurrency=10),
        connect(nats_server.url, namespace=namespace) as producer,
    ):
        await producer.enqueue_many(Sleepy(seconds=0) for _ in range(80))
        await started.reached(timeout=20)
    assert len(starts) == 80
    per_second = Counter(int(t) for t in starts)
    assert max(per_second.values()) <= 20, per_second
    full = sorted(per_second)[1:-1]  # whole seconds only
    assert full, per_second
    assert all(per_second[s] >= 18 for s in full), per_second
