"""Waiting for a task's final status: what `TaskRun.result()` does."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client as NATS

from taskframe import _topology as topology
from taskframe._payloads import encoded
from taskframe._results import TaskStatus, parse_record
from taskframe.errors import ConnectError, ResultTimeoutError

log = logging.getLogger("taskframe.client")

_POLL = 2.0  # seconds between re-reads while waiting, in case a status update was missed


async def wait_final(
    nc: NATS,
    namespace: str,
    task_id: str,
    timeout: float | None,
    read: Callable[[str], Awaitable[TaskStatus | None]],
) -> TaskStatus:
    """Wait until `task_id` reaches a final state and return that status.

    Listens for the final record as it is stored, and re-reads it with `read` every few
    seconds in case an update was missed. A waiter outlives a leader election or a lost
    quorum: it keeps waiting (its timeout still applies) instead of failing on a read that
    will work again.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    # Subscribe before reading, so an update between the read and the wait is not missed.
    sub = await nc.subscribe(topology.result_subject(namespace, task_id))
    try:
        status = await _reread(read, task_id, None)
        while status is None or not status.state.final:
            remaining = _POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise ResultTimeoutError(f"task {task_id} did not finish within {timeout}s")
            try:
                msg = await sub.next_msg(timeout=min(_POLL, remaining))
            except nats.errors.TimeoutError:
                status = await _reread(read, task_id, status)
                continue
            if encoded(msg.headers):  # compressed, or in the payloads bucket
                status = await _reread(read, task_id, status)
            elif msg.data:
                status = parse_record(msg.data)
        return status
    finally:
        await sub.unsubscribe()


async def _reread(
    read: Callable[[str], Awaitable[TaskStatus | None]], task_id: str, known: TaskStatus | None
) -> TaskStatus | None:
    """The status of `task_id`, or `known` while JetStream does not answer."""
    try:
        return await read(task_id)
    except ConnectError as exc:
        log.info("cannot read the status of %s yet: %s", task_id, exc)
        return known
