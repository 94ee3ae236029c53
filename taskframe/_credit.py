"""A worker's credit: how many messages a pool of feeds may hold, and how big its prefetch is.

Shared by the feeds of one pool (see _pull.py): each asks for at most what the credit has
free, and the credit grows its prefetch while tasks are short (`adapt`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskframe._pull import Feed

HORIZON = 0.1
"""Seconds of work an adaptive prefetch holds beyond the pool's runners: the most a task
waits here that another worker's free runner could have started."""
_RATE_EVERY = 0.1  # seconds between estimates of a pool's settle rate


class Credit:
    """How many messages a pool of feeds may hold, and how many it holds.

    A message is held from its delivery until it is settled (acked, nacked, terminated) or
    given up. `capacity` (concurrency + prefetch) bounds those waiting for a runner or
    running: the work one worker takes from a queue that other workers share. A message
    whose attempt has ended but whose ack waits for the confirmation of its status record
    is still held (its credit comes back with the ack) but no longer counts against
    `capacity`, up to `confirming` of them: its work is done, another worker could do
    nothing with it, and a runner that is free must not wait for the server's answer about
    someone else's record. So a pool holds at most `capacity + confirming`.
    """

    def __init__(
        self, capacity: int, confirming: int = 0, *, slots: int = 0, most: int | None = None
    ) -> None:
        self._least = capacity
        self._most = capacity if most is None else max(capacity, most)
        self._slots = slots
        self._confirming_most = confirming
        self.held = 0
        self.confirming = 0
        """Held messages whose ack waits for their record's confirmation."""
        self.feeds: list[Feed] = []  # highest priority first
        self._settled = 0
        self._since = time.monotonic()
        self._resize(capacity)

    def _resize(self, capacity: int) -> None:
        self.capacity = capacity
        self.limit = capacity + self._confirming_most
        self.min_batch = max(1, capacity // 4)

    def free(self) -> int:
        """How many more messages may be held (or asked for) now."""
        return min(self.capacity + self.confirming, self.limit) - self.held

    def adapt(self) -> None:
        """Size an adaptive capacity (`most` given) to the rate messages are settled.

        The prefetch (capacity beyond the `slots` runners) is what the pool settles in
        `HORIZON` seconds, between what it was given and `most`: short tasks get a deep
        pipeline, long ones no more than before. A pool that settled nothing for a while
        shrinks back before it asks again.
        """
        if self._most == self._least:
            return
        now = time.monotonic()
        elapsed = now - self._since
        if elapsed < _RATE_EVERY:
            return
        prefetch = int(self._settled / elapsed * HORIZON)
        self._settled, self._since = 0, now
        self._resize(max(self._least, min(self._most, self._slots + prefetch)))

    def awaiting(self, count: int = 1) -> None:
        """A held message's ack now waits for a confirmation: it leaves the capacity (-1:
        it does not after all)."""
        self.confirming += count
        if count > 0:
            self.wake()

    def finished(self, confirming: bool = False) -> None:
        """One held message is done (acked, nacked or terminated); `confirming` if its ack
        waited for a confirmation."""
        self.held -= 1
        self._settled += 1
        if confirming:
            self.confirming -= 1
        self.wake()

    def wake(self) -> None:
        """Let every feed of the pool check whether it should ask for more."""
        if self.free() < self.min_batch:
            return  # no feed has room for a worthwhile batch (most of the time)
        for feed in self.feeds:
            feed.wake()

    def higher_has_backlog(self, feed: Feed) -> bool:
        """Whether a lane above `feed` still has messages waiting on the server."""
        for other in self.feeds:
            if other is feed:
                return False
            if other.has_backlog():
                return True
        return False
