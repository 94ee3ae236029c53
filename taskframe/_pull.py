"""The continuous pull: how a worker is fed, and where its messages wait for a runner.

A pool is what the routes of one queue (its priority lanes) or one subscriber group share:
one credit (how many messages may be held), one buffer, and `concurrency` runners. Each
route has a feed that keeps pull requests outstanding on its durable consumer, so a
worker is fed as soon as a message is stored, asking for at most
`capacity - held - pending` messages. Lower lanes ask only once higher ones are drained.

Requests expire within half a lease and carry idle heartbeats: a silent connection is
noticed within half a lease, pinged, replaced, and asked again on a new inbox. Each
delivery is handed over with the time its oldest open request was sent, where its lease
starts (see _leases.py). What the server answers a pull request, and when, is in
docs/server-behaviour.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api as js_api

from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._credit import Credit
from taskframe._leases import Lease
from taskframe._ratelimit import RateLimiter
from taskframe._tolerant import listen
from taskframe.app import App, Handler
from taskframe.settings import Settings

log = logging.getLogger("taskframe._pull")

EXPIRES = 30.0  # at most; a request lives at most half a lease
_BACKLOG_FRESH = 1.0  # seconds a reported backlog is trusted (other workers drain it too)


@dataclass(slots=True)
class _Request:
    """An open pull request: how many messages it is still owed, and when it was sent."""

    owed: int
    sent: float


@dataclass(slots=True, eq=False)
class _Inbox:
    """Where a feed's pull requests are answered, and the requests open on it, oldest first.

    An inbox the feed gave up on (the server went silent) is retired, not dropped: its
    requests may still be answered late (a stalled consumer leader, a connection that
    heals), and a delivery nobody listens to is lost yet counted by the server as an
    attempt. It is heard until `until`, when anything its requests bring is stale anyway.
    """

    subject: str
    requests: deque[_Request] = field(default_factory=deque)
    sub: Subscription | None = None
    until: float = 0.0


class Feed:
    """Keeps pull requests outstanding on `stream`/`consumer` and hands over the messages.

    `deliver(msg, since)` gets each message and the time its lease starts.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        credit: Credit,
        deliver: Callable[[Msg, float], None],
        recover: Callable[[], Awaitable[None]],
        ack_wait: float,
    ) -> None:
        self._nc = nc
        self._ack_wait = ack_wait
        self._expires = min(EXPIRES, ack_wait / 2)
        self._heartbeat = self._expires / 4
        self._next = topology.next_subject(stream, consumer)
        self._info = topology.consumer_info_subject(stream, consumer)
        self._inbox = _Inbox(nc.new_inbox())
        self._retired: list[_Inbox] = []
        self.credit = credit
        credit.feeds.append(self)
        self._deliver = deliver
        self._recover = recover
        self._pending = 0
        self._backlog = 0
        self._backlog_at = 0.0
        self._heard = time.monotonic()
        self._wake = asyncio.Event()
        self._lost = False
        self._rotate = False
        self._check = False
        self.stopping = False

    def __repr__(self) -> str:
        return f"<Feed {self._next} held={self.credit.held} pending={self._pending}>"

    async def start(self) -> None:
        """Subscribe to the feed's inbox; `run()` then sends the requests."""
        await self._listen(self._inbox)
        await self._probe_backlog()
        self._wake.set()

    async def _probe_backlog(self) -> None:
        """Read the consumer's backlog before the first delivery says it (priority lanes only)."""
        if len(self.credit.feeds) < 2:
            return
        try:
            reply = await self._nc.request(self._info, b"", timeout=5)
            self._backlog = int(json.loads(reply.data).get("num_pending", 0))
        except Exception as exc:  # unknown: lower lanes wait until deliveries tell
            log.debug("backlog of %s unknown: %r", self._info, exc)
            self._backlog = 1
        self._backlog_at = time.monotonic()

    async def close(self) -> None:
        """Stop asking and drop the inbox; the server forgets requests nobody listens to."""
        self.stopping = True
        self._wake.set()
        for inbox in [self._inbox, *self._retired]:
            if inbox.sub is not None:
                await inbox.sub.unsubscribe()
                inbox.sub = None
        self._retired.clear()

    async def _listen(self, inbox: _Inbox) -> None:
        inbox.sub = await listen(self._nc, inbox.subject, functools.partial(self._on_msg, inbox))

    def _free(self) -> int:
        return self.credit.free() - self._pending

    def has_backlog(self) -> bool:
        """Whether this feed's consumer recently reported messages still waiting."""
        return self._backlog > 0 and time.monotonic() - self._backlog_at < _BACKLOG_FRESH

    def _wanted(self) -> int:
        """How many messages to ask for now (0: none)."""
        if self.credit.higher_has_backlog(self):
            return 0
        self.credit.adapt()
        free = self._free()
        if free >= self.credit.min_batch or (free > 0 and not self._pending):
            return free
        if not self._pending and self.credit.feeds[0] is self and len(self.credit.feeds) > 1:
            return 1  # the top lane keeps a request open even when the pool is full
        return 0

    def wake(self) -> None:
        """Ask for more if there is room for a worthwhile batch."""
        if self._free() >= self.credit.min_batch:
            self._wake.set()

    def reset(self, *, new_inbox: bool = False, check: bool = True) -> None:
        """Forget every open request (after a reconnect): the next round asks afresh.

        With `new_inbox`, the next requests go to a new inbox and the old one is retired
        (see `_Inbox`). With `check`, the consumer is checked (and recreated if gone) first.
        """
        self._lost = True
        self._rotate = self._rotate or new_inbox
        self._check = self._check or check
        self._wake.set()

    async def run(self) -> None:
        """Send pull requests whenever there is room, until `close()`."""
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._heartbeat)
            self._wake.clear()
            if self.stopping:
                return
            if self._retired:
                await self._forget_retired()
            if self._pending and time.monotonic() - self._heard > self._expires:
                await self._silent()
            if self._lost:
                await self._start_over()
            if wanted := self._wanted():
                await self._request(wanted)

    async def _silent(self) -> None:
        """No word from the server for longer than a request lives: is the connection dead?

        Deliveries may still be on their way (a half-open connection heals later, a
        consumer leader that lost its quorum answers late): the next round asks on a new
        inbox, and what arrives on the old one keeps the lease its own requests give.
        """
        log.warning(
            "no word from the server on %s for %.1fs; checking the connection",
            self._next,
            time.monotonic() - self._heard,
        )
        # No consumer check: in a cluster this is what a frozen or re-elected consumer
        # leader looks like, and API calls about it would block the feed until it is back.
        self.reset(new_inbox=True, check=False)
        try:
            await self._nc.flush(timeout=math.ceil(self._expires))
        except Exception as exc:
            log.warning("server did not answer a ping (%r): reconnecting", exc)
            await self._nc._process_op_err(nats.errors.StaleConnectionError())

    async def _start_over(self) -> None:
        log.info("pull requests on %s lost; checking the consumer and asking again", self._next)
        self._pending = 0
        self._lost = False
        self._heard = time.monotonic()
        if self._rotate:
            self._rotate = False
            old, self._inbox = self._inbox, _Inbox(self._nc.new_inbox())
            await self._listen(self._inbox)
            old.until = old.requests[-1].sent + self._ack_wait if old.requests else 0.0
            self._retired.append(old)
        self._inbox.requests.clear()
        try:
            if self._check:
                await self._recover()
                self._check = False
            await self._probe_backlog()
        except Exception as exc:  # the broker may still be away; try again next round
            log.warning("cannot recover consumer for %s: %r", self._next, exc)
            self._lost = True

    async def _forget_retired(self) -> None:
        """Stop hearing retired inboxes whose requests can bring nothing but stale messages."""
        now = time.monotonic()
        for inbox in [inbox for inbox in self._retired if inbox.until <= now]:
            self._retired.remove(inbox)
            if inbox.sub is not None:
                with contextlib.suppress(Exception):  # disconnected: it goes with the connection
                    await inbox.sub.unsubscribe()

    async def _request(self, batch: int) -> None:
        body = json.dumps(
            {
                "batch": batch,
                "expires": int(self._expires * 1e9),
                "idle_heartbeat": int(self._heartbeat * 1e9),
            }
        ).encode()
        sent = time.monotonic()
        try:
            await self._nc.publish(self._next, body, reply=self._inbox.subject)
        except Exception as exc:  # disconnected with a full buffer: ask again later
            log.debug("pull request not sent: %r", exc)
            return
        self._inbox.requests.append(_Request(batch, sent))
        self._pending += batch

    def _settle(self, count: int) -> None:
        """The oldest open request ended; `count` of its messages will not come."""
        if self._inbox.requests:
            self._pending -= self._inbox.requests.popleft().owed
        elif count:
            self._pending = max(0, self._pending - count)
        self._wake.set()

    def _lease_start(self) -> float:
        """When the lease of a delivery arriving now starts: when its request was sent.

        The server cannot have delivered before it got the request, so the oldest open
        request's send time is a safe start. A request sent more than `_expires` and a
        margin ago has expired on the server even if its end (a 408) never reached us (a
        frozen server, a leader change): it is forgotten here, or every later delivery
        would look too old and be dropped, again and again. A delivery no open request
        accounts for answered one sent after that horizon.
        """
        requests = self._inbox.requests
        horizon = self._heard - 1.5 * self._expires
        while requests and requests[0].sent < horizon:
            self._pending = max(0, self._pending - requests.popleft().owed)
        return requests[0].sent if requests else horizon

    def _late(self, inbox: _Inbox, msg: Msg, status: str | None) -> None:
        """A message on a retired inbox: a delivery's lease runs from its oldest request."""
        if status is None and inbox.requests and inbox.sub is not None:
            self.credit.held += 1
            self._deliver(msg, inbox.requests[0].sent)

    def _on_msg(self, inbox: _Inbox, msg: Msg) -> None:
        self._heard = time.monotonic()
        headers = msg.headers
        status = headers.get("Status") if headers and not msg.reply else None
        if inbox is not self._inbox:
            self._late(inbox, msg, status)
            return
        if status is None:
            since = self._lease_start()
            requests = inbox.requests
            if requests:
                oldest = requests[0]
                oldest.owed -= 1
                if oldest.owed <= 0:
                    requests.popleft()
            self._pending = max(0, self._pending - 1)
            self.credit.held += 1
            if len(self.credit.feeds) > 1:
                self._backlog = wire.delivery(msg.reply)[2]
                self._backlog_at = time.monotonic()
                if not self._backlog:
                    self.credit.wake()  # lower lanes may ask now
            self._deliver(msg, since)
            return
        if status == "100":
            return
        assert headers is not None
        self._settle(int(headers.get("Nats-Pending-Messages", "0") or 0))
        if status == "408":
            if self._backlog:
                self._backlog = 0  # a request ran out unfilled: nothing is waiting
                self.credit.wake()
            return
        description = headers.get("Description", "")
        if (status == "409" and "Deleted" in description) or status == "503":
            log.warning("consumer behind %s is gone (%s); recreating it", self._next, status)
            self.reset()
        elif status != "409" or "Exceeded" in description:
            log.warning("pull request on %s ended: %s %s", self._next, status, description)


