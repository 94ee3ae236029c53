"""taskframe.outbox: enqueue in the caller's transaction; the relay sends committed rows.

Against a real PostgreSQL (tests/postgres.py) and SQLite in a temporary file, and a real
nats-server. The relay's own kill -9 scenario is in test_outbox_faults.py.
"""

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, insert, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

import taskframe.outbox
from taskframe import Client, Event
from taskframe import _topology as topology
from taskframe.outbox import Outbox, Relay, create_table, outbox_table
from taskframe.testing import eventually, running_worker
from tests.apps import Add, build


class Shipped(Event):
    order: int


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an outbox-ready database of the test's own, of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    engine = create_engine(url)
    create_table(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg(pg_url: str) -> Iterator[Engine]:
    """An engine on an outbox-ready PostgreSQL database of the test's own."""
    engine = create_engine(pg_url)
    create_table(engine)
    yield engine
    engine.dispose()


async def stored(client: Client, queue: str) -> int:
    info = await client.js.stream_info(topology.queue_stream(client.namespace, queue))
    return info.state.messages


def waiting_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox_table)).scalar_one())


async def test_a_rollback_enqueues_nothing_and_a_commit_exactly_once(
    db: Engine, client: Client
) -> None:
    outbox = Outbox(client.namespace)
    with Session(db) as session:
        outbox.enqueue(session, Add(a=1, b=1))
        session.rollback()
    with Session(db) as session, session.begin():
        task_id = outbox.enqueue(session, Add(a=2, b=3), key="order-7")
    relay = Relay(client, db)
    assert await relay.drain() == 1
    assert await relay.drain() == 0
    assert waiting_rows(db) == 0
    assert await stored(client, "math") == 1
    async with running_worker(build(client.namespace), client):
        assert await client.handle(Add, task_id).result(timeout=10) == 5


async def test_a_row_sent_again_after_a_lost_delete_is_no_second_task(
    db: Engine, client: Client
) -> None:
    """What a relay killed between publish and delete leaves: the row, sent once already."""
    outbox = Outbox(client.namespace)
    with Session(db) as session, session.begin():
        for n in range(5):
            outbox.enqueue(session, Add(a=n, b=0))
        outbox.publish(session, Shipped(order=7))
    with db.connect() as conn:
        rows = conn.execute(select(outbox_table)).mappings().all()
    assert await Relay(client, db).drain() == 6
    with db.begin() as conn:  # the rows come back, as if the deletes had never committed
        conn.execute(insert(outbox_table), [dict(r) for r in rows])
    assert await Relay(client, db).drain() == 6
    assert await stored(client, "math") == 5


async def test_async_sessions_write_to_the_same_outbox(
    client: Client, tmp_path: Path, pg_url: str
) -> None:
    sqlite = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    for sync_url, async_url in [(sqlite.replace("+aiosqlite", ""), sqlite), (pg_url, pg_url)]:
        create_table(sync_url)
        engine = create_async_engine(async_url)
        async with async_sessionmaker(engine)() as session, session.begin():
            Outbox(client.namespace).enqueue(session, Add(a=1, b=2))
        async with async_sessionmaker(engine)() as session:
            Outbox(client.namespace).enqueue(session, Add(a=9, b=9))
            await session.rollback()
        await engine.dispose()
        assert await Relay(client, sync_url).drain() == 1
    assert await stored(client, "math") == 2


async def test_two_relays_on_one_postgres_table_send_every_row_once(
    pg: Engine, client: Client
) -> None:
    engine = pg
    outbox = Outbox(client.namespace)
    with Session(engine) as session, session.begin():
        for n in range(600):
            outbox.enqueue(session, Add(a=n, b=0))
    relays = [Relay(client, pg, batch=20, poll_interval=0.05) for _ in range(2)]
    running = [asyncio.create_task(r.run()) for r in relays]
    await eventually(lambda: waiting_rows(engine) == 0, "the table to drain", timeout=30)
    for relay in relays:
        relay.stop()
    await asyncio.gather(*running)
    # A row both relays sent would count twice here; the stream would hide it as a duplicate.
    assert sum(r.sent for r in relays) == 600
    assert all(r.sent > 0 for r in relays), [r.sent for r in relays]
    assert await stored(client, "math") == 600


