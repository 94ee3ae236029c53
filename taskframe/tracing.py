"""OpenTelemetry tracing: a PRODUCER span per enqueue, a CONSUMER span per attempt.

Needs the `otel` extra (`pip install 'taskframe[otel]'`: opentelemetry-api); importing
taskframe does not import OpenTelemetry. Register the hook where tasks are enqueued and
where they run:

    from taskframe.tracing import Tracing

    app.add_hook(Tracing())       # workers: a span per attempt (and enqueues from handlers)
    client.add_hook(Tracing())    # producers: a span per enqueue or publish

An enqueue writes the W3C `traceparent` (and `tracestate`) of its span into the message's
headers; each attempt's span is a child of it, so a task's attempts, retries included,
sit in the trace that enqueued it. A message published by any program with its own
`traceparent` header is continued the same way, and a dead letter keeps the header, so a
replayed task continues its trace too. Spans go to the tracer provider you configure (the
global one unless `tracer_provider` is given); with none configured OpenTelemetry's no-op
tracer makes them cost next to nothing.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from taskframe.hooks import AttemptInfo, EnqueueInfo, Hook

__all__ = ["Tracing"]

_KEY = "taskframe.tracing"


class Tracing(Hook):
    """Traces enqueues and attempts with OpenTelemetry (see the module's docstring).

    Args:
        tracer_provider: where spans go; the global tracer provider if None.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("taskframe", tracer_provider=tracer_provider)
        self._enqueuing: dict[int, trace.Span] = {}

    def before_enqueue(self, info: EnqueueInfo) -> None:
        """Open the PRODUCER span and write its context into the message's headers."""
        span = self._tracer.start_span(
            f"{info.name} publish",
            kind=SpanKind.PRODUCER,
            attributes=_attributes(info.queue or info.name, info.task_id),
        )
        propagate.inject(info.headers, context=trace.set_span_in_context(span))
        self._enqueuing[id(info)] = span

    def after_enqueue(self, info: EnqueueInfo, error: BaseException | None) -> None:
        """Close the PRODUCER span, as an error if the task was not stored."""
        span = self._enqueuing.pop(id(info), None)
        if span is None:
            return
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    def attempt_started(self, attempt: AttemptInfo) -> None:
        """Open the CONSUMER span, a child of the context in the message's headers, and make
        it current for the handler."""
        parent = propagate.extract(dict(attempt.headers))
        attributes = _attributes(attempt.queue or attempt.group, attempt.task_id)
        attributes["taskframe.attempt"] = attempt.attempt
        span = self._tracer.start_span(
            f"{attempt.name} process", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )
        token = context.attach(trace.set_span_in_context(span))
        attempt.scratch[_KEY] = (span, token)

    def attempt_ended(self, attempt: AttemptInfo) -> None:
        """Close the attempt's span with its outcome; a failure is recorded as an error."""
        found: tuple[trace.Span, Any] | None = attempt.scratch.pop(_KEY, None)
        if found is None:
            return
        span, token = found
        span.set_attribute("taskframe.outcome", attempt.outcome or "")
        if attempt.reason:
            span.set_attribute("taskframe.dead_reason", attempt.reason)
        if attempt.error is not None:
            span.record_exception(attempt.error)
        if attempt.outcome in ("retried", "dead") or attempt.error is not None:
            span.set_status(Status(StatusCode.ERROR, attempt.reason or attempt.outcome or ""))
        span.end()
        context.detach(token)


def _attributes(destination: str, task_id: str) -> dict[str, Any]:
    # Few attributes: the SDK checks each one, and that is most of a span's cost.
    return {
        "messaging.system": "nats",
        "messaging.destination.name": destination,
        "taskframe.task_id": task_id,
    }
