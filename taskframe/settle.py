"""Settling: what happens to a delivery once its attempt ended.

Each message ends in exactly one of:
    ack      the handler returned and its result (if the task keeps results) is stored
    nak      the attempt failed and attempts remain: redelivered after the backoff delay
    term     after its dead letter was stored: bad payload, unknown task, last attempt failed;
             or after its `cancelled` record was stored (_attempt.py: cancelled on request)
    nothing  the worker lost its lease (paused or cut off longer than `ack_wait`); the
             server has redelivered the task to another worker, and JetStream would honour
             a stale ack, so this worker keeps its hands off

Every outcome checks the lease first (see _leases.py), so a worker that lost a message
settles nothing of it. A flow's step does its part of the flow before its ack or term.

An ack after a status record waits for the server's confirmation that the record is
stored, but the runner does not: it sends the record and takes its next task, and the ack
is sent when the confirmation arrives (`Confirmation`). Until then the message stays
held, its lease renewed; a refusal, or no confirmation within `publish_timeout`, sends it
down the awaited path (`_store_and_ack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from typing import TYPE_CHECKING, Any

from nats.errors import MsgAlreadyAckdError

from taskframe import _payloads as payloads
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._confirmation import Confirmation
from taskframe._deadletters import dead_letter_headers, fit
from taskframe._flow_steps import FlowSteps, Step
from taskframe._leases import Lease, Leases
from taskframe._progress import write_status
from taskframe._publish import (
    Ack,
    Publisher,
    publish_stored,
    publisher,
    store_in_freed_room,
)
from taskframe._pull import Route
from taskframe._results import ErrorInfo, TaskState, status_record
from taskframe._retry import UNTIL_AVAILABLE
from taskframe._stats import WorkerStats
from taskframe._tolerant import sender
from taskframe.errors import (
    AttemptTimeoutError,
    Retry,
    StoreFullError,
    TaskframeError,
)
from taskframe.hooks import Outcome

if TYPE_CHECKING:
    from taskframe.app import Handler
    from taskframe.client import Client

log = logging.getLogger("taskframe.worker")

CONFIRMING = 1024
"""Most messages a pool holds whose ack waits for their record's confirmation (beyond its
concurrency + prefetch: see `_credit.Credit`)."""


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
        self._send_now = sender(client.nc)
        self._settings = client.settings
        self._ns = client.namespace
        self._leases = leases
        self._stats = stats
        self.stopping = stopping
        """Set when the worker stops: whatever waits hands its message back."""
        self.ack_wait = leases.ack_wait
        self._settled = settled
        self._confirmations: set[Confirmation] = set()
        self._deleting: set[asyncio.Task[None]] = set()
        self._none_confirming = asyncio.Event()
        self._none_confirming.set()
        self._pipelining = True
        self._publisher: Publisher | None = None  # the connection's, once `succeeded` ran
        self._batch_end = topology.result_subject(self._ns, "_batch")  # stores nothing
        self.flows = FlowSteps(client)

    async def settle(
        self, lease: Lease, how: str, delay: float | None = None, reason: str = ""
    ) -> bool:
        """Ack, nak or term the leased message, unless the lease was lost."""
        if how == "ack":
            return self.ack_now(lease)
        if not self._leases.still_ours(lease):
            return False
        if how == "nak":
            await lease.msg.nak(delay=delay)
        else:  # with a reason, which the server puts in its MSG_TERMINATED advisory
            await self._client.nc.publish(lease.msg.reply, f"+TERM {reason}".encode())
        return self._settled_now(lease)

    def ack_now(self, lease: Lease) -> bool:
        """Ack the leased message without waiting, unless the lease was lost."""
        if not self._leases.still_ours(lease):
            return False
        msg = lease.msg
        if msg._ackd:
            raise MsgAlreadyAckdError(msg)
        if lease.about and lease.about[3] and wire.PAYLOAD in (msg.headers or {}):
            # A task's body in the payloads bucket: deleted once the server confirmed the ack.
            deleting = asyncio.create_task(payloads.ack_and_delete(self._client, msg))
            self._deleting.add(deleting)
            deleting.add_done_callback(self._deleting.discard)
        else:
            self._send_now(msg.reply, b"", "")  # an empty body is an ack
        msg._ackd = True
        return self._settled_now(lease)

    def _settled_now(self, lease: Lease) -> bool:
        lease.settled = True
        self._settled.set()
        return True

    def sent(self, lease: Lease, task_id: str, record: bytes, *, skipped: bool = False) -> bool:
        """Send the task's final status `record`; its ack follows once the server confirms
        storing it (see `Confirmation`), and the caller need not wait: the lease is then
        `confirming`, and released with the ack. False if it was not sent (the worker is
        stopping, or the connection cannot take it now): `succeeded` then stores it."""
        pub = self._publisher
        if not self._pipelining or pub is None or not pub.ready:
            return False
        step = self.flows.step_of(lease.msg.headers, task_id)  # a flow's: its join, then its ack
        confirmation = Confirmation(self, lease, task_id, record, skipped, step)
        lease.confirming = True
        credit = lease.credit
        if credit is not None:
            credit.awaiting()
        subject = topology.result_subject(self._ns, task_id)
        try:
            confirmation.token = pub.send_then(
                subject, record, confirmation, self._settings.publish_timeout, self._batch_end
            )
        except Exception as exc:  # not sent (disconnected, buffer full): the awaited path
            log.debug("record of %s not sent (%r)", task_id, exc)
            lease.confirming = False
            if credit is not None:
                credit.awaiting(-1)
            return False
        confirmations = self._confirmations
        if not confirmations:
            self._none_confirming.clear()
        confirmations.add(confirmation)
        self._stats.confirming += 1
        return True

    def at_once(self, lease: Lease, task_id: str, record: bytes | None) -> Outcome | None:
        """Settle a task that succeeded without waiting: its record sent (acked once
        confirmed: `sent`), or, keeping none, acked now. None if it must be awaited
        (`succeeded`): the record could not be sent, or the task is a flow's step."""
        if record is not None:
            return "succeeded" if self.sent(lease, task_id, record) else None
        if self.flows.step_of(lease.msg.headers, task_id) is not None:
            return None  # its join comes before its ack
        if not self.ack_now(lease):
            return "lost"
        self.count(False)
        return "succeeded"

    async def succeeded(
        self, lease: Lease, task_id: str, record: bytes | None, *, skipped: bool = False
    ) -> Outcome:
        """Store the task's final status `record` (if any), then ack it: pipelined as `sent`
        says where it can be, else awaited here.

        In a full store only acks make room (a queue's stream deletes what is acked), so a
        worker that waited for room before acking would hold its tasks forever. A record
        that finds no room is stored after the ack, in the room the ack made (the server
        applies an ack a moment after it arrives: a few quick tries), or dropped with a
        warning if none comes: the task ran, but its result is not kept.
        """
        if record is not None and self._pipelining:
            if self._publisher is None:
                self._publisher = publisher(self._client.nc)
            if not self._publisher.ready:
                await self._publisher.subscribe()
            if self.sent(lease, task_id, record, skipped=skipped):
                return "succeeded"
        step = self.flows.step_of(lease.msg.headers, task_id)
        if await self._store_and_ack(lease, task_id, record, step=step):
            self.count(skipped)
            return "succeeded"
        return "lost"

    def count(self, skipped: bool) -> None:
        self._stats.skipped += skipped
        self._stats.succeeded += not skipped

    def done(self, confirmation: Confirmation) -> None:
        """The confirmation's message is settled, or given up: release it."""
        if confirmation not in self._confirmations:
            return
        self._confirmations.discard(confirmation)
        self._leases.release(confirmation.lease)  # returns its credit
        self._stats.confirming -= 1
        if not self._confirmations:
            self._none_confirming.set()

    async def confirmed(self) -> None:
        """Wait until no ack waits for a confirmation (nor a body's object for its ack)."""
        await self._none_confirming.wait()
        if self._deleting:
            await asyncio.wait(self._deleting)

    async def hand_back(self) -> int:
        """Stop waiting for confirmations: nak every message whose ack still waits for one.

        Records sent from now on are awaited where they are sent. Returns how many messages
        were handed back; their tasks run again (another worker stores their record).
        """
        self._pipelining = False
        handed = 0
        for confirmation in list(self._confirmations):
            if confirmation.slow is not None:
                confirmation.slow.cancel()
                await asyncio.gather(confirmation.slow, return_exceptions=True)
            elif confirmation.token:
                publisher(self._client.nc).forget(confirmation.token)
            lease = confirmation.lease
            if not lease.settled:
                with contextlib.suppress(Exception):  # cut off: redelivered after ack_wait
                    if await self.settle(lease, "nak"):
                        handed += 1
            self.done(confirmation)
        return handed

    async def _store_and_ack(
        self,
        lease: Lease,
        task_id: str,
        record: bytes | None,
        tried: int = 0,
        step: Step | None = None,
    ) -> bool:
        """Store the record (if not yet), do a flow's step's part of its flow, then ack."""
        if record is not None:
            subject = topology.result_subject(self._ns, task_id)
            try:
                await publish_stored(self._client.nc, self._settings, subject, record, tried=tried)
            except StoreFullError:
                if step is not None:
                    raise  # its join reads its record: the step waits for room, unacked
                if not await self.settle(lease, "ack"):
                    return False
                await store_in_freed_room(self._client.nc, self._settings, task_id, subject, record)
                return True
        if step is not None and self._leases.still_ours(lease):
            await self.flows.advance(step)
        return await self.settle(lease, "ack")

    async def joined(self, confirmation: Confirmation) -> None:
        """A flow's step whose record is confirmed stored: its part of the flow, then its ack
        (in a task of its own: the join waits for the broker)."""
        try:
            lease, task_id, step = confirmation.lease, confirmation.task_id, confirmation.step
            if await self._store_and_ack(lease, task_id, None, step=step):
                self.count(confirmation.skipped)
        except Exception:  # the broker is away: the step is redelivered, and joins again
            log.exception("flow step %s not settled; it will be redelivered", task_id)
        finally:
            self.done(confirmation)

    async def failed(
        self,
        lease: Lease,
        route: Route,
        handler: Handler[Any],
        task_id: str,
        attempt: int,
        exc: Exception,
    ) -> Outcome:
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
            return "lost"
        if attempt >= handler.max_attempts:
            return await self.bury(
                lease, route, handler.name, task_id, attempt, "failed", error, keeps
            )
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
            extra=lease.fields,
        )
        if keeps:
            record = status_record(task_id, handler.name, TaskState.FAILED, attempt, error=error)
            await write_status(self._client.nc, self._ns, task_id, record)
        if await self.settle(lease, "nak", delay):
            self._stats.retried += 1
            return "retried"
        return "lost"

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
    ) -> Outcome:
        """Store a dead letter, then terminate the message: never the other way round.

        A message has one dead letter at most: its id names the message, so burying it again
        (its termination was lost, say) stores nothing new and leaves its status alone.
        """
        if not self._leases.still_ours(lease):
            return "lost"
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
        if stored is None:  # handed back, to try again
            return "retried"
        log.warning(
            "%s %s is dead (%s after %d attempt(s)): %s: %s",
            name,
            task_id,
            reason,
            attempt,
            error.type,
            error.message,
            extra=lease.fields,
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
        if route.queue and (step := self.flows.step_of(msg.headers, task_id)) is not None:
            await self.flows.died(step, task_id, name, error, reason)  # the flow fails with it
        if await self.settle(lease, "term", reason=f"dead letter: {reason}"):
            self._stats.dead += 1
            return "dead"
        return "lost"

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
                await asyncio.wait_for(self.stopping.wait(), UNTIL_AVAILABLE.delay(waited))
            if self.stopping.is_set():
                await self.settle(lease, "nak")
                return None
            if not self._leases.still_ours(lease):
                return None
