"""One soak run: start the server and two workers, offer the load while faults are injected
and samples taken, drain, stop, and put the result together."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import machine
from bench.soak import app as soak_app
from bench.soak import faults, trends
from bench.soak.books import Books
from bench.soak.load import Producer
from bench.soak.options import Options
from bench.soak.processes import Processes
from bench.soak.sampling import Samples
from taskframe import connect
from taskframe._server import server_binary


class Soak:
    """The run's processes, books and samples, and the run itself."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.tmp = Path(tempfile.mkdtemp(prefix="tf-soak-"))
        data = self.tmp / "data"
        data.mkdir()
        self.processes = Processes(self.tmp, data, opts.concurrency, time.time())
        self.books = Books.in_directory(data)
        self.producer = Producer(self.books, opts.rate, opts.event_rate, opts.seed)
        self.samples = Samples()
        self.faults: list[faults.Fault] = []
        self.stop = asyncio.Event()
        self.interrupted = False

    async def run(self) -> dict[str, Any]:
        """Run the soak; the result, as soak.json holds it."""
        opts, processes = self.opts, self.processes
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._interrupt)
        try:
            await asyncio.to_thread(processes.start_server)
            processes.t0 = time.time()
            for slot in range(2):
                await processes.wait_ready(processes.spawn_worker(slot))
            async with connect(processes.url, namespace=soak_app.NAMESPACE) as tf:
                print(f"soak: {opts.minutes} min on {processes.url}, tmp {self.tmp}", flush=True)
                until = opts.minutes * 60
                sampler = asyncio.create_task(
                    self.samples.every(opts.sample_every, self.stop, tf, self.books, processes)
                )
                injecting = asyncio.create_task(
                    faults.inject(opts, processes, self.stop, self.faults)
                )
                progress = asyncio.create_task(self._progress())
                await self.producer.run(
                    tf, lambda: not self.stop.is_set() and processes.now() < until
                )
                injecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await injecting
                drained = await self._drain() if not self.interrupted else 0.0
                await self.samples.take(tf, self.books, processes)
                self.stop.set()
                await sampler
                progress.cancel()
                await processes.stop_workers()
                await asyncio.sleep(1.0)
                self.samples.read_probes(processes)
                for waiter in list(self.producer.waiters):
                    waiter.cancel()
                checks = await self.books.checks(tf, drained, self.interrupted)
            return self._result(checks)
        finally:
            processes.kill_everything()

    def _interrupt(self) -> None:
        self.interrupted = True
        self.stop.set()

    async def _drain(self) -> float:
        """Wait until every acknowledged task and event is accounted for, or the timeout."""
        started = time.monotonic()
        while time.monotonic() - started < self.opts.drain_timeout:
            self.books.read()
            if self.books.pending() == 0 and not self.producer.waiters:
                break
            await asyncio.sleep(0.5)
        return time.monotonic() - started

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(30)
            last = self.samples.totals[-1] if self.samples.totals else {}
            rss = {s["slot"]: s["rss_kb"] // 1024 for s in self.samples.proc[-2:]}
            print(
                f"[{self.processes.now():6.0f}s] enqueued={last.get('enqueued')} "
                f"completed={last.get('completed')} pending={last.get('pending')} "
                f"overdue={last.get('overdue')} dead={last.get('dead')} rss_mb={rss}",
                flush=True,
            )

    def _result(self, checks: dict[str, Any]) -> dict[str, Any]:
        processes, samples = self.processes, self.samples
        version = subprocess.run(
            [server_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        return {
            "options": {**asdict(self.opts), "out": str(self.opts.out), "render": None},
            "duration_s": samples.totals[-1]["t"] if samples.totals else 0.0,
            "interrupted": self.interrupted,
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(processes.t0)),
            "machine": machine.describe(version),
            "checks": checks,
            "faults": [asdict(f) for f in self.faults],
            "lifetimes": [asdict(lt) for lt in processes.lifetimes],
            "trends": [trends.trend(lt, samples, processes.now()) for lt in processes.lifetimes],
            "log_summary": trends.log_summary(processes.lifetimes),
            "samples": {"totals": samples.totals, "proc": samples.proc, "probe": samples.probe},
            "tmp": str(self.tmp),
        }
