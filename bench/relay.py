"""The outbox relay on PostgreSQL: throughput, and commit-to-stored latency with LISTEN/NOTIFY
and with polling, against raw nats-py publishing the same messages, in one run.

    python -m bench.relay [--n 20000] [--samples 200] [--rounds 3]

Starts its own nats-server (file storage) and PostgreSQL (tests/postgres.py: initdb into a
temporary directory, fsync off). Per round, for N rows committed in one transaction:

* ``relay`` — `Relay(client, db, batch=500).drain()`: rows read, published with their
  `Nats-Msg-Id`, confirmed and deleted; rows/s from the start of the drain to its end.
* ``raw nats-py`` — `js.publish_async` of the same N messages (subject, headers, body as
  the rows hold them) into an empty stream, then `publish_async_completed()`: the publish
  alone, without any database.

Latency: a relay runs (`Relay.run()`); each sample commits one row in its own transaction
and times from just before `commit()` until a pull consumer (a long-polling fetch, as
workers use) on the queue's stream receives the message (the server delivers only what it
stored). Samples are apart by a random 0-20 ms (polling: 0 to the interval, so commits fall
anywhere in its cycle). Modes: LISTEN/NOTIFY (poll interval 1 s as the fallback); polling
only, every 1 s (the default interval) and every 0.1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import tempfile
import time

import nats
import nats.errors
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session

from taskframe import Client, Task, connect
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._server import NatsServer
from taskframe.outbox import Outbox, Relay, create_table, outbox_table
from taskframe.provision import ensure_queue
from tests.postgres import running_postgres


class Ping(Task[None], queue="relay"):
    """A small task: only its trip through the outbox is measured."""

    n: int


def commit_rows(engine: Engine, namespace: str, n: int) -> None:
    outbox = Outbox(namespace)
    with Session(engine) as session, session.begin():
        for i in range(n):
            outbox.enqueue(session, Ping(n=i))


async def relay_rate(client: Client, engine: Engine, n: int) -> float:
    await asyncio.to_thread(commit_rows, engine, client.namespace, n)
    start = time.perf_counter()
    sent = await Relay(client, engine, batch=500).drain()
    assert sent == n, (sent, n)
    return n / (time.perf_counter() - start)


async def raw_rate(url: str, client: Client, engine: Engine, n: int) -> float:
    await asyncio.to_thread(commit_rows, engine, client.namespace, n)
    with engine.connect() as conn:
        rows = conn.execute(select(outbox_table.c.subject, outbox_table.c.headers,
                                   outbox_table.c.body)).all()  # fmt: skip
    messages = [(s, json.loads(h), b) for s, h, b in rows]
    nc = await nats.connect(url)
    js = nc.jetstream()
    start = time.perf_counter()
    for subject, headers, body in messages:
        await js.publish_async(subject, body, headers=headers)
    await js.publish_async_completed()
    rate = n / (time.perf_counter() - start)
    await nc.close()
    return rate


async def latencies(
    client: Client, engine: Engine, samples: int, *, listen: bool, poll: float
) -> list[float]:
    seen: asyncio.Queue[float] = asyncio.Queue()
    stream = topology.queue_stream(client.namespace, "relay")
    subject = wire.task_subject(client.namespace, "relay", Ping.__tf_name__)
    durable = f"bench{int(listen)}{int(poll * 1000)}"
    sub = await client.js.pull_subscribe(subject, durable=durable, stream=stream)

    async def consume() -> None:  # a long-polling fetch: answered as the message is stored
        while True:
            with contextlib.suppress(nats.errors.TimeoutError):
                for msg in await sub.fetch(1, timeout=5):
                    seen.put_nowait(time.perf_counter())
                    await msg.ack()

    consumer = asyncio.create_task(consume())
    relay = Relay(client, engine, poll_interval=poll, listen=listen)
    running = asyncio.create_task(relay.run())
    outbox = Outbox(client.namespace)
    found = []
    try:
        for i in range(samples):
            # commits fall anywhere in the relay's cycle, not just after its last pass
            await asyncio.sleep(random.uniform(0, 0.02 if listen else poll))
            session = Session(engine)
            session.begin()
            outbox.enqueue(session, Ping(n=i))
            session.flush()
            start = time.perf_counter()
            await asyncio.to_thread(session.commit)
            session.close()
            found.append((await asyncio.wait_for(seen.get(), 30) - start) * 1000)
    finally:
        relay.stop()
        if listen:  # wakes it now rather than at its next poll
            await asyncio.to_thread(commit_rows, engine, "wake", 1)
        await running
        consumer.cancel()
        await sub.unsubscribe()
        await client.js.delete_consumer(stream, durable)
    return found


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(n: int, samples: int, rounds: int) -> str:
    with (
        tempfile.TemporaryDirectory() as store,
        NatsServer(port=-1, store_dir=store) as server,
        running_postgres() as pg,
    ):
        engine = create_engine(pg.new_database())
        create_table(engine)
        relay_rates, raw_rates = [], []
        for r in range(rounds):
            for name, rates in (("relay", relay_rates), ("raw", raw_rates)):
                async with connect(server.url, namespace=f"b{name}{r}") as client:
                    await ensure_queue(client.js, client.settings, "relay")
                    if name == "relay":
                        rates.append(await relay_rate(client, engine, n))
                    else:
                        rates.append(await raw_rate(server.url, client, engine, n))
                        with engine.begin() as conn:
                            conn.execute(outbox_table.delete())
                    await client.js.delete_stream(topology.queue_stream(client.namespace, "relay"))
        modes = [("LISTEN/NOTIFY (poll 1 s fallback)", True, 1.0, samples),
                 ("polling every 1 s", False, 1.0, max(20, samples // 5)),
                 ("polling every 0.1 s", False, 0.1, samples)]  # fmt: skip
        lat = []
        async with connect(server.url, namespace="blat") as client:
            await ensure_queue(client.js, client.settings, "relay")
            for label, listen, poll, count in modes:
                found = await latencies(client, engine, count, listen=listen, poll=poll)
                lat.append((label, count, found))
        engine.dispose()
    relay, raw = statistics.median(relay_rates), statistics.median(raw_rates)
    lines = [
        f"`python -m bench.relay --n {n} --samples {samples} --rounds {rounds}`",
        "",
        "| throughput, median of rounds | msgs/s | x raw nats-py |",
        "| --- | ---: | ---: |",
        f"| relay (read, publish, confirm, delete; batch 500) | {relay:,.0f} | {relay / raw:.2f} |",
        f"| raw nats-py publish_async, same messages, no database | {raw:,.0f} | 1.00 |",
        "",
        "| commit to stored | samples | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, count, found in lat:
        lines.append(f"| {label} | {count} | {pct(found, 0.5):.1f} | {pct(found, 0.99):.1f} "
                     f"| {max(found):.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the arguments, run, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(asyncio.run(run(args.n, args.samples, args.rounds)))


if __name__ == "__main__":
    main()
