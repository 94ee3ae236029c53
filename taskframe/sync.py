"""The producer side for sync code: Django or Flask views, scripts, thread pools.

    import taskframe.sync

    tf = taskframe.sync.connect("nats://127.0.0.1:4222", namespace="media")
    run = tf.enqueue(ResizeImage(url=u))
    path = run.result(timeout=30)

One `SyncClient` runs one event loop in a daemon thread with one connection; every call
from any thread is handed to that loop and waits for its answer, so one client per
process is shared by all threads. It closes at interpreter exit, or with `close()` /
`with`.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Coroutine, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from taskframe._results import Progress, TaskStatus
from taskframe._taskrun import TaskRun
from taskframe.client import Client
from taskframe.client import connect as async_connect
from taskframe.errors import ConnectError
from taskframe.models import Event, Task

__all__ = ["SyncClient", "SyncTaskRun", "connect"]

R = TypeVar("R")
T = TypeVar("T")


class SyncTaskRun(Generic[R]):
    """A handle on one enqueued task, for sync code (what `SyncClient.enqueue` returns)."""

    __slots__ = ("_client", "_run")

    def __init__(self, client: SyncClient, run: TaskRun[R]) -> None:
        self._client = client
        self._run = run

    def __repr__(self) -> str:
        return repr(self._run).replace("<TaskRun", "<SyncTaskRun", 1)

    @property
    def id(self) -> str:
        """The task's id."""
        return self._run.id

    @property
    def duplicate(self) -> bool:
        """True when the enqueue carried a key already enqueued within the window."""
        return self._run.duplicate

    def status(self) -> TaskStatus:
        """The task's latest status; `queued` until a worker picks it up."""
        return self._client._call(self._run.status())

    def result(self, timeout: float | None = None) -> R:
        """Wait for the task to finish and return its typed result (see `TaskRun.result`)."""
        return self._client._call(self._run.result(timeout))

    def cancel(self) -> bool:
        """Cancel the task (see `Client.cancel`); False if it already finished."""
        return self._client._call(self._run.cancel())


class SyncClient:
    """A `Client` for sync code, safe to share between threads.

    Construct with `taskframe.sync.connect(...)`: it connects at once (raising what
    `Client.open` raises) and stays connected until `close()` or interpreter exit.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return repr(self._client).replace("<Client", "<SyncClient", 1)

    @property
    def namespace(self) -> str:
        """The namespace every subject and stream of this client lives in."""
        return self._client.namespace

    def open(self) -> Self:
        """Start the loop thread and connect; called by `connect`."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="taskframe-sync", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._client.open())
        except BaseException:
            self._closed = True
            self._stop_loop()
            raise
        atexit.register(self.close)
        return self

    def close(self) -> None:
        """Close the connection (flushing what was sent) and stop the loop thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        if self._loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result()
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        if self._closed or self._loop is None:
            work.close()
            raise ConnectError("the sync client is closed (or not opened: use sync.connect)")
        if threading.current_thread() is self._thread:
            work.close()
            raise ConnectError("a SyncClient cannot be called from its own loop (use Client)")
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def enqueue(
        self,
        task: Task[R],
        *,
        key: str | None = None,
        delay: float | None = None,
        at: datetime | None = None,
        priority: str | None = None,
    ) -> SyncTaskRun[R]:
        """Store `task` in its queue and return a handle on it (see `Client.enqueue`)."""
        work = self._client.enqueue(task, key=key, delay=delay, at=at, priority=priority)
        return SyncTaskRun(self, self._call(work))

    def enqueue_many(
        self, tasks: Iterable[Task[Any]], *, priority: str | None = None
    ) -> list[SyncTaskRun[Any]]:
        """Store many tasks, pipelined, and return their handles (see `Client.enqueue_many`)."""
        runs = self._call(self._client.enqueue_many(list(tasks), priority=priority))
        return [SyncTaskRun(self, run) for run in runs]

    def publish(self, event: Event) -> str:
        """Publish `event` to every subscriber group and return its id."""
        return self._call(self._client.publish(event))

    def status(self, task_id: str) -> TaskStatus | None:
        """The latest status record of `task_id`, or None (see `Client.status`)."""
        return self._call(self._client.status(task_id))

    def progress(self, task_id: str) -> Progress | None:
        """The last progress `task_id` reported, or None."""
        return self._call(self._client.progress(task_id))

    def cancel(self, task_id: str) -> bool:
        """Cancel task `task_id` (see `Client.cancel`)."""
        return self._call(self._client.cancel(task_id))

    def handle(self, model: type[Task[R]], task_id: str) -> SyncTaskRun[R]:
        """A handle on an already enqueued task of `model`, from its id."""
        return SyncTaskRun(self, self._client.handle(model, task_id))


def connect(
    url: str | Sequence[str] | None = None,
    *,
    namespace: str | None = None,
    **settings: Any,
) -> SyncClient:
    """A connected `SyncClient` for `namespace` at `url` (arguments as `taskframe.connect`)."""
    return SyncClient(async_connect(url, namespace=namespace, **settings)).open()
