"""Throughput on the overview: how many tasks each queue's stream took in and let go per
minute, from samples of its sequence numbers that the dashboard takes as it is read.

A stream's last sequence counts every message ever stored in it, and last sequence minus
messages held counts every message it ever removed: in a WorkQueue stream, a task leaves
when it is acknowledged, dead-lettered, cancelled or purged. Two samples of these counters
give both rates without any history of our own; the samples live in this process only and
cover at most the last `WINDOW` seconds it watched.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW = 300.0
_MIN_SPAN = 1.0  # shorter than this, a rate is mostly noise: show none yet
_MAX_SAMPLES = 512


@dataclass(frozen=True, slots=True)
class Rate:
    """A queue's throughput over the last `span` seconds (None: not measured yet)."""

    stored_per_minute: float | None
    done_per_minute: float | None
    span: float


class Rates:
    """Per queue, the counter samples of the last `WINDOW` seconds and the rates they give."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: dict[str, deque[tuple[float, int, int]]] = {}

    def observe(self, stream: str, last_seq: int, messages: int) -> Rate:
        """Record the counters of `stream` now; its rates since its oldest sample in the window."""
        now, removed = self._clock(), last_seq - messages
        samples = self._samples.setdefault(stream, deque(maxlen=_MAX_SAMPLES))
        if samples and (last_seq < samples[-1][1] or removed < samples[-1][2]):
            samples.clear()  # the stream was deleted and made again: its counters restarted
        if not samples or now - samples[-1][0] >= _MIN_SPAN:
            samples.append((now, last_seq, removed))
        while len(samples) > 1 and now - samples[1][0] >= WINDOW:
            samples.popleft()  # the oldest kept is the newest one at least WINDOW old
        since, stored_then, removed_then = samples[0]
        span = now - since
        if span < _MIN_SPAN:
            return Rate(None, None, span)
        per_minute = 60.0 / span
        return Rate(
            (last_seq - stored_then) * per_minute, (removed - removed_then) * per_minute, span
        )
