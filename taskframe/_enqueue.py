"""Storing one task message, creating its queue's stream first if none takes it."""

from __future__ import annotations

from collections.abc import Awaitable

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from taskframe import provision
from taskframe._publish import publish_stored
from taskframe.errors import ConnectError, PublishError, StreamMissingError
from taskframe.settings import Settings


async def store_task(
    nc: NATS,
    js: JetStreamContext,
    settings: Settings,
    queue: str,
    subject: str,
    body: bytes,
    headers: dict[str, str],
) -> bool:
    """Store one task message in `queue`; True if the server reported it a duplicate."""
    for attempt in range(settings.publish_attempts):
        try:
            ack = await publish_stored(nc, settings, subject, body, headers)
            return bool(ack.duplicate)
        except StreamMissingError:
            # No stream listened: the queue is new, or (in a cluster) its stream is
            # electing a leader. Create or check it, then send again (same message id).
            try:
                await provision.ensure_queue(js, settings, queue)
            except ConnectError as exc:
                if attempt == settings.publish_attempts - 1:
                    raise PublishError(f"no stream took {subject}: {exc}") from exc
    raise PublishError(f"no stream took {subject} after {attempt + 1} attempts")


async def provisioned(what: str, provisioning: Awaitable[None]) -> None:
    """Await `provisioning` of the stream a publish needs; unanswered is a `PublishError`."""
    try:
        await provisioning
    except ConnectError as exc:
        raise PublishError(f"cannot store on {what}: {exc}") from exc
