"""Leases: the messages a worker holds, kept alive until they are settled or lost.

JetStream redelivers a message whose ack does not come within `ack_wait`, and it honours a
stale ack from the worker it took the message from. So a worker may settle a message only
while it can prove, from its own clock, that the server has not yet given the message to
another worker. A lease is that proof, fenced by the server's answers, never by a send:

- a delivery's lease starts when the pull request it answers was sent (the server cannot
  have delivered it earlier), so a delivery that sat in a socket buffer arrives with its
  lease already spent and is dropped;
- a renewal (`+WPI`) extends the lease only when the server confirms it, and only from when
  it was sent: a renewal written into a dead socket extends nothing.

So a worker cut off from its server, paused, or with its loop blocked, runs out of lease
on its own clock before the server redelivers, and then settles nothing: no ack, no nak,
no status written. docs/guarantees.md spells out the argument.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from taskframe import _logs as _logs
from taskframe import _wire as wire
from taskframe._claims import Claim

if TYPE_CHECKING:
    from taskframe._credit import Credit

log = logging.getLogger("taskframe.worker")


@dataclass(slots=True)
class Lease:
    """A held message, until when the server still counts it as ours, and its claim if any."""

    msg: Msg
    expires: float
    key: str = ""
    """The message's stream and sequence: the same for every delivery of it."""
    attempt: int = 0
    """The delivery's number: 1 for the first."""
    sequence: int = 0
    """The message's stream sequence."""
    credit: Credit | None = field(default=None, repr=False)
    """The credit the message holds, returned (once) when the lease is released."""
    lost: bool = False
    started: bool = False
    claim: Claim | None = None
    running: tuple[str, str, int] | None = None
    """The attempt's task id, task name and attempt number while a `running` status is still
    to be written: written if the attempt still runs at the keeper's next round."""
    renewing: asyncio.Task[None] | None = field(default=None, repr=False)
    confirming: bool = False
    """Its attempt has ended; its ack waits for the confirmation of its status record."""
    settled: bool = False
    """An ack, nak or term was sent for it."""
    about: tuple[str, str, int, str | None, str | None] | None = None
    """Its task's name, id, attempt, queue and group, once its attempt read them."""

    @property
    def fields(self) -> dict[str, Any] | None:
        """Its task's log fields (`_logs.task_fields`), built when a record needs them: most
        tasks log nothing, and the default path does not pay for them."""
        if self.about is None:
            return None
        name, task_id, attempt, queue, group = self.about
        trace = _logs.trace_id(self.msg.headers)
        return _logs.task_fields(name, task_id, attempt, queue=queue, group=group, trace=trace)

    def valid(self) -> bool:
        """Whether the message is still ours to settle."""
        return not self.lost and time.monotonic() < self.expires