@dataclass(frozen=True, slots=True)
class Route:
    """One consumer a worker pulls from: a queue's lane, or a subscriber group."""

    stream: str
    consumer: js_api.ConsumerConfig
    rank: int  # lane order: 0 is served first
    handlers: dict[str, Handler[Any]]
    queue: str | None = None  # set for task routes
    group: str | None = None  # set for event routes

    @property
    def label(self) -> str:
        """How logs name this route."""
        return f"queue {self.queue}" if self.queue else f"group {self.group}"


def app_routes(
    app: App, settings: Settings, queues: list[str], groups: list[str]
) -> list[list[Route]]:
    """The consumers a worker of `app` pulls from, grouped by pool (a queue's lanes, a group)."""
    ns, limit = app.namespace, topology.DEFAULT_MAX_IN_FLIGHT
    pools: list[list[Route]] = []
    for queue in queues:
        options = app.options(queue)
        handlers = {name: h for (q, name), h in app.handlers.items() if q == queue}
        rank = {lane: i for i, lane in enumerate(options.lanes)}
        stream = topology.queue_stream(ns, queue)
        lanes = configs.lane_configs(settings, queue, options, limit)
        pools.append([Route(stream, c, rank[lane], handlers, queue=queue) for lane, c in lanes])
    for group in groups:
        handlers = {name: h for (g, name), h in app.subscribers.items() if g == group}
        config = configs.group_config(settings, group, handlers, limit)
        stream = topology.events_stream(ns)
        pools.append([Route(stream, config, 0, handlers, group=group)])
    return pools


