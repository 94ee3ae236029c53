"""Publishing that reports success only when the server confirmed storing the message.

A message that got no confirmation may or may not be stored. Resending it with the same
`Nats-Msg-Id` is safe inside the stream's duplicate window, so unconfirmed publishes are
retried a few times before the caller hears of it.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from taskframe import wire
from taskframe.errors import PayloadTooLargeError, PublishError
from taskframe.settings import Settings

log = logging.getLogger("taskframe.publish")

TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    ServiceUnavailableError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)


class StreamMissingError(PublishError):
    """No stream stores the subject (the server had no responder for it)."""


def check_size(subject: str, body: bytes, headers: dict[str, str] | None, max_payload: int) -> None:
    """Raise `PayloadTooLargeError` before a message that the server would refuse is sent.

    Over-size messages make nats-server close the whole connection, so they must never leave.
    """
    size = len(body) + (wire.header_size(headers) if headers else 0)
    if size > max_payload:
        raise PayloadTooLargeError(subject, size, max_payload)


async def publish_stored(
    js: JetStreamContext,
    settings: Settings,
    subject: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> js_api.PubAck:
    """Publish and wait for the server's confirmation, resending on timeouts.

    Raises `StreamMissingError` if no stream takes `subject`, `PublishError` if the server
    refused the message or never confirmed it.
    """
    last: BaseException | None = None
    for attempt in range(settings.publish_attempts):
        try:
            return await js.publish(
                subject, body, timeout=settings.publish_timeout, headers=headers
            )
        except NoStreamResponseError as exc:
            raise StreamMissingError(f"no stream stores subject {subject}") from exc
        except TRANSIENT as exc:
            last = exc
            log.warning("no confirmation for %s (attempt %d): %r", subject, attempt + 1, exc)
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        except APIError as exc:
            raise PublishError(f"server refused message on {subject}: {exc.description}") from exc
    raise PublishError(
        f"no confirmation for {subject} after {settings.publish_attempts} attempts; "
        "it may or may not be stored (enqueue again with the same key to be sure)"
    ) from last
