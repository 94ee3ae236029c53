"""A continuous pull consumer for nats-py ("consume" loop, as nats.go does it).

nats-py only offers ``fetch``: one pull request, wait for the batch, return.
Each round trip leaves the consumer idle while the client processes the batch
and asks again. Here we instead keep pull requests outstanding all the time:

* we subscribe to a private inbox and publish pull requests to
  ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` with that inbox as reply;
* ``outstanding`` counts messages requested but not yet delivered; once enough
  capacity is free we request more, so the server always has a request to
  deliver into;
* status messages (header ``Status``) arrive on the same inbox: ``100`` idle
  heartbeat, ``408`` request expired and ``409`` request terminated. For 408/409
  the server reports in ``Nats-Pending-Messages`` how much of that request was
  never filled, which is what we subtract from ``outstanding``;
* if no message, not even a heartbeat, arrives for a couple of heartbeat
  intervals, the server has forgotten our requests (restart, leader change): we
  assume nothing is outstanding and request again.

Two modes: ``max_in_flight=None`` runs the handler inline (fastest for tiny
tasks); otherwise each message gets its own asyncio task and requests are
limited to the free slots, which is how a concurrent worker must apply
back-pressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

Handler = Callable[[Msg], Awaitable[None]]

STATUS = "Status"
DESCRIPTION = "Description"
PENDING_MSGS = "Nats-Pending-Messages"
# 409 descriptions after which asking again cannot help.
FATAL_409 = ("Consumer Deleted", "Consumer is push based")


class PullConsumerError(RuntimeError):
    pass


class ContinuousPull:
    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        handler: Handler,
        *,
        batch: int = 100,
        max_in_flight: int | None = None,
        expires_s: float = 30.0,
        heartbeat_s: float = 5.0,
    ) -> None:
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._handler = handler
        self._concurrent = max_in_flight is not None
        self._limit = max_in_flight if max_in_flight is not None else batch
        # Re-request once this many slots are free: half a batch inline; a
        # tenth of the slots in concurrent mode so slow tasks do not starve it.
        self._threshold = max(1, self._limit // 10 if self._concurrent else self._limit // 2)
        self._expires_ns = int(expires_s * 1e9)
        self._heartbeat_s = heartbeat_s
        self._outstanding = 0
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_seen = time.monotonic()
        self._inbox = ""
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        #: Completes with an exception if the consumer cannot go on.
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        self._watchdog = asyncio.create_task(self._watch())
        await self._request_more()

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self.failed.done():
            self.failed.cancel()

    async def _request_more(self) -> None:
        free = self._limit - self._in_flight - self._outstanding
        # Ask when a worthwhile chunk is free, and never leave the server
        # without a request while we have any capacity at all.
        if free <= 0 or (free < self._threshold and self._outstanding > 0):
            return
        request = {
            "batch": free,
            "expires": self._expires_ns,
            "idle_heartbeat": int(self._heartbeat_s * 1e9),
        }
        self._outstanding += free
        await self._nc.publish(self._subject, json.dumps(request).encode(), reply=self._inbox)

    async def _on_msg(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        headers = msg.headers
        if headers is not None and STATUS in headers:
            await self._on_status(headers)
            return
        self._outstanding -= 1
        if self._concurrent:
            self._in_flight += 1
            task = asyncio.create_task(self._run(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            try:
                await self._handler(msg)
            except Exception as exc:  # the subscription would only log it
                self._fail(exc)
                return
        await self._request_more()

    async def _run(self, msg: Msg) -> None:
        try:
            await self._handler(msg)
        except Exception as exc:
            self._fail(exc)
        finally:
            self._in_flight -= 1
        await self._request_more()

    async def _on_status(self, headers: dict[str, str]) -> None:
        status = headers[STATUS]
        if status == "100":
            return  # idle heartbeat: the server still holds our request
        description = headers.get(DESCRIPTION, "")
        if status == "409" and description.startswith(FATAL_409):
            self._fail(PullConsumerError(f"409 {description}"))
            return
        pending = headers.get(PENDING_MSGS)
        if status in ("408", "409") and pending is not None:
            # That request ended with ``pending`` messages never delivered.
            self._outstanding = max(0, self._outstanding - int(pending))
        else:
            # A status we cannot attribute to a request (e.g. 409 Exceeded
            # MaxWaiting without pending counts): start over from nothing.
            self._outstanding = 0
        await self._request_more()

    async def _watch(self) -> None:
        """Re-arm if the server has gone silent for two heartbeat intervals."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            if time.monotonic() - self._last_seen > 2 * self._heartbeat_s:
                self._outstanding = 0
                self._last_seen = time.monotonic()
                await self._request_more()

    def _fail(self, exc: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_exception(exc)
