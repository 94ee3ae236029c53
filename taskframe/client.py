"""The producer side: connect, enqueue tasks, read their status and results.

async with taskframe.connect("nats://127.0.0.1:4222", namespace="media") as tf:
    run = await tf.enqueue(ResizeImage(url=u))
    path = await run.result(timeout=30)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar, overload

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import TypeAdapter

from taskframe import _control, _deadletters, hooks, provision
from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._cancels import request_cancel
from taskframe._connection import open_connection
from taskframe._deadletters import DeadLetter
from taskframe._enqueue import provisioned, store_task
from taskframe._enqueue_batch import refused_batch, unconfirmed
from taskframe._flow_enqueue import enqueue_flow
from taskframe._message import task_message
from taskframe._payloads import delete, encode
from taskframe._publish import publish_stored, publisher
from taskframe._queues import QueueInfo, queue_infos
from taskframe._registry import WorkerInfo, worker_infos
from taskframe._results import Progress, TaskStatus, read_progress, read_status
from taskframe._retry import answered
from taskframe._taskrun import TaskRun
from taskframe._waiting import wait_final
from taskframe.errors import (
    ConfigError,
    ConnectError,
    PublishError,
    StoreFullError,
    StreamMissingError,
)
from taskframe.flows import Flow, FlowRun
from taskframe.hooks import EnqueueInfo, Hook
from taskframe.models import Event, Task, result_adapter
from taskframe.settings import Settings

R = TypeVar("R")
log = logging.getLogger("taskframe.client")


class Client:
    """A connection to NATS for one namespace: enqueues tasks and reads their results.

    Construct with `taskframe.connect(...)`, use as an async context manager; no I/O here.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._adapters: dict[type[Any], TypeAdapter[Any]] = {}
        self._known_queues: set[str] = set()
        self._results_exist = False
        self.reconnect_listeners: list[Callable[[], Awaitable[None]]] = []
        self.hooks: list[Hook] = []
        """Called around every enqueue and publish of this client (see `add_hook`)."""

    def __repr__(self) -> str:
        state = "connected" if self._nc and self._nc.is_connected else "closed"
        return f"<Client namespace={self.namespace!r} url={self.settings.safe_url!r} {state}>"

    def add_hook(self, hook: Hook) -> None:
        """Call `hook`'s `before_enqueue` and `after_enqueue` around every task enqueued and
        every event published by this client (`taskframe.hooks`)."""
        if not isinstance(hook, Hook):
            raise ConfigError(f"{hook!r} is not a taskframe.hooks.Hook")
        self.hooks.append(hook)

    @property
    def namespace(self) -> str:
        """The namespace every subject and stream of this client lives in."""
        return self.settings.namespace

    @property
    def nc(self) -> NATS:
        """The underlying nats-py connection (internal)."""
        if self._nc is None:
            raise ConnectError("client is not connected: use `async with connect(...)`")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The underlying JetStream context (internal)."""
        if self._js is None:
            raise ConnectError("client is not connected: use `async with connect(...)`")
        return self._js

    async def open(self) -> Self:
        """Connect to NATS. Reconnects forever after a lost connection.

        Raises `UnreachableError` (a `ConnectError`) if no server answers, `ConnectError`
        if one refuses the login or TLS, and `PermissionDeniedError` if the user may not
        receive replies on its inbox prefix.
        """
        self._nc = await open_connection(self.settings, self._reconnected)
        self._js = self._nc.jetstream(timeout=self.settings.publish_timeout)
        return self

    async def _reconnected(self) -> None:
        for listener in list(self.reconnect_listeners):
            await listener()

    async def close(self) -> None:
        """Flush what is buffered and close the connection."""
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.drain()
            except nats.errors.Error:
                await self._nc.close()
        self._nc = self._js = None

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _adapter(self, model: type[Task[Any]]) -> TypeAdapter[Any]:
        adapter = self._adapters.get(model)
        if adapter is None:
            adapter = self._adapters[model] = result_adapter(model)
        return adapter

    def _prepare(
        self,
        task: Task[R],
        key: str | None,
        priority: str | None = None,
        run_at: datetime | None = None,
        seen: list[EnqueueInfo] | None = None,
    ) -> tuple[str, bytes, dict[str, str], str]:
        message = task_message(self.namespace, task, key, priority, run_at)
        subject, body, headers, task_id = message.subject, message.body, message.headers, message.id
        if seen is not None:
            name = type(task).__tf_name__
            seen.append(EnqueueInfo(self.namespace, message.queue or "", name, task_id, headers))
            hooks.before_enqueue(self.hooks, seen[-1])
        return subject, body, headers, task_id

    def _run(self, task: Task[R], task_id: str, duplicate: bool) -> TaskRun[R]:
        run = self.handle(type(task), task_id)
        run.duplicate = duplicate
        return run

    @overload
    async def enqueue(self, task: Flow[R], *, key: str | None = None) -> FlowRun[R]: ...
    @overload
    async def enqueue(
        self, task: Task[R], *, key: str | None = None, delay: float | None = None,
        at: datetime | None = None, priority: str | None = None,
    ) -> TaskRun[R]: ...  # fmt: skip
    async def enqueue(
        self, task: Task[R] | Flow[R], *, key: str | None = None, delay: float | None = None,
        at: datetime | None = None, priority: str | None = None,
    ) -> TaskRun[R] | FlowRun[R]:  # fmt: skip
        """Store `task` in its queue and return a handle on it.

        Returns only once the server confirmed storing the task. Raises `StoreFullError`
        at once when the server has no room for it, `PublishError` when it refused it or
        never confirmed it, `PayloadTooLargeError` before sending an over-size one.

        Args:
            key: an idempotency key: the task id (docs/wire-format.md says which keys
                are valid; `ConfigError` otherwise). Enqueued at most once per key within
                the duplicate window; a repeat's handle has `duplicate` set.
            delay: seconds from now before the task may start.
            at: a timezone-aware time before which the task does not start. The server
                holds delayed tasks (they survive its restarts) and enqueues them when due,
                usually within a few milliseconds and at most about 0.3 s late.
            priority: the lane, for a queue declared with priorities.

        A flow (`chain`, `group`, `chord`) returns a `FlowRun`; `key` names the flow.
        """
        if not isinstance(task, Task):
            return await enqueue_flow(self, task, key)
        run_at = wire.due_at(delay, at)
        seen: list[EnqueueInfo] | None = [] if self.hooks else None
        try:
            subject, body, headers, task_id = self._prepare(task, key, priority, run_at, seen)
            body = await encode(self, subject, body, headers)  # compressed, offloaded, checked
            try:
                duplicate = await store_task(
                    self.nc, self.js, self.settings, type(task).__tf_queue__, subject, body, headers
                )
            except StoreFullError as exc:
                raise exc.for_tasks((task_id,)) from exc
            if duplicate and wire.PAYLOAD in headers:  # the stored task has its own object
                await delete(self.js, self.namespace, headers[wire.PAYLOAD])
        except BaseException as exc:
            self._after(seen, exc)
            raise
        self._after(seen, None)
        return self._run(task, task_id, duplicate)

    def _after(self, seen: list[EnqueueInfo] | None, error: BaseException | None) -> None:
        for info in seen or ():
            hooks.after_enqueue(self.hooks, info, error)

    async def publish(self, event: Event) -> str:
        """Publish `event` to every subscriber group and return its id.

        Returns once the server stored the event. Events published while no group exists
        (no worker or `taskframe provision` has created one) are not kept for anybody.
        Raises `StoreFullError` at once when the server has no room for it.
        """
        name = type(event).__tf_name__
        event_id = wire.new_task_id()
        subject = wire.event_subject(self.namespace, name)
        headers = {wire.MSG_ID: event_id}
        seen: list[EnqueueInfo] | None = None
        if self.hooks:
            seen = [EnqueueInfo(self.namespace, "", name, event_id, headers, "event")]
            hooks.before_enqueue(self.hooks, seen[0])
        try:
            body = await encode(self, subject, wire.encode(event), headers)
            try:
                await publish_stored(self.nc, self.settings, subject, body, headers)
            except StreamMissingError:
                await provisioned(
                    subject, provision.ensure_stream(self.js, configs.events_config(self.settings))
                )
                await publish_stored(self.nc, self.settings, subject, body, headers)
        except BaseException as exc:
            self._after(seen, exc)
            raise
        self._after(seen, None)
        return event_id

    async def enqueue_many(
        self, tasks: Iterable[Task[Any]], *, priority: str | None = None
    ) -> list[TaskRun[Any]]:
        """Store many tasks, pipelining the publishes, and return their handles in order.

        Returns once the server confirmed storing every one; a task whose confirmation did
        not come is sent again with the same id (no duplicate is stored). Raises
        `StoreFullError` at once if the server had no room for some (its `task_ids` are the
        ones not stored; the others were), `PublishError` if any task could not be stored
        for another reason; the error lists which.
        """
        batch = list(tasks)
        seen: list[EnqueueInfo] | None = [] if self.hooks else None
        try:
            runs = await self._enqueue_many(batch, priority, seen)
        except BaseException as exc:  # every task hears of it, stored or not
            self._after(seen, exc)
            raise
        self._after(seen, None)
        return runs

    async def _enqueue_many(
        self, batch: list[Task[Any]], priority: str | None, seen: list[EnqueueInfo] | None
    ) -> list[TaskRun[Any]]:
        prepared = [self._prepare(t, None, priority, None, seen) for t in batch]
        prepared = [(s, await encode(self, s, b, h), h, i) for s, b, h, i in prepared]
        for queue in {type(t).__tf_queue__ for t in batch} - self._known_queues:
            # Once per queue and client: a batch sent to a missing stream would all come back.
            await provisioned(queue, provision.ensure_queue(self.js, self.settings, queue))
            self._known_queues.add(queue)
        sender = publisher(self.nc)
        waiting = list(range(len(batch)))
        for round_ in range(self.settings.publish_attempts):
            futures = [await sender.send(*prepared[i][:3]) for i in waiting]
            if futures:
                await asyncio.wait(futures, timeout=self.settings.publish_timeout)
            waiting, missing, refused = unconfirmed(batch, waiting, futures)
            if waiting:
                sender.abandon()
            if refused:  # the server answered no: resending would be refused again
                raise refused_batch(refused, waiting, prepared)
            if not waiting:
                break
            for queue in sorted(missing):  # no stream answered (deleted, or electing a leader)
                await provisioned(queue, provision.ensure_queue(self.js, self.settings, queue))
            if not missing:
                await asyncio.sleep(min(2.0, 0.1 * 2**round_))
        if waiting:
            raise PublishError(
                f"{len(waiting)} of {len(batch)} tasks were not confirmed stored: "
                f"ids {[prepared[i][3] for i in waiting[:10]]} (enqueue them again: their "
                "ids make a resend safe within the duplicate window)"
            )
        return [self._run(t, p[3], False) for t, p in zip(batch, prepared, strict=True)]

    async def status(self, task_id: str) -> TaskStatus | None:
        """The latest status record of `task_id`, or None if there is none.

        None means no worker has picked the task up yet, its record expired (`result_ttl`),
        its task keeps no results, or the id was never enqueued. Raises `ConnectError` if
        JetStream does not answer (a cluster without a quorum).
        """
        if not await self._results_stream():
            return None
        return await read_status(self.js, self.namespace, task_id)

    async def _results_stream(self) -> bool:
        """Whether the results stream exists (checked until it does): direct gets need it."""
        if not self._results_exist:
            stream = topology.results_stream(self.namespace)
            try:
                await answered(f"stream {stream}", self.js.stream_info, stream)
            except NotFoundError:
                return False
            self._results_exist = True
        return True

    async def progress(self, task_id: str) -> Progress | None:
        """The last progress `task_id` reported (`Context.progress`), or None if none."""
        if not await self._results_stream():
            return None
        return await read_progress(self.js, self.namespace, task_id)

    async def cancel(self, task_id: str) -> bool:
        """Cancel task `task_id`: it will not run, or its running handler is stopped.

        A waiting or delayed task is removed from its queue; a running one is cancelled
        (its asyncio task) within moments on whichever worker runs it, and not retried. Its
        final status is `cancelled`, and `TaskRun.result()` raises `TaskCancelledError`.
        The request is kept `result_ttl`: a delivery of this id within that time is
        dropped unrun. Returns False, changing nothing, if the task already finished (it
        has a final status) or is not known: no status and no waiting or delayed message
        carries its id. A plain `def` handler cannot be stopped in its thread: its outcome
        is dropped. A task that finishes as the request arrives keeps its own outcome.
        """
        return await request_cancel(self, task_id)

    async def wait(self, task_id: str, timeout: float | None) -> TaskStatus:
        """Wait until `task_id` reaches a final state and return that status."""
        return await wait_final(self.nc, self.namespace, task_id, timeout, self.status)

    async def queues(self, *, every_namespace: bool = False) -> list[QueueInfo]:
        """Each queue of this namespace (or of every namespace) as the server sees it now:
        tasks waiting, in flight, redelivered and dead, and whether it is paused, summed
        over its priority lanes."""
        return await queue_infos(self.js, None if every_namespace else self.namespace)

    async def workers(self) -> list[WorkerInfo]:
        """The running workers of this namespace, from the registry each one keeps its record
        in: host, pid, queues, tasks running and counts so far, last seen. A worker drops out
        when it stops, or about 2.5 heartbeats after its last record (killed, cut off)."""
        return await worker_infos(self.js, self.namespace)

    async def dead_letters(
        self,
        *,
        queue: str | None = None,
        task: str | None = None,
        reason: str | None = None,
        task_id: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[DeadLetter]:
        """Dead letters of this namespace, oldest first, filtered by queue, task name,
        reason ("failed", "rejected", "invalid", "unknown-task", "lost") and task id. For
        the next page pass the last letter's `seq` as `after`."""
        return (await _deadletters.dead_letter_page(
            self.js, self.namespace, queue=queue, task=task, reason=reason,
            task_id=task_id, after=after, limit=limit,
        ))[0]  # fmt: skip

    async def pause(self, queue: str) -> None:
        """Stop handing tasks of `queue` to any worker until `resume(queue)`.

        The server's consumer pause, on every lane: it holds for every worker and across
        server restarts. Tasks can still be enqueued; tasks already running finish.
        Raises `ConfigError` if the queue has no consumers yet (no worker ever served it).
        """
        await _control.pause(self.js, self.namespace, queue, _control.UNTIL_RESUMED)

    async def resume(self, queue: str) -> None:
        """Hand tasks of a paused `queue` to workers again, at once."""
        await _control.resume(self.js, self.namespace, queue)

    async def purge(self, queue: str) -> int:
        """Remove every task waiting in `queue` (all lanes) and return how many.

        Tasks running or waiting for a retry stay, and so do delayed tasks and periodic
        schedules. Raises `ConfigError` for an unknown queue.
        """
        return await _control.purge(self.js, self.namespace, queue)

    async def replay(self, letter: DeadLetter) -> None:
        """Enqueue a dead letter's task again (same id, attempt 1), then delete the letter.

        Its status is `queued` again until it runs. It is enqueued before the letter is
        deleted: a crash in between leaves a copy, never nothing.
        """
        await _deadletters.replay(self, letter)

    def handle(self, model: type[Task[R]], task_id: str) -> TaskRun[R]:
        """A handle on an already enqueued task of `model`, from its id."""
        return TaskRun(
            self,
            task_id,
            model.__tf_name__,
            self._adapter(model),
            keeps_result=model.__tf_results__,
        )


def connect(
    url: str | Sequence[str] | None = None,
    *,
    namespace: str | None = None,
    **settings: Any,
) -> Client:
    """A client for `namespace` on the NATS server(s) at `url`; use it with `async with`.

    Unset arguments come from TASKFRAME_* environment variables, then the defaults in
    `Settings` (URL `nats://127.0.0.1:4222`, namespace "default").
    """
    if url is not None and not isinstance(url, str):
        url = ",".join(url)
    return Client(Settings.from_env(url=url, namespace=namespace, **settings))
