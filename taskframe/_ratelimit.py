"""A rate limit shared by every worker and counted by the server: at most `count` task starts
in each window of `per_seconds`.

Window i of limit `name` is a JetStream counter (ADR-49) on `<ns>.rate.<name>.<per>.<i>`,
i = floor(unix time / per). A worker takes k slots by publishing `Nats-Incr: k`; the server
adds atomically and answers with the new total T, so that publish owns slots T-k+1..T and
may use those up to `count`. Each slot number has exactly one owner, so the starts in a
window never exceed `count` however many workers share the limit. A worker that gets no
slot sleeps until the next window, plus a little jitter so they do not all wake at once.

Limits of the scheme: windows are read from each worker's clock, so keep clocks in sync
(skew smears a window's starts across its boundary by the skew); slots taken by a caller
that is then cancelled are lost for that window. Both err on the side of fewer starts.

The stream `TF_<ns>_RATE` (subjects `<ns>.rate.>`) keeps counters for three of the longest
window any limiter of the namespace uses: `ensure()` grows its `max_age`, never shrinks it,
so a short-window limiter cannot expire the counters of a long-window one.

How the server's counters behave is in docs/server-behaviour.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Self

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import (
    APIError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from taskframe import _topology as topology
from taskframe._publish import TRANSIENT
from taskframe._retry import answered
from taskframe._stream_configs import rate_config
from taskframe._topology import rate_stream
from taskframe.errors import ConfigError, ConnectError
from taskframe.models import check_token
from taskframe.settings import Settings

__all__ = ["RateLimit", "RateLimiter"]

log = logging.getLogger("taskframe._ratelimit")

_INCR = "Nats-Incr"
_RETRIED: tuple[type[BaseException], ...] = (NoStreamResponseError, *TRANSIENT)
_WINDOWS_KEPT = 3
_MIN_MAX_AGE = 10.0
_MAX_BACKOFF = 2.0
_JITTER = 0.02  # seconds: workers waking for a new window spread out, not all ask at once
_LIMIT = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]*)\s*(s|sec|m|min|h|hour)\s*")
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `count` starts in each window of `per_seconds` (whole seconds, at least 1)."""

    count: int
    per_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"rate limit count must be at least 1, not {self.count}")
        if not (self.per_seconds >= 1 and float(self.per_seconds).is_integer()):
            raise ConfigError(
                f"rate limit window must be a whole number of seconds, not {self.per_seconds}"
            )

    @classmethod
    def parse(cls, text: str) -> Self:
        """Read "100/s", "600/m", "5000/h" or "10/2s" (count per window)."""
        match = _LIMIT.fullmatch(text)
        if match is None:
            raise ConfigError(
                f"rate limit {text!r}: write it as <count>/<window>, like '100/s', '600/m', "
                "'5000/h' or '10/2s'"
            )
        count, multiple, unit = match.groups()
        per = int(multiple or 1) * _UNIT_SECONDS[unit]
        if per == 0:
            raise ConfigError(f"rate limit {text!r}: the window must be at least 1s")
        return cls(int(count), float(per))

    def __str__(self) -> str:
        per = int(self.per_seconds)
        return f"{self.count}/s" if per == 1 else f"{self.count}/{per}s"


