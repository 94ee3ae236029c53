"""OpenTelemetry tracing (taskframe.tracing): spans captured with the SDK's in-memory exporter.

An enqueue is a PRODUCER span whose context travels in the message's `traceparent` header;
every attempt is a CONSUMER span, its child, in the same trace.
"""

import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from taskframe import App, Client, Context, Task, TaskFailed
from taskframe import _wire as wire
from taskframe._publish import publish_stored
from taskframe.testing import eventually, running_worker
from taskframe.tracing import Tracing
from tests.apps import AlwaysFails, Flaky, build


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(tracer_provider=provider)


def _spans(exporter: InMemorySpanExporter, task_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("taskframe.task_id") == task_id
    ]


def _attempt(span: ReadableSpan) -> int:
    value = (span.attributes or {})["taskframe.attempt"]
    assert isinstance(value, int)
    return value


async def test_a_task_failing_twice_gives_three_attempt_spans_under_its_enqueue_span(
    client: Client, exporter: InMemorySpanExporter, tracing: Tracing
) -> None:
    app = build(client.namespace)
    app.add_hook(tracing)
    client.add_hook(tracing)
    run = await client.enqueue(Flaky(succeed_on=3))
    async with running_worker(app, client):
        assert await run.result(timeout=10) == "ok on 3"
        await eventually(lambda: len(_spans(exporter, run.id)) == 4, "four spans")
    [enqueue] = [s for s in _spans(exporter, run.id) if s.kind is SpanKind.PRODUCER]
    attempts = sorted(
        (s for s in _spans(exporter, run.id) if s.kind is SpanKind.CONSUMER),
        key=_attempt,
    )
    assert [_attempt(s) for s in attempts] == [1, 2, 3]
    for span in attempts:
        assert span.parent is not None
        assert span.parent.span_id == enqueue.context.span_id
        assert span.context.trace_id == enqueue.context.trace_id
    assert [(s.attributes or {})["taskframe.outcome"] for s in attempts] == [
        "retried",
        "retried",
        "succeeded",
    ]
    assert [s.status.status_code for s in attempts][:2] == [StatusCode.ERROR] * 2
    assert attempts[0].events[0].name == "exception"  # the error is recorded


async def test_the_last_attempt_of_a_dead_task_is_an_error_and_a_replay_continues_its_trace(
    client: Client, exporter: InMemorySpanExporter, tracing: Tracing
) -> None:
    app = build(client.namespace)
    app.add_hook(tracing)
    client.add_hook(tracing)
    run = await client.enqueue(AlwaysFails(note="x"))
    async with running_worker(app, client):
        with pytest.raises(TaskFailed):
            await run.result(timeout=10)
        await eventually(lambda: len(_spans(exporter, run.id)) == 4, "enqueue + 3 attempts")
        [enqueue] = [s for s in _spans(exporter, run.id) if s.kind is SpanKind.PRODUCER]
        last = max(_spans(exporter, run.id), key=lambda s: s.end_time or 0)
        assert (last.attributes or {})["taskframe.outcome"] == "dead"
        assert last.status.status_code is StatusCode.ERROR
        [letter] = await client.dead_letters()
        assert "traceparent" in letter.headers  # the dead letter keeps the trace context
        await client.replay(letter)
        await eventually(lambda: len(_spans(exporter, run.id)) == 7, "3 attempts more")
    trace_ids = {s.context.trace_id for s in _spans(exporter, run.id)}
    assert trace_ids == {enqueue.context.trace_id}


class Traced(Task[int], queue="traced"):
    a: int


async def test_a_raw_publish_with_its_own_traceparent_is_continued(
    client: Client, tracing: Tracing
) -> None:
    seen: list[str] = []
    app = App(client.namespace)

    @app.handle(Traced)
    async def traced(job: Traced, ctx: Context) -> int:
        seen.append(format(trace.get_current_span().get_span_context().trace_id, "032x"))
        return job.a

    app.add_hook(tracing)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"Nats-Msg-Id": "raw-1", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    async with running_worker(app, client):
        subject = wire.task_subject(client.namespace, "traced", "Traced")
        await publish_stored(client.nc, client.settings, subject, b'{"a": 1}', headers)
        await eventually(lambda: seen, "the handler ran")
    assert seen == [trace_id]  # the handler ran inside a span of the producer's trace


def test_importing_taskframe_does_not_import_opentelemetry() -> None:
    code = "import taskframe, sys; assert 'opentelemetry' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
