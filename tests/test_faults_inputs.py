"""Faults injected through what producers send and handlers do: a handler that always
raises, bytes no model accepts, an unknown task, a payload the server would refuse, a task
that kills its own process, keys repeated within and after the dedupe window.

Workers run as `python -m taskframe worker tests.fault_apps:app` subprocesses (or in the
test's loop where the scenario needs the worker's counts). Each scenario accounts for its
tasks with `tests.ledger.Ledger` and records its figures for docs/faults.md.
"""

import time
from datetime import datetime
from typing import Any

import nats
import pytest

from taskframe import (
    Client,
    PayloadTooLargeError,
    Task,
    TaskFailed,
    TaskState,
    connect,
    provision,
)
from taskframe import _topology as topology
from taskframe.testing import NatsServer, eventually, running_worker
from tests.fault_apps import POISON_ATTEMPTS, Fail, Once, Poison, Work, build_app
from tests.faultkit import Procs, until_drained
from tests.ledger import Ledger


class Blob(Task[int], queue="work"):
    """Only ever enqueued over-size: it has no handler because it must never reach a worker."""

    data: str


async def test_handler_that_always_raises_is_dead_after_max_attempts_and_worker_goes_on(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("handler that always raises", procs.journal)
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

    starts = procs.journal.entries("start", bad.id)
    assert [e.attempt for e in starts] == [1, 2, 3]
    assert {e.pid for e in starts} == {worker.pid}
    assert procs.journal.entries("done", good.id, pid=worker.pid)
    [letter] = await client.dead_letters()
    assert (letter.task_id, letter.reason, letter.attempts) == (bad.id, "failed", 3)
    assert letter.error == "fails on purpose (attempt 3)"
    await until_drained(client, "work")
    assert len(procs.journal.entries("start", bad.id)) == 3  # and no fourth delivery
    assert worker.alive


async def test_garbage_on_a_task_subject_is_dead_as_invalid_and_worker_goes_on(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("garbage bodies on a task subject", procs.journal)
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

    async def all_dead() -> bool:
        return len(await client.dead_letters()) == len(garbage)

    await eventually(all_dead, "every garbage message to be dead-lettered")
    letters = await client.dead_letters()
    assert sorted(letter.body for letter in letters) == sorted(garbage)  # kept as sent
    for letter in letters:
        assert (letter.reason, letter.error_type, letter.attempts) == (
            "invalid",
            "ValidationError",
            1,
        )
        assert letter.error
        assert letter.original_subject == subject
    assert [e.task_id for e in procs.journal.entries("start")] == [good.id]
    await until_drained(client, "work")
    await ledger.settle(client)
    figures = await ledger.figures(client)
    figures.record()
    figures.check(expect_dead=dict.fromkeys(bad, "invalid"))
    assert worker.alive


async def test_malformed_bytes_wrong_schema_and_unknown_task_are_dead_with_their_reasons(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("malformed, wrong schema, unknown task (raw publishes)", procs.journal)
    worker = procs.worker(nats_server.url, concurrency=8)
    await worker.wait_log("worker ready")
    ns = client.namespace
    good = []
    expect: dict[str, str] = {}
    poison = [
        (f"{ns}.tasks.work.Work", b'{"seconds": 0.0,', "invalid", "ValidationError"),
        (f"{ns}.tasks.work.Add", b'{"a": "one", "b": 2}', "invalid", "ValidationError"),
        (f"{ns}.tasks.work.Add", b'{"a": 1}', "invalid", "ValidationError"),
        (f"{ns}.tasks.work.Resize", b'{"url": "a.png"}', "unknown-task", "UnknownTask"),
    ]
    sent: dict[str, tuple[bytes, str]] = {}
    for subject, body, reason, error_type in poison:
        good += await client.enqueue_many(Work() for _ in range(20))
        task_id = await ledger.publish_raw(client.js, subject, body)
        expect[task_id] = reason
        sent[task_id] = (body, error_type)
    good += await client.enqueue_many(Work() for _ in range(20))
    ledger.acknowledge(*good)

    await ledger.settle(client)
    figures = await ledger.figures(client)
    figures.record()
    figures.check(expect_dead=expect)

    letters = {x.task_id: x for x in await client.dead_letters()}
    # Each one buried at its first delivery, as it came, with the error that refused it.
    assert {i: (x.body, x.error_type) for i, x in letters.items()} == sent
    assert {x.attempts for x in letters.values()} == {1}
    [unknown] = [x for x in letters.values() if x.reason == "unknown-task"]
    assert "Resize" in unknown.error
    assert worker.alive
    assert procs.journal.pids() == {worker.pid}
    assert "Traceback" not in worker.text()
    await until_drained(client, "work")


async def test_oversize_payload_is_refused_before_sending_and_the_connection_stays_up(
    client: Client, procs: Procs, nats_server: NatsServer
) -> None:
    ledger = Ledger("oversize payload", procs.journal)
    limit = client.nc.max_payload
    envelope = len(Blob(data="").model_dump_json())
    # With offloading off (by default such bodies go to the payloads bucket: test_payloads)
    async with connect(nats_server.url, namespace=client.namespace, offload_over=0) as plain:
        with pytest.raises(PayloadTooLargeError):
            await ledger.enqueue(plain, Blob(data="x" * 2 * limit))
        # The body alone fits, so nats-py would send it; with its headers the server would
        # not take it and would close the whole connection.
        with pytest.raises(PayloadTooLargeError):
            await ledger.enqueue(plain, Blob(data="x" * (limit - envelope - 10)))
        assert plain.nc.is_connected
        assert plain.nc.stats["reconnects"] == 0

    async with running_worker(build_app(client.namespace, procs.journal), client):
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


async def test_poison_task_that_kills_its_process_is_dead_as_lost_and_others_go_on(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("poison task kills its worker process", procs.journal)
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
    [letter] = [x for x in await client.dead_letters() if x.task_id == poison.id]
    first = procs.journal.entries("start", poison.id)[0].at
    died = datetime.fromisoformat(letter.died_at).timestamp()
    figures = await ledger.figures(
        client,
        recover_s=died - first,
        note="recover = first delivery to dead letter; processes restarted by the supervisor",
    )
    figures.record()
    figures.check(expect_dead={poison.id: "lost"})

    assert dead.value.error_type == "AttemptsExhausted"
    assert letter.attempts == POISON_ATTEMPTS
    starts = procs.journal.entries("start", poison.id)
    assert [e.attempt for e in starts] == list(range(1, POISON_ATTEMPTS + 1))
    assert supervisor.alive  # the supervisor never gave up
    assert supervisor.text().count("exited with 1; restarting") == POISON_ATTEMPTS
    await until_drained(client, "poison")


async def test_a_few_poison_tasks_do_not_make_the_supervisor_give_up_on_every_worker(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("6 poison tasks under --processes 2", procs.journal)
    supervisor = procs.worker(nats_server.url, concurrency=1, extra=("--processes", "2"))
    await supervisor.wait_log("worker ready", count=2)
    poisons = [await ledger.enqueue(client, Poison()) for _ in range(6)]

    async def buried_or_given_up() -> bool:
        return len(await client.dead_letters()) == len(poisons) or not supervisor.alive

    # Each poison task kills the process it is delivered to, a second or so after the
    # supervisor restarted it: to the supervisor that looks like a crash loop at start.
    await eventually(buried_or_given_up, "the poison tasks to be buried", timeout=45)
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


async def test_duplicate_publish_within_and_after_the_dedupe_window(
    client: Client, procs: Procs
) -> None:
    ledger = Ledger("duplicate publish within and after a 1 s dedupe window", procs.journal)
    app = build_app(client.namespace, procs.journal)
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
            async def stored() -> bool:
                return not (await client.enqueue(task, key=key)).duplicate

            await eventually(stored, f"{key} to be stored again", timeout=10)
            return time.monotonic() - sent[key]

        window_plain = await stored_again(Work(), "plain")
        window_once = await stored_again(Once(), "once")
        await eventually(
            lambda: procs.journal.count("done", plain.id) == 2, "the plain repeat to run"
        )
        await eventually(lambda: worker.stats.skipped == 1, "the exactly-once repeat to be skipped")
        await ledger.settle(client)
    figures = await ledger.figures(
        client,
        note=f"stored again after {window_plain:.1f}s / {window_once:.1f}s: the plain task ran "
        "twice (intended), the exactly-once one was acked without running",
    )
    figures.record()
    figures.check(exactly_once=[once.id])
    assert figures.completions == {plain.id: 2}
    assert procs.journal.count("start", once.id) == 1
    assert window_plain >= 1.0  # never stored again inside the window
    assert window_once >= 1.0
    status = await once.status()
    assert (status.state, status.attempt) == (TaskState.SUCCEEDED, 1)
