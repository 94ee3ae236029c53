"""The shared rate limit, counted by a real nats-server."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import api as js_api

from taskframe._ratelimit import RateLimit, RateLimiter
from taskframe._server import NatsServer
from taskframe._topology import rate_stream
from taskframe.errors import ConfigError
from taskframe.settings import Settings


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [
        ("100/s", 100, 1.0),
        ("20/s", 20, 1.0),
        ("600/m", 600, 60.0),
        ("5000/h", 5000, 3600.0),
        ("10/2s", 10, 2.0),
        ("3/min", 3, 60.0),
        (" 7 / 15m ", 7, 900.0),
    ],
)
def test_parse(text: str, count: int, per: float) -> None:
    assert RateLimit.parse(text) == RateLimit(count, per)


@pytest.mark.parametrize(
    "text", ["", "100", "/s", "0/s", "-1/s", "1.5/s", "10/0s", "10/ms", "10/d", "10/s/s", "x/s"]
)
def test_parse_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        RateLimit.parse(text)


def test_limit_values_and_text() -> None:
    assert str(RateLimit.parse("20/s")) == "20/s"
    assert str(RateLimit.parse("10/2s")) == "10/2s"
    assert str(RateLimit.parse("600/m")) == "600/60s"
    with pytest.raises(ConfigError, match="at least 1"):
        RateLimit(0)
    with pytest.raises(ConfigError, match="whole number of seconds"):
        RateLimit(5, 0.5)


@asynccontextmanager
async def limiters(
    url: str, settings: Settings, limit: RateLimit, workers: int, **options: Any
) -> AsyncIterator[list[RateLimiter]]:
    """One limiter per worker, each on its own connection as separate processes would be."""
    connections = [await nats.connect(url, **options) for _ in range(workers)]
    try:
        made = [RateLimiter(nc.jetstream(), settings, "api", limit) for nc in connections]
        for limiter in made:
            await limiter.ensure()
        yield made
    finally:
        for nc in connections:
            await nc.close()


def settings_for(url: str, namespace: str, **overrides: float) -> Settings:
    return Settings(url=url, namespace=namespace, storage="memory", **overrides)


async def test_acquires_at_once_under_the_limit_then_waits_for_the_next_window(
    nats_server: NatsServer, namespace: str
) -> None:
    settings = settings_for(nats_server.url, namespace)
    async with limiters(nats_server.url, settings, RateLimit.parse("2/s"), workers=1) as (limiter,):
        began = time.perf_counter()
        await limiter.acquire()
        assert time.perf_counter() - began < 0.25
        windows = [math.floor(time.time())]
        for _ in range(4):
            await limiter.acquire()
            windows.append(math.floor(time.time()))
    # Two slots a window: five starts need three windows, however the first one fell.
    assert max(Counter(windows).values()) <= 2
    assert len(set(windows)) == 3
    assert "<RateLimiter api 2/s window=" in repr(limiter)


async def test_ensure_keeps_counters_for_the_longest_window(
    nats_server: NatsServer, namespace: str
) -> None:
    settings = settings_for(nats_server.url, namespace)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await RateLimiter(js, settings, "fast", RateLimit.parse("5/s")).ensure()
        info = await js.stream_info(rate_stream(namespace))
        assert info.config.allow_msg_counter
        assert info.config.max_age == 10.0
        await RateLimiter(js, settings, "slow", RateLimit.parse("5/m")).ensure()
        assert (await js.stream_info(rate_stream(namespace))).config.max_age == 180.0
        await RateLimiter(js, settings, "fast", RateLimit.parse("5/s")).ensure()  # no shrink
        assert (await js.stream_info(rate_stream(namespace))).config.max_age == 180.0
    finally:
        await nc.close()


async def test_ensure_refuses_a_stream_without_counters(
    nats_server: NatsServer, namespace: str
) -> None:
    settings = settings_for(nats_server.url, namespace)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            js_api.StreamConfig(name=rate_stream(namespace), subjects=[f"{namespace}.rate.>"])
        )
        with pytest.raises(ConfigError, match="without message counters"):
            await RateLimiter(js, settings, "api", RateLimit(5)).ensure()
    finally:
        await nc.close()


def test_names_must_be_subject_tokens() -> None:
    settings = Settings(namespace="n")
    with pytest.raises(ConfigError, match="rate limit name"):
        RateLimiter(None, settings, "a.b", RateLimit(5))  # type: ignore[arg-type]


async def quiet(exc: Exception) -> None:
    """Reconnect attempts to a stopped server are expected here: keep them out of the log."""


async def test_waits_while_the_server_is_down_and_resumes_after(tmp_path: Path) -> None:
    server = NatsServer(port=-1, store_dir=tmp_path).start()
    try:
        # Memory storage: the restarted server has lost the stream, so the limiter must
        # provision it again.
        settings = settings_for(server.url, "down", publish_timeout=0.2)
        options = {"reconnect_time_wait": 0.1, "max_reconnect_attempts": -1, "error_cb": quiet}
        async with limiters(server.url, settings, RateLimit(1000), 1, **options) as (limiter,):
            await limiter.acquire()
            port = server.port
            server.stop()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await limiter.acquire()
            server = NatsServer(port=port, store_dir=tmp_path).start()
            async with asyncio.timeout(5.0):
                await limiter.acquire()
    finally:
        server.stop()
