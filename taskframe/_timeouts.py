"""Per-attempt handler timeouts and cancellations: one watchdog for all of a worker's runners.

A dict entry per running attempt instead of a timer per attempt (`asyncio.timeout` costs
a scheduled callback per task): the watchdog looks every 0.1 s, so an attempt is
cancelled within 0.1 s of its deadline. A cancel request (`Client.cancel`) stops the
attempt of its task at once, the same way.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Container
from typing import Any, TypeVar

from taskframe.errors import AttemptTimeoutError, TaskCancelledError

T = TypeVar("T")
_TICK = 0.1  # seconds between looks


class Watchdog:
    """Cancels attempts past their deadline (`run()` is its loop) or cancelled on request.

    Args:
        cancelled: the ids of tasks cancelled on request; an attempt of one stops at once.
    """

    def __init__(self, cancelled: Container[str] = frozenset()) -> None:
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._stopped: dict[asyncio.Task[Any], bool] = {}  # True: cancelled on request
        self._runners: dict[str, asyncio.Task[Any]] = {}
        self._cancelled = cancelled
        self._loop: asyncio.AbstractEventLoop | None = None

    async def call(
        self, timeout: float | None, work: Callable[[], Awaitable[T]], task_id: str = ""
    ) -> T:
        """Await `work()` in the current task; `AttemptTimeoutError` once `timeout` seconds
        pass, `TaskCancelledError` once task `task_id` is cancelled.

        A handler that swallows the cancellation still stops: its return value is dropped,
        since the attempt already counts as failed (or cancelled).
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        # With its loop, current_task skips get_running_loop (and the getpid() it calls
        # every time): a watchdog serves one loop, and this runs for every task.
        runner = asyncio.current_task(self._loop)
        assert runner is not None
        if task_id in self._cancelled:  # requested before this attempt registered
            raise TaskCancelledError(task_id)
        self._deadlines[runner] = math.inf if timeout is None else time.monotonic() + timeout
        self._runners[task_id] = runner
        try:
            return await work()
        except asyncio.CancelledError:
            if runner not in self._stopped:
                raise  # cancelled from outside (shutting down), not by us
        finally:
            del self._deadlines[runner]
            if self._runners.get(task_id) is runner:
                del self._runners[task_id]
            requested = self._stopped.pop(runner, None) if self._stopped else None
            if requested is not None:
                runner.uncancel()
        if requested:
            raise TaskCancelledError(task_id)
        raise AttemptTimeoutError(f"attempt exceeded its timeout of {timeout}s")

    def cancel(self, task_id: str) -> bool:
        """Stop the running attempt of `task_id`, if one runs here."""
        runner = self._runners.get(task_id)
        if runner is None or runner in self._stopped:
            return False
        self._stopped[runner] = True
        runner.cancel()
        return True

    async def run(self) -> None:
        """Look for attempts past their deadline until cancelled."""
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            for runner, deadline in list(self._deadlines.items()):
                if now >= deadline and runner not in self._stopped:
                    self._stopped[runner] = False
                    runner.cancel()
