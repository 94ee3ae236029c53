"""A task's record sent and its message held until the record is confirmed stored."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from taskframe._flow_steps import Step
from taskframe._leases import Lease
from taskframe._publish import TRANSIENT

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
        self.token = ""
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
            self.slow = asyncio.create_task(
                settler._confirm_slowly(self, tried), name="taskframe-confirm"
            )
            return
        if self.step is not None:
            self.slow = asyncio.create_task(settler.joined(self), name="taskframe-join")
            return
        try:
            if settler.ack_now(self.lease):
                settler._count(self.skipped)
        except Exception as exc:  # cut off: the message is redelivered after ack_wait
            log.warning("ack of %s not sent: %r; it will be redelivered", self.task_id, exc)
        finally:
            settler._done(self)
