"""Test helpers and a pytest plugin: a real nats-server for your handler tests.

Installed with taskframe, the plugin gives every test session these fixtures:

    nats_server   a nats-server with JetStream on a free loopback port, temporary store
    namespace     a fresh namespace per test, so tests never share streams
    client        an open `Client` for that namespace

and `running_worker` / `work_until` run a real worker in the test's event loop:

    async def test_resize(client):
        run = await client.enqueue(ResizeImage(url="a.png"))
        async with running_worker(app_for(client), client):
            assert await run.result(timeout=5) == "a.thumb.png"
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from taskframe._server import NatsServer
from taskframe.app import App
from taskframe.client import Client, connect
from taskframe.worker import Worker

__all__ = ["NatsServer", "running_worker", "work_until"]


@asynccontextmanager
async def running_worker(app: App, client: Client, **options: Any) -> AsyncIterator[Worker]:
    """Run a worker for `app` in the current loop; stop it gracefully on exit.

    `options` go to `Worker` (queues, concurrency, grace, ...). Yields once it is pulling.
    """
    worker = Worker(app, client, **options)
    runner = asyncio.create_task(worker.run(), name="taskframe-test-worker")
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        ready.cancel()
        runner.result()  # the worker failed to start: raise its error here
    try:
        yield worker
    finally:
        worker.stop()
        await runner


async def work_until(
    app: App,
    client: Client,
    condition: Callable[[Worker], bool],
    *,
    timeout: float = 10.0,
    **options: Any,
) -> Worker:
    """Run a worker until `condition(worker)` holds, then stop it and return it.

    The condition is checked each time the worker settles a message. Raises `TimeoutError`
    if it does not hold within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    async with running_worker(app, client, **options) as worker:
        while not condition(worker):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s: {worker!r}")
            worker.progress.clear()
            if condition(worker):
                break
            try:
                await asyncio.wait_for(worker.progress.wait(), remaining)
            except TimeoutError:
                continue
    return worker


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free loopback port, for the whole test session."""
    with NatsServer(port=-1, store_dir=tmp_path_factory.mktemp("nats-store")) as server:
        yield server


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for each test."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
async def client(nats_server: NatsServer, namespace: str) -> AsyncIterator[Client]:
    """An open client on the session's server, in the test's own namespace."""
    async with connect(nats_server.url, namespace=namespace) as tf:
        yield tf
