"""Concurrent enqueueing for producers that only offer one-task-at-a-time calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

STALL_TIMEOUT_S = 30.0


async def windowed(
    count: int,
    submit: Callable[[int], Awaitable[object]],
    window: int,
    timeout_s: float = 120.0,
) -> None:
    """Run ``submit(0..count-1)`` with at most ``window`` calls in flight.

    Used for clients without a batch API (taskiq ``kiq``, arq ``enqueue_job``,
    saq ``enqueue``): keeping many requests in flight pipelines them over the
    connection(s), which is the fastest those APIs can go. The first failure
    is raised; every wait is bounded.
    """
    slots = asyncio.Semaphore(window)
    tasks: list[asyncio.Task[None]] = []
    failed = False

    async def one(index: int) -> None:
        nonlocal failed
        try:
            await submit(index)
        except Exception:
            failed = True  # stop submitting; gather() below re-raises it
            raise
        finally:
            slots.release()

    try:
        for index in range(count):
            if failed:
                break
            if slots.locked():  # only pay for wait_for (a loop turn) when full
                await asyncio.wait_for(slots.acquire(), STALL_TIMEOUT_S)
            else:
                await slots.acquire()
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)
    finally:
        for task in tasks:
            task.cancel()
