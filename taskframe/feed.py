"""A continuous pull on one durable consumer: pull requests are kept outstanding, so a worker
is fed as soon as a message is stored instead of asking for a batch and waiting for it.

The feed asks for at most `capacity - held` messages, where `held` counts messages it
delivered that are not yet finished; a worker therefore never holds more than `capacity`.
The server answers a request with up to `batch` messages, then (when the request expires
or is cut short) a status message saying how many it did not deliver. Status codes:
100 idle heartbeat, 408 request expired, 409 request ended early (consumer deleted,
leadership change, limits), 503 no JetStream responder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("taskframe.feed")

EXPIRES = 30.0
HEARTBEAT = 5.0
_SILENCE = 3 * HEARTBEAT  # no word at all for this long: the requests are gone


class Feed:
    """Keeps a worker's pull requests outstanding on `stream`/`consumer` and hands over messages."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        capacity: int,
        deliver: Callable[[Msg], None],
        recover: Callable[[], Awaitable[None]],
    ) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self.capacity = capacity
        self._min_batch = max(1, capacity // 4)
        self._deliver = deliver
        self._recover = recover
        self._outstanding: deque[int] = (
            deque()
        )  # undelivered count of each open request, oldest first
        self._pending = 0
        self.held = 0
        self._heard = time.monotonic()
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._lost = False
        self.stopping = False

    def __repr__(self) -> str:
        return f"<Feed {self._next} held={self.held} pending={self._pending}>"

    async def start(self) -> None:
        """Subscribe to the feed's inbox; `run()` then sends the requests."""
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=-1)
        self._wake.set()

    async def close(self) -> None:
        """Stop asking and drop the inbox; the server forgets requests nobody listens to."""
        self.stopping = True
        self._wake.set()
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def finished(self) -> None:
        """One held message is done (acked, nacked or terminated)."""
        self.held -= 1
        if self.capacity - self.held - self._pending >= self._min_batch:
            self._wake.set()

    def reset(self) -> None:
        """Forget every open request (after a reconnect): the next round asks afresh."""
        self._lost = True
        self._wake.set()

    async def run(self) -> None:
        """Send pull requests whenever there is room, until `close()`."""
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), HEARTBEAT)
            self._wake.clear()
            if self.stopping:
                return
            if self._lost or (self._pending and time.monotonic() - self._heard > _SILENCE):
                await self._start_over()
            free = self.capacity - self.held - self._pending
            if free >= self._min_batch or (free > 0 and not self._pending):
                await self._request(free)

    async def _start_over(self) -> None:
        log.info("pull requests on %s lost; checking the consumer and asking again", self._next)
        self._outstanding.clear()
        self._pending = 0
        self._lost = False
        self._heard = time.monotonic()
        try:
            await self._recover()
        except Exception as exc:  # the broker may still be away; try again next round
            log.warning("cannot recover consumer for %s: %r", self._next, exc)
            self._lost = True

    async def _request(self, batch: int) -> None:
        body = json.dumps(
            {"batch": batch, "expires": int(EXPIRES * 1e9), "idle_heartbeat": int(HEARTBEAT * 1e9)}
        ).encode()
        try:
            await self._nc.publish(self._next, body, reply=self._inbox)
        except Exception as exc:  # disconnected with a full buffer: ask again later
            log.debug("pull request not sent: %r", exc)
            return
        self._outstanding.append(batch)
        self._pending += batch

    def _settle(self, count: int) -> None:
        """`count` messages of the oldest open request will not come."""
        if self._outstanding:
            remaining = self._outstanding.popleft()
            self._pending -= remaining
        elif count:
            self._pending = max(0, self._pending - count)
        self._wake.set()

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        headers = msg.headers
        status = headers.get("Status") if headers and not msg.reply else None
        if status is None:
            if self._outstanding:
                self._outstanding[0] -= 1
                if self._outstanding[0] <= 0:
                    self._outstanding.popleft()
            self._pending = max(0, self._pending - 1)
            self.held += 1
            self._deliver(msg)
            return
        if status == "100":
            return
        assert headers is not None
        left = int(headers.get("Nats-Pending-Messages", "0") or 0)
        self._settle(left)
        if status == "408":
            return
        description = headers.get("Description", "")
        if (status == "409" and "Deleted" in description) or status == "503":
            log.warning("consumer behind %s is gone (%s); recreating it", self._next, status)
            self.reset()
        elif status != "409" or "Exceeded" in description:
            log.warning("pull request on %s ended: %s %s", self._next, status, description)
