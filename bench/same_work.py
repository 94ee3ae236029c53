"""Enqueue and processing throughput against raw nats-py doing the wire work taskframe does.

The suite's raw loops (`python -m bench`) are the physical limit: a few bytes per message,
no headers, nothing decoded. A taskframe task carries one header (`Nats-Msg-Id`, which
makes a resent enqueue safe) and a JSON body validated into a model. Here raw nats-py
gets the same messages and decodes each body with pydantic, in its best loop
(pull requests of 500 kept outstanding, handler inline, `ack()`), and runs in turn with a
single-process taskframe worker on the same server. Enqueueing compares raw
`publish_async` of the same messages (header included, every PubAck checked) with
`enqueue_many`:

    python -m bench.same_work [--n 20000] [--rounds 3] [--out bench/results/same_work.md]

With `--default-path` it measures the path a user of the README gets instead (a CLI worker
whose task keeps its result) against raw nats-py with and without one KV put per task;
see `bench/default_path.py`:

    python -m bench.same_work --default-path [--n 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from pydantic import BaseModel

from bench import default_path
from taskframe import App, Context, Task, Worker, connect, provision
from taskframe._server import NatsServer


class Noop(Task[None], queue="bench", results=False):
    """The task both sides move."""

    n: int


class _Body(BaseModel):
    n: int


async def raw(url: str, tag: str, n: int) -> tuple[float, float]:
    """Raw nats-py: publish_async with Nats-Msg-Id, then a continuous pull of 500 + ack."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = f"RAW{tag}"
    await js.add_stream(
        StreamConfig(name=stream, subjects=[f"raw{tag}.>"], retention=RetentionPolicy.WORK_QUEUE)
    )
    await js.add_consumer(
        stream,
        ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=100_000),
    )
    tasks = [Noop(n=i) for i in range(n)]
    started = time.perf_counter()
    acks = [
        await js.publish_async(
            f"raw{tag}.Noop", task.model_dump_json().encode(), headers={"Nats-Msg-Id": str(i)}
        )
        for i, task in enumerate(tasks)
    ]
    await asyncio.gather(*acks)
    enqueued = n / (time.perf_counter() - started)
    done, wanted = asyncio.Event(), asyncio.Event()
    inbox = nc.new_inbox()
    count = pending = 0

    async def on_msg(msg: Msg) -> None:
        nonlocal count, pending
        if not msg.reply:  # a status: the request ended
            pending = 0
            wanted.set()
            return
        _Body.model_validate_json(msg.data)
        await msg.ack()
        count += 1
        pending -= 1
        if pending < 250:
            wanted.set()
        if count == n:
            done.set()

    await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1)

    async def pull() -> None:
        nonlocal pending
        request = json.dumps({"batch": 500, "expires": 5_000_000_000}).encode()
        while not done.is_set():
            if pending < 250:
                await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.c", request, reply=inbox)
                pending += 500
            wanted.clear()
            await wanted.wait()

    started = time.perf_counter()
    puller = asyncio.create_task(pull())
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - started
    puller.cancel()
    await nc.close()
    return enqueued, n / elapsed


async def framework(url: str, tag: str, n: int) -> tuple[float, float]:
    """taskframe: enqueue_many, then one in-process worker, no stored results."""
    app = App(f"same{tag}")
    done = asyncio.Event()
    count = 0

    @app.handle(Noop)
    async def noop(job: Noop, ctx: Context) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async with connect(url, namespace=f"same{tag}") as client:
        await provision(app, client)  # as raw's stream exists before it publishes
        tasks = [Noop(n=i) for i in range(n)]
        started = time.perf_counter()
        await client.enqueue_many(tasks)
        enqueued = n / (time.perf_counter() - started)
        worker = Worker(app, client, concurrency=64)
        running = asyncio.create_task(worker.run())
        await worker.ready.wait()
        started = time.perf_counter()
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - started
        worker.stop()
        await running
    return enqueued, n / elapsed


Rates = list[tuple[float, float]]  # (enqueue, process) per round


async def main(url: str, n: int, rounds: int) -> tuple[Rates, Rates]:
    raws: Rates = []
    ours: Rates = []
    for index in range(rounds):
        raws.append(await raw(url, str(index), n))
        ours.append(await framework(url, str(index), n))
        print(f"round {index + 1}: raw {raws[-1]}  taskframe {ours[-1]}")
    return raws, ours


def _rows(raws: Rates, ours: Rates, column: int) -> list[str]:
    r = [x[column] for x in raws]
    o = [x[column] for x in ours]
    rows = [
        f"| {i + 1} | {a:,.0f}/s | {b:,.0f}/s | {b / a:.2f} |"
        for i, (a, b) in enumerate(zip(r, o, strict=True))
    ]
    rows.append(f"| best | {max(r):,.0f}/s | {max(o):,.0f}/s | {max(o) / max(r):.2f} |")
    mr, mo = statistics.median(r), statistics.median(o)
    rows.append(f"| median | {mr:,.0f}/s | {mo:,.0f}/s | {mo / mr:.2f} |")
    return rows


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--default-path",
        action="store_true",
        help="CLI worker keeping results vs raw pull and raw pull + KV put (default_path.md)",
    )
    parser.add_argument(
        "--kv-window",
        type=int,
        default=1024,
        help="--default-path: messages the raw KV loop requests or awaits PubAcks for at once",
    )
    args = parser.parse_args()
    if args.default_path:
        out = args.out or Path("bench/results/default_path.md")
        default_path.run(args.n, args.rounds, out, args.kv_window)
        return
    args.out = args.out or Path("bench/results/same_work.md")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as store, NatsServer(port=-1, store_dir=store) as server:
        raws, ours = asyncio.run(main(server.url, args.n, args.rounds))
    lines = [
        "# Enqueue and processing throughput, same wire work as taskframe",
        "",
        f"`python -m bench.same_work --n {args.n} --rounds {args.rounds}` on "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load {load:.2f} before.",
        "Each message: one `Nats-Msg-Id` header and a JSON body (pydantic-encoded, and",
        "validated with pydantic on the way out); file storage; single process; no stored",
        "results.",
        "",
        "## Enqueue: raw `publish_async` vs `enqueue_many`",
        "",
        "| round | raw nats-py | taskframe | ratio |",
        "| ---: | ---: | ---: | ---: |",
        *_rows(raws, ours, 0),
        "",
        "## Processing a backlog: raw continuous pull (500, inline) vs a taskframe worker",
        "",
        "| round | raw nats-py | taskframe | ratio |",
        "| ---: | ---: | ---: | ---: |",
        *_rows(raws, ours, 1),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    run()
