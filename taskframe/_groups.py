"""What the server holds for each subscriber group: its durable consumer on the event stream."""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskframe import _topology as topology
from taskframe._retry import answered


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One subscriber group as the server sees it now."""

    group: str
    pending: int
    """Events stored for the group and not delivered to any of its subscribers yet."""
    in_flight: int
    """Delivered to a subscriber and not yet acknowledged."""
    redelivered: int
    """In flight and delivered more than once."""
    paused: bool


async def group_infos(js: JetStreamContext, namespace: str) -> list[GroupInfo]:
    """Every subscriber group of `namespace`, sorted by name (none before the event stream)."""
    stream = topology.events_stream(namespace)
    try:
        consumers = await answered(f"consumers of {stream}", js.consumers_info, stream)
    except NotFoundError:
        return []
    prefix = topology.group_consumer("")
    return sorted(
        (
            GroupInfo(
                c.name[len(prefix) :],
                c.num_pending or 0,
                c.num_ack_pending or 0,
                c.num_redelivered or 0,
                bool(c.paused),
            )
            for c in consumers
            if c.name.startswith(prefix)
        ),
        key=lambda g: g.group,
    )