class Leases:
    """Every lease a worker holds, and the loop that renews them.

    Args:
        nc: the worker's connection (renewals are requests the server answers).
        ack_wait: the consumers' ack_wait, in seconds.
        on_stall: called when the loop stood still longer than `ack_wait`; every lease was
            dropped, and deliveries still on their way are stale.
        write_running: writes a `running` status record (task id, task name, attempt); the
            record is built then, for the few attempts that run that long.
        on_lost: called once for each lease given up.

    `renew_claim`, when set, extends an exactly-once claim along with its message's lease.
    """

    def __init__(
        self,
        nc: NATS,
        ack_wait: float,
        on_stall: Callable[[], None],
        write_running: Callable[[str, str, int], Awaitable[None]],
        on_lost: Callable[[], None],
    ) -> None:
        self.ack_wait = ack_wait
        self._nc = nc
        self._on_stall = on_stall
        self._on_lost = on_lost
        self._write_running = write_running
        self.renew_claim: Callable[[Claim], Awaitable[bool]] | None = None
        self._held: dict[int, Lease] = {}
        self._started: dict[str, Lease] = {}  # attempts running here, by message
        self._awake = time.monotonic()  # when the keeper last ran

    def __len__(self) -> int:
        return len(self._held)

    def take(self, msg: Msg, since: float, credit: Credit | None = None) -> Lease | None:
        """Lease a just-delivered message whose pull request was sent at `since`.

        The lease holds `credit` until it is released; without a lease, the caller returns it.

        None if the delivery must not be run: it may already be stale (dropped unsettled;
        the server redelivers it), or it is a redelivery of a message whose attempt still
        runs here, which then carries on under this delivery.
        """
        now = time.monotonic()
        if now - self._awake > self.ack_wait:
            # The loop has not run for longer than a lease (the process was stopped, or a
            # handler blocked the loop): this delivery may have gone to another worker
            # already. The keeper starts over when it wakes.
            return None
        expires = since + self.ack_wait
        if expires <= now:
            log.warning("delivery on %s arrived after its lease: left to redelivery", msg.subject)
            return None
        key, attempt, sequence = wire.delivered(msg.reply)
        running = self._started.get(key)
        if running is not None:
            self._adopt(running, msg, expires, attempt)
            return None
        lease = self._held[id(msg)] = Lease(msg, expires, key, attempt, sequence, credit)
        return lease

    def _adopt(self, lease: Lease, msg: Msg, expires: float, attempt: int) -> None:
        """Carry on a running attempt under a new delivery of its message.

        The server redelivered it because this worker lost the lease (cut off or stalled),
        yet the attempt still runs here: running it twice, or burying it as lost while it
        runs, would be wrong. The attempt settles with the new delivery instead.
        """
        self._held.pop(id(lease.msg), None)
        lease.msg, lease.expires, lease.lost, lease.attempt = msg, expires, False, attempt
        self._held[id(msg)] = lease
        log.info(
            "redelivery of %s, whose attempt still runs here: the attempt carries on",
            msg.subject,
        )

    def start(self, lease: Lease) -> None:
        """The lease's attempt begins: a redelivery of its message is adopted, not run."""
        lease.started = True
        self._started[lease.key] = lease

    def release(self, lease: Lease) -> None:
        """Stop renewing `lease` and return its credit: its message was settled (or given up).

        Releasing it again does nothing.
        """
        if lease.credit is not None:
            credit, lease.credit = lease.credit, None
            credit.finished(lease.confirming)
        lease.confirming = False
        self._held.pop(id(lease.msg), None)
        if lease.started and self._started.get(lease.key) is lease:
            del self._started[lease.key]
        if lease.renewing is not None:
            lease.renewing.cancel()

    def still_ours(self, lease: Lease) -> bool:
        """Whether `lease` is valid; if not, count it lost (once) and say so."""
        if lease.valid():
            return True
        self._give_up(lease, "lease on %s lost: leaving it to its new owner")
        return False

    def _give_up(self, lease: Lease, message: str) -> None:
        if not lease.lost:
            lease.lost = True
            self._on_lost()
            log.warning(message, lease.msg.subject, extra=lease.fields)

    async def renew(self, lease: Lease) -> None:
        """Extend the lease if the server confirms in time; extend its claim too.

        The new lease runs from when the renewal was sent, and only a confirmation that
        arrives while the old lease still holds counts: the server then got the renewal
        before it could have redelivered the message.
        """
        if not lease.valid():
            return
        msg, sent = lease.msg, time.monotonic()
        try:
            await self._nc.request(msg.reply, b"+WPI", timeout=lease.expires - sent)
        except Exception as exc:  # no answer in time: the lease runs out unless a later one
            log.debug("lease on %s not renewed: %r", msg.subject, exc)
            return
        if lease.msg is not msg or not lease.valid():
            return
        lease.expires = max(lease.expires, sent + self.ack_wait)
        if lease.claim is not None and self.renew_claim is not None:
            await self.renew_claim(lease.claim)

    def _renew_soon(self, lease: Lease) -> None:
        """Renew in the background: a renewal waits for the server, the keeper must not."""
        if lease.renewing is None or lease.renewing.done():
            lease.renewing = asyncio.create_task(self.renew(lease), name="taskframe-renew")

    async def keep(self) -> None:
        """Renew what needs renewing, forever; give up what expired."""
        period = self.ack_wait / 3
        try:
            while True:
                await asyncio.sleep(period / 2)
                await self._round(period)
        finally:
            for lease in self._held.values():
                if lease.renewing is not None:
                    lease.renewing.cancel()

    async def _round(self, period: float) -> None:
        now = time.monotonic()
        if now - self._awake > self.ack_wait:
            self._stalled(now - self._awake)
        self._awake = now
        for lease in list(self._held.values()):
            if now >= lease.expires:
                self._held.pop(id(lease.msg), None)
                self._give_up(
                    lease,
                    "lease on %s expired (worker paused or cut off): another worker "
                    "owns it now; it will not be settled here",
                )
                continue
            if lease.running is not None:
                running, lease.running = lease.running, None
                await self._write_running(*running)
            if lease.expires - now < self.ack_wait - period:
                self._renew_soon(lease)

    def _stalled(self, asleep: float) -> None:
        log.warning(
            "worker was stalled for %.1fs, longer than its lease (ack_wait %.1fs): dropping "
            "%d held task(s) unsettled and asking the server afresh",
            asleep,
            self.ack_wait,
            len(self._held),
        )
        for lease in self._held.values():
            if not lease.lost:
                lease.lost = True
                self._on_lost()
        self._held.clear()
        self._on_stall()
