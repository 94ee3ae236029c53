"""When to try again: a failed task's backoff, and JetStream API calls that went unanswered."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import nats.errors
from nats.js.errors import ServiceUnavailableError

from taskframe.errors import ConnectError

T = TypeVar("T")
P = ParamSpec("P")
_API_ATTEMPTS = 4


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
# Between tries to store a status record whose stream has no leader yet.
RECORD_RETRY = Backoff(initial=0.1, maximum=2.0)


async def answered(
    what: str, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
) -> T:
    """`call(*args, **kwargs)`, again when JetStream does not answer (a cluster electing a leader).

    In a cluster, a request about a stream that another client is creating at this
    moment, or whose leader is being elected, goes unanswered, or is answered 503
    "JetStream system temporarily unavailable", until the leader is in place: a few
    seconds at most, so a few tries bridge it. A cluster that lost its quorum stays
    unavailable: that ends in `ConnectError`, never in a raw nats-py error.
    """
    for attempt in range(_API_ATTEMPTS):
        try:
            return await call(*args, **kwargs)
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            ServiceUnavailableError,
        ) as exc:
            if attempt == _API_ATTEMPTS - 1:
                raise ConnectError(f"JetStream did not answer about {what}: {exc!r}") from exc
            await asyncio.sleep(0.25 * 2**attempt)
    raise AssertionError("unreachable")
