"""Context: what a handler gets besides its task."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from taskframe import _topology as topology
from taskframe._flow_inputs import before
from taskframe._logs import task_fields, trace_id
from taskframe._progress import Reporter

if TYPE_CHECKING:
    from taskframe._taskrun import TaskRun
    from taskframe.client import Client
    from taskframe.models import Event, Task

R = TypeVar("R")
_TASK_LOG = logging.getLogger("taskframe.task")
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class Context:
    """The running attempt of a task: its identity, a logger, and a way back to the broker."""

    __slots__ = (
        "_client",
        "_headers",
        "_heartbeat",
        "_log",
        "_reporter",
        "attempt",
        "max_attempts",
        "queue",
        "task",
        "task_id",
    )

    def __init__(
        self,
        task_id: str,
        task: str,
        queue: str,
        attempt: int,
        max_attempts: int,
        client: Client,
        heartbeat: Callable[[], Awaitable[None]],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.task_id = task_id
        """The task's id (a UUIDv7 string, or its idempotency key)."""
        self.task = task
        """The task's name."""
        self.queue = queue
        self.attempt = attempt
        """This attempt's number, 1 for the first delivery."""
        self.max_attempts = max_attempts
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        self._client = client
        self._heartbeat = heartbeat
        self._headers = headers
        self._reporter: Reporter | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        """The delivered message's headers: taskframe's own, and any a producer's
        `before_enqueue` hook added (a `traceparent`, say)."""
        return self._headers or _NO_HEADERS

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger ("taskframe.task") whose records carry the attempt's `task`, `task_id`,
        `attempt`, `queue` and, if the message has a `traceparent` header, `trace_id`, as
        attributes: the CLI's text and JSON formats show them."""
        if self._log is None:
            fields = task_fields(
                self.task,
                self.task_id,
                self.attempt,
                queue=self.queue,
                trace=trace_id(self._headers),
            )
            self._log = logging.LoggerAdapter(_TASK_LOG, fields)
        return self._log

    def __repr__(self) -> str:
        return f"<Context {self.task} id={self.task_id} attempt={self.attempt}/{self.max_attempts}>"

    async def heartbeat(self) -> None:
        """Tell the server this task is still being worked on, extending its lease now.

        The worker already does this for every running task; call it to extend the lease
        at once, for example right after a long blocking step.
        """
        await self._heartbeat()

    async def progress(
        self, done: float, total: float | None = None, note: str | None = None
    ) -> None:
        """Report how far the task has got: `done` out of `total`, with an optional note.

        Readable by anyone with `TaskRun.progress()` / `Client.progress(id)`. Cheap to call
        often: at most one report every 0.5 s is written to the broker, and the last one is
        always written (when the interval is up, or when the attempt ends).
        """
        if self._reporter is None:
            subject = topology.report_subject(self._client.namespace, self.task_id)
            self._reporter = Reporter(self._client.nc, subject, self.attempt)
        await self._reporter.report(done, total, note)

    async def enqueue(
        self,
        task: Task[R],
        *,
        key: str | None = None,
        delay: float | None = None,
        priority: str | None = None,
    ) -> TaskRun[R]:
        """Enqueue a follow-up task through the worker's connection."""
        return await self._client.enqueue(task, key=key, delay=delay, priority=priority)

    async def publish(self, event: Event) -> str:
        """Publish an event to every subscriber group; returns its id."""
        return await self._client.publish(event)

    async def previous(self, model: type[Task[R]]) -> R:
        """In a flow, the result of the step before this one, which is a `model` task (or a
        chain ending in one): `total = await ctx.previous(Sum)`, typed as Sum's result.

        Raises `ConfigError` outside a flow, for a first step, or when the step before is
        a group (read that with `members`) or another task.
        """
        value: R = await before(self._client, self._headers, self.task_id, model, False)
        return value

    @overload
    async def members(self) -> list[Any]: ...
    @overload
    async def members(self, model: type[Task[R]]) -> list[R]: ...
    async def members(self, model: type[Task[Any]] | None = None) -> list[Any]:
        """In a flow, the results of the group before this step (a chord's callback reads
        its members' this way), in member order: typed as `model`'s result, each member
        being a `model` task (or a chain ending in one); untyped without `model`.

        Raises `ConfigError` outside a flow, or when what comes before is not a group.
        """
        values: list[Any] = await before(self._client, self._headers, self.task_id, model, True)
        return values

    @property
    def client(self) -> Client:
        """The worker's client, for anything else a handler needs from the broker."""
        return self._client
