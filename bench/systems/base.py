"""The interface every benchmarked system implements, plus the shared workloads.

A system supplies a handful of primitives -- ``reset``, ``enqueue`` (bulk, its
best producer API), ``enqueue_one`` (single task, for latency) and ``worker``
(run a worker in-process or as a subprocess) -- and inherits the four
workloads from :class:`BenchSystem`, so every system is measured by the very
same code. A system may override a workload method if it really must, but the
measurement definitions below must be preserved:

* every task handler calls :func:`bench.probe.mark` with its task index: at
  handler start for no-op tasks, after the sleep for the slow tasks of the
  mixed workload (for no-op tasks start and end coincide);
* throughput = ``(distinct tasks - 1) / (last mark - first mark)``, i.e. the
  worker's startup and connection time are not counted;
* latency = handler mark - monotonic time taken just before the enqueue call.

A system module exposes its class as ``SYSTEM``. The "taskframe" slot is
``bench/systems/taskframe_system.py``; the harness runs it when it exists.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from bench import procs
from bench.model import MixedSpec, StepResult, Workload
from bench.probe import Recorder
from bench.stats import percentile

DEFAULT_VARIANT = "default"
WARMUP_TASKS = 20
WARMUP_INDEX_BASE = 1_000_000_000  # keeps warm-up indices apart from measured ones
FIRST_TASK_TIMEOUT_S = 60.0  # covers worker start-up (celery needs a few seconds)
SAMPLE_TIMEOUT_S = 10.0

T = TypeVar("T")


class WorkerMode(StrEnum):
    """How a worker is configured.

    THROUGHPUT: the system's best setting for a single worker process draining
    no-op tasks (also used, idle, for latency). MIXED: ``MixedSpec.concurrency``
    tasks in flight at once.
    """

    THROUGHPUT = "throughput"
    MIXED = "mixed"


@dataclass(frozen=True)
class Context:
    """What a system gets from the harness for one step."""

    nats_url: str
    redis_url: str
    workdir: Path  # scratch space for this step: FIFO, worker logs
    repo_root: Path  # importable root for worker subprocesses
    recorder: Recorder
    probe_fifo: Path  # where subprocess workers write their marks
    mixed: MixedSpec

    def redis_db_url(self, db: int) -> str:
        """The run's redis-server, database ``db`` (each Redis peer uses its own)."""
        return f"{self.redis_url.rsplit('/', 1)[0]}/{db}"


