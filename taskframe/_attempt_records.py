"""Attempts counted by the records they left, not by the server's delivery count.

A consumer leader that lost its quorum goes on counting deliveries that reach no worker
(docs/server-behaviour.md), so a delivery past `max_attempts` is buried as `lost` only if
the task's records show that its last allowed attempt really started.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from taskframe import _topology as topology
from taskframe._leases import Lease
from taskframe._publish import publish_stored
from taskframe._pull import Route
from taskframe._results import ErrorInfo, TaskState, read_status, status_record
from taskframe.errors import TaskframeError
from taskframe.hooks import AttemptInfo, Outcome
from taskframe.settle import Settler

if TYPE_CHECKING:
    from taskframe.app import Handler
    from taskframe.client import Client

log = logging.getLogger("taskframe.worker")


class AttemptRecords:
    """Attempt accounting for over-delivered tasks: the `running` records redeliveries
    store before they run, and what a delivery past `max_attempts` becomes."""

    def __init__(self, client: Client, settler: Settler) -> None:
        self._client = client
        self._settler = settler

    async def spent(
        self,
        lease: Lease,
        route: Route,
        handler: Handler[Any],
        task_id: str,
        attempt: int,
        seen: AttemptInfo | None,
    ) -> Outcome | None:
        """A delivery past `max_attempts`: bury it as lost if its last allowed attempt
        started (or ack it if it succeeded); None if it never got that far, and runs now."""
        name = handler.name
        started = await self._last_started(lease, task_id, attempt)
        if started is None:
            return "succeeded"  # acked: its final record says it succeeded
        if started >= handler.max_attempts:
            error = ErrorInfo(
                type="AttemptsExhausted",
                message=f"delivered {attempt} times; its attempt {started} never finished "
                "(worker crashed, timed out or was cut off)",
            )
            keeps = handler.keeps_result
            if seen is not None:
                seen.reason = "lost"
            return await self._settler.bury(
                lease, route, name, task_id, attempt - 1, "lost", error, keeps
            )
        log.warning(
            "%s %s delivered %d times, but its last attempt to start was %s: running it",
            name,
            task_id,
            attempt,
            started or "none",
            extra=lease.fields,
        )
        return None

    async def mark_started(self, task_id: str, name: str, attempt: int) -> bool:
        """Store a `running` record before a redelivery runs: what `spent` reads.
        False if it could not be stored.

        A first delivery writes none (the fast path); a task that crashes its worker on
        every delivery is then buried after `max_attempts` runs, or 2 if that is 1.
        """
        record = status_record(task_id, name, TaskState.RUNNING, attempt)
        subject = topology.progress_subject(self._client.namespace, task_id)
        try:
            await publish_stored(self._client.nc, self._client.settings, subject, record)
        except TaskframeError as exc:  # runs all the same; a crash now leaves no trace
            log.warning("start of %s attempt %d not recorded: %s", task_id, attempt, exc)
            return False
        return True

    async def _last_started(self, lease: Lease, task_id: str, attempt: int) -> int | None:
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
            return attempt
        if status is None:
            return 0
        if status.state is TaskState.SUCCEEDED:
            await self._settler.succeeded(lease, task_id, None, skipped=True)
            return None
        return status.attempt
