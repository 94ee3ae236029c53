"""What the server holds for each queue: its stream, its lanes' consumers, its dead letters.

One implementation of the counts that `Client.queues()`, `taskframe queues` and the tests
read. A queue with priority lanes has one consumer per lane (`workers`, `workers-<lane>`);
its counts are summed over all of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from taskframe import _topology as topology
from taskframe._retry import answered


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """One queue as the server sees it now, summed over its lanes."""

    namespace: str
    queue: str
    waiting: int
    """Stored and not delivered to any worker yet (delayed tasks not counted)."""
    in_flight: int
    """Delivered to a worker and not yet acknowledged."""
    redelivered: int
    """In flight and delivered more than once."""
    dead: int
    """Dead letters kept for this queue."""
    paused: bool
    """Whether every lane's consumer is paused (no worker is given tasks)."""
    lanes: tuple[str, ...]
    """The consumers serving the queue (none before the first worker provisioned it)."""


async def queue_streams(
    js: JetStreamContext, namespace: str | None = None
) -> list[tuple[str, str, js_api.StreamInfo]]:
    """(namespace, queue, stream info) of every taskframe queue (of `namespace`, if given)."""
    found, page = [], await answered("the streams", js.streams_info)
    listed = []
    while page:  # the server lists 256 streams a page
        listed += page
        page = await answered("the streams", js.streams_info, len(listed))
    for info in listed:
        meta = info.config.metadata or {}
        ns, queue = meta.get(topology.META_NAMESPACE), meta.get(topology.META_QUEUE)
        if meta.get(topology.META_KIND) != "queue" or ns is None or queue is None:
            continue
        if namespace is None or ns == namespace:
            found.append((ns, queue, info))
    return found


async def queue_infos(
    js: JetStreamContext,
    namespace: str | None = None,
    streams: list[tuple[str, str, js_api.StreamInfo]] | None = None,
) -> list[QueueInfo]:
    """Every taskframe queue (of `namespace`, if given), sorted by namespace and queue;
    `streams` is what `queue_streams` returned, if the caller has it already."""
    infos = []
    for ns, queue, stream in await queue_streams(js, namespace) if streams is None else streams:
        infos.append(await _queue_info(js, ns, queue, stream))
    return sorted(infos, key=lambda q: (q.namespace, q.queue))


async def _queue_info(
    js: JetStreamContext, namespace: str, queue: str, stream: js_api.StreamInfo
) -> QueueInfo:
    name = stream.config.name or topology.queue_stream(namespace, queue)
    consumers = [
        c
        for c in await answered(f"consumers of {name}", js.consumers_info, name)
        if topology.is_lane_consumer(c.name)
    ]
    waiting = sum(c.num_pending or 0 for c in consumers)
    in_flight = sum(c.num_ack_pending or 0 for c in consumers)
    redelivered = sum(c.num_redelivered or 0 for c in consumers)
    if not consumers:  # no worker provisioned it yet: everything stored is waiting
        waiting = stream.state.messages
    dead = 0
    with contextlib.suppress(NotFoundError):  # no dead-letter stream yet
        letters = await answered(
            f"dead letters of {queue}",
            js.stream_info,
            topology.dead_stream(namespace),
            subjects_filter=topology.dead_filter(namespace, queue),
        )
        dead = sum((letters.state.subjects or {}).values())
    paused = bool(consumers) and all(c.paused for c in consumers)
    lanes = tuple(sorted(c.name for c in consumers))
    return QueueInfo(namespace, queue, waiting, in_flight, redelivered, dead, paused, lanes)
