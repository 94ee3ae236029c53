"""More faults, each accounted for by the ledger: what was acknowledged, what became of it.

Exactly-once tasks whose worker dies, a task that kills its own process, bytes no model
accepts, payloads the server would refuse, producers retrying through a server crash,
dedupe windows, a frozen server and a consumer deleted under running workers. Workers
run as `taskframe worker tests.fault_apps:app` subprocesses with a short ack_wait.
"""

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Awaitable
from datetime import datetime
from typing import Any

import pytest

from taskframe import (
    Client,
    PayloadTooLargeError,
    PublishError,
    Task,
    TaskFailed,
    TaskState,
    connect,
    provision,
)
from taskframe import _topology as topology
from taskframe._server import NatsServer
from taskframe.testing import running_worker
from tests.fault_apps import POISON_ATTEMPTS, Once, Other, Poison, Work, build_app
from tests.faultkit import (
    APP,
    TASKFRAME,
    Procs,
    dead_letters,
    until,
    until_async,
    until_drained,
)
from tests.ledger import Ledger


class Blob(Task[int], queue="work"):
    """Only ever enqueued over-size: it has no handler because it must never reach a worker."""

    data: str


async def produce(
    ledger: Ledger,
    tf: Client,
    count: int,
    *,
    prefix: str,
    pause: float = 0.01,
    seconds: float = 0.05,
    give_up: float = 60.0,
) -> list[float]:
    """Enqueue `count` keyed Work tasks as a careful producer does; return each one's latency.

    A task whose enqueue raised is enqueued again with the same key, so the server stores
    it once however often it is sent; the ledger records both the error and the success.
    """
    latencies = []
    for n in range(count):
        started = time.monotonic()
        while True:
            try:
                await ledger.enqueue(tf, Work(seconds=seconds), key=f"{prefix}{n}")
                break
            except PublishError:
                if time.monotonic() - started > give_up:
                    raise
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(pause)  # a steady trickle, so the fault lands mid-flow
    return latencies


