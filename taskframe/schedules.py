"""Periodic tasks, kept by the broker: workers reconcile what the App declares with the
schedules stored in each queue's stream, and the server fires every tick exactly once.

A periodic schedule is one message on `<ns>.sched.<queue>.cron.<name>` carrying the task's
JSON and the headers `Nats-Schedule` (a cron or `@every` expression), `Nats-Schedule-Target`
(the task subject) and `Tf-Schedule` (its name). Publishing to the subject again replaces
it; purging the subject removes it. There is no beat process to keep alive.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._cron import Schedule
from taskframe._publish import publish_stored
from taskframe._queues import queue_streams
from taskframe._retry import answered
from taskframe.errors import StoreFullError
from taskframe.models import Task

if TYPE_CHECKING:
    from taskframe.app import App
    from taskframe.client import Client

log = logging.getLogger("taskframe.schedules")


@dataclass(frozen=True, slots=True)
class Periodic:
    """A task enqueued by the broker itself on a schedule (cron or every N seconds)."""

    name: str
    task: Task[Any]
    expression: str
    """The `Nats-Schedule` value: a 6-field cron (seconds first), `@every 300s`, `@hourly`..."""
    time_zone: str | None = None

    @property
    def queue(self) -> str:
        """The queue the scheduled task goes to."""
        return type(self.task).__tf_queue__


def _prefix(namespace: str, queue: str) -> str:
    return wire.periodic_subject(namespace, queue, "")


def _headers(namespace: str, periodic: Periodic) -> dict[str, str]:
    model = type(periodic.task)
    target = wire.task_subject(namespace, periodic.queue, model.__tf_name__, model.__tf_priority__)
    headers = {
        wire.SCHEDULE: periodic.expression,
        wire.SCHEDULE_TARGET: target,
        wire.TASK: model.__tf_name__,
        wire.SCHEDULE_NAME: periodic.name,
    }
    if periodic.time_zone:
        headers[wire.SCHEDULE_TIME_ZONE] = periodic.time_zone
    return headers


async def reconcile(client: Client, app: App, queues: Iterable[str]) -> None:
    """Make the stored schedules of `queues` match those `app` declares.

    Creates missing schedules, replaces changed ones and removes those no longer declared.
    Unchanged schedules are left alone, so restarting workers does not shift their ticks.
    A schedule the store has no room for is left as it is, with an error in the log: a
    worker that waited for room instead would never start to drain the store.
    """
    js, ns = client.js, client.namespace
    for queue in queues:
        stream = topology.queue_stream(ns, queue)
        prefix = _prefix(ns, queue)
        info = await answered(
            f"stream {stream}", js.stream_info, stream, subjects_filter=f"{prefix}>"
        )
        stored = {subject[len(prefix) :] for subject in (info.state.subjects or {})}
        declared = {p.name: p for p in app.schedules.values() if p.queue == queue}
        for name in sorted(stored - declared.keys()):
            subject = prefix + name
            await answered(f"schedule {subject}", js.purge_stream, stream, subject=subject)
            log.info("removed schedule %s from queue %s: no longer declared", name, queue)
        for name, periodic in sorted(declared.items()):
            headers = _headers(ns, periodic)
            body = wire.encode(periodic.task)
            if name in stored:
                subject = prefix + name
                last = await answered(f"schedule {subject}", js.get_last_msg, stream, subject)
                have = last.headers or {}
                if last.data == body and all(have.get(k) == v for k, v in headers.items()):
                    continue
            try:
                await publish_stored(client.nc, client.settings, prefix + name, body, headers)
            except StoreFullError as exc:
                log.error(
                    "schedule %s on queue %s not set (next start tries again): %s", name, queue, exc
                )
                continue
            log.info("schedule %s on queue %s set to %s", name, queue, periodic.expression)


@dataclass(frozen=True, slots=True)
class StoredSchedule:
    """A periodic schedule as the broker holds it."""

    namespace: str
    queue: str
    name: str
    task: str
    expression: str
    time_zone: str | None
    stored_at: datetime | None
    next_fire: datetime | None


async def stored_schedules(
    js: JetStreamContext, namespace: str | None, *, offset: int = 0, limit: int | None = None
) -> list[StoredSchedule]:
    """The periodic schedules on the server (of `namespace`, if given), with their next tick,
    sorted by namespace, queue and name: `limit` of them from `offset` (every one if None).

    The names are listed first (the streams' subject counts); only the schedules of the
    page asked for are read.
    """
    listed = []
    for ns, queue, info in sorted(await queue_streams(js, namespace), key=lambda s: s[:2]):
        prefix = _prefix(ns, queue)
        stream = info.config.name or ""
        details = await answered(
            f"stream {stream}", js.stream_info, stream, subjects_filter=f"{prefix}>"
        )
        listed += [(ns, queue, stream, prefix, s) for s in sorted(details.state.subjects or {})]
    end = None if limit is None else offset + limit
    found = []
    now = datetime.now(UTC)
    for ns, queue, stream, prefix, subject in listed[offset:end]:
        try:
            msg = await answered(f"schedule {subject}", js.get_last_msg, stream, subject)
        except NotFoundError:  # fired or removed meanwhile
            continue
        headers = msg.headers or {}
        expression = headers.get(wire.SCHEDULE, "")
        zone = headers.get(wire.SCHEDULE_TIME_ZONE)
        try:
            next_fire = Schedule.parse(expression, time_zone=zone).next_after(now, msg.time)
        except Exception:  # an expression this version cannot evaluate: still list it
            next_fire = None
        name, task = subject[len(prefix) :], headers.get(wire.TASK, "?")
        found.append(StoredSchedule(ns, queue, name, task, expression, zone, msg.time, next_fire))
    return found
