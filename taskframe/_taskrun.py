"""A handle on one enqueued task: what `Client.enqueue` returns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

from pydantic import TypeAdapter

from taskframe._results import Progress, TaskState, TaskStatus
from taskframe.errors import ConfigError, TaskCancelledError, TaskFailed

if TYPE_CHECKING:
    from taskframe.client import Client

R = TypeVar("R")


class TaskRun(Generic[R]):
    """A handle on one enqueued task: its id, its status, and its result when it has one."""

    __slots__ = ("_adapter", "_client", "duplicate", "id", "keeps_result", "task")

    def __init__(
        self,
        client: Client,
        task_id: str,
        task: str,
        adapter: TypeAdapter[R],
        *,
        keeps_result: bool = True,
        duplicate: bool = False,
    ) -> None:
        self._client = client
        self._adapter = adapter
        self.id = task_id
        self.task = task
        self.keeps_result = keeps_result
        self.duplicate = duplicate
        """True when the enqueue carried a key already enqueued within the duplicate window."""

    def __repr__(self) -> str:
        dup = " duplicate" if self.duplicate else ""
        return f"<TaskRun {self.task} id={self.id}{dup}>"

    async def status(self) -> TaskStatus:
        """The task's latest status; `queued` until a worker picks it up."""
        status = await self._client.status(self.id)
        return status or TaskStatus(id=self.id, task=self.task, state=TaskState.QUEUED)

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the task to finish and return its typed result.

        Raises `TaskFailed` if the task ended dead, `TaskCancelledError` (a `TaskFailed`)
        if it was cancelled, `ResultTimeoutError` if it did not finish within `timeout`
        seconds (it may still finish later).
        """
        if not self.keeps_result:
            raise ConfigError(f"{self.task} is declared with results=False: no result is stored")
        status = await self._client.wait(self.id, timeout)
        if status.state is TaskState.CANCELLED:
            raise TaskCancelledError(self.id, status.attempt)
        if status.state is TaskState.DEAD:
            error = status.error
            raise TaskFailed(
                self.id,
                error.type if error else "Unknown",
                error.message if error else "",
                status.attempt,
                status.state.value,
            )
        return self._adapter.validate_python(status.result)

    async def progress(self) -> Progress | None:
        """The last progress the task reported (`Context.progress`), or None if none."""
        return await self._client.progress(self.id)

    async def cancel(self) -> bool:
        """Cancel the task (see `Client.cancel`); False if it already finished."""
        return await self._client.cancel(self.id)
