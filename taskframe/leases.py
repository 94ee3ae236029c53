"""Leases: the messages a worker holds, kept alive until they are settled or lost.

JetStream redelivers a message whose ack does not come within `ack_wait`, and it honours a
stale ack or `in_progress()` from the worker it took the message from. So a worker renews
every message it holds with `in_progress()` every third of `ack_wait`, and once it cannot
be sure the server still counts a message as its own (the process was stopped, the loop
was blocked, the connection was down past the deadline), it leaves the message alone:
no ack, no nak, no status written. The server has given it to another worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from taskframe.claims import Claim

log = logging.getLogger("taskframe.worker")


@dataclass(slots=True)
class Lease:
    """A held message, until when the server still counts it as ours, and its claim if any."""

    msg: Msg
    expires: float
    lost: bool = False
    claim: Claim | None = None
    running: tuple[str, bytes] | None = None
    """A `running` status to write if the attempt is still running at the next renewal."""

    def valid(self) -> bool:
        """Whether the message is still ours to settle."""
        return not self.lost and time.monotonic() < self.expires


class Leases:
    """Every lease a worker holds, and the loop that renews them.

    Args:
        ack_wait: the consumers' ack_wait, in seconds.
        on_stall: called when the loop stood still longer than `ack_wait`; every lease was
            dropped, and deliveries still on their way are stale.
        write_running: writes a `running` status record (task id, record).
        on_lost: called once for each lease given up.

    `renew_claim`, when set, extends an exactly-once claim along with its message's lease.
    """

    def __init__(
        self,
        ack_wait: float,
        on_stall: Callable[[], None],
        write_running: Callable[[str, bytes], Awaitable[None]],
        on_lost: Callable[[], None],
    ) -> None:
        self.ack_wait = ack_wait
        self._on_stall = on_stall
        self._on_lost = on_lost
        self._write_running = write_running
        self.renew_claim: Callable[[Claim], Awaitable[bool]] | None = None
        self._held: dict[int, Lease] = {}
        self._awake = time.monotonic()  # when the keeper last ran

    def __len__(self) -> int:
        return len(self._held)

    def take(self, msg: Msg) -> Lease | None:
        """Lease a just-delivered message; None if the delivery may already be stale."""
        now = time.monotonic()
        if now - self._awake > self.ack_wait:
            # The loop has not run for longer than a lease (the process was stopped, or a
            # handler blocked the loop): this delivery may have gone to another worker
            # already. The keeper starts over when it wakes.
            return None
        lease = self._held[id(msg)] = Lease(msg, now + self.ack_wait)
        return lease

    def release(self, lease: Lease) -> None:
        """Stop renewing `lease`: its message was settled (or given up)."""
        self._held.pop(id(lease.msg), None)

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
            log.warning(message, lease.msg.subject)

    async def renew(self, lease: Lease) -> None:
        """Tell the server the message is still being worked on; extend its claim too."""
        if not lease.valid():
            return
        try:
            await lease.msg.in_progress()
        except Exception as exc:  # disconnected: the lease runs out unless we reconnect in time
            log.debug("heartbeat not sent: %r", exc)
            return
        lease.expires = time.monotonic() + self.ack_wait
        if lease.claim is not None and self.renew_claim is not None:
            await self.renew_claim(lease.claim)

    async def keep(self) -> None:
        """Renew what needs renewing, forever; give up what expired."""
        period = self.ack_wait / 3
        while True:
            await asyncio.sleep(period / 2)
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
                    task_id, record = lease.running
                    lease.running = None
                    await self._write_running(task_id, record)
                if lease.expires - now < self.ack_wait - period:
                    await self.renew(lease)

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
