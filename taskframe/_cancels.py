"""Cancel requests: stored by `Client.cancel`, watched by every worker.

A request is a message on `<ns>.cancel.<id>` in the stream `TF_<ns>_CANCEL`, kept
`result_ttl` (as long as a task's status record). It is the broker's word for it, so a
worker started later still sees it: each worker reads the stream with an ordered consumer
from its start and then as requests arrive, and keeps the ids in memory. Before an
attempt runs, its id is looked up there (no broker round trip on the default path); an
attempt running when its request arrives is stopped at once (`Watchdog.cancel`).

The client also removes what it can itself: the schedule of a delayed task, the message
of a waiting one, and it writes the task's final `cancelled` record unless the task
already has a final one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import APIError, NotFoundError

from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._publish import publish_stored
from taskframe._queues import queue_streams
from taskframe._results import TaskState, status_record
from taskframe._retry import answered
from taskframe.errors import PublishError, StreamMissingError
from taskframe.provision import ensure_stream

if TYPE_CHECKING:
    from taskframe.client import Client

log = logging.getLogger("taskframe.cancel")
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"


class Cancels:
    """The ids of a namespace's cancelled tasks, as one worker knows them.

    Args:
        client: the worker's client.
        on_cancel: called with each id as its request arrives (stops its running attempt).
    """

    def __init__(self, client: Client, on_cancel: Callable[[str], object]) -> None:
        self._client = client
        self._on_cancel = on_cancel
        self.ids: dict[str, float] = {}
        """The cancelled ids, each with when its request arrived, oldest first."""
        self._ttl = client.settings.result_ttl
        self._prefix = topology.cancel_subject(client.namespace, "")
        self._caught_up = asyncio.Event()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Read the stored requests, then go on hearing new ones.

        Returns once the stored ones are read (or after `publish_timeout`, with a warning),
        so a task cancelled before this worker started is not run by it.
        """
        js, stream = self._client.js, topology.cancels_stream(self._client.namespace)
        if self._sub is None:
            info = await answered(f"stream {stream}", js.stream_info, stream)
            if not info.state.messages:
                self._caught_up.set()
            self._sub = await answered(
                f"cancel requests of {stream}",
                js.subscribe,
                f"{self._prefix}>",
                stream=stream,
                ordered_consumer=True,
                cb=self._heard,
            )
        try:
            await asyncio.wait_for(self._caught_up.wait(), self._client.settings.publish_timeout)
        except TimeoutError:
            log.warning("stored cancel requests not all read yet; reading them on")

    async def stop(self) -> None:
        """Stop hearing requests."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _heard(self, msg: Msg) -> None:
        task_id = msg.subject.removeprefix(self._prefix)
        now = time.monotonic()
        self.ids.pop(task_id, None)
        self.ids[task_id] = now
        expired = []  # with their stored requests: the oldest come first
        for old, at in self.ids.items():
            if at + self._ttl > now:
                break
            expired.append(old)
        for old in expired:
            del self.ids[old]
        self._on_cancel(task_id)
        if wire.delivery(msg.reply)[2] == 0:
            self._caught_up.set()


async def request_cancel(client: Client, task_id: str) -> bool:
    """What `Client.cancel` does: see there."""
    status = await client.status(task_id)
    if status is not None and status.state.final:
        return False
    name = status.task if status else await _remove_waiting(client, task_id)
    if name is None:
        return False
    subject = topology.cancel_subject(client.namespace, task_id)
    headers = {wire.MSG_ID: f"cancel-{task_id}"}
    try:
        await publish_stored(client.nc, client.settings, subject, b"", headers)
    except StreamMissingError:
        await ensure_stream(client.js, configs.cancels_config(client.settings))
        await publish_stored(client.nc, client.settings, subject, b"", headers)
    return await _record_cancelled(client, task_id, name, status.attempt if status else 0)


async def _record_cancelled(client: Client, task_id: str, name: str, attempt: int) -> bool:
    """Write the `cancelled` record unless a final one exists; False if one does (the task
    finished meanwhile: its record stays)."""
    record = status_record(task_id, name, TaskState.CANCELLED, attempt)
    subject = topology.result_subject(client.namespace, task_id)
    headers = {_EXPECTED_LAST: "0"}
    try:
        try:
            await publish_stored(client.nc, client.settings, subject, record, headers)
        except StreamMissingError:  # no worker has provisioned the namespace yet
            await ensure_stream(client.js, configs.results_config(client.settings))
            await publish_stored(client.nc, client.settings, subject, record, headers)
    except PublishError as exc:
        now = await client.status(task_id)
        if now is not None and now.state.final:
            return now.state is TaskState.CANCELLED
        raise PublishError(f"cancelled record of {task_id} not stored: {exc}") from exc
    return True


async def _remove_waiting(client: Client, task_id: str) -> str | None:
    """Delete the schedule of a delayed `task_id`, or its waiting message, and return its
    task name; None if the namespace's queues hold neither (it never existed, or it
    finished without a record).

    A waiting task is found by reading its queue's messages one by one, so this costs
    one request per task waiting ahead of it: it runs only for a task with no record.
    """
    js, ns = client.js, client.namespace
    for _, queue, info in await queue_streams(js, ns):
        stream = info.config.name
        assert stream is not None
        try:
            msg = await js.get_last_msg(stream, wire.once_subject(ns, queue, task_id))
        except NotFoundError:
            pass
        else:
            await _delete(client, stream, msg.seq)
            target = (msg.headers or {}).get(wire.SCHEDULE_TARGET, "")
            return _task_name(target)
        seq, tasks = info.state.first_seq, f"{ns}.tasks.{queue}.>"
        while seq <= info.state.last_seq:
            try:
                msg = await js.get_msg(stream, seq, subject=tasks, next=True)
            except NotFoundError:
                break
            if msg.seq is None:
                break
            if wire.message_id(msg.headers, "") == task_id:
                await _delete(client, stream, msg.seq)
                return _task_name(msg.subject or "")
            seq = msg.seq + 1
    return None


def _task_name(subject: str) -> str:
    """The task name in a task subject `<ns>.tasks.<queue>.<Task>[.<lane>]`."""
    tokens = subject.split(".")
    return tokens[3] if len(tokens) > 3 else ""


async def _delete(client: Client, stream: str, seq: int | None) -> None:
    """Delete a cancelled task's message; one already gone (it ran meanwhile) is fine."""
    if seq is None:
        return
    with contextlib.suppress(NotFoundError):
        try:
            await client.js.delete_msg(stream, seq)
        except APIError as exc:
            log.debug("message %d of %s not deleted: %s", seq, stream, exc)