class Worker(ABC):
    """A running worker; reports its own peak memory while still alive.

    ``watch`` holds futures that complete only if the worker dies (its
    background task or its process); :meth:`until` races them against a
    harness wait, so a crashed worker fails the step at once instead of
    running into the timeout.
    """

    def __init__(self, description: str = "") -> None:
        self.description = description
        self.watch: list[asyncio.Future[Any]] = []

    @abstractmethod
    def peak_rss(self) -> tuple[float, int]:
        """(peak RSS in MB, number of worker processes)."""

    async def until(self, awaitable: Awaitable[T]) -> T:
        waiter = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait([waiter, *self.watch], return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        waiter.cancel()
        dead = next(iter(done))
        if dead.cancelled():
            reason = "cancelled"
        elif (exc := dead.exception()) is not None:
            reason = repr(exc)
        else:
            reason = f"exited ({dead.result()!r})"
        raise RuntimeError(f"worker died before the workload finished: {reason}")


class InProcessWorker(Worker):
    """A worker living in the step process itself.

    Each step runs in a fresh child process, so the process's VmHWM is the
    worker's own footprint (plus the thin harness around it).
    """

    def peak_rss(self) -> tuple[float, int]:
        kb = procs.peak_rss_kb(os.getpid())
        return ((kb or 0) / 1024.0, 1)


class BenchSystem(ABC):
    """Base class for one benchmarked system; see the module docstring."""

    name: ClassVar[str]
    #: Human-readable description of how the system is driven (APIs, pool).
    setup: ClassVar[str] = ""
    #: Default task count when ``--n`` is not given (smaller for slow peers).
    default_n: ClassVar[int] = 20_000
    #: Variants per workload (e.g. raw nats: fetch vs continuous pull).
    variants: ClassVar[Mapping[Workload, tuple[str, ...]]] = {}

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @classmethod
    def variants_for(cls, workload: Workload) -> tuple[str, ...]:
        return cls.variants.get(workload, (DEFAULT_VARIANT,))

    # ----------------------------------------------------------- primitives
    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect producer-side clients (called once per step)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything ``open`` acquired."""

    @abstractmethod
    async def reset(self) -> None:
        """Drop every queued task and per-run state so the next step starts empty."""

    @abstractmethod
    async def enqueue(self, count: int, slow_every: int = 0) -> None:
        """Enqueue tasks 0..count-1 with the best bulk producer API; return once
        the broker has confirmed all of them. Task i sleeps
        ``sleep_ms_for(i, slow_every, ctx.mixed.slow_ms)`` ms before marking."""

    @abstractmethod
    async def enqueue_one(self, index: int) -> None:
        """Enqueue one no-op task and return when the broker confirmed it."""

    @abstractmethod
    def worker(self, mode: WorkerMode, variant: str) -> AbstractAsyncContextManager[Worker]:
        """Run a worker for the duration of the ``async with`` block."""

    async def queued(self) -> int | None:
        """Tasks still waiting or unacknowledged in the broker; None if unknown.

        Used as a sanity check after draining a backlog (were all tasks really
        consumed and acknowledged, not just started?)."""
        return None

    # ------------------------------------------------------------ workloads
    async def enqueue_variant(self, variant: str, count: int, slow_every: int = 0) -> None:
        """Enqueue like :meth:`enqueue`, with the producer API that ``variant`` names.

        Only systems that declare several ``Workload.ENQUEUE`` variants override
        this; backlog fills always use the first variant."""
        await self.enqueue(count, slow_every)

    async def measure_enqueue(
        self, n: int, slow_every: int = 0, variant: str = DEFAULT_VARIANT
    ) -> StepResult:
        """Start from an empty queue and enqueue ``n`` tasks, timed. The backlog
        is left for the next step (process or mixed) to drain."""
        await self.reset()
        start = time.perf_counter()
        await self.enqueue_variant(variant, n, slow_every)
        elapsed = time.perf_counter() - start
        return StepResult(
            self.name, Workload.ENQUEUE, variant, n=n, rate=n / elapsed, elapsed_s=elapsed
        )

    async def process_backlog(self, n: int, variant: str, timeout_s: float) -> StepResult:
        """Drain a backlog of ``n`` no-op tasks left by a previous enqueue step."""
        async with self.worker(WorkerMode.THROUGHPUT, variant) as worker:
            await worker.until(self.ctx.recorder.wait_distinct(n, timeout_s))
            rss, nproc = worker.peak_rss()
            # Let the worker finish acknowledging what it already handled.
            left = await self._settled_queue()
        result = self._throughput(Workload.PROCESS, variant, n, rss, nproc, worker.description)
        if left is not None:
            result.extra["left_in_queue"] = left
        return result

    async def mixed(self, n: int, variant: str, timeout_s: float) -> StepResult:
        """Drain a backlog of ``n`` mixed tasks left by a previous enqueue step
        (filled in another process, so this process's RSS is the worker's)."""
        async with self.worker(WorkerMode.MIXED, variant) as worker:
            await worker.until(self.ctx.recorder.wait_distinct(n, timeout_s))
            rss, nproc = worker.peak_rss()
        return self._throughput(Workload.MIXED, variant, n, rss, nproc, worker.description)

    async def latency(self, samples: int, variant: str) -> StepResult:
        await self.reset()
        recorder = self.ctx.recorder
        async with self.worker(WorkerMode.THROUGHPUT, variant) as worker:
            # Warm-up: the first task also proves the worker is up and idle.
            for j in range(WARMUP_TASKS):
                await self.enqueue_one(WARMUP_INDEX_BASE + j)
                timeout = FIRST_TASK_TIMEOUT_S if j == 0 else SAMPLE_TIMEOUT_S
                await worker.until(recorder.wait_index(WARMUP_INDEX_BASE + j, timeout))
            recorder.reset()
            latencies_ms: list[float] = []
            rng = random.Random(42)
            for i in range(samples):
                # A small random idle gap so sampling does not phase-lock with a
                # polling worker's cycle (this is jitter, not synchronisation).
                await asyncio.sleep(rng.uniform(0.0, 0.002))
                sent = time.monotonic_ns()
                await self.enqueue_one(i)
                handled = await worker.until(recorder.wait_index(i, SAMPLE_TIMEOUT_S))
                latencies_ms.append((handled - sent) / 1e6)
            rss, nproc = worker.peak_rss()
        return StepResult(
            self.name,
            Workload.LATENCY,
            variant=variant,
            n=samples,
            p50_ms=percentile(latencies_ms, 50),
            p95_ms=percentile(latencies_ms, 95),
            p99_ms=percentile(latencies_ms, 99),
            max_ms=max(latencies_ms),
            worker_peak_rss_mb=rss,
            worker_processes=nproc,
            setup=worker.description,
        )

    async def _settled_queue(self, within_s: float = 5.0) -> int | None:
        """Queue depth once it reaches 0 or ``within_s`` passed. Brokers offer no
        "tell me when empty" notification, so this polls at a short interval."""
        deadline = time.monotonic() + within_s
        while True:
            left = await self.queued()
            if left is None or left == 0 or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.05)

    def _throughput(
        self, workload: Workload, variant: str, n: int, rss: float, nproc: int, setup: str
    ) -> StepResult:
        rec = self.ctx.recorder
        assert rec.min_ns is not None
        assert rec.max_ns is not None
        span_s = max((rec.max_ns - rec.min_ns) / 1e9, 1e-9)
        return StepResult(
            self.name,
            workload,
            variant=variant,
            n=n,
            rate=(rec.distinct - 1) / span_s,
            elapsed_s=span_s,
            worker_peak_rss_mb=rss,
            worker_processes=nproc,
            duplicates=rec.duplicates,
            setup=setup,
        )
