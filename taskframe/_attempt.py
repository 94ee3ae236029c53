"""One attempt at a delivery: check what it carries, decode it, claim it if it is
exactly-once, run its handler under its timeout, and hand the outcome to the settler.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from pydantic import ValidationError

from taskframe import _inbound as inbound
from taskframe import _payloads as payloads
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe import hooks as _hooks
from taskframe._attempt_records import AttemptRecords
from taskframe._cancels import Cancels
from taskframe._claims import Claim, Claims
from taskframe._claims import Outcome as Outcome_
from taskframe._inbound import Arrival
from taskframe._leases import Lease, Leases
from taskframe._publish import publish_stored
from taskframe._pull import Pool, Route
from taskframe._results import ErrorInfo, TaskState, status_record
from taskframe._stats import WorkerStats
from taskframe._timeouts import Watchdog
from taskframe.context import Context
from taskframe.errors import PayloadError, Reject, TaskCancelledError, TaskframeError
from taskframe.hooks import AttemptInfo, Hook, Outcome
from taskframe.settle import Settler

if TYPE_CHECKING:
    from taskframe.app import Handler
    from taskframe.client import Client

log = logging.getLogger("taskframe.worker")


class Attempts:
    """Runs the deliveries a worker's runners take from their pools.

    Args:
        client: the worker's client, handed to each handler's `Context`.
        settler: settles each delivery once its attempt ended.
        leases: the worker's leases.
        claims: the claims bucket, if any handler is exactly-once.
        threads: where plain `def` handlers run.
        stopping: set when the worker stops.
        stats: the counts to keep.
        hooks: called around every attempt (the app's list: hooks added later count).
    """

    def __init__(
        self,
        client: Client,
        settler: Settler,
        leases: Leases,
        claims: Claims | None,
        threads: ThreadPoolExecutor,
        stopping: asyncio.Event,
        stats: WorkerStats,
        hooks: list[Hook],
    ) -> None:
        self._client = client
        self._hooks = hooks
        self._settler = settler
        self._leases = leases
        self._claims = claims
        self._threads = threads
        self._stopping = stopping
        self._stats = stats
        self.cancels = Cancels(client, lambda task_id: self._watchdog.cancel(task_id))
        """The ids of tasks cancelled on request; `start()` it before taking deliveries."""
        self._watchdog = Watchdog(self.cancels.ids)
        self._records = AttemptRecords(client, settler)
        self._claim_poll = client.settings.ack_wait / 3

    async def watch_timeouts(self) -> None:
        """Cancel attempts that run past their timeout, until cancelled."""
        await self._watchdog.run()

    async def process(self, pool: Pool, route: Route, lease: Lease) -> None:
        """Run one delivery to its outcome."""
        msg, attempt, seq = lease.msg, lease.attempt, lease.sequence
        if route.queue:
            arrival = inbound.task(msg.subject, msg.headers, f"{route.queue}-{seq}")
        else:
            arrival = inbound.event(msg.subject, msg.headers, f"event-{seq}")
        name, task_id = arrival.name, arrival.task_id
        lease.about = (name, task_id, attempt, route.queue, route.group)
        handler = None if arrival.problem else route.handlers.get(arrival.name)
        if self._hooks:
            await self._observed(pool, route, lease, arrival, handler, attempt)
        else:
            await self._deliver(pool, route, lease, arrival, handler, attempt, None)

    async def _observed(
        self,
        pool: Pool,
        route: Route,
        lease: Lease,
        arrival: Arrival,
        handler: Handler[Any] | None,
        attempt: int,
    ) -> None:
        """`_deliver` between the hooks' `attempt_started` and `attempt_ended`."""
        msg, now = lease.msg, time.time()
        stored = wire.stored_at(msg.reply)
        seen = AttemptInfo(
            namespace=self._client.namespace,
            queue=route.queue or "",
            group=route.group or "",
            name=arrival.name,
            task_id=arrival.task_id,
            attempt=attempt,
            max_attempts=attempt if handler is None else handler.max_attempts,
            headers=msg.headers or {},
            stored_at=stored,
            queued=max(0.0, now - stored),
        )
        _hooks.attempt_started(self._hooks, seen)
        began = time.monotonic()
        outcome: Outcome = "cancelled"  # unless it ends otherwise: the worker stopped
        try:
            outcome = await self._deliver(pool, route, lease, arrival, handler, attempt, seen)
        except Exception as exc:  # not settled: redelivered after ack_wait
            outcome, seen.error = "lost", seen.error or exc
            raise
        finally:
            seen.outcome = outcome
            if outcome == "dead" and not seen.reason:
                seen.reason = "failed"
            seen.duration = time.monotonic() - began
            _hooks.attempt_ended(self._hooks, seen)

    async def _deliver(
        self,
        pool: Pool,
        route: Route,
        lease: Lease,
        arrival: Arrival,
        handler: Handler[Any] | None,
        attempt: int,
        seen: AttemptInfo | None,
    ) -> Outcome:
        name, task_id, msg = arrival.name, arrival.task_id, lease.msg
        if arrival.problem:  # what its producer sent cannot go in a subject or a key: buried
            error = ErrorInfo(type="InvalidMessage", message=arrival.problem)
            return await self._bury(seen, lease, route, arrival, attempt, "invalid", error, True)
        if handler is None:
            error = ErrorInfo(
                type="UnknownTask", message=f"no handler for {name!r} in {route.label}"
            )
            return await self._bury(
                seen, lease, route, arrival, attempt, "unknown-task", error, True
            )
        keeps = handler.keeps_result
        if task_id in self.cancels.ids:
            return await self._cancelled(lease, task_id, name, attempt - 1, keeps)
        if attempt > handler.max_attempts:
            spent = await self._records.spent(lease, route, handler, task_id, attempt, seen)
            if spent is not None:
                return spent
        # A plain body is read without another coroutine: every task comes here.
        encoded = payloads.encoded(msg.headers)  # compressed, or in the payloads bucket
        task, unreadable = (
            await self._decoded(handler, msg) if encoded else _read(handler, msg.data)
        )
        if unreadable is not None:
            return await self._bury(
                seen, lease, route, arrival, attempt, "invalid", unreadable, keeps
            )
        if pool.limiter is not None:
            await pool.limiter.acquire()
        if handler.exactly_once and self._claims is not None:
            claim = await self._await_claim(lease, task_id)
            if claim is None:
                return "cancelled" if self._stopping.is_set() else "lost"
            if claim.outcome is Outcome_.DONE:
                # Its first run may have completed without storing its status (broker
                # away): storing the same final record again is harmless.
                record = claim.record if keeps else None
                return await self._settler.succeeded(lease, task_id, record, skipped=True)
            lease.claim = claim
        recorded = attempt > 1 and await self._records.mark_started(task_id, name, attempt)
        return await self._run(route, handler, task, task_id, attempt, lease, seen, recorded)

    async def _decoded(self, handler: Handler[Any], msg: Msg) -> tuple[Any, ErrorInfo | None]:
        """`_read` of an encoded delivery's body, or why it cannot be read."""
        try:
            client = self._client
            data = await payloads.decode(client.js, client.namespace, msg.headers, msg.data)
        except PayloadError as exc:
            return None, ErrorInfo(type="PayloadError", message=str(exc))
        return _read(handler, data)

    async def _bury(
        self,
        seen: AttemptInfo | None,
        lease: Lease,
        route: Route,
        arrival: Arrival,
        attempt: int,
        reason: str,
        error: ErrorInfo,
        keeps: bool,
    ) -> Outcome:
        if seen is not None:
            seen.reason = reason
        name, task_id = arrival.name, arrival.task_id
        return await self._settler.bury(lease, route, name, task_id, attempt, reason, error, keeps)

    async def _await_claim(self, lease: Lease, task_id: str) -> Claim | None:
        """Claim an exactly-once task; while another worker holds the claim, wait for it.

        A claim is busy while its holder runs the task, or was paused or cut off past its
        message's lease but not yet past the claim's. This delivery is held (and renewed)
        meanwhile, so waiting spends no attempt; the task is taken over as soon as the claim
        expires, or acked once it completes. None if the worker stops or the lease is lost.
        """
        assert self._claims is not None
        claim = await self._claims.claim(task_id)
        if claim.outcome is Outcome_.BUSY:
            log.info("%s is claimed by another attempt; waiting for it to end", task_id)
        while claim.outcome is Outcome_.BUSY:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._claim_poll)
            if self._stopping.is_set():
                await self._settler.settle(lease, "nak")
                return None
            if not self._leases.still_ours(lease):
                return None
            claim = await self._claims.claim(task_id)
        return claim

    async def _run(
        self,
        route: Route,
        handler: Handler[Any],
        task: Any,
        task_id: str,
        attempt: int,
        lease: Lease,
        seen: AttemptInfo | None,
        recorded: bool = False,
    ) -> Outcome:
        """Run the handler and settle its outcome; `recorded`: its `running` record is
        stored already (`AttemptRecords.mark_started`)."""
        name, keeps, settler = handler.name, handler.keeps_result, self._settler
        ctx = Context(  # by position: built for every task
            task_id,
            name,
            route.queue or "",
            attempt,
            handler.max_attempts,
            self._client,
            functools.partial(self._leases.renew, lease),
            lease.msg.headers,
        )
        if keeps and not recorded:
            # Built and written by the lease keeper once the attempt has run a while: most
            # tasks finish sooner, and one status write per task instead of two doubles their
            # throughput.
            lease.running = (task_id, name, attempt)
        result_json = b"null"
        try:
            try:
                work = self._work(handler, task, ctx)
                value = await self._watchdog.call(handler.timeout, work, task_id)
            finally:
                if ctx._reporter is not None:  # the last progress it reported, if not yet written
                    await ctx._reporter.close()
            lease.running = None
            if keeps:  # validated only where it is stored: a fire-and-forget result goes nowhere
                result_json = handler.result.dump_json(handler.result.validate_python(value))
        except asyncio.CancelledError:
            lease.running = None
            await self._release(lease)
            await settler.settle(lease, "nak")  # shutting down: hand the task back at once
            raise
        except Exception as exc:
            lease.running = None
            await self._release(lease)
            return await self._raised(route, handler, task_id, attempt, lease, seen, exc)
        record = None
        if keeps:
            record = status_record(
                task_id, name, TaskState.SUCCEEDED, attempt, result_json=result_json, plain=True
            )
            if payloads.oversize(self._client, len(record)):
                record = await self._stored_large(task_id, record)
        if lease.claim is not None and not await self._completed(lease, record, name, task_id):
            return "lost"
        if not self._leases.still_ours(lease):  # another worker owns the task: its record wins
            return "lost"
        done = settler.at_once(lease, task_id, record)  # most tasks: nothing to await
        return done if done is not None else await settler.succeeded(lease, task_id, record)

    async def _raised(
        self,
        route: Route,
        handler: Handler[Any],
        task_id: str,
        attempt: int,
        lease: Lease,
        seen: AttemptInfo | None,
        exc: Exception,
    ) -> Outcome:
        """Settle an attempt whose handler raised: rejected, cancelled, or failed."""
        name, keeps = handler.name, handler.keeps_result
        if isinstance(exc, Reject):
            error = ErrorInfo(type="Reject", message=exc.reason)
            if seen is not None:
                seen.error, seen.reason = exc, "rejected"
            return await self._settler.bury(
                lease, route, name, task_id, attempt, "rejected", error, keeps
            )
        if isinstance(exc, TaskCancelledError) and exc.task_id == task_id:  # not another's
            return await self._cancelled(lease, task_id, name, attempt, keeps)
        if seen is not None:
            seen.error = exc
        return await self._settler.failed(lease, route, handler, task_id, attempt, exc)

    async def _completed(self, lease: Lease, record: bytes | None, name: str, task_id: str) -> bool:
        """Mark an exactly-once task's claim completed (with its record); False if the claim
        was lost while it ran (then it is not acked)."""
        assert self._claims is not None
        assert lease.claim is not None
        if await self._claims.complete(lease.claim, record):
            return True
        message = "claim on %s %s was lost while it ran: not acking"
        log.warning(message, name, task_id, extra=lease.fields)
        self._stats.lost += 1
        return False

    def _work(self, handler: Handler[Any], task: Any, ctx: Context) -> Callable[[], Awaitable[Any]]:
        """The handler's call, for the watchdog: on the loop, or in the thread pool if plain
        (a thread cannot be stopped: its result is dropped)."""
        if handler.is_async:
            return functools.partial(handler.fn, task, ctx)
        call = functools.partial(handler.fn, task, ctx)
        if self._hooks:  # what hooks set in attempt_started is seen in the thread too
            call = functools.partial(contextvars.copy_context().run, handler.fn, task, ctx)
        loop = asyncio.get_running_loop()
        return lambda: loop.run_in_executor(self._threads, call)

    async def _cancelled(
        self, lease: Lease, task_id: str, name: str, attempt: int, keeps_result: bool
    ) -> Outcome:
        """Cancelled on request: store its `cancelled` record (if it keeps one), then
        terminate its message, with no retry and no dead letter."""
        if not self._leases.still_ours(lease):
            return "lost"
        log.info("%s %s cancelled on request (attempt %d)", name, task_id, attempt)
        if keeps_result:
            record = status_record(task_id, name, TaskState.CANCELLED, attempt)
            try:
                subject = topology.result_subject(self._client.namespace, task_id)
                await publish_stored(self._client.nc, self._client.settings, subject, record)
            except TaskframeError as exc:  # the client stored one already, unless it failed
                log.warning("status of cancelled task %s not stored: %s", task_id, exc)
        if await self._settler.settle(lease, "term", reason="cancelled"):
            self._stats.cancelled += 1
        return "cancelled"

    async def _stored_large(self, task_id: str, record: bytes) -> bytes | None:
        """A `succeeded` record over a payload threshold: None once it is stored, compressed
        or in the payloads bucket, with the headers that say so; itself if compressing did
        not make it smaller (the ack stores it)."""
        headers: dict[str, str] = {}
        subject = topology.result_subject(self._client.namespace, task_id)
        body = await payloads.encode(self._client, subject, record, headers)
        if not headers:  # compressing did not make it smaller
            return record
        await publish_stored(self._client.nc, self._client.settings, subject, body, headers)
        return None

    async def _release(self, lease: Lease) -> None:
        if lease.claim is not None and self._claims is not None:
            await self._claims.release(lease.claim)


def _read(handler: Handler[Any], data: bytes) -> tuple[Any, ErrorInfo | None]:
    """The task a body holds, or why it is not one (the delivery is then buried)."""
    try:
        return handler.model.model_validate_json(data), None
    except ValidationError as exc:
        return None, ErrorInfo(type="ValidationError", message=_short(exc))


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in exc.errors()
    )[:1000]
