"""Progress reports of a running attempt (`Context.progress`), throttled.

A handler may report progress in a tight loop; the broker gets at most one report per
`INTERVAL` per attempt. A report that comes sooner waits, replaced by any later one, and
is written when the interval is up, or when the attempt ends: the last value reported is
always the last one stored.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS

from taskframe import _topology as topology
from taskframe._results import progress_record

log = logging.getLogger("taskframe.worker")
INTERVAL = 0.5
"""The least time in seconds between two reports of one attempt written to the broker."""


async def write_status(nc: NATS, namespace: str, task_id: str, record: bytes) -> None:
    """Write a non-final status without waiting: a final record, if any, supersedes it."""
    try:
        await nc.publish(topology.progress_subject(namespace, task_id), record)
    except Exception as exc:
        log.debug("status not written: %r", exc)


class Reporter:
    """Writes one attempt's progress reports to `subject`, at most one per `INTERVAL`."""

    __slots__ = ("_attempt", "_last", "_nc", "_pending", "_subject", "_timer", "_writing")

    def __init__(self, nc: NATS, subject: str, attempt: int) -> None:
        self._nc = nc
        self._subject = subject
        self._attempt = attempt
        self._last = -INTERVAL  # monotonic time of the last write
        self._pending: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None

    async def report(self, done: float, total: float | None, note: str | None) -> None:
        """Write this report now, or as the pending one once the interval is up."""
        self._pending = progress_record(done, total, note, self._attempt)
        wait = self._last + INTERVAL - time.monotonic()
        if wait <= 0:
            await self._write()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._due)

    def _due(self) -> None:
        self._timer = None
        self._writing = asyncio.create_task(self._write(), name="taskframe-progress")

    async def _write(self) -> None:
        record, self._pending = self._pending, None
        if record is None:
            return
        self._last = time.monotonic()
        try:
            await self._nc.publish(self._subject, record)
        except Exception as exc:  # progress is advice: a lost report never fails the task
            log.debug("progress not written: %r", exc)

    async def close(self) -> None:
        """The attempt ended: write the report still pending, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await self._writing
        await self._write()