async def test_notify_wakes_the_relay_long_before_its_poll(pg: Engine, client: Client) -> None:
    engine = pg
    relay = Relay(client, pg, poll_interval=60.0)
    running = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: relay.sent == 0 and relay._conn is not None, "a first pass")
        with Session(engine) as session, session.begin():
            Outbox(client.namespace).enqueue(session, Add(a=1, b=1))
        await eventually(lambda: relay.sent == 1, "the row sent on NOTIFY", timeout=10)
    finally:
        relay.stop()
        with Session(engine) as session, session.begin():  # wakes it to see the stop
            Outbox("other").enqueue(session, Add(a=0, b=0))
        await running


async def test_rows_that_cannot_be_sent_stay_and_the_rest_go(db: Engine, client: Client) -> None:
    """A whole batch of unreadable rows at the head of the table blocks nothing after it."""
    outbox = Outbox(client.namespace)
    with Session(db) as session, session.begin():
        outbox.enqueue(session, Add(a=1, b=1))
    bad = {"namespace": client.namespace, "msg_id": "bad", "task_id": "bad", "queue": "math",
           "subject": "x", "headers": "{not json", "body": b"{}"}  # fmt: skip
    with db.begin() as conn:
        conn.execute(insert(outbox_table), [bad] * 4)
    with Session(db) as session, session.begin():
        outbox.enqueue(session, Add(a=2, b=2))
    assert await Relay(client, db, batch=2, poll_interval=0.01).drain() == 2
    assert waiting_rows(db) == 4
    assert await stored(client, "math") == 2


async def test_the_documented_sql_migration_makes_a_working_outbox(
    client: Client, tmp_path: Path
) -> None:
    doc = (Path(taskframe.outbox.__file__).parent.parent / "docs" / "outbox.md").read_text()
    assert taskframe.outbox.NOTIFY_SQL.strip() in doc
    sqlite_sql = doc.split("SQLite:\n\n```sql\n", 1)[1].split("```", 1)[0]
    url = f"sqlite:///{tmp_path / 'migrated.db'}"
    with closing(sqlite3.connect(tmp_path / "migrated.db")) as conn:
        conn.executescript(sqlite_sql)
    engine = create_engine(url)
    with Session(engine) as session, session.begin():
        task_id = Outbox(client.namespace).enqueue(session, Add(a=1, b=2))
    engine.dispose()
    assert await Relay(client, url).drain() == 1
    status = await client.handle(Add, task_id).status()
    assert status.state.value == "queued"
    assert await stored(client, "math") == 1


async def test_a_relay_outlives_a_database_error_and_sends_once_it_is_back(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = create_engine(url)  # no outbox table yet: every pass fails
    relay = Relay(client, url, poll_interval=0.05)
    running = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: "outbox pass failed" in caplog.text, "a failed pass logged")
        create_table(engine)
        with Session(engine) as session, session.begin():
            Outbox(client.namespace).enqueue(session, Add(a=1, b=1))
        await eventually(lambda: relay.sent == 1, "the row sent once the table exists")
    finally:
        relay.stop()
        await running
        engine.dispose()
    assert await stored(client, "math") == 1


async def test_a_relay_in_the_workers_process_delivers_a_committed_task_to_it(
    db: Engine, client: Client
) -> None:
    """Embedded: `Relay.run()` beside `Worker.run()` on one loop and one connection."""
    async with running_worker(build(client.namespace), client):
        relay = Relay(client, db, poll_interval=0.05)
        running = asyncio.create_task(relay.run())
        try:
            with Session(db) as session, session.begin():
                task_id = Outbox(client.namespace).enqueue(session, Add(a=20, b=22))
            assert await client.handle(Add, task_id).result(timeout=10) == 42
        finally:
            relay.stop()
            await running


async def test_the_relay_stores_committed_rows_in_their_order(db: Engine, client: Client) -> None:
    outbox = Outbox(client.namespace)
    for first in (0, 30):  # two transactions, committed one after the other
        with Session(db) as session, session.begin():
            for n in range(first, first + 30):
                outbox.enqueue(session, Add(a=n, b=0))
    assert await Relay(client, db, batch=7).drain() == 60
    stream = topology.queue_stream(client.namespace, "math")
    bodies = [(await client.js.get_msg(stream, seq)).data for seq in range(1, 61)]
    assert [json.loads(body or b"")["a"] for body in bodies] == list(range(60))
