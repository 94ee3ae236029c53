"""The outbox relay killed with kill -9 again and again while it drains: every committed
task is stored once and run once (ledger), none lost."""

import asyncio
import signal

from nats.js.errors import NotFoundError
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session

from taskframe import Client
from taskframe import _topology as topology
from taskframe.outbox import Outbox, create_table, outbox_table
from taskframe.testing import NatsServer, eventually
from tests.fault_apps import Work
from tests.faultkit import TASKFRAME, Procs
from tests.ledger import Ledger

ROWS = 5000
KILLS = 8


async def stored(client: Client) -> int:
    try:
        info = await client.js.stream_info(topology.queue_stream(client.namespace, "work"))
    except NotFoundError:  # the first relay has not created it yet
        return 0
    return info.state.messages


async def in_flight(client: Client, engine: Engine) -> bool:
    return await stored(client) > ROWS - await asyncio.to_thread(waiting_rows, engine)


def waiting_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox_table)).scalar_one())


async def test_a_relay_killed_repeatedly_while_draining_stores_every_task_once(
    nats_server: NatsServer, client: Client, procs: Procs, pg_url: str
) -> None:
    engine = create_engine(pg_url)
    create_table(engine)
    ledger = Ledger(f"outbox relay kill -9 x{KILLS} while draining {ROWS} rows", procs.journal)
    outbox = Outbox(client.namespace)
    with Session(engine) as session, session.begin():
        ledger.acknowledge(*(outbox.enqueue(session, Work()) for _ in range(ROWS)))

    def relay() -> object:
        return procs.spawn(*TASKFRAME, "relay", "--db", pg_url, "--namespace", client.namespace,
                           "--url", nats_server.url, "--batch", "200")  # fmt: skip

    kills = caught = 0  # caught: rows stored by a killed relay that did not delete them
    while kills < KILLS and waiting_rows(engine) > 0:
        victim = relay()
        # Killed once it has stored rows it has not deleted yet: in the window that matters.
        await eventually(
            lambda: in_flight(client, engine), "stored rows not yet deleted", interval=0.001
        )
        victim.signal(signal.SIGKILL)  # type: ignore[attr-defined]
        await victim.wait_exit()  # type: ignore[attr-defined]
        kills += 1
        caught += await stored(client) - (ROWS - waiting_rows(engine))
    assert kills == KILLS, f"drained after only {kills} kills: too few rows to test anything"
    last = relay()
    await last.wait_log("relay started")  # type: ignore[attr-defined]
    await eventually(lambda: waiting_rows(engine) == 0, "the last relay to drain", timeout=30)
    last.signal(signal.SIGTERM)  # type: ignore[attr-defined]
    assert await last.wait_exit() == 0  # type: ignore[attr-defined]
    assert caught > 0, "no kill fell between a publish and its delete"
    assert await stored(client) == ROWS, "a row sent twice was stored twice, or one was lost"

    procs.worker(nats_server.url, concurrency=16)
    await ledger.settle(client, timeout=60)
    figures = await ledger.figures(client, note=f"{caught} rows stored but not deleted at a kill")
    figures.record()
    figures.check(exactly_once=True)
    assert figures.executed == ROWS
    engine.dispose()
