"""Prometheus metrics: a hook that counts attempts, and queue gauges read at scrape time.

    taskframe worker shop.worker:app --metrics-port 9100   # serves /metrics

Needs the `metrics` extra (`pip install 'taskframe[metrics]'`); importing `taskframe`
does not import prometheus-client, only this module does.

What a worker counts (labels namespace, queue; an event's queue label is its group):

    taskframe_tasks_total{task, outcome}        attempts by outcome (`hooks.Outcome`)
    taskframe_task_duration_seconds{task}        histogram: attempt start to outcome
    taskframe_task_queued_seconds{task}          histogram: stored to first attempt's start
    taskframe_tasks_running                      attempts running now

and what the server holds, read from its consumers when scraped (the same for every worker
of a namespace: aggregate with max(), not sum()):

    taskframe_queue_waiting, taskframe_queue_in_flight, taskframe_queue_redelivered,
    taskframe_queue_dead, taskframe_queue_paused (1 if paused)

With `--processes N` the supervising process serves one endpoint for the pool: children
write their samples to files in a directory it makes (prometheus-client's multiprocess
mode), and it adds them up when scraped and reads the queue gauges once, itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from taskframe.errors import ConfigError
from taskframe.hooks import AttemptInfo, Hook

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
    from prometheus_client import multiprocess as _multiprocess
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ConfigError("metrics need prometheus-client: pip install 'taskframe[metrics]'") from exc

from taskframe._queues import QueueInfo
from taskframe.client import Client, connect

__all__ = ["Metrics", "PoolMetrics", "QueueCollector", "serve_worker"]

log = logging.getLogger("taskframe.metrics")

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Histogram bucket bounds, in seconds."""
SCRAPE_TIMEOUT = 5.0
"""Seconds a scrape waits for the server's queue counts; without them it has the rest."""
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

_TASK = ("namespace", "queue", "task")
_QUEUE = ("namespace", "queue")


class Metrics(Hook):
    """The hook that counts a worker's attempts into `registry`.

    `registry=None` registers nowhere: what a pool's child does, whose samples go to the
    multiprocess directory for its supervisor to serve.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.tasks = Counter(
            "taskframe_tasks", "Attempts by outcome.", (*_TASK, "outcome"), registry=registry
        )
        self.duration = Histogram(
            "taskframe_task_duration_seconds",
            "Seconds from an attempt's start to its outcome.",
            _TASK,
            buckets=BUCKETS,
            registry=registry,
        )
        self.queued = Histogram(
            "taskframe_task_queued_seconds",
            "Seconds from storing a task to the start of its first attempt.",
            _TASK,
            buckets=BUCKETS,
            registry=registry,
        )
        self.running = Gauge(
            "taskframe_tasks_running",
            "Attempts running now.",
            _QUEUE,
            multiprocess_mode="livesum",
            registry=registry,
        )
        self._by_task: dict[tuple[str, str, str], _Series] = {}

    def attempt_started(self, attempt: AttemptInfo) -> None:
        """Count the attempt as running; note how long a first attempt waited."""
        series = self._series(attempt)
        series.running.inc()
        if attempt.attempt == 1:
            series.queued.observe(attempt.queued)

    def attempt_ended(self, attempt: AttemptInfo) -> None:
        """Count the outcome and the attempt's duration."""
        series = self._series(attempt)
        series.running.dec()
        outcome = attempt.outcome or "lost"
        counter = series.outcomes.get(outcome)
        if counter is None:
            labels = (attempt.namespace, attempt.queue or attempt.group, attempt.name, outcome)
            counter = series.outcomes[outcome] = self.tasks.labels(*labels)
        counter.inc()
        series.duration.observe(attempt.duration)

    def _series(self, attempt: AttemptInfo) -> _Series:
        # prometheus-client's labels() costs microseconds: each task's series is looked up once
        key = (attempt.namespace, attempt.queue or attempt.group, attempt.name)
        series = self._by_task.get(key)
        if series is None:
            series = self._by_task[key] = _Series(
                self.running.labels(*key[:2]),
                self.queued.labels(*key),
                self.duration.labels(*key),
                {},
            )
        return series


@dataclass(slots=True)
class _Series:
    running: Gauge
    queued: Histogram
    duration: Histogram
    outcomes: dict[str, Counter]


Read = Callable[[], Coroutine[Any, Any, list[QueueInfo]]]


class QueueCollector(Collector):
    """The server's counts of each queue, read through `read` on `loop` at every scrape."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read: Read) -> None:
        self._loop = loop
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Gauges of every queue of the namespace; none if the server did not answer."""
        try:
            infos = asyncio.run_coroutine_threadsafe(self._read(), self._loop).result(
                SCRAPE_TIMEOUT
            )
        except Exception as exc:
            log.warning("queue counts not read for /metrics: %r", exc)
            return
        gauges = {
            field: GaugeMetricFamily(f"taskframe_queue_{field}", text, labels=_QUEUE)
            for field, text in (
                ("waiting", "Tasks stored and not yet delivered (server's count)."),
                ("in_flight", "Tasks delivered and not yet acknowledged (server's count)."),
                ("redelivered", "Tasks in flight delivered more than once (server's count)."),
                ("dead", "Dead letters kept for the queue."),
                ("paused", "1 if the queue is paused."),
            )
        }
        for info in infos:
            labels = [info.namespace, info.queue]
            for field, gauge in gauges.items():
                gauge.add_metric(labels, float(getattr(info, field)))
        yield from gauges.values()


def serve_worker(
    metrics_registry: CollectorRegistry, client: Client, port: int, host: str
) -> Callable[[], None]:
    """Serve `/metrics` of one worker process; its queue counts are read through `client`
    on the running loop. Returns the function that stops serving."""
    metrics_registry.register(QueueCollector(asyncio.get_running_loop(), client.queues))
    return _serve(metrics_registry, port, host)


class PoolMetrics:
    """Serves `/metrics` for a pool of worker processes, until `close()`.

    Makes the directory the children write to (and sets `PROMETHEUS_MULTIPROC_DIR` for
    them, as they inherit its environment), serves what they wrote and the queue counts,
    read over a connection of its own on a thread of its own. Raises `ConfigError` if
    `host:port` cannot be served.
    """

    def __init__(self, url: str | None, namespace: str, port: int, host: str) -> None:
        self._url, self._namespace = url, namespace
        self.directory = tempfile.mkdtemp(prefix="taskframe-metrics-")
        os.environ[MULTIPROC_DIR] = self.directory
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="taskframe-metrics", daemon=True
        )
        self._thread.start()
        self._client: Client | None = None
        registry.register(QueueCollector(self._loop, self._read))
        try:
            self._stop = _serve(registry, port, host)
        except ConfigError:
            self._stop = lambda: None
            self.close()
            raise
        log.info("pool processes write their samples to %s", self.directory)

    async def _read(self) -> list[QueueInfo]:
        if self._client is None:
            self._client = await connect(self._url, namespace=self._namespace).open()
        return await self._client.queues()

    def exited(self, pid: int) -> None:
        """Child `pid` exited: its gauges no longer count (its counters still do)."""
        _multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Stop serving; remove the children's files."""
        self._stop()
        if self._client is not None:
            closing = asyncio.run_coroutine_threadsafe(self._client.close(), self._loop)
            with contextlib.suppress(Exception):
                closing.result(SCRAPE_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(SCRAPE_TIMEOUT)
        shutil.rmtree(self.directory, ignore_errors=True)


def _serve(registry: CollectorRegistry, port: int, host: str) -> Callable[[], None]:
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop
