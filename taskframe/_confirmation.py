"""A task's record sent and its message held until the record is confirmed stored."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

from taskframe._flow_steps import Step
from taskframe._leases import Lease
from taskframe._publish import TRANSIENT, unavailable
from taskframe._retry import RECORD_RETRY
from taskframe.errors import PublishError

if TYPE_CHECKING:
    from taskframe.settle import Settler

log = logging.getLogger("taskframe.worker")


class Confirmation:
    """A task's record sent, its message held until the server confirms storing it.

    Called by the publisher with the outcome, in the read loop as it is read: once
    stored, the message is acked if the lease still holds, counted and released; refused
    or not confirmed within `publish_timeout`, it goes down the awaited path in a task of
    its own. So a task is still acked only after its own record was confirmed stored. A flow's
    step does its part of its flow first, in a task of its own (`Settler.joined`).
    """

    __slots__ = ("lease", "record", "settler", "skipped", "slow", "step", "task_id", "token")

    def __init__(
        self,
        settler: Settler,
        lease: Lease,
        task_id: str,
        record: bytes,
        skipped: bool,
        step: Step | None = None,
    ) -> None:
        self.settler = settler
        self.lease = lease
        self.task_id = task_id
        self.record = record
        self.skipped = skipped
        self.token = 0
        """What `Publisher.forget` takes: it stops waiting for the confirmation."""
        self.slow: asyncio.Task[None] | None = None
        self.step = step
        """The flow and step, for a flow's step: its join comes before its ack."""

    def __call__(self, error: BaseException | None) -> None:
        settler = self.settler
        if self not in settler._confirmations:
            return  # handed back meanwhile
        if error is not None:
            tried = 0
            if isinstance(error, TRANSIENT):  # as publish_stored counts an unanswered attempt
                tried = 1
                log.warning("no confirmation for the record of %s (attempt 1)", self.task_id)
            self.slow = asyncio.create_task(self._slowly(tried), name="taskframe-confirm")
            return
        if self.step is not None:
            self.slow = asyncio.create_task(settler.joined(self), name="taskframe-join")
            return
        self._acked()

    def _acked(self) -> None:
        """Ack the message of a record confirmed stored (unless its lease was lost), count
        it and release it: every task that keeps its result comes here."""
        settler, lease = self.settler, self.lease
        try:
            if settler.ack_now(lease):
                settler.count(self.skipped)
        except Exception as exc:  # cut off: the message is redelivered after ack_wait
            log.warning("ack of %s not sent: %r; it will be redelivered", self.task_id, exc)
        finally:
            settler.done(self)

    async def _slowly(self, tried: int) -> None:
        """The awaited path for a record refused or not confirmed in time: `publish_stored`
        (which retries what went unanswered, `tried` times already), then the ack; acks
        first in a full store.

        A record the broker cannot store now (its stream has no leader: a cluster electing
        one, or short of its quorum) is tried again for as long as the lease holds, since
        the keeper renews it: the work is done, and leaving the message to redelivery would
        run the handler again and spend an attempt each ack_wait, until a task that
        succeeded every time was buried as lost.
        """
        settler, lease = self.settler, self.lease
        try:
            for waited in itertools.count(1):
                try:
                    stored = await settler._store_and_ack(
                        lease, self.task_id, self.record, tried, self.step
                    )
                    if stored:
                        settler.count(self.skipped)
                    return
                except PublishError as exc:
                    if not unavailable(exc) or not await self._held_while_away(waited, exc):
                        raise
                    tried = 0
        except Exception:
            log.exception("message on %s not settled; it will be redelivered", lease.msg.subject)
        finally:
            settler.done(self)

    async def _held_while_away(self, waited: int, exc: Exception) -> bool:
        """Wait to store a record again; False if the lease ran out or the worker stops."""
        lease, stopping = self.lease, self.settler.stopping
        delay = min(self.settler.ack_wait / 3, RECORD_RETRY.delay(waited))
        log.warning(
            "status record of %s not stored (%s); trying again in %.1fs, holding the task",
            lease.msg.subject,
            exc,
            delay,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        return not stopping.is_set() and lease.valid()
