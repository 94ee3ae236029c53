"""Where a worker's messages wait: the routes it pulls from, and each pool's runners' buffer.

A pool is what the routes of one queue (its priority lanes) or one subscriber group share:
one credit (how many messages may be held), one buffer, and `concurrency` runners.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from nats.js import api as js_api

from taskframe.app import Handler
from taskframe.feed import Credit, Feed
from taskframe.leases import Lease
from taskframe.ratelimit import RateLimiter


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


class Buffer:
    """Delivered messages waiting for a runner, highest lane first.

    A message that arrives while a runner waits goes straight to that runner; this is the
    one hand-off every message makes, so it is kept leaner than an `asyncio.Queue`.
    """

    def __init__(self, lanes: int) -> None:
        self._lanes: list[deque[tuple[Lease, Route]]] = [deque() for _ in range(lanes)]
        self._waiting: deque[asyncio.Future[tuple[Lease, Route]]] = deque()

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
        runner: asyncio.Future[tuple[Lease, Route]] = asyncio.get_running_loop().create_future()
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
