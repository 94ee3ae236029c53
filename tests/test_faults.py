"""Faults against real processes: workers killed, paused and stopped; the broker crashed.

Workers run as `python -m taskframe worker tests.fault_apps:app` subprocesses with a short
ack_wait (TASKFRAME_ACK_WAIT), so a lost delivery comes back within a second or two. Their
handlers write a ledger (see tests/fault_apps.py) that says which process ran which
delivery of which task.
"""

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from taskframe import Client, TaskFailed, TaskState, connect, topology
from taskframe.server import NatsServer
from tests.fault_apps import Fail, Work
from tests.faultkit import Procs, dead_letters, until, until_async, until_drained


@pytest.fixture
def procs(tmp_path: Path, namespace: str) -> Iterator[Procs]:
    with Procs(tmp_path, namespace) as running:
        yield running


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own, to crash and restart; file store in tmp_path."""
    server = NatsServer(port=-1, store_dir=tmp_path / "store")
    try:
        yield server.start()
    finally:
        server.stop()


async def test_kill_9_mid_task_redelivers_it_and_it_completes_once(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    a = procs.worker(nats_server.url, concurrency=2)
    b = procs.worker(nats_server.url, concurrency=2)
    await a.wait_log("worker ready")
    await b.wait_log("worker ready")
    runs = await client.enqueue_many(Work(seconds=1.5) for _ in range(6))
    ids = {r.id for r in runs}

    await until(lambda: procs.ledger.entries("start", pid=a.pid), "a start on worker A")
    a.signal(signal.SIGKILL)
    assert await a.wait_exit() == -signal.SIGKILL
    victim = procs.ledger.entries("start", pid=a.pid)[0].task_id

    results = await asyncio.gather(*(r.result(timeout=20) for r in runs))
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
    async with connect(own_server.url, namespace=namespace) as tf:
        runs = await tf.enqueue_many(Work() for _ in range(200))
    ids = [r.id for r in runs]
    port = own_server.port

    own_server.kill()
    assert not own_server.running
    own_server.start()
    assert own_server.port == port

    async with connect(own_server.url, namespace=namespace) as tf:
        info = await tf.js.stream_info(topology.queue_stream(namespace, "work"))
        assert info.config.storage == "file"
        assert info.state.messages == 200
        worker = procs.worker(own_server.url, concurrency=32)
        results = await asyncio.gather(*(tf.handle(Work, i).result(timeout=30) for i in ids))
        assert results == ids
        assert Counter(e.task_id for e in procs.ledger.entries("done")) == Counter(ids)
        await until_drained(tf.js, namespace, "work")
    assert worker.alive


async def test_server_restart_while_tasks_flow_and_everyone_reconnects(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    worker = procs.worker(own_server.url, concurrency=8, ack_wait=2.0)
    await worker.wait_log("worker ready")
    async with connect(own_server.url, namespace=namespace) as tf:
        runs = []
        outage = asyncio.Event()

        async def produce() -> None:
            for n in range(80):
                runs.append(await tf.enqueue(Work(seconds=0.05)))
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
        outage.set()

        probe = await tf.enqueue(Work())
        assert await probe.result(timeout=30) == probe.id
        recovered = time.monotonic()
        print(  # noqa: T201
            f"\nserver down {ready - killed:.2f}s; first task after restart done "
            f"{recovered - ready:.2f}s after the server was ready"
        )

        await asyncio.wait_for(producer, 30)
        results = await asyncio.gather(*(r.result(timeout=30) for r in runs))
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
    a = procs.worker(nats_server.url, concurrency=4, grace=10.0, ack_wait=2.0)
    await a.wait_log("worker ready")
    runs = await client.enqueue_many(Work(seconds=0.5) for _ in range(16))

    await until(lambda: len(procs.ledger.entries("start")) >= 6, "the second round of tasks")
    a.signal(signal.SIGTERM)
    assert await a.wait_exit(timeout=12) == 0
    assert "worker stopped" in a.text()
    started = procs.ledger.entries("start", pid=a.pid)
    finished = procs.ledger.entries("done", pid=a.pid)
    assert {(e.task_id, e.attempt) for e in started} == {(e.task_id, e.attempt) for e in finished}
    assert 6 <= len(finished) < 16

    b = procs.worker(nats_server.url, concurrency=4, ack_wait=2.0)
    results = await asyncio.gather(*(r.result(timeout=20) for r in runs))
    assert results == [r.id for r in runs]
    done = procs.ledger.entries("done")
    assert Counter(e.task_id for e in done) == Counter(r.id for r in runs)
    assert len([e for e in done if e.pid == b.pid]) == 16 - len(finished)
    await until_drained(client.js, client.namespace, "work")


async def test_paused_worker_loses_its_lease_and_does_not_settle_the_task(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    records = await client.nc.subscribe(topology.result_subject(client.namespace, "*"))
    a = procs.worker(nats_server.url, concurrency=1, ack_wait=1.0)
    await a.wait_log("worker ready")
    run = await client.enqueue(Work(seconds=1.5))
    await until(lambda: procs.ledger.entries("start", run.id, pid=a.pid), "worker A to start")
    a.signal(signal.SIGSTOP)
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
    [stopped] = [line for line in a.text().splitlines() if "worker stopped" in line]
    assert "succeeded=0" in stopped
    await until_drained(client.js, client.namespace, "work")


async def test_handler_that_always_raises_is_dead_after_max_attempts_and_worker_goes_on(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    worker = procs.worker(nats_server.url)
    bad = await client.enqueue(Fail())
    with pytest.raises(TaskFailed) as failed:
        await bad.result(timeout=20)
    assert failed.value.attempts == 3
    assert failed.value.error_type == "RuntimeError"
    good = await client.enqueue(Work())
    assert await good.result(timeout=10) == good.id

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
    worker = procs.worker(nats_server.url)
    await worker.wait_log("worker ready")
    garbage = [b"\x00\xff\xfe garbage \x80", b"", b"[1, 2]", b'{"seconds": "soon"}']
    subject = f"{client.namespace}.tasks.work.Work"
    raw = await nats.connect(nats_server.url)
    try:
        for body in garbage:
            await raw.publish(subject, body)
        await raw.flush()
    finally:
        await raw.close()

    good = await client.enqueue(Work())
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
    assert worker.alive
