"""One attempt at a delivery: check what it carries, decode it, claim it if it is
exactly-once, run its handler under its timeout, and hand the outcome to the settler.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from taskframe import _inbound as inbound
from taskframe import _logs
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._claims import Claim, Claims, Outcome
from taskframe._leases import Lease, Leases
from taskframe._publish import publish_stored
from taskframe._pull import Pool, Route
from taskframe._results import ErrorInfo, TaskState, read_status, status_record
from taskframe._timeouts import Watchdog
from taskframe.context import Context
from taskframe.errors import Reject, TaskframeError
from taskframe.settle import Settler, WorkerStats

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
    ) -> None:
        self._client = client
        self._settler = settler
        self._leases = leases
        self._claims = claims
        self._threads = threads
        self._stopping = stopping
        self._stats = stats
        self._watchdog = Watchdog()
        self._claim_poll = client.settings.ack_wait / 3

    async def watch_timeouts(self) -> None:
        """Cancel attempts that run past their timeout, until cancelled."""
        await self._watchdog.run()

    async def process(self, pool: Pool, route: Route, lease: Lease) -> None:
        """Run one delivery to its outcome."""
        msg, bury = lease.msg, self._settler.bury
        attempt, seq, _ = wire.delivery(msg.reply)
        if route.queue:
            arrival = inbound.task(msg.subject, msg.headers, f"{route.queue}-{seq}")
        else:
            arrival = inbound.event(msg.subject, msg.headers, f"event-{seq}")
        name, task_id = arrival.name, arrival.task_id
        trace = _logs.trace_id(msg.headers)
        lease.fields = _logs.task_fields(
            name, task_id, attempt, queue=route.queue, group=route.group, trace=trace
        )
        if arrival.problem:  # what its producer sent cannot go in a subject or a key: buried
            error = ErrorInfo(type="InvalidMessage", message=arrival.problem)
            await bury(lease, route, name, task_id, attempt, "invalid", error, True)
            return
        handler = route.handlers.get(name)
        if handler is None:
            error = ErrorInfo(
                type="UnknownTask", message=f"no handler for {name!r} in {route.label}"
            )
            await bury(lease, route, name, task_id, attempt, "unknown-task", error, True)
            return
        keeps = handler.keeps_result
        if attempt > handler.max_attempts and await self._spent(lease, route, handler, task_id):
            return
        try:
            task = handler.model.model_validate_json(msg.data)
        except ValidationError as exc:
            error = ErrorInfo(type="ValidationError", message=_short(exc))
            await bury(lease, route, name, task_id, attempt, "invalid", error, keeps)
            return
        if pool.limiter is not None:
            await pool.limiter.acquire()
        if handler.exactly_once and self._claims is not None:
            claim = await self._await_claim(lease, task_id)
            if claim is None:
                return
            if claim.outcome is Outcome.DONE:
                # Its first run may have completed without storing its status (broker
                # away): storing the same final record again is harmless.
                record = claim.record if keeps else None
                await self._settler.succeeded(lease, task_id, record, skipped=True)
                return
            lease.claim = claim
        if attempt > 1:
            await self._mark_started(task_id, name, attempt)
        await self._run(route, handler, task, task_id, attempt, lease)

    async def _spent(self, lease: Lease, route: Route, handler: Handler[Any], task_id: str) -> bool:
        """A delivery past `max_attempts`: bury it as lost if its last allowed attempt
        started (or ack it if it succeeded); False if it never got that far, and runs now."""
        name, attempt = handler.name, wire.delivery(lease.msg.reply)[0]
        started = await self._last_started(lease, task_id)
        if started is None:
            return True  # acked: its final record says it succeeded
        if started >= handler.max_attempts:
            error = ErrorInfo(
                type="AttemptsExhausted",
                message=f"delivered {attempt} times; its attempt {started} never finished "
                "(worker crashed, timed out or was cut off)",
            )
            keeps = handler.keeps_result
            await self._settler.bury(lease, route, name, task_id, attempt - 1, "lost", error, keeps)
            return True
        log.warning(
            "%s %s delivered %d times, but its last attempt to start was %s: running it",
            name,
            task_id,
            attempt,
            started or "none",
            extra=lease.fields,
        )
        return False

    async def _mark_started(self, task_id: str, name: str, attempt: int) -> None:
        """Store a `running` record before a redelivery runs: what `_last_started` reads.

        A first delivery writes none (the fast path); a task that crashes its worker on
        every delivery is then buried after `max_attempts` runs, or 2 if that is 1.
        """
        record = status_record(task_id, name, TaskState.RUNNING, attempt)
        subject = topology.progress_subject(self._client.namespace, task_id)
        try:
            await publish_stored(self._client.nc, self._client.settings, subject, record)
        except TaskframeError as exc:  # runs all the same; a crash now leaves no trace
            log.warning("start of %s attempt %d not recorded: %s", task_id, attempt, exc)

    async def _last_started(self, lease: Lease, task_id: str) -> int | None:
        """The last attempt of an over-delivered task that is known to have started (0:
        none), or None if its final record says it succeeded, and it was acked here.

        The server's delivery count is not a count of attempts: a consumer leader that lost
        its quorum goes on counting deliveries that reach no worker (see
        docs/server-behaviour.md). Records are the evidence of attempts that ran.
        """
        try:
            status = await read_status(self._client.js, self._client.namespace, task_id)
        except TaskframeError as exc:  # unknown: trust the delivery count, as before
            log.warning("status of %s unreadable (%s): counting deliveries", task_id, exc)
            return wire.delivery(lease.msg.reply)[0]
        if status is None:
            return 0
        if status.state is TaskState.SUCCEEDED:
            await self._settler.succeeded(lease, task_id, None, skipped=True)
            return None
        return status.attempt

    async def _await_claim(self, lease: Lease, task_id: str) -> Claim | None:
        """Claim an exactly-once task; while another worker holds the claim, wait for it.

        A claim is busy while its holder runs the task, or was paused or cut off past its
        message's lease but not yet past the claim's. This delivery is held (and renewed)
        meanwhile, so waiting spends no attempt; the task is taken over as soon as the claim
        expires, or acked once it completes. None if the worker stops or the lease is lost.
        """
        assert self._claims is not None
        claim = await self._claims.claim(task_id)
        if claim.outcome is Outcome.BUSY:
            log.info("%s is claimed by another attempt; waiting for it to end", task_id)
        while claim.outcome is Outcome.BUSY:
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
    ) -> None:
        name, keeps, settler = handler.name, handler.keeps_result, self._settler
        ctx = Context(
            task_id=task_id,
            task=name,
            queue=route.queue or "",
            attempt=attempt,
            max_attempts=handler.max_attempts,
            client=self._client,
            heartbeat=functools.partial(self._leases.renew, lease),
            trace_id=(lease.fields or {}).get("trace_id"),
        )
        if keeps:
            # Built and written by the lease keeper once the attempt has run a while: most
            # tasks finish sooner, and one status write per task instead of two doubles their
            # throughput.
            lease.running = (task_id, name, attempt)
        result_json = b"null"
        try:
            value = await self._call(handler, task, ctx)
            lease.running = None
            if keeps:  # validated only where it is stored: a fire-and-forget result goes nowhere
                result_json = handler.result.dump_json(handler.result.validate_python(value))
        except asyncio.CancelledError:
            lease.running = None
            await self._release(lease)
            await settler.settle(lease, "nak")  # shutting down: hand the task back at once
            raise
        except Reject as exc:
            lease.running = None
            await self._release(lease)
            error = ErrorInfo(type="Reject", message=exc.reason)
            await settler.bury(lease, route, name, task_id, attempt, "rejected", error, keeps)
            return
        except Exception as exc:
            lease.running = None
            await self._release(lease)
            await settler.failed(lease, route, handler, task_id, attempt, exc)
            return
        record = None
        if keeps:
            record = status_record(
                task_id, name, TaskState.SUCCEEDED, attempt, result_json=result_json
            )
        claims, claim = self._claims, lease.claim
        if claims is not None and claim is not None and not await claims.complete(claim, record):
            message = "claim on %s %s was lost while it ran: not acking"
            log.warning(message, name, task_id, extra=lease.fields)
            self._stats.lost += 1
            return
        if not self._leases.still_ours(lease):  # another worker owns the task: its record wins
            return
        await settler.succeeded(lease, task_id, record)

    async def _call(self, handler: Handler[Any], task: Any, ctx: Context) -> Any:
        """Run the handler under its timeout: on the loop, or in the thread pool if plain."""
        if handler.is_async:
            return await self._watchdog.call(handler.timeout, lambda: handler.fn(task, ctx))
        loop = asyncio.get_running_loop()
        call = functools.partial(handler.fn, task, ctx)
        return await self._watchdog.call(
            handler.timeout, lambda: loop.run_in_executor(self._threads, call)
        )

    async def _release(self, lease: Lease) -> None:
        if lease.claim is not None and self._claims is not None:
            await self._claims.release(lease.claim)


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in exc.errors()
    )[:1000]
