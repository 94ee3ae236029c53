"""Per-attempt handler timeouts: one watchdog loop for all of a worker's runners.

A dict entry per running attempt instead of a timer per attempt (`asyncio.timeout` costs
a scheduled callback per task): the watchdog looks every 0.1 s, so an attempt is
cancelled within 0.1 s of its deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from taskframe.errors import AttemptTimeoutError

T = TypeVar("T")
_TICK = 0.1  # seconds between looks


class Watchdog:
    """Cancels attempts that run past their deadline; `run()` is its loop."""

    def __init__(self) -> None:
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def call(self, timeout: float | None, work: Callable[[], Awaitable[T]]) -> T:
        """Await `work()` in the current task; `AttemptTimeoutError` once `timeout` seconds pass.

        A handler that swallows the cancellation still times out: its return value is
        dropped, since the attempt already counts as failed.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        # With its loop, current_task skips get_running_loop (and the getpid() it calls
        # every time): a watchdog serves one loop, and this runs for every task.
        runner = asyncio.current_task(self._loop)
        assert runner is not None
        self._deadlines[runner] = math.inf if timeout is None else time.monotonic() + timeout
        try:
            return await work()
        except asyncio.CancelledError:
            if runner not in self._expired:
                raise  # cancelled from outside (shutting down), not by us
        finally:
            del self._deadlines[runner]
            if runner in self._expired:
                self._expired.discard(runner)
                runner.uncancel()
        raise AttemptTimeoutError(f"attempt exceeded its timeout of {timeout}s")

    async def run(self) -> None:
        """Look for attempts past their deadline until cancelled."""
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            for runner, deadline in list(self._deadlines.items()):
                if now >= deadline and runner not in self._expired:
                    self._expired.add(runner)
                    runner.cancel()
