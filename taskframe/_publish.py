"""Publishing that reports success only when the server confirmed storing the message.

A message that got no confirmation may or may not be stored. Resending it with the same
`Nats-Msg-Id` is safe inside the stream's duplicate window, so unconfirmed publishes are
retried a few times before the caller hears of it.

A refusal is different: the server answered, and nothing was stored. It is raised at once,
never retried: `StoreFullError` when there is no room (the server's store, the account's
limit or the stream's own limit is used up), `PublishError` with the server's description
for anything else. Only a server that did not answer, or answered that JetStream is
briefly unavailable (a cluster electing a leader), is tried again.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from taskframe import _wire as wire
from taskframe._batching import LINGER, OVER, Batches
from taskframe._connection import watch
from taskframe._tolerant import listen_raw, sender
from taskframe.errors import PayloadTooLargeError, PublishError, StoreFullError, StreamMissingError
from taskframe.settings import Settings

log = logging.getLogger("taskframe._publish")

TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    ServiceUnavailableError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)


_STREAM_LIMITS = frozenset({"maximum bytes exceeded", "maximum messages exceeded"})
"""Descriptions of err_code 10077 (the server's "store failed: {reason}") that mean no room.

Not "maximum messages per subject exceeded": that refuses one subject, not for lack of room.
"""
_UNAVAILABLE = 10008  # "JetStream system temporarily unavailable": a cluster without a leader


def refusal(subject: str, error: dict[str, Any], stream: str | None = None) -> Exception:
    """The exception for the error the server answered a publish on `subject` with.

    `StoreFullError` when it has no room; nats-py's `ServiceUnavailableError` (which
    `publish_stored` retries) when JetStream is briefly unavailable; else a `PublishError`
    with the server's description.
    """
    code = int(error.get("code") or 0)
    err_code = int(error.get("err_code") or 0)
    description = str(error.get("description") or "")
    if err_code in (StoreFullError.SERVER_FULL, StoreFullError.ACCOUNT_FULL) or (
        err_code == StoreFullError.STREAM_FULL and description in _STREAM_LIMITS
    ):
        return StoreFullError(subject, description, code, err_code, stream)
    if code == 503 and err_code in (0, _UNAVAILABLE):
        return ServiceUnavailableError(code=code, err_code=err_code, description=description)
    return PublishError(
        f"server refused message on {subject}: {description} (code {code}, err_code {err_code})"
    )


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

Then = Callable[[BaseException | None], None]
"""What `Publisher.send_then` calls with the outcome: None once stored, else the error."""

_SWEEP = 0.25  # seconds between looks for confirmations that are overdue


class Publisher:
    """JetStream publishes over one reply subscription, with a future for each confirmation.

    nats-py's `publish_async` does the same but costs about twice as much per message
    (a random token, a semaphore and a dataclass built by introspection for every ack);
    enqueueing and storing results go through here instead.

    `send_then` goes further for a caller that must not wait at all: no future, a callback
    run with the outcome as the confirmation arrives, and one sweeper for the overdue.
    """

    WINDOW = 8192  # confirmations awaited at once; more waits, so memory stays bounded

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._send_now = sender(nc)
        self._prefix = ""
        self._futures: dict[int, tuple[asyncio.Future[Ack], str]] = {}
        self._thens: dict[int, tuple[Then, float, str]] = {}  # then, deadline, subject
        self._asks: dict[int, asyncio.Future[Msg]] = {}
        self._sequence = itertools.count(1)  # tokens: a reply subject's last token
        self._cut = 0
        self._room = asyncio.Event()
        self._room.set()
        self._sweeper: asyncio.Task[None] | None = None
        self._batches: Batches | None = None
        self._lingering: asyncio.TimerHandle | None = None

    @property
    def ready(self) -> bool:
        """Whether its reply subscription exists (`send_now` needs it)."""
        return bool(self._prefix)

    async def subscribe(self) -> None:
        """Subscribe to the replies, once."""
        if not self._prefix:
            prefix = self._nc.new_inbox() + "."
            await listen_raw(self._nc, prefix + ">", self._on_reply)
            self._prefix, self._cut = prefix, len(prefix)
            reconnects = functools.partial(self._nc.stats.__getitem__, "reconnects")
            self._batches = Batches(self._send_now, self._confirm, prefix, reconnects)

    async def send(
        self, subject: str, body: bytes, headers: dict[str, str] | None
    ) -> asyncio.Future[Ack]:
        """Publish; the returned future resolves to the `Ack`, or to the error of `refusal`."""
        if not self._prefix:
            await self.subscribe()
        while len(self._futures) >= self.WINDOW:
            self._room.clear()
            await self._room.wait()
        token = next(self._sequence)
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._futures[token] = (future, subject)
        try:
            await self._nc.publish(subject, body, reply=f"{self._prefix}{token}", headers=headers)
        except BaseException:
            del self._futures[token]
            raise
        return future

    def send_then(
        self, subject: str, body: bytes, then: Then, timeout: float, batch_end: str = ""
    ) -> int:
        """Publish without waiting; `then(None)` once the server confirms storing it.

        `then(error)` gets what `send`'s future would raise instead (a refusal, a status),
        or `TimeoutError` if no confirmation came within `timeout` (within a quarter of a
        second more). It is called once, from the read loop as the confirmations arrive:
        it must be quick (whatever waits goes in a task of its own); what it raises is
        logged. Returns the token that `forget` takes. Raises what
        `TolerantClient.publish_now` raises, and then `then` is never called. `subject` is
        not checked: taskframe builds it from checked parts. The publisher must be `ready`.

        With `batch_end` (a subject of the same stream that ends a batch), the message goes
        in a fast-ingest batch (`_batching`) while many confirmations are awaited: the
        server then confirms many at once.
        """
        token = next(self._sequence)
        thens = self._thens
        thens[token] = (then, time.monotonic() + timeout, subject)
        batches = self._batches
        try:
            if batch_end and batches is not None and len(thens) > OVER and batches.resumed():
                batches.add(subject, body, token, batch_end)
                if self._lingering is None:
                    loop = asyncio.get_running_loop()
                    self._lingering = loop.call_later(LINGER, self._linger, batches.sent())
            else:
                self._send_now(subject, body, f"{self._prefix}{token}")
        except BaseException:
            thens.pop(token, None)
            raise
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="taskframe-confirmations")
        return token

    def _linger(self, sent: int) -> None:
        """End the open batch if no record joined it since `sent`; look again later if any did."""
        self._lingering = None
        if self._batches is None:
            return
        now = self._batches.sent()
        if now == sent or self._batches.stale():  # idle, or a reconnect since it opened
            self._batches.end()
        elif now:
            self._lingering = asyncio.get_running_loop().call_later(LINGER, self._linger, now)

    def _confirm(self, token: int, error: BaseException | None) -> None:
        then = self._thens.pop(token, None)
        if then is not None:
            _call(then[0], error)

    async def ask(self, subject: str, headers: dict[str, str], timeout: float) -> Msg:
        """Publish an empty body and return the server's whole answer, for a caller that
        reads more of it than `send` keeps (a counter's value): nats-py's `request` costs a
        random token and a `wait_for` more. Raises nats-py's `TimeoutError` if none comes
        within `timeout`, `NoRespondersError` if no stream listens on `subject`."""
        if not self._prefix:
            await self.subscribe()
        token = next(self._sequence)
        answer: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._asks[token] = answer
        try:
            await self._nc.publish(subject, b"", reply=f"{self._prefix}{token}", headers=headers)
            async with asyncio.timeout(timeout):
                msg = await answer
        except TimeoutError:
            raise nats.errors.TimeoutError from None
        finally:
            self._asks.pop(token, None)
        if not msg.data and (msg.headers or {}).get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg

    def forget(self, token: int) -> bool:
        """Stop waiting for the confirmation of `send_then`'s `token`; False if it came."""
        return self._thens.pop(token, None) is not None

    def abandon(self) -> None:
        """Forget confirmations nobody waits for any more (futures cancelled on a timeout)."""
        self._futures = {t: fs for t, fs in self._futures.items() if not fs[0].done()}
        self._room.set()

    async def _sweep(self) -> None:
        """Call `then(TimeoutError())` for every confirmation overdue; end once none waits."""
        while self._thens:
            await asyncio.sleep(_SWEEP)
            now = time.monotonic()
            overdue = [t for t, (_, deadline, _) in self._thens.items() if deadline <= now]
            if overdue and self._batches is not None:
                self._batches.end()  # its server may have lost it: later records start anew
            for token in overdue:
                waiting = self._thens.pop(token, None)  # a `then` awaited below may answer more
                if waiting is not None:
                    then, _, subject = waiting
                    _call(then, TimeoutError(f"no confirmation for {subject}"))

    def _on_reply(self, subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        """Resolve the future (or call the `then`) that a reply answers. Never raises:
        nats-py would only log it, and the future would wait out its timeout."""
        tail = subject[self._cut :]
        if not tail.isdigit():
            if self._batches is not None:
                self._batches.on_frame(tail, data)
            return
        token = int(tail)
        then = self._thens.pop(token, None)
        if then is not None:
            error = None
            if not data or b'"error"' in data or b'"duplicate"' in data:
                outcome: Ack | BaseException = _outcome(data, headers, then[2])
                error = outcome if isinstance(outcome, BaseException) else None
            _call(then[0], error)
            return
        asked = self._asks.get(token)
        if asked is not None:
            if not asked.done():
                name = subject.decode(errors="surrogateescape")
                asked.set_result(Msg(self._nc, name, "", data, headers))
            return
        waiting = self._futures.pop(token, None)
        if len(self._futures) < self.WINDOW:
            self._room.set()
        if waiting is None or waiting[0].done():
            return
        future, sent_on = waiting
        if data and b'"error"' not in data and b'"duplicate"' not in data:
            future.set_result(_STORED)  # {"stream":...,"seq":...}: all a caller needs
            return
        outcome = _outcome(data, headers, sent_on)
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _outcome(data: bytes, headers: dict[str, str] | None, subject: str) -> Ack | BaseException:
    """What a confirmation that is not a plain `{"stream":...,"seq":...}` says."""
    if not data:  # a status: 503 means no stream listens on the subject
        status = (headers or {}).get("Status", "")
        return NoStreamResponseError() if status == "503" else ServiceUnavailableError()
    try:  # rare: parse it (the server writes `"duplicate": true`)
        reply = json.loads(data)
        error = reply.get("error")
        if error is not None:
            return refusal(subject, error, reply.get("stream"))
        return _DUPLICATE if reply.get("duplicate") else _STORED
    except (ValueError, TypeError, AttributeError) as exc:
        failure = PublishError(f"unreadable confirmation for {subject}: {data[:200]!r}")
        failure.__cause__ = exc
        return failure


def _call(then: Then, outcome: BaseException | None) -> None:
    try:
        then(outcome)
    except Exception:
        log.exception("confirmation callback failed")


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
    *,
    tried: int = 0,
) -> Ack:
    """Publish and wait for the server's confirmation, resending on timeouts.

    Raises `StreamMissingError` if no stream takes `subject`, `StoreFullError` at once if
    the server has no room for it, `PublishError` at once if the server refused it for
    another reason, and after `publish_attempts` if it never confirmed it: `tried` of them
    were already spent elsewhere (a pipelined send that went unconfirmed), but one is
    always made here.
    """
    last: BaseException | None = None
    for attempt in range(min(tried, settings.publish_attempts - 1), settings.publish_attempts):
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
    raise PublishError(
        f"no confirmation for {subject} after {settings.publish_attempts} attempts; "
        "it may or may not be stored (enqueue again with the same key to be sure)"
    ) from last


def unavailable(exc: PublishError) -> bool:
    """Whether the broker could not store a message now, rather than refused it."""
    return isinstance(exc, StreamMissingError) or isinstance(exc.__cause__, TRANSIENT)


_ROOM_TRIES = 6  # tries to store a record after its task was acked to make room: ~0.3 s


async def store_in_freed_room(
    nc: NATS, settings: Settings, task_id: str, subject: str, record: bytes
) -> None:
    """Store a task's record in the room its ack made in a full store: the server applies
    an ack a moment after it arrives, so a few quick tries; dropped with a warning if no
    room comes (the task ran, but its result is not kept)."""
    last: StoreFullError | None = None
    for attempt in range(_ROOM_TRIES):
        await asyncio.sleep(0.005 * 2**attempt)
        try:
            await publish_stored(nc, settings, subject, record)
            return
        except StoreFullError as exc:
            last = exc
    log.warning("result of %s dropped: the store stayed full (%s)", task_id, last)
