"""The worker: pulls tasks and events, runs their handlers, settles every message once.

This module is the worker's life: start-up (provisioning, one pool per queue or group),
the runner loop, and a graceful stop. What one attempt does is in _attempt.py, how a
delivery ends (ack, retry, dead letter) in settle.py, how the worker is fed in _pull.py
and why it may settle at all in _leases.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from nats.aio.msg import Msg

from taskframe import _stream_configs as configs
from taskframe._attempt import Attempts
from taskframe._claims import Claims
from taskframe._credit import Credit
from taskframe._leases import Leases
from taskframe._progress import write_status
from taskframe._pull import Buffer, Feed, Pool, Route, app_routes
from taskframe._ratelimit import RateLimit, RateLimiter
from taskframe._registry import Registration
from taskframe._results import TaskState, status_record
from taskframe._retry import UNTIL_AVAILABLE
from taskframe._stats import WorkerStats
from taskframe.app import App
from taskframe.client import Client
from taskframe.errors import ConfigError, ConnectError, PayloadTooLargeError, PublishError
from taskframe.provision import ensure_consumer, ensure_queue, ensure_stream, provision
from taskframe.settle import CONFIRMING, Settler

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger("taskframe.worker")

MOST_PREFETCH = 960
"""The most an adaptive prefetch grows to: with the default concurrency, a pool then holds
at most 1024 tasks waiting or running (and `CONFIRMING` more awaiting their acks)."""


class Worker:
    """Runs an App's handlers for some of its queues (and its event groups) until stopped.

    Args:
        app: the handlers.
        client: an open client for the app's namespace (its connection is shared).
        queues: the queues to serve; default every queue the app has handlers for.
        groups: the subscriber groups to serve; default every group of the app.
        concurrency: tasks run at once, per queue (and per group).
        prefetch: extra tasks held ready per queue, so a free slot never waits for the network.
            By default it adapts: as many as the worker settles in 0.1 s (`_credit.HORIZON`),
            at least `concurrency` up to 64 and at most `MOST_PREFETCH`, so short tasks get
            a deep pipeline and long ones are left to other workers. A number fixes it.
            Tasks that have run and whose ack waits for the server to confirm their status
            record are held too, up to `settle.CONFIRMING` more, but take no slot: their
            runner has moved on.
        grace: seconds running tasks get to finish after `stop()`, and finished ones to have
            their record confirmed and be acked; the rest are handed back.
        max_tasks: stop by itself, as `stop()` does, once it has started this many attempts.
    """

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
        max_tasks: int | None = None,
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
        if min(concurrency, 1 if max_tasks is None else max_tasks) < 1:
            raise ConfigError("concurrency and max_tasks must be at least 1")
        self.concurrency = concurrency
        self.prefetch = min(concurrency, 64) if prefetch is None else prefetch
        """The prefetch; the least it adapts to when none was given."""
        self._adaptive = prefetch is None
        self.grace = grace
        self.max_tasks = max_tasks
        self.stats = WorkerStats()
        self._settings = client.settings
        self._stop = asyncio.Event()  # asyncio events bind to a loop on first use, not here
        self._idle = asyncio.Event()
        self._idle.set()
        self.ready = asyncio.Event()
        """Set once the worker has provisioned its streams and is pulling."""
        self.progress = asyncio.Event()
        """Set whenever a message is settled; clear it to wait for the next."""
        self._leases = Leases(
            client.nc, self._settings.ack_wait, self._stalled, self._running, self._lost
        )
        self._settler = Settler(client, self._leases, self.stats, self._stop, self.progress)
        self._claims: Claims | None = None
        if any(h.exactly_once for (q, _), h in app.handlers.items() if q in self.queues):
            self._claims = Claims(client.js, self._settings)
            self._leases.renew_claim = self._claims.renew
        self._pools: list[Pool] = []
        self._registration = Registration(
            client, self.stats, self.queues, self.groups, concurrency, self._stop
        )
        self.id = self._registration.id
        """Its key in the namespace's worker registry (`Client.workers()`)."""

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<Worker {self.app.namespace} id={self.id} queues={self.queues} "
            f"groups={self.groups} concurrency={self.concurrency} running={s.running} "
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
        threads = ThreadPoolExecutor(min(self.concurrency, 64), "taskframe")
        hooks, stop, stats = self.app.hooks, self._stop, self.stats
        attempts = Attempts(
            self.client, self._settler, self._leases, self._claims, threads, stop, stats, hooks
        )
        lent = [hook for hook in self.app.hooks if hook not in self.client.hooks]
        self.client.hooks.extend(lent)  # ctx.enqueue goes through this client
        try:
            if not await self._provision_when_possible(attempts.cancels.start):
                return  # stopped before JetStream answered
            async with asyncio.TaskGroup() as group:
                for routes in app_routes(self.app, self._settings, self.queues, self.groups):
                    self._start_pool(group, attempts, routes)
                for pool in self._pools:
                    for feed in pool.feeds:
                        await feed.start()
                        group.create_task(feed.run(), name=f"taskframe-feed-{feed}")
                group.create_task(self._leases.keep(), name="taskframe-leases")
                group.create_task(attempts.watch_timeouts(), name="taskframe-timeouts")
                group.create_task(self._registration.keep(), name="taskframe-registry")
                self.client.reconnect_listeners.append(self._on_reconnect)
                await self._registration.write()
                self.ready.set()
                log.info("worker ready: %r", self)
                await self._stop.wait()
                await self._drain()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            await attempts.cancels.stop()
            self.ready.clear()
            for hook in lent:
                self.client.hooks.remove(hook)
            await self._registration.remove()
            if self._on_reconnect in self.client.reconnect_listeners:
                self.client.reconnect_listeners.remove(self._on_reconnect)
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            threads.shutdown(wait=False, cancel_futures=True)
            log.info("worker stopped: %r", self)

    async def _provision_when_possible(self, then: Callable[[], Awaitable[None]]) -> bool:
        """`provision()` and `then()` (hear cancel requests), again while JetStream does not
        answer; False if stopped meanwhile.

        A worker may start while its cluster has no quorum or elects a leader: it waits for
        JetStream instead of exiting. A refused permission or a conflicting setting fails.
        """
        attempt = 0
        while not self._stop.is_set():
            try:
                await provision(self.app, self.client, queues=self.queues, groups=self.groups)
                await then()
                return True
            except PayloadTooLargeError:
                raise
            except (ConnectError, PublishError) as exc:
                attempt += 1
                delay = UNTIL_AVAILABLE.delay(attempt)
                log.warning("cannot provision yet (%s); trying again in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        return False

    def _start_pool(
        self, group: asyncio.TaskGroup, attempts: Attempts, routes: list[Route]
    ) -> None:
        first = routes[0]
        pool = Pool(
            first.label,
            Credit(
                self.concurrency + self.prefetch,
                CONFIRMING,
                slots=self.concurrency,
                most=self.concurrency + MOST_PREFETCH if self._adaptive else None,
            ),
            Buffer(max(route.rank for route in routes) + 1),
        )
        if first.queue and (limit := self.app.options(first.queue).rate_limit):
            pool.limiter = RateLimiter(
                self.client.js, self._settings, first.queue, RateLimit.parse(limit)
            )
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
        self._pools.append(pool)
        for n in range(self.concurrency):
            group.create_task(self._runner(pool, attempts), name=f"taskframe-run-{pool.name}-{n}")

    async def _recover(self, route: Route) -> None:
        js = self.client.js
        if route.queue:
            await ensure_queue(js, self._settings, route.queue, self.app.options(route.queue))
        else:
            await ensure_stream(js, configs.events_config(self._settings))
        await ensure_consumer(js, route.stream, route.consumer)

    async def _on_reconnect(self) -> None:
        for pool in self._pools:
            for feed in pool.feeds:
                feed.reset()

    def _accept(self, pool: Pool, route: Route, msg: Msg, since: float) -> None:
        lease = self._leases.take(msg, since, pool.credit)
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

    async def _running(self, task_id: str, name: str, attempt: int) -> None:
        record = status_record(task_id, name, TaskState.RUNNING, attempt)
        await write_status(self.client.nc, self.client.namespace, task_id, record)

    async def _runner(self, pool: Pool, attempts: Attempts) -> None:
        stats = self.stats
        while True:
            lease, route = await pool.buffer.get()
            try:
                if not self._leases.still_ours(lease):
                    continue  # lost while it waited; another worker has it now
                if self._stop.is_set():
                    await self._settler.settle(lease, "nak")
                    continue
                stats.running += 1
                stats.started += 1
                if stats.running == 1:
                    self._idle.clear()
                if stats.started == self.max_tasks:
                    self.stop()
                self._leases.start(lease)
                try:
                    await attempts.process(pool, route, lease)
                finally:
                    stats.running -= 1
                    if not stats.running:
                        self._idle.set()
            except Exception:
                # Storing a result or a dead letter failed even after retries: the broker is
                # away. Leave the task to come back after ack_wait rather than stop the worker.
                subject, fields = lease.msg.subject, lease.fields
                log.exception("message on %s not settled; redelivered later", subject, extra=fields)
            finally:
                if not lease.confirming:  # else released once its record is confirmed
                    self._leases.release(lease)  # and its credit returned

    async def _drain(self) -> None:
        log.info(
            "stopping: finishing %d running task(s), up to %.0fs", self.stats.running, self.grace
        )
        for pool in self._pools:
            for feed in pool.feeds:
                feed.stopping = True
            for lease, _ in pool.buffer.drain():
                await self._settler.settle(lease, "nak")
                self._leases.release(lease)
        try:
            async with asyncio.timeout(self.grace):
                await self._idle.wait()  # no attempt starts any more: then no record is sent
                await self._settler.confirmed()
        except TimeoutError:
            log.warning(
                "after %.0fs, %d task(s) still running and %d awaiting their record's "
                "confirmation: handing them back",
                self.grace,
                self.stats.running,
                self.stats.confirming,
            )
        await self._settler.hand_back()  # what still awaits a confirmation runs again elsewhere
        for pool in self._pools:
            for feed in pool.feeds:
                await feed.close()
        with contextlib.suppress(Exception):  # cut off: what is left is the server's to resend
            await self.client.nc.flush(timeout=5)


class _Stopped(Exception):
    """Raised inside the worker's task group to cancel its tasks once draining is done."""
