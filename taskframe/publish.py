"""Publishing that reports success only when the server confirmed storing the message.

A message that got no confirmation may or may not be stored. Resending it with the same
`Nats-Msg-Id` is safe inside the stream's duplicate window, so unconfirmed publishes are
retried a few times before the caller hears of it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import weakref
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import APIError, NoStreamResponseError, ServiceUnavailableError

from taskframe import wire
from taskframe.errors import PayloadTooLargeError, PublishError
from taskframe.permissions import watch
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


@dataclass(frozen=True, slots=True)
class Ack:
    """The server's confirmation that a message is stored."""

    duplicate: bool
    """The stream already held a message with this `Nats-Msg-Id` (within its window)."""


_STORED, _DUPLICATE = Ack(duplicate=False), Ack(duplicate=True)


class Publisher:
    """JetStream publishes over one reply subscription, with a future for each confirmation.

    nats-py's `publish_async` does the same but costs about twice as much per message
    (a random token, a semaphore and a dataclass built by introspection for every ack);
    enqueueing and storing results go through here instead.
    """

    WINDOW = 8192  # confirmations awaited at once; more waits, so memory stays bounded

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = ""
        self._futures: dict[str, asyncio.Future[Ack]] = {}
        self._sequence = itertools.count()
        self._room = asyncio.Event()
        self._room.set()

    async def send(
        self, subject: str, body: bytes, headers: dict[str, str] | None
    ) -> asyncio.Future[Ack]:
        """Publish; the returned future resolves to the `Ack`, or raises the server's error."""
        if not self._prefix:
            prefix = self._nc.new_inbox() + "."
            await self._nc.subscribe(prefix + "*", cb=self._on_reply, pending_msgs_limit=-1)
            self._prefix = prefix
        while len(self._futures) >= self.WINDOW:
            self._room.clear()
            await self._room.wait()
        token = str(next(self._sequence))
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        try:
            await self._nc.publish(subject, body, reply=self._prefix + token, headers=headers)
        except BaseException:
            del self._futures[token]
            raise
        return future

    def abandon(self) -> None:
        """Forget confirmations nobody waits for any more (futures cancelled on a timeout)."""
        self._futures = {t: f for t, f in self._futures.items() if not f.done()}
        self._room.set()

    async def _on_reply(self, msg: Msg) -> None:
        future = self._futures.pop(msg.subject[len(self._prefix) :], None)
        if len(self._futures) < self.WINDOW:
            self._room.set()
        if future is None or future.done():
            return
        data = msg.data
        if not data:  # a status: 503 means no stream listens on the subject
            status = (msg.headers or {}).get("Status", "")
            future.set_exception(
                NoStreamResponseError() if status == "503" else ServiceUnavailableError()
            )
        elif b'"error"' in data:
            future.set_exception(APIError.from_error(json.loads(data)["error"]))
        elif b'"duplicate"' in data:  # rare: parse it (the server writes `"duplicate": true`)
            future.set_result(_DUPLICATE if json.loads(data).get("duplicate") else _STORED)
        else:  # {"stream":...,"seq":...}: stored, and that is all a caller needs
            future.set_result(_STORED)


_publishers: weakref.WeakKeyDictionary[NATS, Publisher] = weakref.WeakKeyDictionary()


def publisher(nc: NATS) -> Publisher:
    """The publisher of connection `nc` (one per connection)."""
    found = _publishers.get(nc)
    if found is None:
        found = _publishers[nc] = Publisher(nc)
    return found


async def publish_stored(
    nc: NATS,
    settings: Settings,
    subject: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> Ack:
    """Publish and wait for the server's confirmation, resending on timeouts.

    Raises `StreamMissingError` if no stream takes `subject`, `PublishError` if the server
    refused the message or never confirmed it.
    """
    last: BaseException | None = None
    for attempt in range(settings.publish_attempts):
        try:
            future = await publisher(nc).send(subject, body, headers)
            try:
                async with asyncio.timeout(settings.publish_timeout), watch(nc, subject):
                    return await future
            finally:
                if not future.done():  # a confirmation that never came: stop waiting for it
                    future.cancel()
                    publisher(nc).abandon()
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