class Buffer:
    """Delivered messages waiting for a runner, highest lane first.

    A message that arrives while a runner waits goes straight to that runner; this is the
    one hand-off every message makes, so it is kept leaner than an `asyncio.Queue`.
    """

    def __init__(self, lanes: int) -> None:
        self._lanes: list[deque[tuple[Lease, Route]]] = [deque() for _ in range(lanes)]
        self._waiting: deque[asyncio.Future[tuple[Lease, Route]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def put(self, lease: Lease, route: Route) -> None:
        while self._waiting:
            runner = self._waiting.popleft()
            if not runner.done():  # a runner cancelled at shutdown no longer waits
                runner.set_result((lease, route))
                return
        self._lanes[route.rank].append((lease, route))

    async def get(self) -> tuple[Lease, Route]:
        for lane in self._lanes:
            if lane:
                return lane.popleft()
        if self._loop is None:  # one loop for the pool's life: looked up once
            self._loop = asyncio.get_running_loop()
        runner: asyncio.Future[tuple[Lease, Route]] = self._loop.create_future()
        self._waiting.append(runner)
        return await runner

    def drain(self) -> list[tuple[Lease, Route]]:
        """Take everything waiting, at once."""
        items = [item for lane in self._lanes for item in lane]
        for lane in self._lanes:
            lane.clear()
        return items


@dataclass
class Pool:
    """The runners, buffer and credit that the routes of one queue (or group) share."""

    name: str
    credit: Credit
    buffer: Buffer
    feeds: list[Feed] = field(default_factory=list)
    limiter: RateLimiter | None = None
