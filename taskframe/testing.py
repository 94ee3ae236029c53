"""Test helpers and a pytest plugin: a real nats-server for your handler tests.

Installed with taskframe, the plugin gives every test session these fixtures:

    nats_server   a nats-server with JetStream on a free loopback port, temporary store
    namespace     a fresh namespace per test, so tests never share streams
    client        an open `Client` for that namespace; the streams of the namespace are
                  deleted after the test, so a long session's server stays small

`running_worker` runs a real worker in the test's event loop, and `eventually` waits for
what has no event to wait on (a count, a status, a line in a log):

    async def test_resize(client):
        run = await client.enqueue(ResizeImage(url="a.png"))
        async with running_worker(app_for(client), client) as worker:
            assert await run.result(timeout=5) == "a.thumb.png"
            await eventually(lambda: worker.stats.succeeded == 1, "the resize to be acked")
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar, overload

import nats.errors
import pytest

from taskframe._server import NatsServer
from taskframe.app import App
from taskframe.client import Client, connect
from taskframe.worker import Worker

__all__ = ["NatsServer", "eventually", "running_worker"]

T = TypeVar("T")


@overload
async def eventually(
    condition: Callable[[], Awaitable[T]],
    what: str,
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
) -> T: ...


@overload
async def eventually(
    condition: Callable[[], T], what: str, *, timeout: float = 15.0, interval: float = 0.05
) -> T: ...


async def eventually(
    condition: Callable[[], Any], what: str, *, timeout: float = 15.0, interval: float = 0.05
) -> Any:
    """Call `condition` every `interval` seconds until it returns a true value; return it.

    `condition` is a plain function or an async one (`lambda: worker.stats.dead == 1`,
    `lambda: client.status(task_id)`). Fails the test with an `AssertionError` that says
    what it was waiting for if no true value came within `timeout` seconds; an exception
    the condition raises ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


@asynccontextmanager
async def running_worker(app: App, client: Client, **options: Any) -> AsyncIterator[Worker]:
    """Run a worker for `app` in the current loop; stop it gracefully on exit.

    `options` go to `Worker` (queues, concurrency, grace, ...). Yields once it is pulling;
    a worker that fails to start raises its error here.
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
    """An open client on the session's server, in the test's own namespace.

    Afterwards every stream whose name holds the namespace is deleted: its queues, dead
    letters, results and claims, and any stream the test named after it.
    """
    async with connect(nats_server.url, namespace=namespace) as tf:
        yield tf
        with contextlib.suppress(nats.errors.Error):  # cut off or closed by the test: let it be
            await _delete_streams(tf, namespace)


async def _delete_streams(client: Client, namespace: str) -> None:
    names: list[str] = []
    while page := await client.js.streams_info(offset=len(names)):
        names += [info.config.name or "" for info in page]
    for name in names:
        if namespace in name:
            await client.js.delete_stream(name)
