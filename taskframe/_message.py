"""A task or event as the message that stores it: subject, headers, body and id.

Built the same way by `Client` (which sends it at once) and by the outbox (which keeps it in
the caller's database until the relay sends it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from taskframe import _wire as wire
from taskframe._inbound import key_id
from taskframe.models import Event, Task, check_token


@dataclass(slots=True)
class Message:
    """One message to store: what it carries and the id it stands for."""

    subject: str
    headers: dict[str, str]
    body: bytes
    id: str
    """The task id (or event id)."""
    queue: str | None
    """The task's queue; None for an event."""


def task_message(
    namespace: str,
    task: Task[Any],
    key: str | None,
    priority: str | None = None,
    run_at: datetime | None = None,
) -> Message:
    """The message that enqueues `task` (held by the server until `run_at` if given)."""
    model = type(task)
    queue = model.__tf_queue__
    task_id = key_id(key) if key is not None else wire.new_task_id()
    lane = priority or model.__tf_priority__
    if lane is not None:
        check_token("priority", lane)
    subject = wire.task_subject(namespace, queue, model.__tf_name__, lane)
    headers = wire.task_headers(task_id)
    if run_at is not None:
        # The server stores the schedule and enqueues the task itself when it is due;
        # custom headers are copied onto the task, Nats-Msg-Id (for dedupe) is not.
        headers[wire.ID] = task_id
        headers[wire.SCHEDULE] = f"@at {wire.rfc3339(run_at)}"
        headers[wire.SCHEDULE_TARGET] = subject
        subject = wire.once_subject(namespace, queue, task_id)
    return Message(subject, headers, wire.encode(task), task_id, queue)


def event_message(namespace: str, event: Event) -> Message:
    """The message that publishes `event` to every subscriber group."""
    event_id = wire.new_task_id()
    subject = wire.event_subject(namespace, type(event).__tf_name__)
    return Message(subject, {wire.MSG_ID: event_id}, wire.encode(event), event_id, None)
