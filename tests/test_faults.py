"""Faults against real processes: workers killed, paused and stopped; the broker crashed.

Workers run as `python -m taskframe worker tests.fault_apps:app` subprocesses with a short
ack_wait (TASKFRAME_ACK_WAIT), so a lost delivery comes back within a second or two. Their
handlers write a journal (see tests/fault_apps.py) that says which process ran which
delivery of which task. Each scenario accounts for its tasks with `tests.ledger.Ledger` and
records its figures for docs/faults.md.
"""

import asyncio
import json
import signal
import time
from collections import Counter

import nats
import nats.errors
import pytest

from taskframe import Client, TaskFailed, TaskState, connect
from taskframe import _topology as topology
from taskframe._server import NatsServer
from tests.fault_apps import Fail, Work
from tests.faultkit import Procs, dead_letters, until, until_async, until_drained
from tests.ledger import Ledger


async def test_kill_9_mid_task_redelivers_it_and_it_completes_once(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    a = procs.worker(nats_server.url, concurrency=2)
    b = procs.worker(nats_server.url, concurrency=2)
    await a.wait_log("worker ready")
    await b.wait_log("worker ready")
    ledger = Ledger("worker kill -9 mid-task", procs.ledger)
    runs = await client.enqueue_many(Work(seconds=1.5) for _ in range(6))
    ledger.acknowledge(*runs)
    ids = {r.id for r in runs}

    await until(lambda: procs.ledger.entries("start", pid=a.pid), "a start on worker A")
    a.signal(signal.SIGKILL)
    ledger.died(a.pid)
    assert await a.wait_exit() == -signal.SIGKILL
    victim = procs.ledger.entries("start", pid=a.pid)[0].task_id

    results = await asyncio.gather(*(r.result(timeout=20) for r in runs))
    await ledger.settle(client)
    figures = await ledger.figures(
        client, recover_s=ledger.first_done_after(ledger.deaths[a.pid], {victim})
    )
    figures.record()
    figures.check()
    assert results == [r.id for r in runs]
    done = procs.ledger.entries("done")
    assert Counter(e.task_id for e in done) == Counter(ids)  # each exactly once, none lost
    assert {e.pid for e in done} == {b.pid}
    assert not procs.ledger.entries("done", victim, pid=a.pid)
    [(attempt, pid)] = [(e.attempt, e.pid) for e in done if e.task_id == victim]
    assert (attempt, pid) == (2, b.pid)
    assert [e.attempt for e in procs.ledger.entries("start", victim)] == [1, 2]
    status = await client.status(victim)
    assert status is not None
    assert (status.state, status.attempt) == (TaskState.SUCCEEDED, 2)
    await until_drained(client.js, client.namespace, "work")
    assert b.alive


async def test_server_crash_with_tasks_waiting_loses_none(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    ledger = Ledger("server kill -9 with 200 tasks waiting", procs.ledger)
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
        assert Counter(e.task_id for e in procs.ledger.entries("done")) == Counter(ids)
        await until_drained(tf.js, namespace, "work")
    assert worker.alive


async def test_server_restart_while_tasks_flow_and_everyone_reconnects(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    worker = procs.worker(own_server.url, concurrency=8, ack_wait=2.0)
    await worker.wait_log("worker ready")
    ledger = Ledger("server kill -9 and restart while tasks flow", procs.ledger)
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
        await until(lambda: len(procs.ledger.entries("done")) >= 20, "20 tasks done")
        await asyncio.to_thread(own_server.kill)
        killed = time.monotonic()
        await worker.wait_log("disconnected from NATS")
        await until(lambda: tf.nc.is_reconnecting, "the client to notice")
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
        done = Counter(e.task_id for e in procs.ledger.entries("done"))
        assert set(done) == {r.id for r in runs} | {probe.id}
        assert worker.alive  # the same process, reconnected: the supervisor did not restart it
        assert procs.ledger.pids() == {worker.pid}
        await until_drained(tf.js, namespace, "work")


async def test_sigterm_under_load_finishes_started_tasks_and_exits_0(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("worker SIGTERM under load", procs.ledger)
    a = procs.worker(nats_server.url, concurrency=4, grace=10.0, ack_wait=2.0)
    await a.wait_log("worker ready")
    runs = await client.enqueue_many(Work(seconds=0.5) for _ in range(16))
    ledger.acknowledge(*runs)

    await until(lambda: len(procs.ledger.entries("start")) >= 6, "the second round of tasks")
    a.signal(signal.SIGTERM)
    assert await a.wait_exit(timeout=12) == 0
    exited = time.time()
    assert "worker stopped" in a.text()
    started = procs.ledger.entries("start", pid=a.pid)
    finished = procs.ledger.entries("done", pid=a.pid)
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
    done = procs.ledger.entries("done")
    assert Counter(e.task_id for e in done) == Counter(r.id for r in runs)
    assert len([e for e in done if e.pid == b.pid]) == 16 - len(finished)
    await until_drained(client.js, client.namespace, "work")


async def test_paused_worker_loses_its_lease_and_does_not_settle_the_task(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("worker SIGSTOP past ack_wait", procs.ledger)
    records = await client.nc.subscribe(topology.result_subject(client.namespace, "*"))
    a = procs.worker(nats_server.url, concurrency=1, ack_wait=1.0)
    await a.wait_log("worker ready")
    run = await ledger.enqueue(client, Work(seconds=1.5))
    await until(lambda: procs.ledger.entries("start", run.id, pid=a.pid), "worker A to start")
    a.signal(signal.SIGSTOP)
    stopped = time.time()
    try:
        b = procs.worker(nats_server.url, concurrency=1, ack_wait=1.0)
        await until(lambda: procs.ledger.entries("done", run.id, pid=b.pid), "B to finish it")
        assert await run.result(timeout=10) == run.id
    finally:
        a.signal(signal.SIGCONT)
    [by_b] = procs.ledger.entries("done", run.id, pid=b.pid)
    await until(lambda: procs.ledger.entries("done", run.id, pid=a.pid), "A to resume")
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
    await until_drained(client.js, client.namespace, "work")
    await ledger.settle(client)
    figures = await ledger.figures(
        client,
        recover_s=ledger.first_done_after(stopped, {run.id}),
        note="at-least-once: paused A finished its handler too, but did not settle it",
    )
    figures.record()
    figures.check()
    assert figures.duplicated == 1


async def test_handler_that_always_raises_is_dead_after_max_attempts_and_worker_goes_on(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("handler that always raises", procs.ledger)
    worker = procs.worker(nats_server.url)
    bad = await ledger.enqueue(client, Fail())
    with pytest.raises(TaskFailed) as failed:
        await bad.result(timeout=20)
    assert failed.value.attempts == 3
    assert failed.value.error_type == "RuntimeError"
    good = await ledger.enqueue(client, Work())
    assert await good.result(timeout=10) == good.id
    await ledger.settle(client)
    figures = await ledger.figures(client)
    figures.record()
    figures.check(expect_dead={bad.id: "failed"})

    starts = procs.ledger.entries("start", bad.id)
    assert [e.attempt for e in starts] == [1, 2, 3]
    assert {e.pid for e in starts} == {worker.pid}
    assert procs.ledger.entries("done", good.id, pid=worker.pid)
    [letter] = await dead_letters(client.js, client.namespace)
    assert letter["Tf-Id"] == bad.id
    assert letter["Tf-Dead-Reason"] == "failed"
    assert letter["Tf-Attempts"] == "3"
    assert "fails on purpose (attempt 3)" in letter["Tf-Error"]
    await until_drained(client.js, client.namespace, "work")
    assert len(procs.ledger.entries("start", bad.id)) == 3  # and no fourth delivery
    assert worker.alive


async def test_garbage_on_a_task_subject_is_dead_as_invalid_and_worker_goes_on(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("garbage bodies on a task subject", procs.ledger)
    worker = procs.worker(nats_server.url)
    await worker.wait_log("worker ready")
    garbage = [b"\x00\xff\xfe garbage \x80", b"", b"[1, 2]", b'{"seconds": "soon"}']
    subject = f"{client.namespace}.tasks.work.Work"
    raw = await nats.connect(nats_server.url)  # a producer that knows nothing of taskframe
    try:
        bad = [await ledger.publish_raw(raw.jetstream(), subject, body) for body in garbage]
    finally:
        await raw.close()

    good = await ledger.enqueue(client, Work())
    assert await good.result(timeout=10) == good.id
    dead = topology.dead_stream(client.namespace)

    async def all_dead() -> bool:
        return (await client.js.stream_info(dead)).state.messages == len(garbage)

    await until_async(all_dead, "every garbage message to be dead-lettered")
    letters = await dead_letters(client.js, client.namespace)
    assert sorted(letter["body"] for letter in letters) == sorted(garbage)
    for letter in letters:
        assert letter["Tf-Dead-Reason"] == "invalid"
        assert letter["Tf-Error-Type"] == "ValidationError"
        assert letter["Tf-Error"]
        assert letter["Tf-Subject"] == subject
        assert letter["Tf-Attempts"] == "1"
    assert [e.task_id for e in procs.ledger.entries("start")] == [good.id]
    await until_drained(client.js, client.namespace, "work")
    await ledger.settle(client)
    figures = await ledger.figures(client)
    figures.record()
    figures.check(expect_dead=dict.fromkeys(bad, "invalid"))
    assert worker.alive
