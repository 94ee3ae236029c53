"""How long to wait before the next attempt of a failed task."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter over the upper half of each step.

    The delay after attempt `n` (1-based) is drawn from [d/2, d] where
    d = min(maximum, initial * factor ** (n - 1)). The jitter spreads retries of tasks
    that failed together (say, on a database restart) so they do not return together.
    """

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the failed attempt number `attempt` (1-based)."""
        step = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return random.uniform(step / 2, step)


DEFAULT_BACKOFF = Backoff()
# Between a worker's tries while its server, or JetStream, is not there yet.
UNTIL_AVAILABLE = Backoff(maximum=10.0)
