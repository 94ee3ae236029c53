"""What hooks cost a worker: no hooks vs the Prometheus hook vs the tracing hook, one run.

    python -m bench.hooks_cost [--n 20000] [--rounds 3]

Each round drains an N-task backlog of the default-path task (a no-op that keeps its
result: `bench.default_path_app`) three times on one nats-server (file storage), rows
interleaved and rotated between rounds, with an in-process `Worker` (default options):

* ``no hooks`` — the app as users write it;
* ``metrics`` — `taskframe.metrics.Metrics` registered (what `--metrics-port` adds);
* ``tracing`` — `taskframe.tracing.Tracing` with an OpenTelemetry SDK tracer provider whose
  batch processor hands the spans to an exporter that drops them (the cost of making and
  ending every span, not of shipping it).

Rate: N / (time from the worker's start to the last ack seen on the consumer); worker CPU
per task is this process's CPU over the same span. Medians over the rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

from bench import rounds
from bench.default_path_app import QUEUE, Noop, build_app
from taskframe import App, Worker, connect, provision
from taskframe._server import NatsServer
from taskframe.metrics import Metrics
from taskframe.tracing import Tracing


class _Dropped(SpanExporter):
    """An exporter that drops every span: what tracing costs before any shipping."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _no_hooks(app: App) -> None:
    return None


def _metrics(app: App) -> None:
    app.add_hook(Metrics(CollectorRegistry()))


def _tracing(app: App) -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Dropped()))
    app.add_hook(Tracing(tracer_provider=provider))


ROWS: dict[str, Callable[[App], None]] = {
    "no hooks": _no_hooks,
    "metrics": _metrics,
    "tracing": _tracing,
}


async def drain(url: str, row: str, tag: str, n: int) -> tuple[float, float]:
    """Tasks per second and worker CPU us per task for one drain of `row`."""
    namespace = f"hk{tag}"
    app = build_app(namespace)
    ROWS[row](app)
    async with connect(url, namespace=namespace) as client:
        await provision(app, client)
        await client.enqueue_many(Noop(n=i) for i in range(n))
        worker = Worker(app, client)
        cpu, started = time.process_time(), time.perf_counter()
        running = asyncio.create_task(worker.run())
        await rounds.drained(client, namespace, QUEUE)
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu
        worker.stop()
        await running
        for name in (stream.config.name for stream in await client.js.streams_info()):
            if name and namespace in name:
                await client.js.delete_stream(name)
    return n / elapsed, used / n * 1e6


async def run(n: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Every row once per round, interleaved and rotated."""
    found: dict[str, list[tuple[float, float]]] = {row: [] for row in ROWS}
    names = list(ROWS)
    with tempfile.TemporaryDirectory() as store, NatsServer(port=-1, store_dir=store) as server:
        for index in range(rounds):
            order = names[index % len(names) :] + names[: index % len(names)]
            for position, row in enumerate(order):
                found[row].append(await drain(server.url, row, f"{index}{position}", n))
    return found


def report(n: int, rounds: int, found: dict[str, list[tuple[float, float]]]) -> str:
    """A Markdown table of the medians, with each row's ratio to `no hooks`."""
    base = statistics.median(rate for rate, _ in found["no hooks"])
    lines = [
        f"`python -m bench.hooks_cost --n {n} --rounds {rounds}` (in-process worker, result kept)",
        "",
        "| hooks | tasks/s | x no hooks | worker CPU us/task |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row, drains in found.items():
        rate = statistics.median(r for r, _ in drains)
        cpu = statistics.median(c for _, c in drains)
        lines.append(f"| {row} | {rate:,.0f} | {rate / base:.2f} | {cpu:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rounds.main(__doc__, 20_000, run, report)
