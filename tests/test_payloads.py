"""Bodies on the wire: zstd-compressed over `compress_over`, stored in the payloads bucket
over `offload_over` (a claim check), transparent to producers, handlers and results.

Sizes are kept small except where the size is the point (one 20 MiB round trip, one
20 MiB task for the kill test); the bench (bench/payloads.py) measures the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from nats.js.api import StoreCompression
from nats.js.errors import NotFoundError

from taskframe import App, Client, Context, DeadLetter, Event, Task, TaskState, connect, provision
from taskframe import _payloads as payloads
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe.testing import NatsServer, eventually, running_worker
from tests.fault_apps import Bulky
from tests.faultkit import REPO, Procs


class Echo(Task[str], queue="payloads"):
    text: str
    fail: bool = False


class Noted(Event, name="payloads.noted"):
    text: str


def order(n: int) -> str:
    """A realistic JSON document of about 10 KB: an order with its lines."""
    lines = [
        {"sku": f"SKU-{i:05d}", "name": f"Widget model {i}", "qty": i % 7 + 1, "price": 19.99}
        for i in range(n)
    ]
    return json.dumps(
        {"order": "A-1001", "customer": {"name": "Ada", "city": "Paris"}, "lines": lines}
    )


def build(namespace: str, seen: list[str] | None = None) -> App:
    app = App(namespace)

    @app.handle(Echo, max_attempts=1)
    async def echo(job: Echo, ctx: Context) -> str:
        if job.fail:
            raise RuntimeError("fails on purpose")
        return job.text[::-1]

    @app.subscribe(Noted, group="notes")
    async def noted(event: Noted, ctx: Context) -> None:
        assert seen is not None
        seen.append(event.text)

    return app


@pytest.fixture
async def packed(nats_server: NatsServer, namespace: str, client: Client) -> AsyncIterator[Client]:
    """A client of the test's namespace that compresses bodies over 1 KiB."""
    async with connect(nats_server.url, namespace=namespace, compress_over=1024) as tf:
        yield tf


async def first_message(client: Client, stream: str) -> tuple[dict[str, str], bytes]:
    msg = await client.js.get_msg(stream, seq=1)
    return msg.headers or {}, msg.data or b""


async def chunks(client: Client, name: str) -> int:
    """How many chunks of object `name` the payloads bucket still stores."""
    store = payloads._store(client.js, client.namespace)
    try:
        info = await store.get_info(name, show_deleted=True)
    except NotFoundError:
        return 0
    bucket = topology.payloads_bucket(client.namespace)
    stream = await client.js.stream_info(
        f"OBJ_{bucket}", subjects_filter=f"$O.{bucket}.C.{info.nuid}"
    )
    return stream.state.messages if stream.state.subjects else 0


async def test_a_20_mib_task_round_trips_with_its_20_mib_result_and_its_object_goes(
    client: Client,
) -> None:
    text = os.urandom(10 * 2**20).hex()  # 20 MiB that do not compress
    run = await client.enqueue(Echo(text=text))
    headers, body = await first_message(client, topology.queue_stream(client.namespace, "payloads"))
    assert body == b""
    name = headers[wire.PAYLOAD]
    assert await chunks(client, name) > 0

    async with running_worker(build(client.namespace), client):
        assert await run.result(timeout=60) == text[::-1]
        await eventually(lambda: _gone(client, name), "the task's object to be deleted")
    record = await client.js.get_last_msg(
        topology.results_stream(client.namespace), topology.result_subject(client.namespace, run.id)
    )
    assert wire.PAYLOAD in (record.headers or {})  # the result went to the bucket too
    assert len(record.data or b"") == 0


async def _gone(client: Client, name: str) -> bool:
    return await chunks(client, name) == 0


async def test_compressed_bodies_are_transparent_to_handlers_results_events_dead_letters_and_replay(
    packed: Client, client: Client
) -> None:
    seen: list[str] = []
    app = build(packed.namespace, seen)
    await provision(app, packed)
    doc = order(120)
    run = await packed.enqueue(Echo(text=doc))
    headers, body = await first_message(packed, topology.queue_stream(packed.namespace, "payloads"))
    assert headers[wire.ENCODING] == "zstd"
    assert len(body) * 3 < len(doc)  # what is stored is the compressed form
    dead = await packed.enqueue(Echo(text=doc, fail=True))
    await packed.publish(Noted(text=doc))

    async with running_worker(app, packed):
        assert await run.result(timeout=10) == doc[::-1]
        record = await packed.js.get_last_msg(
            topology.results_stream(packed.namespace),
            topology.result_subject(packed.namespace, run.id),
        )
        assert (record.headers or {})[wire.ENCODING] == "zstd"  # the result is compressed too
        assert (await client.status(run.id)).result == doc[::-1]  # type: ignore[union-attr]
        await eventually(lambda: seen == [doc], "the compressed event to reach its subscriber")
        assert (await dead.status()).state is TaskState.DEAD
        [letter] = await packed.dead_letters(task_id=dead.id)
        assert letter.reason == "failed"
        assert letter.body == Echo(text=doc, fail=True).model_dump_json().encode()  # as JSON
        assert wire.ENCODING not in letter.headers  # so a replay sends it plain: still read
        raw = await packed.js.get_msg(topology.dead_stream(packed.namespace), letter.seq)
        assert (raw.headers or {})[wire.ENCODING] == "zstd"  # stored as it came, compressed
        await packed.replay(letter)
        [again] = await eventually(
            lambda: _other_letters(packed, dead.id, letter.seq), "the replayed task to die again"
        )
        assert again.error == "fails on purpose"  # it was read: a corrupt body is `invalid`
        # a foreign producer's plain JSON, without the header, still works
        ack = await packed.js.publish(
            wire.task_subject(packed.namespace, "payloads", "Echo"),
            json.dumps({"text": doc}).encode(),
            headers={wire.MSG_ID: "foreign-1"},
        )
        assert ack.seq
        assert await packed.handle(Echo, "foreign-1").result(timeout=10) == doc[::-1]