class RateLimiter:
    """One worker's handle on the rate limit `name`, shared with every worker of the namespace.

    Call `ensure()` once, then `acquire()` before each task start. Slots are taken from the
    server in batches of up to `max_batch` (default: a tenth of the limit, 1 to 256), only as
    many as callers are waiting, and handed out locally within the same window.
    """

    def __init__(
        self,
        js: JetStreamContext,
        settings: Settings,
        name: str,
        limit: RateLimit,
        *,
        max_batch: int | None = None,
    ) -> None:
        self.name = check_token("rate limit name", name)
        self.limit = limit
        self.max_batch = max_batch or max(1, min(256, limit.count // 10))
        self._js = js
        self._settings = settings
        self._subject = topology.rate_subject(settings.namespace, name, int(limit.per_seconds))
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._window = -1  # the window `_spare` belongs to
        self._spare = 0
        self._full = -1  # the latest window known to have no slots left

    def __repr__(self) -> str:
        return (
            f"<RateLimiter {self.name} {self.limit} window={self._window} spare={self._spare} "
            f"waiting={self._waiting}>"
        )

    async def ensure(self) -> None:
        """Create the counter stream, or grow its `max_age` to keep this limit's windows."""
        need = max(_MIN_MAX_AGE, _WINDOWS_KEPT * self.limit.per_seconds)
        stream = rate_stream(self._settings.namespace)
        # Limiters with other windows may grow max_age at the same time: re-read until ours
        # holds (the largest wins, since nobody shrinks it).
        for _ in range(5):
            try:
                info = await answered(f"stream {stream}", self._js.stream_info, stream)
            except NotFoundError:
                try:
                    config = rate_config(self._settings, need)
                    await answered(f"stream {stream}", self._js.add_stream, config)
                    return
                except APIError as exc:
                    if exc.err_code == 10058:  # created meanwhile by another worker: re-read
                        continue
                    raise ConfigError(f"cannot create stream {stream}: {exc.description}") from exc
            have = info.config
            if not have.allow_msg_counter:
                raise ConfigError(
                    f"stream {stream} exists without message counters; delete it or use "
                    "another namespace"
                )
            if not have.max_age or have.max_age >= need - 1e-6:
                return
            try:
                config = dataclasses.replace(have, max_age=need)
                await answered(f"stream {stream}", self._js.update_stream, config)
            except APIError as exc:
                raise ConfigError(f"cannot update stream {stream}: {exc.description}") from exc
        raise ConfigError(f"stream {stream} kept changing while setting its max_age")

    async def acquire(self) -> None:
        """Return when the caller may start one task within the limit.

        Waits for the next window when this one is used up. While the server cannot be
        reached it keeps retrying with backoff (it never lets a task through unchecked):
        bound the wait with `asyncio.timeout` if the caller needs to.
        """
        self._waiting += 1
        try:
            async with self._lock:
                await self._take()
        finally:
            self._waiting -= 1

    async def _take(self) -> None:
        failures = 0
        while True:
            now = time.time()
            window = int(now // self.limit.per_seconds)
            if window == self._window and self._spare > 0:
                self._spare -= 1
                return
            if window <= self._full:
                await asyncio.sleep(self._until_next(window, now))
                continue
            want = min(self._waiting, self.max_batch)
            try:
                total = await self._increment(window, want)
            except _RETRIED as exc:
                failures += 1
                await self._recover(exc, failures)
                continue
            if failures:
                log.info("rate limit %s: server reachable again", self.name)
                failures = 0
            granted = max(0, min(want, self.limit.count - (total - want)))
            if granted < want:
                self._full = window
            if int(time.time() // self.limit.per_seconds) != window:
                continue  # the window ended while the server answered: those slots are void
            if granted:
                self._window, self._spare = window, granted - 1
                return

    async def _recover(self, exc: BaseException, failures: int) -> None:
        if failures == 1:
            log.warning("rate limit %s: no answer from the server, waiting: %r", self.name, exc)
        if isinstance(exc, NoStreamResponseError):
            # No stream takes the counter: deleted by an operator? Provision it again.
            with contextlib.suppress(*TRANSIENT):
                await self.ensure()
        await asyncio.sleep(min(_MAX_BACKOFF, 0.05 * 2**failures) * random.uniform(0.5, 1))

    def _until_next(self, window: int, now: float) -> float:
        boundary = (window + 1) * self.limit.per_seconds
        return max(0.001, boundary - now + random.uniform(0, _JITTER))

    async def _increment(self, window: int, count: int) -> int:
        """Add `count` to `window`'s counter and return its new total."""
        try:
            ack = await self._js.publish(
                f"{self._subject}.{window}",
                b"",
                timeout=self._settings.publish_timeout,
                headers={_INCR: str(count)},
            )
        except nats.errors.ConnectionClosedError as exc:
            raise ConnectError(f"rate limit {self.name}: the connection is closed") from exc
        except ServiceUnavailableError:
            raise  # transient: the caller retries
        except APIError as exc:
            raise ConfigError(
                f"rate limit {self.name}: the server refused the counter: {exc.description}"
            ) from exc
        if ack.val is None:
            raise ConfigError(f"rate limit {self.name}: {ack.stream} did not return a counter")
        return int(ack.val)
