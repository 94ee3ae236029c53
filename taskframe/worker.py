"""The worker: pulls tasks and events, runs their handlers, and settles every message once.

Each message ends in exactly one of:
    ack      the handler returned and its result (if the task keeps results) is stored
    nak      the attempt failed and attempts remain: redelivered after the backoff delay
    term     after its dead letter was stored: bad payload, unknown task, last attempt failed
    nothing  the worker lost its lease (paused or cut off longer than `ack_wait`); the
             server has redelivered the task to another worker, and JetStream would honour
             a stale ack, so this worker keeps its hands off

While a message is held, the worker renews its lease with `in_progress()` every third of
`ack_wait`, so `ack_wait` stays short and a crashed worker's tasks come back quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from pydantic import ValidationError

from taskframe import inbound, schedules, topology, wire
from taskframe.app import App, Handler
from taskframe.claims import Claim, Claims, Outcome
from taskframe.client import Client
from taskframe.context import Context
from taskframe.deadletters import dead_letter_headers, fit
from taskframe.errors import (
    ConfigError,
    ConnectError,
    PayloadTooLargeError,
    PublishError,
    Reject,
    Retry,
    StoreFullError,
    TaskframeError,
)
from taskframe.feed import Credit, Feed
from taskframe.leases import Lease, Leases
from taskframe.pools import Buffer, Pool, Route
from taskframe.publish import Ack, publish_stored
from taskframe.ratelimit import RateLimit, RateLimiter
from taskframe.results import ErrorInfo, TaskState, status_record
from taskframe.retry import UNTIL_AVAILABLE
from taskframe.timeouts import AttemptTimeout, Watchdog

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


class Worker:
    """Runs an App's handlers for some of its queues (and its event groups) until stopped.

    Args:
        app: the handlers.
        client: an open client for the app's namespace (its connection is shared).
        queues: the queues to serve; default every queue the app has handlers for.
        groups: the subscriber groups to serve; default every group of the app.
        concurrency: tasks run at once, per queue (and per group).
        prefetch: extra tasks held ready per queue, so a free slot never waits for the network
            (default: as many as `concurrency`, at most 64).
        grace: seconds running tasks get to finish after `stop()`; the rest are handed back.
    """

    MAX_IN_FLIGHT = 100_000
    """Default cap on tasks held by all of a queue's workers together (max_ack_pending)."""

    def __init__(
        self,
        app: App,
        client: Client,
        *,
        queues: Iterable[str] | None = None,
        groups: Iterable[str] | None = None,
        concurrency: int = 64,
        prefetch: int | None = None,
        grace: float = 30.0,
    ) -> None:
        if app.namespace != client.namespace:
            raise ConfigError(
                f"app namespace {app.namespace!r} is not the client's {client.namespace!r}"
            )
        self.app = app
        self.client = client
        self.queues = sorted(app.queues if queues is None else queues)
        self.groups = sorted(app.groups if groups is None else groups)
        unknown = set(self.queues) - app.queues
        if unknown:
            raise ConfigError(f"no handlers for queue(s) {sorted(unknown)} in {app!r}")
        if not self.queues and not self.groups:
            raise ConfigError(f"{app!r} has no handlers or subscribers: nothing to run")
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.prefetch = min(concurrency, 64) if prefetch is None else prefetch
        self.grace = grace
        self.stats = WorkerStats()
        self._settings = client.settings
        self._leases = Leases(
            client.nc, self._settings.ack_wait, self._stalled, self._record, self._lost
        )
        self._pools: list[Pool] = []
        self._claims: Claims | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._stop = asyncio.Event()  # asyncio events bind to a loop on first use, not here
        self._idle = asyncio.Event()
        self._idle.set()
        self._watchdog = Watchdog()
        self.ready = asyncio.Event()
        """Set once the worker has provisioned its streams and is pulling."""
        self.progress = asyncio.Event()
        """Set whenever a message is settled; clear it to wait for the next."""

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<Worker {self.app.namespace} queues={self.queues} running={s.running} "
            f"succeeded={s.succeeded} retried={s.retried} dead={s.dead} lost={s.lost}>"
        )

    def stop(self) -> None:
        """Ask the worker to stop: no new tasks, running ones get `grace` seconds."""
        self._stop.set()

    async def run(self, *, handle_signals: bool = False) -> None:
        """Provision, then work until `stop()` (or SIGTERM/SIGINT with `handle_signals`)."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        self._threads = ThreadPoolExecutor(min(self.concurrency, 64), "taskframe")
        try:
            routes = await self._provision_when_possible()
            if routes is None:
                return  # stopped before JetStream answered
            async with asyncio.TaskGroup() as group:
                for pool_routes in routes:
                    await self._start_pool(group, pool_routes)
                group.create_task(self._leases.keep(), name="taskframe-leases")
                group.create_task(self._watchdog.run(), name="taskframe-timeouts")
                self.client.reconnect_listeners.append(self._on_reconnect)
                self.ready.set()
                log.info(
                    "worker ready: namespace=%s queues=%s groups=%s concurrency=%d",
                    self.app.namespace,
                    self.queues,
                    self.groups,
                    self.concurrency,
                )
                await self._stop.wait()
                await self._drain()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            self.ready.clear()
            if self._on_reconnect in self.client.reconnect_listeners:
                self.client.reconnect_listeners.remove(self._on_reconnect)
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self._threads.shutdown(wait=False, cancel_futures=True)
            log.info("worker stopped: %r", self)

    async def _provision_when_possible(self) -> list[list[Route]] | None:
        """`provision()`, again while JetStream does not answer; None if stopped meanwhile.

        A worker may start while its cluster has no quorum or elects a leader: it waits for
        JetStream instead of exiting. A refused permission or a conflicting setting fails.
        """
        attempt = 0
        while not self._stop.is_set():
            try:
                return await self.provision()
            except PayloadTooLargeError:
                raise
            except (ConnectError, PublishError) as exc:
                attempt += 1
                delay = UNTIL_AVAILABLE.delay(attempt)
                log.warning("cannot provision yet (%s); trying again in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        return None

    async def provision(self) -> list[list[Route]]:
        """Create or update the streams, consumers, groups and schedules this worker serves.

        Returns the routes of each pool (internal). Safe to run from many workers at once.
        """
        js, settings, ns = self.client.js, self._settings, self.app.namespace
        await topology.ensure_shared(js, settings)
        if any(h.exactly_once for (q, _), h in self.app.handlers.items() if q in self.queues):
            self._claims = Claims(js, settings)
            self._leases.renew_claim = self._claims.renew
            await self._claims.ensure()
        pools: list[list[Route]] = []
        for queue in self.queues:
            options = self.app.options(queue)
            await topology.ensure_queue(js, settings, queue, options)
            await topology.ensure_lanes(js, settings, queue, options, self.MAX_IN_FLIGHT)
            handlers = {name: h for (q, name), h in self.app.handlers.items() if q == queue}
            configs = topology.lane_configs(settings, queue, options, self.MAX_IN_FLIGHT)
            rank = {lane: i for i, lane in enumerate(options.lanes)}
            stream = topology.queue_stream(ns, queue)
            pools.append(
                [Route(stream, c, rank[lane], handlers, queue=queue) for lane, c in configs]
            )
        await schedules.reconcile(self.client, self.app, self.queues)
        if self.groups:
            await topology.ensure_stream(js, topology.events_config(settings))
        for group in self.groups:
            handlers = {name: h for (g, name), h in self.app.subscribers.items() if g == group}
            config = topology.group_config(settings, group, handlers, self.MAX_IN_FLIGHT)
            stream = topology.events_stream(ns)
            await topology.ensure_consumer(js, stream, config)
            pools.append([Route(stream, config, 0, handlers, group=group)])
        return pools

    async def _start_pool(self, group: asyncio.TaskGroup, routes: list[Route]) -> None:
        first = routes[0]
        pool = Pool(
            first.label,
            Credit(self.concurrency + self.prefetch),
            Buffer(max(route.rank for route in routes) + 1),
        )
        if first.queue and (limit := self.app.options(first.queue).rate_limit):
            pool.limiter = RateLimiter(
                self.client.js, self._settings, first.queue, RateLimit.parse(limit)
            )
            await pool.limiter.ensure()
        for route in sorted(routes, key=lambda r: r.rank):  # the credit lists lanes top first
            assert route.consumer.name is not None
            feed = Feed(
                self.client.nc,
                route.stream,
                route.consumer.name,
                pool.credit,
                functools.partial(self._accept, pool, route),
                functools.partial(self._recover, route),
                self._settings.ack_wait,
            )
            pool.feeds.append(feed)
        for feed in pool.feeds:
            await feed.start()
            group.create_task(feed.run(), name=f"taskframe-feed-{feed}")
        self._pools.append(pool)
        for n in range(self.concurrency):
            group.create_task(self._runner(pool), name=f"taskframe-run-{pool.name}-{n}")

    async def _recover(self, route: Route) -> None:
        if route.queue:
            await topology.ensure_queue(
                self.client.js, self._settings, route.queue, self.app.options(route.queue)
            )
        else:
            await topology.ensure_stream(self.client.js, topology.events_config(self._settings))
        await topology.ensure_consumer(self.client.js, route.stream, route.consumer)

    async def _on_reconnect(self) -> None:
        for pool in self._pools:
            for feed in pool.feeds:
                feed.reset()

    def _accept(self, pool: Pool, route: Route, msg: Msg, since: float) -> None:
        lease = self._leases.take(msg, since)
        if lease is None:  # stale (dropped unsettled), or adopted by its running attempt
            pool.credit.finished()
            return
        pool.buffer.put(lease, route)

    def _lost(self) -> None:
        self.stats.lost += 1

    def _stalled(self) -> None:
        for pool in self._pools:
            for feed in pool.feeds:
                feed.reset(new_inbox=True)

    async def _runner(self, pool: Pool) -> None:
        while True:
            lease, route = await pool.buffer.get()
            try:
                if not self._leases.still_ours(lease):
                    continue  # lost while it waited; another worker has it now
                if self._stop.is_set():
                    await self._settle(lease, "nak")
                    continue
                self._started()
                self._leases.start(lease)
                try:
                    await self._process(pool, route, lease)
                finally:
                    self._finished()
            except Exception:
                # Storing a result or a dead letter failed even after retries: the broker is
                # away. Leave the task to come back after ack_wait rather than stop the worker.
                log.exception(
                    "message on %s not settled; it will be redelivered", lease.msg.subject
                )
            finally:
                self._leases.release(lease)
                pool.credit.finished()

    def _started(self) -> None:
        self.stats.running += 1
        self._idle.clear()

    def _finished(self) -> None:
        self.stats.running -= 1
        if self.stats.running == 0:
            self._idle.set()

    async def _settle(
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
            await self.client.nc.publish(msg.reply, f"+TERM {reason}".encode())
        self.progress.set()
        return True

    async def _process(self, pool: Pool, route: Route, lease: Lease) -> None:
        msg = lease.msg
        attempt, seq, _ = wire.delivery(msg.reply)
        if route.queue:
            arrival = inbound.task(msg.subject, msg.headers, f"{route.queue}-{seq}")
        else:
            arrival = inbound.event(msg.subject, msg.headers, f"event-{seq}")
        name, task_id = arrival.name, arrival.task_id
        if arrival.problem:  # what its producer sent cannot go in a subject or a key: buried
            error = ErrorInfo(type="InvalidMessage", message=arrival.problem)
            await self._bury(lease, route, name, task_id, attempt, "invalid", error, True)
            return
        handler = route.handlers.get(name)
        if handler is None:
            error = ErrorInfo(
                type="UnknownTask", message=f"no handler for {name!r} in {route.label}"
            )
            await self._bury(lease, route, name, task_id, attempt, "unknown-task", error, True)
            return
        keeps = handler.keeps_result
        if attempt > handler.max_attempts:
            error = ErrorInfo(
                type="AttemptsExhausted",
                message=f"delivered {attempt} times; earlier attempts never finished "
                "(worker crashed, timed out or was cut off)",
            )
            await self._bury(lease, route, name, task_id, attempt - 1, "lost", error, keeps)
            return
        try:
            task = handler.model.model_validate_json(msg.data)
        except ValidationError as exc:
            error = ErrorInfo(type="ValidationError", message=_short(exc))
            await self._bury(lease, route, name, task_id, attempt, "invalid", error, keeps)
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
                record = claim.record if handler.keeps_result else None
                if await self._store_and_ack(lease, task_id, record):
                    self.stats.skipped += 1
                return
            lease.claim = claim
        await self._run(route, handler, task, task_id, attempt, lease)

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
                await asyncio.wait_for(self._stop.wait(), self._settings.ack_wait / 3)
            if self._stop.is_set():
                await self._settle(lease, "nak")
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
        name, keeps = handler.name, handler.keeps_result
        ctx = Context(
            task_id=task_id,
            task=name,
            queue=route.queue or "",
            attempt=attempt,
            max_attempts=handler.max_attempts,
            client=self.client,
            heartbeat=functools.partial(self._leases.renew, lease),
        )
        if keeps:
            # Written by the lease keeper once the attempt has run a while: most tasks finish
            # sooner, and one status write per task instead of two doubles their throughput.
            lease.running = (task_id, status_record(task_id, name, TaskState.RUNNING, attempt))
        result_json = b"null"
        try:
            value = await self._call(handler, task, ctx)
            lease.running = None
            if keeps:  # validated only where it is stored: a fire-and-forget result goes nowhere
                result_json = handler.result.dump_json(handler.result.validate_python(value))
        except asyncio.CancelledError:
            lease.running = None
            await self._release(lease)
            await self._settle(lease, "nak")  # shutting down: hand the task back at once
            raise
        except Reject as exc:
            lease.running = None
            await self._release(lease)
            error = ErrorInfo(type="Reject", message=exc.reason)
            await self._bury(lease, route, name, task_id, attempt, "rejected", error, keeps)
            return
        except Exception as exc:
            lease.running = None
            await self._release(lease)
            await self._failed(route, handler, task_id, attempt, lease, exc)
            return
        record = None
        if keeps:
            record = status_record(
                task_id, name, TaskState.SUCCEEDED, attempt, result_json=result_json
            )
        claims, claim = self._claims, lease.claim
        if claims is not None and claim is not None and not await claims.complete(claim, record):
            log.warning("claim on %s %s was lost while it ran: not acking", name, task_id)
            self.stats.lost += 1
            return
        if not self._leases.still_ours(lease):  # another worker owns the task: its record wins
            return
        if await self._store_and_ack(lease, task_id, record):
            self.stats.succeeded += 1

    async def _store_and_ack(self, lease: Lease, task_id: str, record: bytes | None) -> bool:
        """Store the task's final status `record` (if any), then ack it; True if acked.

        In a full store only acks make room (a queue's stream deletes what is acked), so a
        worker that waited for room before acking would hold its tasks forever. A record
        that finds no room is stored after the ack, in the room the ack made (the server
        applies an ack a moment after it arrives: a few quick tries), or dropped with a
        warning if none comes: the task ran, but its result is not kept.
        """
        if record is None:
            return await self._settle(lease, "ack")
        subject = topology.result_subject(self.app.namespace, task_id)
        try:
            await publish_stored(self.client.nc, self._settings, subject, record)
        except StoreFullError:
            if not await self._settle(lease, "ack"):
                return False
            await self._store_in_freed_room(task_id, subject, record)
            return True
        return await self._settle(lease, "ack")

    async def _store_in_freed_room(self, task_id: str, subject: str, record: bytes) -> None:
        """Store `record` in the room an ack just made, trying a few times; else drop it."""
        last: StoreFullError | None = None
        for attempt in range(_ROOM_TRIES):
            await asyncio.sleep(0.005 * 2**attempt)
            try:
                await publish_stored(self.client.nc, self._settings, subject, record)
                return
            except StoreFullError as exc:
                last = exc
        log.warning("result of %s dropped: the store stayed full (%s)", task_id, last)

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

    async def _failed(
        self,
        route: Route,
        handler: Handler[Any],
        task_id: str,
        attempt: int,
        lease: Lease,
        exc: Exception,
    ) -> None:
        if isinstance(exc, AttemptTimeout):
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
            await self._bury(lease, route, handler.name, task_id, attempt, "failed", error, keeps)
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
            await self._record(task_id, record)
        if await self._settle(lease, "nak", delay):
            self.stats.retried += 1

    async def _bury(
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
            self.client.nc.max_payload,
        )
        ns = self.app.namespace
        if route.queue:
            subject = wire.dead_subject(ns, route.queue, name or "unknown")
        else:
            subject = wire.dead_event_subject(ns, route.group or "", name or "unknown")
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
                subject = topology.result_subject(ns, task_id)
                await publish_stored(self.client.nc, self._settings, subject, record)
            except TaskframeError as exc:  # the dead letter is what counts: terminate anyway
                log.error("status of dead task %s not stored: %s", task_id, exc)
        if await self._settle(lease, "term", reason=f"dead letter: {reason}"):
            self.stats.dead += 1

    async def _store_dead_letter(
        self, lease: Lease, task_id: str, subject: str, body: bytes, headers: dict[str, str]
    ) -> Ack | None:
        """Store a dead letter; None if it was not stored and the message was handed back.

        While the store is full the message is held (its lease renewed) and the letter
        tried again: handed back, its next delivery would be past its attempts and buried
        as `lost`, without the error it died of.
        """
        waited = 0
        while True:
            try:
                return await publish_stored(self.client.nc, self._settings, subject, body, headers)
            except StoreFullError as exc:
                if not waited:
                    log.warning("dead letter for %s waits for room: %s", task_id, exc)
                waited += 1
            except TaskframeError as exc:
                log.error("dead letter for %s not stored (%s); it goes back to retry", task_id, exc)
                await self._settle(lease, "nak", 5.0)
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), UNTIL_AVAILABLE.delay(waited))
            if self._stop.is_set():
                await self._settle(lease, "nak")
                return None
            if not self._leases.still_ours(lease):
                return None

    async def _record(self, task_id: str, record: bytes) -> None:
        """Write a non-final status without waiting: a final record, if any, supersedes it."""
        try:
            subject = topology.progress_subject(self.app.namespace, task_id)
            await self.client.nc.publish(subject, record)
        except Exception as exc:
            log.debug("status not written: %r", exc)

    async def _drain(self) -> None:
        log.info(
            "stopping: finishing %d running task(s), up to %.0fs", self.stats.running, self.grace
        )
        for pool in self._pools:
            for feed in pool.feeds:
                feed.stopping = True
            for lease, _ in pool.buffer.drain():
                await self._settle(lease, "nak")
                self._leases.release(lease)
                pool.credit.finished()
        try:
            await asyncio.wait_for(self._idle.wait(), self.grace)
        except TimeoutError:
            log.warning(
                "%d task(s) still running after %.0fs: handing them back",
                self.stats.running,
                self.grace,
            )
        for pool in self._pools:
            for feed in pool.feeds:
                await feed.close()
        await self.client.nc.flush()


class _Stopped(Exception):
    """Raised inside the worker's task group to cancel its tasks once draining is done."""


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in exc.errors()
    )[:1000]
