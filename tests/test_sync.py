"""taskframe.sync: the producer for sync code, one loop thread shared by every thread."""

import asyncio
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import taskframe.sync
from taskframe import Client, ConnectError
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe.testing import NatsServer, running_worker
from tests.apps import Add, build

REPO = Path(__file__).resolve().parent.parent


async def stored(client: Client, queue: str) -> int:
    info = await client.js.stream_info(topology.queue_stream(client.namespace, queue))
    return info.state.messages


async def test_eight_threads_of_a_hundred_enqueues_store_exactly_800_tasks(
    nats_server: NatsServer, client: Client
) -> None:
    def enqueue_hundred(sync: taskframe.sync.SyncClient, thread: int) -> list[str]:
        return [sync.enqueue(Add(a=thread, b=i)).id for i in range(100)]

    def produce() -> list[str]:
        sync = taskframe.sync.connect(nats_server.url, namespace=client.namespace)
        with sync, ThreadPoolExecutor(8) as pool:
            batches = pool.map(lambda t: enqueue_hundred(sync, t), range(8))
            return [task_id for batch in batches for task_id in batch]

    ids = await asyncio.to_thread(produce)
    assert len(set(ids)) == 800
    assert await stored(client, "math") == 800


async def test_a_sync_caller_gets_the_typed_result_and_a_keyed_repeat_is_a_duplicate(
    nats_server: NatsServer, client: Client
) -> None:
    sync = await asyncio.to_thread(
        taskframe.sync.connect, nats_server.url, namespace=client.namespace
    )
    try:
        async with running_worker(build(client.namespace), client):
            run = await asyncio.to_thread(sync.enqueue, Add(a=2, b=3), key="k1")
            again = await asyncio.to_thread(sync.enqueue, Add(a=2, b=3), key="k1")
            assert await asyncio.to_thread(run.result, 10) == 5
            assert (again.id, again.duplicate, run.duplicate) == (run.id, True, False)
            status = await asyncio.to_thread(sync.status, run.id)
            assert status is not None
            assert status.result == 5
    finally:
        await asyncio.to_thread(sync.close)
    with pytest.raises(ConnectError, match="closed"):
        sync.status(run.id)
    sync.close()  # idempotent


def test_an_unreachable_server_is_a_connect_error_and_leaves_no_thread_behind() -> None:

    before = threading.active_count()
    with pytest.raises(ConnectError):
        taskframe.sync.connect("nats://127.0.0.1:1", namespace="x")
    assert threading.active_count() == before


async def test_a_script_that_never_closes_its_client_exits_cleanly_with_its_task_stored(
    nats_server: NatsServer, client: Client
) -> None:
    """The client closes at interpreter exit (atexit), after its enqueue was confirmed."""
    script = (
        "import taskframe.sync\n"
        "from tests.apps import Add\n"
        f"tf = taskframe.sync.connect({nats_server.url!r}, namespace={client.namespace!r})\n"
        "print(tf.enqueue(Add(a=1, b=2)).id)\n"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert await stored(client, "math") == 1
    last = await client.js.get_last_msg(
        topology.queue_stream(client.namespace, "math"),
        wire.task_subject(client.namespace, "math", Add.__tf_name__),
    )
    assert (last.headers or {}).get("Nats-Msg-Id") == done.stdout.strip()
