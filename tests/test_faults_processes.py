"""Faults injected into processes: workers killed, stopped and paused, nats-server crashed,
restarted and frozen, and the consumer the workers pull from deleted under them.

Workers run as `python -m taskframe worker tests.fault_apps:app` subprocesses with a short
ack_wait (TASKFRAME_ACK_WAIT), so a lost delivery comes back within a second or two. Their
handlers write a journal (tests/journal.py) that says which process ran which delivery of
which task. Each scenario accounts for its tasks with `tests.ledger.Ledger` and records its
figures for docs/faults.md.
"""

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Awaitable

import nats.errors
import pytest
from nats.aio.msg import Msg

from taskframe import Client, PublishError, TaskState, connect
from taskframe import _topology as topology
from taskframe.testing import NatsServer, eventually
from tests.fault_apps import Once, Other, Work
from tests.faultkit import APP, TASKFRAME, Procs, until_drained
from tests.ledger import Ledger


async def test_kill_9_mid_task_redelivers_it_and_it_completes_once(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    a = procs.worker(nats_server.url, concurrency=2)
    b = procs.worker(nats_server.url, concurrency=2)
    await a.wait_log("worker ready")
    await b.wait_log("worker ready")
    ledger = Ledger("worker kill -9 mid-task", procs.journal)
    runs = await client.enqueue_many(Work(seconds=1.5) for _ in range(6))
    ledger.acknowledge(*runs)
    ids = {r.id for r in runs}

    await eventually(lambda: procs.journal.entries("start", pid=a.pid), "a start on worker A")
    a.signal(signal.SIGKILL)
    ledger.died(a.pid)
    assert await a.wait_exit() == -signal.SIGKILL
    victim = procs.journal.entries("start", pid=a.pid)[0].task_id

    results = await asyncio.gather(*(r.result(timeout=20) for r in runs))
    await ledger.settle(client)
    figures = await ledger.figures(
        client, recover_s=ledger.first_done_after(ledger.deaths[a.pid], {victim})
    )
    figures.record()
    figures.check()
    assert results == [r.id for r in runs]
    done = procs.journal.entries("done")
    assert Counter(e.task_id for e in done) == Counter(ids)  # each exactly once, none lost
    assert {e.pid for e in done} == {b.pid}
    assert not procs.journal.entries("done", victim, pid=a.pid)
    [(attempt, pid)] = [(e.attempt, e.pid) for e in done if e.task_id == victim]
    assert (attempt, pid) == (2, b.pid)
    assert [e.attempt for e in procs.journal.entries("start", victim)] == [1, 2]
    status = await client.status(victim)
    assert status is not None
    assert (status.state, status.attempt) == (TaskState.SUCCEEDED, 2)
    await until_drained(client, "work")
    assert b.alive


async def test_server_crash_with_tasks_waiting_loses_none(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    ledger = Ledger("server kill -9 with 200 tasks waiting", procs.journal)
    async with connect(own_server.url, namespace=namespace) as tf:
        runs = await tf.enqueue_many(Work() for _ in range(200))
    ledger.acknowledge(*runs)
    ids = [r.id for r in runs]
    port = own_server.port

    own_server.kill()
    assert not own_server.running
    own_server.start()
    back = time.time()
    assert own_server.port == port

    async with connect(own_server.url, namespace=namespace) as tf:
        info = await tf.js.stream_info(topology.queue_stream(namespace, "work"))
        assert info.config.storage == "file"
        assert info.state.messages == 200
        worker = procs.worker(own_server.url, concurrency=32)
        results = await asyncio.gather(*(tf.handle(Work, i).result(timeout=30) for i in ids))
        assert results == ids
        await ledger.settle(tf)
        figures = await ledger.figures(
            tf,
            recover_s=ledger.first_done_after(back),
            note="the worker starts after the restart: recovery includes its start-up",
        )
        figures.record()
        figures.check()
        assert Counter(e.task_id for e in procs.journal.entries("done")) == Counter(ids)
        await until_drained(tf, "work")
    assert worker.alive


async def test_server_restart_while_tasks_flow_and_everyone_reconnects(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    worker = procs.worker(own_server.url, concurrency=8, ack_wait=2.0)
    await worker.wait_log("worker ready")
    ledger = Ledger("server kill -9 and restart while tasks flow", procs.journal)
    async with connect(own_server.url, namespace=namespace) as tf:
        runs = []
        outage = asyncio.Event()

        async def produce() -> None:
            for n in range(80):
                runs.append(await ledger.enqueue(tf, Work(seconds=0.05)))
                if n == 40:
                    await outage.wait()  # half the tasks go in after the restart
                await asyncio.sleep(0.01)

        producer = asyncio.create_task(produce())
        await eventually(lambda: len(procs.journal.entries("done")) >= 20, "20 tasks done")
        await asyncio.to_thread(own_server.kill)
        killed = time.monotonic()
        await worker.wait_log("disconnected from NATS")
        await eventually(lambda: tf.nc.is_reconnecting, "the client to notice")
        await asyncio.to_thread(own_server.start)
        ready = time.monotonic()
        back = time.time()
        outage.set()

        probe = await ledger.enqueue(tf, Work())
        assert await probe.result(timeout=30) == probe.id

        await asyncio.wait_for(producer, 30)
        results = await asyncio.gather(*(r.result(timeout=30) for r in runs))
        await ledger.settle(tf)
        figures = await ledger.figures(
            tf,
            recover_s=ledger.first_done_after(back, started_after=True),
            note=f"server down {ready - killed:.2f}s; at-least-once: tasks in flight at the "
            "crash ran again",
        )
        figures.record()
        figures.check()
        assert results == [r.id for r in runs]
        assert len(runs) == 80
        done = Counter(e.task_id for e in procs.journal.entries("done"))
        assert set(done) == {r.id for r in runs} | {probe.id}
        assert worker.alive  # the same process, reconnected: the supervisor did not restart it
        assert procs.journal.pids() == {worker.pid}
        await until_drained(tf, "work")


async def test_sigterm_under_load_finishes_started_tasks_and_exits_0(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("worker SIGTERM under load", procs.journal)
    a = procs.worker(nats_server.url, concurrency=4, grace=10.0, ack_wait=2.0)
    await a.wait_log("worker ready")
    runs = await client.enqueue_many(Work(seconds=0.5) for _ in range(16))
    ledger.acknowledge(*runs)

    await eventually(lambda: len(procs.journal.entries("start")) >= 6, "the second round of tasks")
    a.signal(signal.SIGTERM)
    assert await a.wait_exit(timeout=12) == 0
    exited = time.time()
    assert "worker stopped" in a.text()
    started = procs.journal.entries("start", pid=a.pid)
    finished = procs.journal.entries("done", pid=a.pid)
    assert {(e.task_id, e.attempt) for e in started} == {(e.task_id, e.attempt) for e in finished}
    assert 6 <= len(finished) < 16

    b = procs.worker(nats_server.url, concurrency=4, ack_wait=2.0)
    results = await asyncio.gather(*(r.result(timeout=20) for r in runs))
    assert results == [r.id for r in runs]
    await ledger.settle(client)
    figures = await ledger.figures(
        client,
        recover_s=ledger.first_done_after(exited),
        note="A finished what it started; recovery is a new worker B starting up",
    )
    figures.record()
    figures.check()
    done = procs.journal.entries("done")
    assert Counter(e.task_id for e in done) == Counter(r.id for r in runs)
    assert len([e for e in done if e.pid == b.pid]) == 16 - len(finished)
    await until_drained(client, "work")


async def test_paused_worker_loses_its_lease_and_does_not_settle_the_task(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("worker SIGSTOP past ack_wait", procs.journal)
    records = await client.nc.subscribe(topology.result_subject(client.namespace, "*"))
    a = procs.worker(nats_server.url, concurrency=1, ack_wait=1.0)
    await a.wait_log("worker ready")
    run = await ledger.enqueue(client, Work(seconds=1.5))
    await eventually(lambda: procs.journal.entries("start", run.id, pid=a.pid), "worker A to start")
    a.signal(signal.SIGSTOP)
    stopped = time.time()
    try:
        b = procs.worker(nats_server.url, concurrency=1, ack_wait=1.0)
        await eventually(lambda: procs.journal.entries("done", run.id, pid=b.pid), "B to finish it")
        assert await run.result(timeout=10) == run.id
    finally:
        a.signal(signal.SIGCONT)
    [by_b] = procs.journal.entries("done", run.id, pid=b.pid)
    await eventually(lambda: procs.journal.entries("done", run.id, pid=a.pid), "A to resume")
    a.signal(signal.SIGTERM)
    assert await a.wait_exit() == 0  # A has done everything it was going to do
    await client.nc.flush()  # every record written before A exited is now in our inbox
    succeeded = []
    while True:
        try:
            msg = await records.next_msg(timeout=0.05)
        except nats.errors.TimeoutError:
            break
        record = json.loads(msg.data)
        if record["state"] == "succeeded":
            succeeded.append(record["attempt"])
    await records.unsubscribe()

    assert "lease" in a.text()
    assert succeeded == [by_b.attempt], "only the worker holding the lease may report success"
    status = await run.status()
    assert (status.state, status.attempt) == (TaskState.SUCCEEDED, by_b.attempt)
    [stopped_line] = [line for line in a.text().splitlines() if "worker stopped" in line]
    assert "succeeded=0" in stopped_line
    await until_drained(client, "work")
    await ledger.settle(client)
    figures = await ledger.figures(
        client,
        recover_s=ledger.first_done_after(stopped, {run.id}),
        note="at-least-once: paused A finished its handler too, but did not settle it",
    )
    figures.record()
    figures.check()
    assert figures.duplicated == 1


async def test_exactly_once_task_killed_mid_run_completes_once_never_concurrently(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("exactly-once task, worker kill -9 mid-run", procs.journal)
    a = procs.worker(nats_server.url, concurrency=2)
    b = procs.worker(nats_server.url, concurrency=2)
    await a.wait_log("worker ready")
    await b.wait_log("worker ready")
    runs = await client.enqueue_many(Once(seconds=1.0) for _ in range(6))
    ledger.acknowledge(*runs)

    await eventually(lambda: procs.journal.entries("start", pid=a.pid), "A to start a task")
    a.signal(signal.SIGKILL)
    ledger.died(a.pid)
    assert await a.wait_exit() == -signal.SIGKILL
    victims = {e.task_id for e in procs.journal.entries("start", pid=a.pid)}

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

    done = Counter(e.task_id for e in procs.journal.entries("done"))
    assert done == Counter(r.id for r in runs)
    for victim in victims:
        [rerun] = [e for e in procs.journal.entries("start", victim) if e.pid != a.pid]
        assert rerun.pid == b.pid
        assert rerun.attempt >= 2
        assert rerun.at > killed  # B started it only after A was gone: never both at once
        assert not procs.journal.entries("done", victim, pid=a.pid)
    assert b.alive


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


async def test_producers_retrying_through_a_server_kill_store_each_task_once(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    ledger = Ledger("producer retries across server kill -9 + restart", procs.journal)
    worker = procs.worker(own_server.url, concurrency=8, ack_wait=2.0, extra=("--queue", "work"))
    await worker.wait_log("worker ready")
    async with connect(own_server.url, namespace=namespace) as tf:
        # "kept" stays stored (nobody serves queue other); "consumed" runs and is removed.
        kept = await tf.enqueue(Other(), key="kept")
        consumed = await ledger.enqueue(tf, Work(), key="consumed")
        assert await consumed.result(timeout=10) == consumed.id
        assert (await tf.enqueue(Work(), key="consumed")).duplicate  # the window remembers

        producer = asyncio.create_task(produce(ledger, tf, 150, prefix="p"))
        await eventually(lambda: len(procs.journal.entries("done")) >= 50, "50 tasks done")
        await asyncio.to_thread(own_server.kill)
        killed = time.time()
        await asyncio.to_thread(own_server.start)
        back = time.time()
        latencies = await asyncio.wait_for(producer, 60)
        await ledger.settle(tf, timeout=30)
        # A message delivered again after the crash may carry attempt 1 again: the server
        # had not written its consumer's delivery count down when it was killed.
        firsts = Counter(e.task_id for e in procs.journal.entries("start") if e.attempt == 1)
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
        await eventually(lambda: procs.journal.count("done", consumed.id) == 2, "the repeat to run")
        assert kept.id not in {e.task_id for e in procs.journal.entries()}
    assert worker.alive


# nats-py does not close the socket of a reconnect attempt whose INFO never came (the frozen
# server accepted the TCP connection): the garbage collector closes it, with a warning.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <function StreamWriter.__del__"
    ":pytest.PytestUnraisableExceptionWarning"
)
async def test_frozen_server_past_the_ping_timeout_then_thawed_loses_nothing(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    ledger = Ledger("nats-server SIGSTOP past ping timeout, then SIGCONT", procs.journal)
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
        await eventually(lambda: len(procs.journal.entries("done")) >= 30, "30 tasks done")
        own_server.signal(signal.SIGSTOP)
        frozen = time.monotonic()

        async def noticed(wait: Awaitable[object]) -> float:
            await wait
            return time.monotonic() - frozen

        try:
            # Both sides must notice on their own, by unanswered pings (3 x 1 s): the socket
            # stays open, so nothing else tells them.
            producer_noticed, worker_noticed = await asyncio.gather(
                noticed(eventually(lambda: not tf.nc.is_connected, "the producer to notice")),
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
    assert procs.journal.pids() == {worker.pid}


async def test_consumer_deleted_under_running_workers_is_recreated_and_nothing_is_lost(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("workers consumer deleted while tasks flow", procs.journal)
    worker = procs.worker(nats_server.url, concurrency=8, ack_wait=2.0)
    await worker.wait_log("worker ready")
    stream = topology.queue_stream(client.namespace, "work")
    before = await client.js.consumer_info(stream, topology.WORKERS)
    producer = asyncio.create_task(produce(ledger, client, 150, prefix="c"))
    await eventually(lambda: len(procs.journal.entries("done")) >= 40, "40 tasks done")
    await client.js.delete_consumer(stream, topology.WORKERS)
    deleted = time.time()
    # The pull loop's warning, as the CLI logs it: level, logger, pid, message.
    await worker.wait_log(
        r"WARNING +taskframe\._pull \[\d+\] consumer behind .* is gone", timeout=20
    )
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
    await until_drained(client, "work")


async def test_server_kill_while_a_worker_batches_its_records_loses_no_result(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    """nats-server killed (-9) and restarted while a CLI worker's records go in fast-ingest
    batches: every task's result is stored, the same worker carries on, and batches too."""
    worker = procs.worker(own_server.url, concurrency=64, ack_wait=5.0)
    await worker.wait_log("worker ready")
    async with connect(own_server.url, namespace=namespace) as tf:
        frames = 0

        async def frame(msg: Msg) -> None:  # a batch's answer to the worker
            nonlocal frames
            frames += 1

        # _INBOX.<connection>.<batch>.<flow>.fail.<seq>.<op>.$FI
        await tf.nc.subscribe("_INBOX.*.*.*.fail.*.*.*", cb=frame)
        runs = await tf.enqueue_many([Work() for _ in range(3000)])
        await eventually(
            lambda: len(procs.journal.entries("done")) >= 800 and frames > 0,
            "800 tasks done, records in batches",
            timeout=30,
        )
        await asyncio.to_thread(own_server.kill)
        await worker.wait_log("disconnected from NATS")
        before = frames
        await asyncio.to_thread(own_server.start)
        results = await asyncio.gather(*(run.result(timeout=60) for run in runs))
        assert results == [run.id for run in runs]  # every record stored, none lost
        assert frames > before  # batches again after the restart
        done = Counter(e.task_id for e in procs.journal.entries("done"))
        assert set(done) == {run.id for run in runs}  # at least once: some ran twice
        assert worker.alive
        assert procs.journal.pids() == {worker.pid}
        await until_drained(tf, "work")
