"""Messages a raw publisher got wrong, against the real CLI worker: each one is dead-lettered
once with reason `invalid`, and the work published around it completes. Each scenario
records its figures for docs/faults.md.

Before `taskframe._inbound` and `taskframe._tolerant` these stopped workers for good:
a subject that is not UTF-8 ended the connection's read loop (and again after every
reconnect); a task name or a message id with a space made burying it, or storing its
result, raise on an invalid subject, so it came back every ack_wait forever.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from taskframe import Client, DeadLetter
from taskframe import _wire as wire
from taskframe.testing import NatsServer, eventually
from tests.fault_apps import Work
from tests.faultkit import Procs, until_drained
from tests.ledger import Ledger
from tests.rawnats import RawNats, header_block


@pytest.fixture
async def raw(nats_server: NatsServer) -> AsyncIterator[RawNats]:
    """A raw protocol connection: it publishes whatever bytes it is given."""
    connection = await RawNats.connect(nats_server.url)
    yield connection
    await connection.close()


async def bury_one(
    client: Client,
    nats_server: NatsServer,
    procs: Procs,
    raw: RawNats,
    scenario: str,
    tail: bytes,
    headers: bytes | None = None,
) -> DeadLetter:
    """Publish one raw message between good tasks; record and check the figures; its letter."""
    worker = procs.worker(nats_server.url, concurrency=4)
    await worker.wait_log("worker ready")
    ledger = Ledger(scenario, procs.journal)
    good = await client.enqueue_many(Work() for _ in range(5))
    subject = f"{client.namespace}.tasks.work.".encode() + tail
    ack = await raw.publish(subject, b'{"seconds": 0}', headers)
    assert ack.stored, ack
    good += await client.enqueue_many(Work() for _ in range(5))
    bad = f"work-{ack.seq}"  # the id the worker gives a message whose own is unusable
    ledger.acknowledge(*good, bad)

    await ledger.settle(client)
    figures = await ledger.figures(client, note="a raw publish between 10 good tasks")
    figures.record()
    figures.check(expect_dead={bad: "invalid"})
    await until_drained(client, "work")
    [letter] = await client.dead_letters()
    assert letter.subject == f"{client.namespace}.dead.work._invalid"
    assert (letter.reason, letter.error_type, letter.attempts) == ("invalid", "InvalidMessage", 1)
    assert letter.body == b'{"seconds": 0}'
    assert worker.alive
    log = worker.text()
    assert "Traceback" not in log
    assert "not settled" not in log
    return letter


async def test_a_subject_that_is_not_utf8_is_dead_once_and_the_worker_reads_on(
    client: Client, nats_server: NatsServer, procs: Procs, raw: RawNats
) -> None:
    scenario = "raw message: a subject that is not UTF-8"
    letter = await bury_one(client, nats_server, procs, raw, scenario, b"Work\xff\xfe")
    subject = f"{client.namespace}.tasks.work.Work\\xff\\xfe"  # the bytes, escaped
    assert letter.original_subject == subject
    assert letter.task_id == f"work-{letter.headers[wire.MSG_ID].split(':')[1]}"
    assert letter.error == (
        f"subject '{subject}' must end in <TaskName> or <TaskName>.<lane>, "
        "each 1 to 256 of [A-Za-z0-9_-]"
    )


async def test_a_task_name_with_a_space_is_dead_once(
    client: Client, nats_server: NatsServer, procs: Procs, raw: RawNats
) -> None:
    headers = header_block((wire.TASK, "Send Email"))
    scenario = "raw message: a task name with a space"
    letter = await bury_one(client, nats_server, procs, raw, scenario, b"Work", headers)
    assert letter.error == "task name 'Send Email' (from Tf-Task) must be 1 to 256 of [A-Za-z0-9_-]"
    assert letter.headers[wire.TASK] == "Send Email"  # kept as it came
    assert letter.original_subject == f"{client.namespace}.tasks.work.Work"


async def test_a_message_id_with_a_space_is_dead_once_under_a_usable_id(
    client: Client, nats_server: NatsServer, procs: Procs, raw: RawNats
) -> None:
    headers = header_block((wire.MSG_ID, "order 42"))
    scenario = "raw message: a message id with a space"
    letter = await bury_one(client, nats_server, procs, raw, scenario, b"Work", headers)
    assert letter.error == (
        "task id 'order 42' (from Nats-Msg-Id) must be 1 to 256 of [A-Za-z0-9_=/-], dots "
        f"only between them (the message is named {letter.task_id} instead)"
    )
    status = await client.status(letter.task_id)
    assert status is not None
    assert status.state == "dead"


async def test_the_connection_reads_every_message_whatever_its_bytes(
    client: Client, raw: RawNats
) -> None:
    got: list[tuple[str, dict[str, str] | None]] = []

    async def on_msg(msg: object) -> None:
        got.append((msg.subject, msg.headers))  # type: ignore[attr-defined]

    prefix = f"{client.namespace}.raw."
    await client.nc.subscribe(prefix + ">", cb=on_msg)
    await client.nc.flush()
    sent = [
        (b"\xff\xfe", None),  # not UTF-8: nats-py's decode raised
        (b"a\x0bb", None),  # \x0b and \x0c: nats-py's pattern took them for separators
        (b"a\x0cb", None),
        (b"short", b"NATS/1.0"),  # shorter than a header block: nats-py indexed past it
        (b"short", b"XYZ"),
        (b"odd", b"NATS/1.0\r\nk\xff: v\r\nTf-Id: caf\xc3\xa9 \xff\r\n\r\n"),
        (b"ok", header_block(("Tf-Id", "x"))),
    ]
    for tail, headers in sent:
        raw.send(prefix.encode() + tail, b"body", headers)
    await raw.ping()
    await eventually(lambda: len(got) == len(sent), f"{len(sent)} messages, got {got}", timeout=5)
    assert got == [
        (prefix + "\udcff\udcfe", None),
        (prefix + "a\x0bb", None),
        (prefix + "a\x0cb", None),
        (prefix + "short", None),
        (prefix + "short", None),
        (prefix + "odd", {"Tf-Id": "caf\u00e9 \ufffd"}),
        (prefix + "ok", {"Tf-Id": "x"}),
    ]
    await client.nc.flush(timeout=2)
    assert client.nc.stats["reconnects"] == 0