async def test_exactly_once_task_killed_mid_run_completes_once_never_concurrently(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("exactly-once task, worker kill -9 mid-run", procs.ledger)
    a = procs.worker(nats_server.url, concurrency=2)
    b = procs.worker(nats_server.url, concurrency=2)
    await a.wait_log("worker ready")
    await b.wait_log("worker ready")
    runs = await client.enqueue_many(Once(seconds=1.0) for _ in range(6))
    ledger.acknowledge(*runs)

    await until(lambda: procs.ledger.entries("start", pid=a.pid), "A to start a task")
    a.signal(signal.SIGKILL)
    ledger.died(a.pid)
    assert await a.wait_exit() == -signal.SIGKILL
    victims = {e.task_id for e in procs.ledger.entries("start", pid=a.pid)}

    results = await asyncio.gather(*(r.result(timeout=30) for r in runs))
    assert results == [r.id for r in runs]
    await ledger.settle(client)
    killed = ledger.deaths[a.pid]
    figures = await ledger.figures(
        client,
        recover_s=ledger.first_done_after(killed, victims),
        note="B waits out A's claim (3 ack_waits) before it may run A's task",
    )
    figures.record()
    figures.check(exactly_once=True)

    done = Counter(e.task_id for e in procs.ledger.entries("done"))
    assert done == Counter(r.id for r in runs)
    for victim in victims:
        [rerun] = [e for e in procs.ledger.entries("start", victim) if e.pid != a.pid]
        assert rerun.pid == b.pid
        assert rerun.attempt >= 2
        assert rerun.at > killed  # B started it only after A was gone: never both at once
        assert not procs.ledger.entries("done", victim, pid=a.pid)
    assert b.alive


async def test_poison_task_that_kills_its_process_is_dead_as_lost_and_others_go_on(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("poison task kills its worker process", procs.ledger)
    supervisor = procs.worker(nats_server.url, concurrency=2, extra=("--processes", "2"))
    await supervisor.wait_log("worker ready", count=2)
    ledger.acknowledge(*await client.enqueue_many(Work(seconds=0.02) for _ in range(40)))
    poison = await ledger.enqueue(client, Poison())
    ledger.acknowledge(*await client.enqueue_many(Work(seconds=0.02) for _ in range(40)))

    # Every delivery of the poison kills a process; the supervisor restarts each one.
    await supervisor.wait_log("exited with 1; restarting", count=POISON_ATTEMPTS, timeout=20)
    with pytest.raises(TaskFailed) as dead:
        await poison.result(timeout=20)
    after = await ledger.enqueue(client, Work())
    assert await after.result(timeout=20) == after.id
    await ledger.settle(client)
    [letter] = [
        x for x in await dead_letters(client.js, client.namespace) if x["Tf-Id"] == poison.id
    ]
    first = procs.ledger.entries("start", poison.id)[0].at
    died = datetime.fromisoformat(letter["Tf-Died-At"]).timestamp()
    figures = await ledger.figures(
        client,
        recover_s=died - first,
        note="recover = first delivery to dead letter; processes restarted by the supervisor",
    )
    figures.record()
    figures.check(expect_dead={poison.id: "lost"})

    assert dead.value.error_type == "AttemptsExhausted"
    assert letter["Tf-Attempts"] == str(POISON_ATTEMPTS)
    starts = procs.ledger.entries("start", poison.id)
    assert [e.attempt for e in starts] == list(range(1, POISON_ATTEMPTS + 1))
    assert supervisor.alive  # the supervisor never gave up
    assert supervisor.text().count("exited with 1; restarting") == POISON_ATTEMPTS
    await until_drained(client.js, client.namespace, "poison")


async def test_a_few_poison_tasks_do_not_make_the_supervisor_give_up_on_every_worker(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("6 poison tasks under --processes 2", procs.ledger)
    supervisor = procs.worker(nats_server.url, concurrency=1, extra=("--processes", "2"))
    await supervisor.wait_log("worker ready", count=2)
    poisons = [await ledger.enqueue(client, Poison()) for _ in range(6)]

    async def buried_or_given_up() -> bool:
        letters = await dead_letters(client.js, client.namespace)
        return len(letters) == len(poisons) or not supervisor.alive

    # Each poison task kills the process it is delivered to, a second or so after the
    # supervisor restarted it: to the supervisor that looks like a crash loop at start.
    await until_async(buried_or_given_up, "the poison tasks to be buried", timeout=45)
    good = await ledger.enqueue(client, Work())
    await ledger.settle(client, timeout=10 if supervisor.alive else 0)
    gave_up = "giving up" in supervisor.text()
    deaths = supervisor.text().count("exited with 1") + gave_up  # the last one is not logged
    figures = await ledger.figures(
        client, note=f"{deaths} worker deaths" + ("; the supervisor gave up" if gave_up else "")
    )
    figures.record()
    assert not gave_up, "a few bad messages stopped every worker:\n" + supervisor.text()[-1500:]
    assert supervisor.alive
    figures.check(expect_dead=dict.fromkeys((p.id for p in poisons), "lost"))
    assert await good.result(timeout=1) == good.id


async def test_malformed_bytes_wrong_schema_and_unknown_task_are_dead_with_their_reasons(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("malformed, wrong schema, unknown task (raw publishes)", procs.ledger)
    worker = procs.worker(nats_server.url, concurrency=8)
    await worker.wait_log("worker ready")
    ns = client.namespace
    good = []
    expect: dict[str, str] = {}
    poison = [
        (f"{ns}.tasks.work.Work", b'{"seconds": 0.0,', "invalid"),
        (f"{ns}.tasks.work.Add", b'{"a": "one", "b": 2}', "invalid"),
        (f"{ns}.tasks.work.Resize", b'{"url": "a.png"}', "unknown-task"),
    ]
    for subject, body, reason in poison:
        good += await client.enqueue_many(Work() for _ in range(20))
        expect[await ledger.publish_raw(client.js, subject, body)] = reason
    good += await client.enqueue_many(Work() for _ in range(20))
    ledger.acknowledge(*good)

    await ledger.settle(client)
    figures = await ledger.figures(client)
    figures.record()
    figures.check(expect_dead=expect)

    letters = {x["Tf-Id"]: x for x in await dead_letters(client.js, client.namespace)}
    assert {i: letters[i]["Tf-Error-Type"] for i in expect} == dict(
        zip(expect, ["ValidationError", "ValidationError", "UnknownTask"], strict=True)
    )
    assert worker.alive
    assert procs.ledger.pids() == {worker.pid}
    assert "Traceback" not in worker.text()
    await until_drained(client.js, ns, "work")


async def test_oversize_payload_is_refused_before_sending_and_the_connection_stays_up(
    client: Client, procs: Procs
) -> None:
    ledger = Ledger("oversize payload", procs.ledger)
    limit = client.nc.max_payload
    envelope = len(Blob(data="").model_dump_json())
    with pytest.raises(PayloadTooLargeError):
        await ledger.enqueue(client, Blob(data="x" * 2 * limit))
    # The body alone fits, so nats-py would send it; with its headers the server would not
    # take it and would close the whole connection.
    with pytest.raises(PayloadTooLargeError):
        await ledger.enqueue(client, Blob(data="x" * (limit - envelope - 10)))
    assert client.nc.is_connected

    async with running_worker(build_app(client.namespace, procs.ledger.path), client):
        run = await ledger.enqueue(client, Work())
        assert await run.result(timeout=10) == run.id
        await ledger.settle(client)
    figures = await ledger.figures(client)
    figures.record()
    figures.check()
    assert figures.acknowledged == 1
    assert client.nc.is_connected
    assert client.nc.stats["reconnects"] == 0
    info = await client.js.stream_info(topology.queue_stream(client.namespace, "work"))
    assert info.state.last_seq == 1  # only the Work task was ever stored


async def test_producers_retrying_through_a_server_kill_store_each_task_once(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    ledger = Ledger("producer retries across server kill -9 + restart", procs.ledger)
    worker = procs.worker(own_server.url, concurrency=8, ack_wait=2.0, extra=("--queue", "work"))
    await worker.wait_log("worker ready")
    async with connect(own_server.url, namespace=namespace) as tf:
        # "kept" stays stored (nobody serves queue other); "consumed" runs and is removed.
        kept = await tf.enqueue(Other(), key="kept")
        consumed = await ledger.enqueue(tf, Work(), key="consumed")
        assert await consumed.result(timeout=10) == consumed.id
        assert (await tf.enqueue(Work(), key="consumed")).duplicate  # the window remembers

        producer = asyncio.create_task(produce(ledger, tf, 150, prefix="p"))
        await until(lambda: len(procs.ledger.entries("done")) >= 50, "50 tasks done")
        await asyncio.to_thread(own_server.kill)
        killed = time.time()
        await asyncio.to_thread(own_server.start)
        back = time.time()
        latencies = await asyncio.wait_for(producer, 60)
        await ledger.settle(tf, timeout=30)
        # A message delivered again after the crash may carry attempt 1 again: the server
        # had not written its consumer's delivery count down when it was killed.
        firsts = Counter(e.task_id for e in procs.ledger.entries("start") if e.attempt == 1)
        figures = await ledger.figures(
            tf,
            recover_s=ledger.first_done_after(back, started_after=True),
            note=f"slowest enqueue {max(latencies):.2f}s; at-least-once: tasks in flight at "
            "the crash ran again; "
            f"{sum(1 for n in firsts.values() if n > 1)} redelivered as attempt 1 again",
        )
        figures.record()
        figures.check()

        # Each acknowledged task was stored once: the stream handed out one sequence per
        # task, however often a producer or taskframe resent it.
        info = await tf.js.stream_info(topology.queue_stream(namespace, "work"))
        assert info.state.last_seq == len(ledger.acknowledged)
        for task_id in figures.completions:  # every second run is a redelivery after the crash
            assert max(start for i, _, start, _ in ledger.runs() if i == task_id) > killed

        # After a restart the server rebuilds its dedupe table from the messages it still
        # stores: a repeat of a waiting task is caught, one of a finished task is not.
        assert (await tf.enqueue(Other(), key="kept")).duplicate
        again = await tf.enqueue(Work(), key="consumed")
        assert again.id == consumed.id
        assert not again.duplicate
        await until(lambda: procs.ledger.count("done", consumed.id) == 2, "the repeat to run")
        assert kept.id not in {e.task_id for e in procs.ledger.entries()}
    assert worker.alive


async def test_duplicate_publish_within_and_after_the_dedupe_window(
    client: Client, procs: Procs
) -> None:
    ledger = Ledger("duplicate publish within and after a 1 s dedupe window", procs.ledger)
    app = build_app(client.namespace, procs.ledger.path)
    app.queue("work", duplicate_window=1.0)
    app.queue("once", duplicate_window=1.0)
    await provision(app, client)  # before the first enqueue creates the streams
    async with running_worker(app, client) as worker:
        sent = {"plain": time.monotonic()}
        plain = await ledger.enqueue(client, Work(), key="plain")
        sent["once"] = time.monotonic()
        once = await ledger.enqueue(client, Once(), key="once")
        repeats = [await client.enqueue(Work(), key="plain")]
        repeats.append(await client.enqueue(Once(), key="once"))
        assert [(r.id, r.duplicate) for r in repeats] == [(plain.id, True), (once.id, True)]
        assert await plain.result(timeout=10) == plain.id
        assert await once.result(timeout=10) == once.id

        async def stored_again(task: Task[Any], key: str) -> float:
            # The window has no event to wait for: repeat until the server stores it again.
            # Each refused repeat is harmless, which is the point of the window.
            while (await client.enqueue(task, key=key)).duplicate:
                assert time.monotonic() - sent[key] < 10, f"{key} still a duplicate after 10 s"
                await asyncio.sleep(0.05)
            return time.monotonic() - sent[key]

        window_plain = await stored_again(Work(), "plain")
        window_once = await stored_again(Once(), "once")
        await until(lambda: procs.ledger.count("done", plain.id) == 2, "the plain repeat to run")
        await until(lambda: worker.stats.skipped == 1, "the exactly-once repeat to be skipped")
        await ledger.settle(client)
    figures = await ledger.figures(
        client,
        note=f"stored again after {window_plain:.1f}s / {window_once:.1f}s: the plain task ran "
        "twice (intended), the exactly-once one was acked without running",
    )
    figures.record()
    figures.check(exactly_once=[once.id])
    assert figures.completions == {plain.id: 2}
    assert procs.ledger.count("start", once.id) == 1
    assert window_plain >= 1.0  # never stored again inside the window
    assert window_once >= 1.0
    status = await once.status()
    assert (status.state, status.attempt) == (TaskState.SUCCEEDED, 1)


# nats-py does not close the socket of a reconnect attempt whose INFO never came (the frozen
# server accepted the TCP connection): the garbage collector closes it, with a warning.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function StreamWriter.__del__"
    ":pytest.PytestUnraisableExceptionWarning"
)
async def test_frozen_server_past_the_ping_timeout_then_thawed_loses_nothing(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    ledger = Ledger("nats-server SIGSTOP past ping timeout, then SIGCONT", procs.ledger)
    worker = procs.spawn(
        *TASKFRAME,
        "worker",
        APP,
        "--url",
        own_server.url,
        "--concurrency",
        "8",
        "--queue",
        "work",
        ack_wait=2.0,
        TASKFRAME_PING_INTERVAL="1",
    )
    await worker.wait_log("worker ready")
    async with connect(own_server.url, namespace=namespace, ping_interval=1.0) as tf:
        producer = asyncio.create_task(produce(ledger, tf, 120, prefix="s", pause=0.02))
        await until(lambda: len(procs.ledger.entries("done")) >= 30, "30 tasks done")
        own_server.signal(signal.SIGSTOP)
        frozen = time.monotonic()

        async def noticed(wait: Awaitable[None]) -> float:
            await wait
            return time.monotonic() - frozen

        try:
            # Both sides must notice on their own, by unanswered pings (3 x 1 s): the socket
            # stays open, so nothing else tells them.
            producer_noticed, worker_noticed = await asyncio.gather(
                noticed(until(lambda: not tf.nc.is_connected, "the producer to notice")),
                noticed(worker.wait_log("disconnected from NATS")),
            )
        finally:
            own_server.signal(signal.SIGCONT)
        thawed = time.time()
        latencies = await asyncio.wait_for(producer, 90)
        await ledger.settle(tf, timeout=30)
        figures = await ledger.figures(
            tf,
            recover_s=ledger.first_done_after(thawed, started_after=True),
            note=f"stale connection noticed after {producer_noticed:.1f}s (producer), "
            f"{worker_noticed:.1f}s (worker); enqueues blocked up to "
            f"{max(latencies):.1f}s",
        )
        figures.record()
        figures.check()
        assert tf.nc.is_connected
    assert worker.alive
    assert procs.ledger.pids() == {worker.pid}


async def test_consumer_deleted_under_running_workers_is_recreated_and_nothing_is_lost(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("workers consumer deleted while tasks flow", procs.ledger)
    worker = procs.worker(nats_server.url, concurrency=8, ack_wait=2.0)
    await worker.wait_log("worker ready")
    stream = topology.queue_stream(client.namespace, "work")
    before = await client.js.consumer_info(stream, topology.WORKERS)
    producer = asyncio.create_task(produce(ledger, client, 150, prefix="c"))
    await until(lambda: len(procs.ledger.entries("done")) >= 40, "40 tasks done")
    await client.js.delete_consumer(stream, topology.WORKERS)
    deleted = time.time()
    await worker.wait_log("consumer behind .* is gone", timeout=20)
    await asyncio.wait_for(producer, 60)
    await ledger.settle(client, timeout=30)
    figures = await ledger.figures(
        client,
        recover_s=ledger.first_done_after(deleted, started_after=True),
        note="at-least-once: tasks in flight at the deletion ran again (their acks went to "
        "the deleted consumer)",
    )
    figures.record()
    figures.check()
    for task_id in figures.completions:
        assert max(start for i, _, start, _ in ledger.runs() if i == task_id) > deleted

    after = await client.js.consumer_info(stream, topology.WORKERS)
    assert after.created != before.created
    assert after.config.ack_wait == before.config.ack_wait == 2.0
    assert worker.alive
    await until_drained(client.js, client.namespace, "work")
