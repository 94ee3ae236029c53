import asyncio

import pytest

from taskframe import (
    Client,
    ConfigError,
    PayloadTooLargeError,
    ResultTimeoutError,
    Task,
    TaskState,
    connect,
)
from taskframe import _topology as topology
from taskframe._publish import publish_stored
from taskframe._results import status_record
from taskframe._server import NatsServer
from taskframe._topology import queue_stream
from taskframe.provision import ensure_shared
from taskframe.testing import running_worker
from tests.apps import Add, Quiet, build


class Blob(Task[None], queue="blobs"):
    data: str


async def stream_messages(client: Client, queue: str) -> int:
    info = await client.js.stream_info(queue_stream(client.namespace, queue))
    return info.state.messages


async def test_enqueue_returns_once_the_task_is_stored(client: Client) -> None:
    run = await client.enqueue(Add(a=1, b=2))
    assert await stream_messages(client, "math") == 1
    assert len(run.id) == 36
    assert not run.duplicate
    assert (await run.status()).state is TaskState.QUEUED
    assert await client.status(run.id) is None


async def test_a_repeated_key_is_enqueued_once_and_names_the_same_task(client: Client) -> None:
    first = await client.enqueue(Add(a=1, b=2), key="order-42")
    again = await client.enqueue(Add(a=1, b=2), key="order-42")
    other = await client.enqueue(Add(a=1, b=2), key="order-43")
    assert again.duplicate
    assert not first.duplicate
    assert not other.duplicate
    assert again.id == first.id != other.id
    assert await stream_messages(client, "math") == 2


async def test_enqueue_many_stores_every_task_in_order(client: Client) -> None:
    runs = await client.enqueue_many(Add(a=i, b=i) for i in range(500))
    assert len({r.id for r in runs}) == 500
    assert await stream_messages(client, "math") == 500
    async with running_worker(build(client.namespace), client):
        assert [await r.result(timeout=10) for r in runs[:5]] == [0, 2, 4, 6, 8]


async def test_oversize_payload_is_refused_before_sending(client: Client) -> None:
    with pytest.raises(PayloadTooLargeError, match="over the server's max_payload") as info:
        await client.enqueue(Blob(data="x" * 1_100_000))
    assert info.value.size > info.value.max_payload
    # The connection survived: the next enqueue works.
    await client.enqueue(Add(a=1, b=1))
    assert client.nc.is_connected


async def test_result_times_out_without_a_worker(client: Client) -> None:
    run = await client.enqueue(Add(a=1, b=2))
    with pytest.raises(ResultTimeoutError):
        await run.result(timeout=0.3)


async def test_result_of_a_task_without_results_is_a_clear_error(client: Client) -> None:
    run = await client.enqueue(Quiet(n=1))
    with pytest.raises(ConfigError, match="results=False"):
        await run.result(timeout=1)


async def test_connect_to_nothing_is_a_connect_error() -> None:
    from taskframe import ConnectError

    with pytest.raises(ConnectError, match="cannot reach NATS"):
        async with connect("nats://127.0.0.1:1", namespace="x"):
            pass


async def test_producer_and_worker_on_separate_connections(
    nats_server: NatsServer, namespace: str
) -> None:
    async with (
        connect(nats_server.url, namespace=namespace) as producer,
        connect(nats_server.url, namespace=namespace) as consumer,
    ):
        runs = [await producer.enqueue(Add(a=i, b=1)) for i in range(3)]
        async with running_worker(build(namespace), consumer):
            results = await asyncio.gather(*(r.result(timeout=10) for r in runs))
        assert results == [1, 2, 3]
    assert repr(producer).startswith(f"<Client namespace='{namespace}'")


async def test_a_late_progress_record_never_replaces_a_final_one(client: Client) -> None:
    await ensure_shared(client.js, client.settings)
    ns, task_id = client.namespace, "late-running"
    progress = topology.progress_subject(ns, task_id)
    running = status_record(task_id, "Add", TaskState.RUNNING, 1)
    await publish_stored(client.nc, client.settings, progress, running)
    status = await client.status(task_id)
    assert status is not None
    assert status.state is TaskState.RUNNING

    done = status_record(task_id, "Add", TaskState.SUCCEEDED, 2, result_json=b"3")
    await publish_stored(client.nc, client.settings, topology.result_subject(ns, task_id), done)
    # A `running` write of attempt 1 that sat in a cut connection arrives after the success.
    await publish_stored(client.nc, client.settings, progress, running)
    status = await client.status(task_id)
    assert status is not None
    assert (status.state, status.attempt, status.result) == (
        TaskState.SUCCEEDED,
        2,
        3,
    )
