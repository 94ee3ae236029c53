"""The worker: pulls tasks, runs their handlers, and settles every message exactly one way.

Each message ends in exactly one of:
    ack      the handler returned and its result (if the task keeps results) is stored
    nak      the attempt failed and attempts remain: redelivered after the backoff delay
    term     after its dead letter was stored: bad payload, unknown task, last attempt failed
    nothing  the worker lost its lease (paused or cut off longer than `ack_wait`); the
             server has redelivered the task to another worker, so this one keeps its hands off

While a message is held, the worker renews its lease with `in_progress()` every third of
`ack_wait`, so `ack_wait` stays short and a crashed worker's tasks come back quickly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from pydantic import ValidationError

from taskframe import topology, wire
from taskframe.app import App, Handler
from taskframe.client import Client
from taskframe.context import Context
from taskframe.errors import ConfigError, Reject, Retry, TaskframeError
from taskframe.feed import Feed
from taskframe.publish import publish_stored
from taskframe.results import ErrorInfo, TaskState, status_record

log = logging.getLogger("taskframe.worker")


@dataclass(slots=True)
class Lease:
    """A held message and until when the server still counts it as ours."""

    msg: Msg
    expires: float
    lost: bool = False

    def valid(self) -> bool:
        """Whether the message is still ours to settle."""
        return not self.lost and time.monotonic() < self.expires


@dataclass
class WorkerStats:
    """Counts of settled messages since the worker started."""

    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    lost: int = 0
    running: int = 0
    by_task: dict[str, int] = field(default_factory=dict)


class Worker:
    """Runs an App's handlers for some of its queues until stopped.

    Args:
        app: the handlers.
        client: an open client for the app's namespace (its connection is shared).
        queues: the queues to serve; default every queue the app has handlers for.
        concurrency: tasks run at once, per queue.
        prefetch: extra tasks held ready per queue, so a free slot never waits for the network.
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
        concurrency: int = 64,
        prefetch: int | None = None,
        grace: float = 30.0,
        max_in_flight: int | None = None,
    ) -> None:
        if app.namespace != client.namespace:
            raise ConfigError(
                f"app namespace {app.namespace!r} is not the client's {client.namespace!r}"
            )
        self.app = app
        self.client = client
        self.queues = sorted(queues or app.queues)
        unknown = set(self.queues) - app.queues
        if unknown:
            raise ConfigError(f"no handlers for queue(s) {sorted(unknown)} in {app!r}")
        if not self.queues:
            raise ConfigError(f"{app!r} has no handlers: nothing to run")
        if concurrency < 1:
            raise ConfigError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.prefetch = min(concurrency, 32) if prefetch is None else prefetch
        self.grace = grace
        self.max_in_flight = max_in_flight or self.MAX_IN_FLIGHT
        self.stats = WorkerStats()
        self._settings = client.settings
        self._leases: dict[int, Lease] = {}
        self._stop = asyncio.Event()  # asyncio events bind to a loop on first use, not here
        self._idle = asyncio.Event()
        self._idle.set()
        self.ready = asyncio.Event()
        """Set once the worker has provisioned its queues and is pulling."""
        self.progress = asyncio.Event()
        """Set whenever a message is settled; clear it to wait for the next."""
        self._feeds: dict[str, Feed] = {}
        self._buffers: dict[str, asyncio.Queue[Msg]] = {}
        self._threads: ThreadPoolExecutor | None = None

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
            await self._provision()
            async with asyncio.TaskGroup() as group:
                for queue in self.queues:
                    await self._start_queue(group, queue)
                group.create_task(self._keep_leases(), name="taskframe-leases")
                self.client.reconnect_listeners.append(self._on_reconnect)
                self.ready.set()
                log.info(
                    "worker ready: namespace=%s queues=%s concurrency=%d",
                    self.app.namespace,
                    self.queues,
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
            if self._threads is not None:
                self._threads.shutdown(wait=False, cancel_futures=True)
            log.info("worker stopped: %r", self)

    async def _provision(self) -> None:
        js = self.client.js
        await topology.ensure_shared(js, self._settings)
        for queue in self.queues:
            await topology.ensure_queue(js, self._settings, queue)
            await self._ensure_consumer(queue)

    async def _ensure_consumer(self, queue: str) -> None:
        await topology.ensure_consumer(
            self.client.js,
            topology.queue_stream(self.app.namespace, queue),
            topology.consumer_config(self._settings, queue, self.max_in_flight),
        )

    async def _start_queue(self, group: asyncio.TaskGroup, queue: str) -> None:
        buffer: asyncio.Queue[Msg] = asyncio.Queue()
        feed = Feed(
            self.client.nc,
            topology.queue_stream(self.app.namespace, queue),
            topology.WORKERS,
            self.concurrency + self.prefetch,
            functools.partial(self._accept, buffer),
            functools.partial(self._recover, queue),
        )
        self._feeds[queue] = feed
        self._buffers[queue] = buffer
        await feed.start()
        group.create_task(feed.run(), name=f"taskframe-feed-{queue}")
        for n in range(self.concurrency):
            group.create_task(self._runner(queue, feed, buffer), name=f"taskframe-run-{queue}-{n}")

    async def _recover(self, queue: str) -> None:
        await topology.ensure_queue(self.client.js, self._settings, queue)
        await self._ensure_consumer(queue)

    async def _on_reconnect(self) -> None:
        for feed in self._feeds.values():
            feed.reset()

    def _accept(self, buffer: asyncio.Queue[Msg], msg: Msg) -> None:
        self._leases[id(msg)] = Lease(msg, time.monotonic() + self._settings.ack_wait)
        buffer.put_nowait(msg)

    async def _runner(self, queue: str, feed: Feed, buffer: asyncio.Queue[Msg]) -> None:
        while True:
            msg = await buffer.get()
            lease = self._leases.get(id(msg))
            try:
                if lease is not None:
                    if feed.stopping:
                        await self._settle(lease, "nak")
                    else:
                        self._started()
                        try:
                            await self._process(queue, msg, lease)
                        finally:
                            self._finished()
            except Exception:
                # Storing a result or a dead letter failed even after retries: the broker is
                # away. Leave the task to come back after ack_wait rather than stop the worker.
                log.exception("task on %s not settled; it will be redelivered", msg.subject)
            finally:
                self._leases.pop(id(msg), None)
                feed.finished()

    async def _keep_leases(self) -> None:
        period = self._settings.ack_wait / 3
        while True:
            await asyncio.sleep(period / 2)
            now = time.monotonic()
            for key, lease in list(self._leases.items()):
                if now >= lease.expires:
                    lease.lost = True
                    self._leases.pop(key, None)
                    self.stats.lost += 1
                    log.warning(
                        "lease on %s expired (worker paused or cut off): another worker "
                        "owns it now; it will not be settled here",
                        lease.msg.subject,
                    )
                elif lease.expires - now < self._settings.ack_wait - period:
                    await self._renew(lease)

    async def _renew(self, lease: Lease) -> None:
        if not lease.valid():
            return
        try:
            await lease.msg.in_progress()
        except Exception as exc:  # disconnected: the lease runs out unless we reconnect in time
            log.debug("heartbeat not sent: %r", exc)
            return
        lease.expires = time.monotonic() + self._settings.ack_wait

    async def _settle(
        self, lease: Lease, how: str, delay: float | None = None, reason: str = ""
    ) -> bool:
        """Ack, nak or term the leased message, unless the lease was lost."""
        if not lease.valid():
            if not lease.lost:
                lease.lost = True
                self.stats.lost += 1
            log.warning("not settling %s (%s): lease lost", lease.msg.subject, how)
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

    async def _process(self, queue: str, msg: Msg, lease: Lease) -> None:
        meta = msg.metadata
        attempt = meta.num_delivered
        headers = msg.headers or {}
        name = wire.task_name_of(msg.subject, headers)
        task_id = headers.get(wire.ID) or f"{queue}-{meta.sequence.stream}"
        handler = self.app.handlers.get((queue, name))
        if handler is None:
            await self._bury(
                lease,
                queue,
                name,
                task_id,
                attempt,
                "unknown-task",
                ErrorInfo(
                    type="UnknownTask", message=f"no handler for task {name!r} on queue {queue!r}"
                ),
                keeps_result=True,
            )
            return
        keeps = handler.model.__tf_results__
        if attempt > handler.max_attempts:
            await self._bury(
                lease,
                queue,
                name,
                task_id,
                attempt - 1,
                "lost",
                ErrorInfo(
                    type="AttemptsExhausted",
                    message=f"delivered {attempt} times; earlier attempts never finished "
                    "(worker crashed, timed out or was cut off)",
                ),
                keeps_result=keeps,
            )
            return
        try:
            task = handler.model.model_validate_json(msg.data)
        except ValidationError as exc:
            await self._bury(
                lease,
                queue,
                name,
                task_id,
                attempt,
                "invalid",
                ErrorInfo(type="ValidationError", message=_short(exc)),
                keeps_result=keeps,
            )
            return
        await self._run(queue, handler, task, task_id, attempt, lease)

    async def _run(
        self, queue: str, handler: Handler[Any], task: Any, task_id: str, attempt: int, lease: Lease
    ) -> None:
        name = handler.name
        keeps = handler.model.__tf_results__
        ctx = Context(
            task_id=task_id,
            task=name,
            queue=queue,
            attempt=attempt,
            max_attempts=handler.max_attempts,
            client=self.client,
            heartbeat=functools.partial(self._renew, lease),
        )
        if keeps:
            await self._record(task_id, status_record(task_id, name, TaskState.RUNNING, attempt))
        try:
            async with asyncio.timeout(handler.timeout):
                if handler.is_async:
                    value = await handler.fn(task, ctx)
                else:
                    loop = asyncio.get_running_loop()
                    value = await loop.run_in_executor(
                        self._threads, functools.partial(handler.fn, task, ctx)
                    )
            result_json = handler.result.dump_json(handler.result.validate_python(value))
        except asyncio.CancelledError:
            await self._settle(lease, "nak")  # shutting down: hand the task back at once
            raise
        except Reject as exc:
            await self._bury(
                lease,
                queue,
                name,
                task_id,
                attempt,
                "rejected",
                ErrorInfo(type="Reject", message=exc.reason),
                keeps_result=keeps,
            )
            return
        except Exception as exc:
            await self._failed(queue, handler, task_id, attempt, lease, exc)
            return
        if keeps:
            record = status_record(
                task_id, name, TaskState.SUCCEEDED, attempt, result_json=result_json
            )
            await publish_stored(
                self.client.js,
                self._settings,
                topology.result_subject(self.app.namespace, task_id),
                record,
            )
        if await self._settle(lease, "ack"):
            self.stats.succeeded += 1

    def _started(self) -> None:
        self.stats.running += 1
        self._idle.clear()

    def _finished(self) -> None:
        self.stats.running -= 1
        if self.stats.running == 0:
            self._idle.set()

    async def _failed(
        self,
        queue: str,
        handler: Handler[Any],
        task_id: str,
        attempt: int,
        lease: Lease,
        exc: Exception,
    ) -> None:
        if isinstance(exc, TimeoutError) and not isinstance(exc, TaskframeError):
            error = ErrorInfo(
                type="TimeoutError", message=f"attempt exceeded its timeout of {handler.timeout}s"
            )
        else:
            error = ErrorInfo(
                type=type(exc).__qualname__,
                message=str(exc),
                traceback="".join(traceback.format_exception(exc)),
            )
        if attempt >= handler.max_attempts:
            await self._bury(
                lease,
                queue,
                handler.name,
                task_id,
                attempt,
                "failed",
                error,
                keeps_result=handler.model.__tf_results__,
            )
            return
        delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else None
        delay = handler.backoff.delay(attempt) if delay is None else delay
        log.info(
            "task %s %s attempt %d/%d failed (%s); retrying in %.1fs",
            handler.name,
            task_id,
            attempt,
            handler.max_attempts,
            error.type,
            delay,
        )
        if handler.model.__tf_results__:
            await self._record(
                task_id,
                status_record(task_id, handler.name, TaskState.FAILED, attempt, error=error),
            )
        if await self._settle(lease, "nak", delay):
            self.stats.retried += 1

    async def _bury(
        self,
        lease: Lease,
        queue: str,
        name: str,
        task_id: str,
        attempt: int,
        reason: str,
        error: ErrorInfo,
        *,
        keeps_result: bool,
    ) -> None:
        """Store a dead letter, then terminate the message: never the other way round."""
        msg = lease.msg
        headers = {k: v for k, v in (msg.headers or {}).items() if k != wire.MSG_ID}
        headers.update(
            {
                wire.MSG_ID: f"{task_id}:{msg.metadata.sequence.stream}:{attempt}",
                wire.ID: task_id,
                wire.DEAD_REASON: reason,
                wire.ERROR_TYPE: wire.one_line(error.type),
                wire.ERROR: wire.one_line(error.message),
                wire.ATTEMPTS: str(attempt),
                wire.ORIGINAL_SUBJECT: msg.subject,
                wire.DIED_AT: wire.now_rfc3339(),
            }
        )
        if error.traceback:
            headers[wire.TRACEBACK] = wire.json_header(error.traceback)
        subject = wire.dead_subject(self.app.namespace, queue, name or "unknown")
        try:
            await publish_stored(self.client.js, self._settings, subject, msg.data, headers)
        except TaskframeError as exc:
            log.error("dead letter for %s not stored (%s); task goes back to retry", task_id, exc)
            await self._settle(lease, "nak", 5.0)
            return
        log.warning(
            "task %s %s is dead (%s after %d attempt(s)): %s: %s",
            name,
            task_id,
            reason,
            attempt,
            error.type,
            error.message,
        )
        if keeps_result:
            record = status_record(
                task_id,
                name,
                TaskState.DEAD,
                attempt,
                error=error.model_copy(update={"reason": reason}),
            )
            await publish_stored(
                self.client.js,
                self._settings,
                topology.result_subject(self.app.namespace, task_id),
                record,
            )
        if await self._settle(lease, "term", reason=f"dead letter: {reason}"):
            self.stats.dead += 1

    async def _record(self, task_id: str, record: bytes) -> None:
        """Write a non-final status without waiting: a later final record supersedes it."""
        try:
            await self.client.nc.publish(
                topology.result_subject(self.app.namespace, task_id), record
            )
        except Exception as exc:
            log.debug("status not written: %r", exc)

    async def _drain(self) -> None:
        log.info(
            "stopping: finishing %d running task(s), up to %.0fs", self.stats.running, self.grace
        )
        for feed in self._feeds.values():
            feed.stopping = True
        for queue, buffer in self._buffers.items():
            while not buffer.empty():
                msg = buffer.get_nowait()
                lease = self._leases.pop(id(msg), None)
                if lease is not None:
                    await self._settle(lease, "nak")
                self._feeds[queue].finished()
        try:
            await asyncio.wait_for(self._idle.wait(), self.grace)
        except TimeoutError:
            log.warning(
                "%d task(s) still running after %.0fs: handing them back",
                self.stats.running,
                self.grace,
            )
        for feed in self._feeds.values():
            await feed.close()
        await self.client.nc.flush()


class _Stopped(Exception):
    """Raised inside the worker's task group to cancel its tasks once draining is done."""


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in exc.errors()
    )[:1000]
