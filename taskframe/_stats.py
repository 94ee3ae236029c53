"""The counts a worker keeps of what it settled (`Worker.stats`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerStats:
    """Counts of settled messages since the worker started."""

    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    lost: int = 0
    skipped: int = 0
    """Exactly-once tasks acked without running because they had completed before."""
    cancelled: int = 0  # on request (`Client.cancel`): stopped while running, or never run
    running: int = 0
    started: int = 0
    """Attempts started (tasks and events), whatever their outcome."""
    confirming: int = 0
    """Tasks done whose ack waits for the server to confirm storing their status record."""
