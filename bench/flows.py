"""What a group costs per member: a group of N tasks vs N plain tasks vs raw nats-py, one run.

    python -m bench.flows [--n 10000] [--rounds 3]

Each round runs every row once on one nats-server (file storage), rows interleaved and
rotated between rounds, with one in-process `Worker` (default options) and the default-path
task (a no-op that keeps its result: `bench.default_path_app`):

* ``raw nats-py`` — N messages published pipelined (`publish_async`), then pulled in
  batches of 256 and acked one by one: the broker's own cost for the same traffic;
* ``plain tasks`` — `enqueue_many` of N tasks, then a worker drains them; done when the
  queue's consumer has nothing pending or unacked;
* ``group`` — `enqueue(group(*N tasks))`, then a worker runs them; done when the flow's
  final record is stored (the last member's join found every member's record).

Time: from the first enqueue to done (enqueue and processing together; the worker starts
before the first enqueue). Medians over the rounds; `x plain` is the time's ratio to
`plain tasks`, and `us/member over plain` what the group adds per task.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

import nats

from bench import rounds
from bench.default_path_app import QUEUE, Noop, build_app
from taskframe import Worker, connect, group, provision
from taskframe._server import NatsServer

ROWS = ("raw nats-py", "plain tasks", "group")


async def _raw(url: str, tag: str, n: int) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream, subject = f"RAW_{tag}", f"raw{tag}.tasks"
    await js.add_stream(name=stream, subjects=[subject], retention="workqueue")
    sub = await js.pull_subscribe(subject, durable="workers", stream=stream)
    body = Noop(n=0).model_dump_json().encode()
    started = time.perf_counter()
    for i in range(n):
        await js.publish_async(subject, body, headers={"Nats-Msg-Id": f"{tag}-{i}"})
    await js.publish_async_completed()
    seen = 0
    while seen < n:
        for msg in await sub.fetch(256, timeout=5):
            await msg.ack()
            seen += 1
    await nc.flush()
    elapsed = time.perf_counter() - started
    await js.delete_stream(stream)
    await nc.close()
    return elapsed


async def _taskframe(url: str, row: str, tag: str, n: int) -> float:
    namespace = f"fl{tag}"
    app = build_app(namespace)
    async with connect(url, namespace=namespace) as client:
        await provision(app, client)
        worker = Worker(app, client)
        running = asyncio.create_task(worker.run())
        await worker.ready.wait()
        started = time.perf_counter()
        if row == "group":
            flow = await client.enqueue(group(*(Noop(n=i) for i in range(n))))
            await client.wait(flow.id, timeout=600)
        else:
            await client.enqueue_many(Noop(n=i) for i in range(n))
            await rounds.drained(client, namespace, QUEUE)
        elapsed = time.perf_counter() - started
        worker.stop()
        await running
        for name in (stream.config.name for stream in await client.js.streams_info()):
            if name and namespace in name:
                await client.js.delete_stream(name)
    return elapsed


async def run(n: int, rounds: int) -> dict[str, list[float]]:
    """Every row once per round, interleaved and rotated: seconds per row."""
    found: dict[str, list[float]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory() as store, NatsServer(port=-1, store_dir=store) as server:
        for index in range(rounds):
            order = ROWS[index % len(ROWS) :] + ROWS[: index % len(ROWS)]
            for position, row in enumerate(order):
                tag = f"{index}{position}"
                if row == "raw nats-py":
                    seconds = await _raw(server.url, tag, n)
                else:
                    seconds = await _taskframe(server.url, row, tag, n)
                found[row].append(seconds)
    return found


def report(n: int, rounds: int, found: dict[str, list[float]]) -> str:
    """A Markdown table of the medians, with each row's ratio to `plain tasks`."""
    plain = statistics.median(found["plain tasks"])
    lines = [
        f"`python -m bench.flows --n {n} --rounds {rounds}` (in-process worker, results kept)",
        "",
        "| row | seconds | tasks/s | us/task | x plain | us/member over plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row, times in found.items():
        seconds = statistics.median(times)
        extra = f"{(seconds - plain) / n * 1e6:.0f}" if row == "group" else "-"
        lines.append(
            f"| {row} | {seconds:.2f} | {n / seconds:,.0f} | {seconds / n * 1e6:.0f} "
            f"| {seconds / plain:.2f} | {extra} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rounds.main(__doc__, 10_000, run, report)
