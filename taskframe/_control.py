"""An operator's hands on a queue: pause and resume its delivery, purge what waits in it.

Pausing is the server's consumer pause (nats-server 2.11+): the time until which a
consumer delivers nothing is part of its stored configuration. So a pause covers every
worker at once, holds across server restarts, and outlives a worker that provisions the
consumer again (an update that does not name `pause_until` keeps it). A queue pauses all
its lanes' consumers together. docs/server-behaviour.md says what a paused consumer
answers a worker's pull requests.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._retry import answered
from taskframe.errors import ConfigError

UNTIL_RESUMED = "2200-01-01T00:00:00Z"
"""A pause "until resumed": the server counts pauses in int64 nanoseconds (up to 2262)."""
_PURGE_PAUSE = timedelta(minutes=10)
"""How long a purge holds back deliveries of a queue that was not paused: should the purge
die half-way, the queue resumes by itself."""


async def lanes(js: JetStreamContext, namespace: str, queue: str) -> list[js_api.ConsumerInfo]:
    """The lane consumers of `queue`; `ConfigError` if the queue or its consumers are missing."""
    stream = topology.queue_stream(namespace, queue)
    try:
        infos = await answered(f"consumers of {stream}", js.consumers_info, stream)
    except NotFoundError as exc:
        raise ConfigError(f"namespace {namespace!r} has no queue {queue!r}") from exc
    found = [c for c in infos if topology.is_lane_consumer(c.name)]
    if not found:
        raise ConfigError(
            f"queue {queue!r} of namespace {namespace!r} has no consumers yet: start a "
            "worker or run `taskframe provision` first"
        )
    return found


async def pause(js: JetStreamContext, namespace: str, queue: str, until: str) -> list[str]:
    """Pause every lane consumer of `queue` until `until` (RFC 3339); their names."""
    stream = topology.queue_stream(namespace, queue)
    names = [c.name for c in await lanes(js, namespace, queue)]
    for name in names:
        await answered(f"consumer {name}", js.pause_consumer, stream, name, until)
    return names


async def resume(js: JetStreamContext, namespace: str, queue: str) -> list[str]:
    """Resume every lane consumer of `queue` now; their names."""
    stream = topology.queue_stream(namespace, queue)
    names = [c.name for c in await lanes(js, namespace, queue)]
    for name in names:
        await answered(f"consumer {name}", js.resume_consumer, stream, name)
    return names


async def purge(js: JetStreamContext, namespace: str, queue: str) -> int:
    """Remove every task of `queue` no worker holds; how many were removed.

    Delayed tasks and periodic schedules stay, and so do tasks in flight and those waiting
    for a retry (a worker holds them). Deliveries are held back while it runs (see
    `_PURGE_PAUSE`), so no task is handed to a worker and removed under it.
    """
    stream = topology.queue_stream(namespace, queue)
    try:
        consumers = await lanes(js, namespace, queue)
    except ConfigError:
        try:  # a queue no worker ever served: everything it stores waits
            await answered(f"stream {stream}", js.stream_info, stream)
        except NotFoundError as exc:
            raise ConfigError(f"namespace {namespace!r} has no queue {queue!r}") from exc
        return await _purge(js, stream, topology.tasks_filter(namespace, queue))
    running = [c.name for c in consumers if not c.paused]
    until = wire.rfc3339(datetime.now(UTC) + _PURGE_PAUSE)
    for name in running:
        await answered(f"consumer {name}", js.pause_consumer, stream, name, until)
    removed = 0
    try:
        for consumer in consumers:
            # Read once deliveries stopped: what it delivered last is final now.
            info = await answered(
                f"consumer {consumer.name}", js.consumer_info, stream, consumer.name
            )
            filters = info.config.filter_subjects or [info.config.filter_subject or ""]
            after = info.delivered.stream_seq if info.delivered else 0
            for subject in filter(None, filters):
                if info.num_ack_pending:
                    removed += await _delete_after(js, stream, subject, after)
                else:  # nothing held: everything on the lane waits
                    removed += await _purge(js, stream, subject)
    finally:
        for name in running:
            await answered(f"consumer {name}", js.resume_consumer, stream, name)
    return removed


async def _purge(js: JetStreamContext, stream: str, subject: str) -> int:
    body = json.dumps({"filter": subject}).encode()
    reply = await answered(
        f"stream {stream}", js._api_request, topology.purge_subject(stream), body
    )
    return int(reply.get("purged", 0))


async def _delete_after(js: JetStreamContext, stream: str, subject: str, after: int) -> int:
    """Delete the messages on `subject` stored after sequence `after`, one by one.

    Those at or below it were delivered and are still held by a worker: the server's purge
    cannot spare them, so this costs two requests per removed task.
    """
    removed, seq = 0, after + 1
    while True:
        try:
            msg = await answered(f"stream {stream}", js.get_msg, stream, seq, subject, False, True)
        except NotFoundError:
            return removed
        seq = (msg.seq or seq) + 1
        try:
            await answered(f"stream {stream}", js.delete_msg, stream, seq - 1)
            removed += 1
        except NotFoundError:  # gone meanwhile (a server-side expiry)
            continue
