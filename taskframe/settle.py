"""Settling: what happens to a delivery once its attempt ended.

Each message ends in exactly one of:
    ack      the handler returned and its result (if the task keeps results) is stored
    nak      the attempt failed and attempts remain: redelivered after the backoff delay
    term     after its dead letter was stored: bad payload, unknown task, last attempt failed
    nothing  the worker lost its lease (paused or cut off longer than `ack_wait`); the
             server has redelivered the task to another worker, and JetStream would honour
             a stale ack, so this worker keeps its hands off

Every outcome checks the lease first (see _leases.py), so a worker that lost a message
settles nothing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._deadletters import dead_letter_headers, fit
from taskframe._leases import Lease, Leases
from taskframe._publish import Ack, publish_stored
from taskframe._pull import Route
from taskframe._results import ErrorInfo, TaskState, status_record
from taskframe._retry import UNTIL_AVAILABLE
from taskframe.errors import AttemptTimeoutError, Retry, StoreFullError, TaskframeError

if TYPE_CHECKING:
    from taskframe.app import Handler
    from taskframe.client import Client

log = logging.getLogger("taskframe.worker")
_ROOM_TRIES = 6  # tries to store a record after its task was acked to make room: ~0.3 s


@dataclass
class WorkerStats:
    """Counts of settled messages since the worker started."""

    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    lost: int = 0
    skipped: int = 0
    """Exactly-once tasks acked without running because they had completed before."""
    running: int = 0


class Settler:
    """Settles a worker's deliveries: ack with the record, retry with a delay, or bury.

    Args:
        client: the worker's client (its connection and settings).
        leases: the worker's leases; nothing is settled without one.
        stats: the counts to keep.
        stopping: set when the worker stops: whatever waits hands its message back.
        settled: set after every settlement.
    """

    def __init__(
        self,
        client: Client,
        leases: Leases,
        stats: WorkerStats,
        stopping: asyncio.Event,
        settled: asyncio.Event,
    ) -> None:
        self._client = client
        self._settings = client.settings
        self._ns = client.namespace
        self._leases = leases
        self._stats = stats
        self._stopping = stopping
        self._settled = settled

    async def settle(
        self, lease: Lease, how: str, delay: float | None = None, reason: str = ""
    ) -> bool:
        """Ack, nak or term the leased message, unless the lease was lost."""
        if not self._leases.still_ours(lease):
            return False
        msg = lease.msg
        if how == "ack":
            await msg.ack()
        elif how == "nak":
            await msg.nak(delay=delay)
        else:  # with a reason, which the server puts in its MSG_TERMINATED advisory
            await self._client.nc.publish(msg.reply, f"+TERM {reason}".encode())
        self._settled.set()
        return True

    async def succeeded(
        self, lease: Lease, task_id: str, record: bytes | None, *, skipped: bool = False
    ) -> None:
        """Store the task's final status `record` (if any), then ack it.

        In a full store only acks make room (a queue's stream deletes what is acked), so a
        worker that waited for room before acking would hold its tasks forever. A record
        that finds no room is stored after the ack, in the room the ack made (the server
        applies an ack a moment after it arrives: a few quick tries), or dropped with a
        warning if none comes: the task ran, but its result is not kept.
        """
        if not await self._store_and_ack(lease, task_id, record):
            return
        if skipped:
            self._stats.skipped += 1
        else:
            self._stats.succeeded += 1

    async def _store_and_ack(self, lease: Lease, task_id: str, record: bytes | None) -> bool:
        if record is None:
            return await self.settle(lease, "ack")
        subject = topology.result_subject(self._ns, task_id)
        try:
            await publish_stored(self._client.nc, self._settings, subject, record)
        except StoreFullError:
            if not await self.settle(lease, "ack"):
                return False
            await self._store_in_freed_room(task_id, subject, record)
            return True
        return await self.settle(lease, "ack")

    async def _store_in_freed_room(self, task_id: str, subject: str, record: bytes) -> None:
        last: StoreFullError | None = None
        for attempt in range(_ROOM_TRIES):
            await asyncio.sleep(0.005 * 2**attempt)
            try:
                await publish_stored(self._client.nc, self._settings, subject, record)
                return
            except StoreFullError as exc:
                last = exc
        log.warning("result of %s dropped: the store stayed full (%s)", task_id, last)

    async def failed(
        self,
        lease: Lease,
        route: Route,
        handler: Handler[Any],
        task_id: str,
        attempt: int,
        exc: Exception,
    ) -> None:
        """The handler raised: retry after its backoff (or `Retry`'s delay), or bury it."""
        if isinstance(exc, AttemptTimeoutError):
            error = ErrorInfo(type="TimeoutError", message=str(exc))
        else:
            error = ErrorInfo(
                type=type(exc).__qualname__,
                message=str(exc),
                traceback="".join(traceback.format_exception(exc)),
            )
        keeps = handler.keeps_result
        if not self._leases.still_ours(lease):
            return
        if attempt >= handler.max_attempts:
            await self.bury(lease, route, handler.name, task_id, attempt, "failed", error, keeps)
            return
        delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else None
        delay = handler.backoff.delay(attempt) if delay is None else delay
        log.info(
            "%s %s attempt %d/%d failed (%s); retrying in %.1fs",
            handler.name,
            task_id,
            attempt,
            handler.max_attempts,
            error.type,
            delay,
        )
        if keeps:
            record = status_record(task_id, handler.name, TaskState.FAILED, attempt, error=error)
            await self.progress(task_id, record)
        if await self.settle(lease, "nak", delay):
            self._stats.retried += 1

    async def bury(
        self,
        lease: Lease,
        route: Route,
        name: str,
        task_id: str,
        attempt: int,
        reason: str,
        error: ErrorInfo,
        keeps_result: bool,
    ) -> None:
        """Store a dead letter, then terminate the message: never the other way round.

        A message has one dead letter at most: its id names the message, so burying it again
        (its termination was lost, say) stores nothing new and leaves its status alone.
        """
        if not self._leases.still_ours(lease):
            return
        msg = lease.msg
        headers, body = fit(
            dead_letter_headers(msg, task_id, attempt, reason, error),
            msg.data,
            self._client.nc.max_payload,
        )
        if route.queue:
            subject = wire.dead_subject(self._ns, route.queue, name or "unknown")
        else:
            subject = wire.dead_event_subject(self._ns, route.group or "", name or "unknown")
        stored = await self._store_dead_letter(lease, task_id, subject, body, headers)
        if stored is None:
            return
        log.warning(
            "%s %s is dead (%s after %d attempt(s)): %s: %s",
            name,
            task_id,
            reason,
            attempt,
            error.type,
            error.message,
        )
        if keeps_result and route.queue and not stored.duplicate:
            record = status_record(
                task_id,
                name,
                TaskState.DEAD,
                attempt,
                error=error.model_copy(update={"reason": reason}),
            )
            try:
                subject = topology.result_subject(self._ns, task_id)
                await publish_stored(self._client.nc, self._settings, subject, record)
            except TaskframeError as exc:  # the dead letter is what counts: terminate anyway
                log.error("status of dead task %s not stored: %s", task_id, exc)
        if await self.settle(lease, "term", reason=f"dead letter: {reason}"):
            self._stats.dead += 1

    async def _store_dead_letter(
        self, lease: Lease, task_id: str, subject: str, body: bytes, headers: dict[str, str]
    ) -> Ack | None:
        """Store a dead letter; None if it was not stored and the message was handed back.

        While the store is full the message is held (its lease renewed) and the letter
        tried again: handed back, its next delivery would be past its attempts and buried
        as `lost`, without the error it died of.
        """
        nc, waited = self._client.nc, 0
        while True:
            try:
                return await publish_stored(nc, self._settings, subject, body, headers)
            except StoreFullError as exc:
                if not waited:
                    log.warning("dead letter for %s waits for room: %s", task_id, exc)
                waited += 1
            except TaskframeError as exc:
                log.error("dead letter for %s not stored (%s); it goes back to retry", task_id, exc)
                await self.settle(lease, "nak", 5.0)
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), UNTIL_AVAILABLE.delay(waited))
            if self._stopping.is_set():
                await self.settle(lease, "nak")
                return None
            if not self._leases.still_ours(lease):
                return None

    async def progress(self, task_id: str, record: bytes) -> None:
        """Write a non-final status without waiting: a final record, if any, supersedes it."""
        try:
            subject = topology.progress_subject(self._ns, task_id)
            await self._client.nc.publish(subject, record)
        except Exception as exc:
            log.debug("status not written: %r", exc)