async def _other_letters(client: Client, task_id: str, seq: int) -> list[DeadLetter]:
    return [x for x in await client.dead_letters(task_id=task_id) if x.seq != seq]


async def test_a_body_whose_object_is_gone_is_dead_lettered_and_delayed_keyed_and_event_ones_work(
    nats_server: NatsServer, namespace: str, client: Client
) -> None:
    seen: list[str] = []
    app = build(namespace, seen)
    async with connect(nats_server.url, namespace=namespace, offload_over=1024) as small:
        await provision(app, small)
        run = await small.enqueue(Echo(text="x" * 4096))
        headers, _ = await first_message(small, topology.queue_stream(namespace, "payloads"))
        await payloads.delete(small.js, namespace, headers[wire.PAYLOAD])
        later = await small.enqueue(Echo(text="y" * 4096 + "z"), delay=0.2, key="k1")
        again = await small.enqueue(Echo(text="y" * 4096 + "z"), delay=0.2, key="k1")
        assert again.duplicate
        assert await _objects(small) == 1  # the duplicate's own object was deleted at once
        await small.publish(Noted(text="n" * 4096))
        async with running_worker(app, small) as worker:
            # the schedule carried the reference to the task the server made of it
            assert await later.result(timeout=10) == "z" + "y" * 4096
            await eventually(lambda: worker.stats.dead == 1, "the task to be dead-lettered")
            await eventually(lambda: seen == ["n" * 4096], "the large event to be read")
            assert worker.stats.succeeded == 2  # the delayed task and the event
    [letter] = await client.dead_letters(task_id=run.id)
    assert (letter.reason, letter.error_type) == ("invalid", "PayloadError")
    assert headers[wire.PAYLOAD] in letter.error
    assert "deleted, or expired" in letter.error
    assert letter.headers[wire.PAYLOAD] == headers[wire.PAYLOAD]  # kept, as it came


async def test_an_object_whose_producer_died_before_publishing_expires_by_payload_ttl(
    nats_server: NatsServer, namespace: str, client: Client
) -> None:
    async with connect(nats_server.url, namespace=namespace, payload_ttl=1.0) as tf:
        headers: dict[str, str] = {}
        assert await payloads.offload(tf, b"x" * (600 * 1024), headers) == b""
        name = headers[wire.PAYLOAD]  # stored, and never published: the producer "died"
        assert await chunks(tf, name) > 0
        await eventually(lambda: _gone(tf, name), "the orphan to expire", timeout=10)


async def test_a_queue_stored_compressed_on_disk_is_provisioned_with_s2_and_can_be_turned_off(
    client: Client,
) -> None:
    app = build(client.namespace)
    stream = topology.queue_stream(client.namespace, "payloads")
    app.queue("payloads", compression=True)
    await provision(app, client)
    assert (await client.js.stream_info(stream)).config.compression == StoreCompression.S2
    app.queue("payloads")
    await provision(app, client)
    assert (await client.js.stream_info(stream)).config.compression == StoreCompression.NONE


async def test_a_worker_killed_mid_download_leaves_the_object_and_another_completes_the_task(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    a = procs.worker(nats_server.url, concurrency=1)
    await a.wait_log("worker ready")
    run = await client.enqueue(Bulky(pad=os.urandom(10 * 2**20).hex()))
    headers, _ = await first_message(client, topology.queue_stream(client.namespace, "work"))
    await eventually(lambda: _downloading(client), "worker A mid-download", interval=0.005)
    a.signal(signal.SIGKILL)
    assert await a.wait_exit() == -signal.SIGKILL
    assert not procs.journal.entries("start")  # its handler never began
    assert await chunks(client, headers[wire.PAYLOAD]) > 0

    b = procs.worker(nats_server.url, concurrency=1)
    assert await run.result(timeout=30) == run.id
    [start] = procs.journal.entries("start", run.id)
    assert (start.pid, start.attempt) == (b.pid, 2)
    await eventually(lambda: _gone(client, headers[wire.PAYLOAD]), "the object to be deleted")


async def _objects(client: Client) -> int:
    """How many objects the payloads bucket holds chunks of."""
    bucket = topology.payloads_bucket(client.namespace)
    info = await client.js.stream_info(f"OBJ_{bucket}", subjects_filter=f"$O.{bucket}.C.>")
    return len(info.state.subjects or {})


async def _downloading(client: Client) -> bool:
    """Whether a worker reads an object, with 20 of its 128 KiB chunks (of 160) or more
    still to be sent to it: far enough from the end that a kill now is mid-download."""
    bucket = topology.payloads_bucket(client.namespace)
    try:
        consumers = await client.js.consumers_info(f"OBJ_{bucket}")
    except NotFoundError:
        return False
    return any((c.num_pending or 0) >= 20 for c in consumers)


def test_without_the_compression_extra_writing_and_reading_zstd_are_clear_errors() -> None:
    script = """
import sys
sys.modules["zstandard"] = None  # as if the extra were not installed
from taskframe import ConfigError, PayloadError
from taskframe import _payloads as payloads
assert payloads.compress(b"x" * 10, {}, 100) == b"x" * 10  # under the threshold: no import
for call, error in ((lambda: payloads.compress(b"x" * 200, {}, 100), ConfigError),
                    (lambda: payloads.unpack(b"\\x28\\xb5\\x2f\\xfd"), PayloadError)):
    try:
        call()
    except error as exc:
        print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert all("pip install 'taskframe[compression]'" in line for line in lines), lines
