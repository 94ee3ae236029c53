"""Status records in fast-ingest batches (taskframe._batching): a busy worker's records are
confirmed many at once, and whatever a batch does not confirm is stored on its own; no
task is acked before its own record is stored, none twice."""

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import pytest
from nats.aio.msg import Msg

import taskframe._publish
from taskframe import App, Client, Context, Task, Worker, connect, provision
from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe._publish import publisher
from taskframe.testing import NatsServer, eventually
from tests.faultkit import AckTap


class Echo(Task[str], queue="echo"):
    text: str


def echo_app(namespace: str) -> App:
    app = App(namespace)

    @app.handle(Echo)
    async def echo(job: Echo, ctx: Context) -> str:
        return job.text

    return app


class Replies:
    """Counts what a connection's publisher hears: one reply per record, or batch frames."""

    def __init__(self, client: Client) -> None:
        pub = publisher(client.nc)
        self._deliver: Callable[..., None] = pub._on_reply
        self.single = self.frames = 0
        self.said: list[bytes] = []  # the batch frames' bodies
        pub._on_reply = self._on_reply  # type: ignore[method-assign]

    def _on_reply(self, subject: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        if subject.endswith(b".$FI"):
            self.frames += 1
            self.said.append(data)
        else:
            self.single += 1
        self._deliver(subject, data, headers)


async def drain(
    client: Client, url: str, app: App, texts: list[str], **settings: Any
) -> tuple[list[str], AckTap, Replies]:
    """Enqueue one task per text, run a worker (on its own connection to `url`, with
    `settings`) until those that can succeed did, and return the ids (in order), what was
    acked and what its publisher heard."""
    stream = topology.queue_stream(client.namespace, "echo")
    runs = await client.enqueue_many([Echo(text=text) for text in texts])
    async with (
        connect(url, namespace=client.namespace, **settings) as own,
        AckTap(client, stream) as acks,
    ):
        replies = Replies(own)
        worker = Worker(app, own)
        running = asyncio.create_task(worker.run())
        wanted = sum(len(text) < 500 for text in texts)
        await eventually(lambda: worker.stats.succeeded == wanted, f"{wanted} tasks", timeout=30)
        await eventually(lambda: len(acks.seen(kinds=("+ACK",))) == wanted, "their acks")
        worker.stop()
        await asyncio.wait_for(running, 30)
    return [run.id for run in runs], acks, replies


async def test_a_busy_worker_gets_its_records_confirmed_many_at_once(
    client: Client, nats_server: NatsServer
) -> None:
    app = echo_app(client.namespace)
    texts = [f"t{i}" for i in range(1500)]
    ids, acks, replies = await drain(client, nats_server.url, app, texts)
    # Every task acked once, after its first and only delivery, and its record stored.
    assert sorted(s.stream_seq for s in acks.seen()) == list(range(1, 1501))
    assert {s.delivered for s in acks.seen()} == {1}
    for task_id, text in list(zip(ids, texts, strict=True))[::100]:
        assert await client.handle(Echo, task_id).result(timeout=1) == text
    # Far fewer answers than records: most came in batches, a few (the first, while few
    # awaited their confirmation) one by one.
    assert replies.frames > 0
    assert replies.single + replies.frames < 1500 / 4


async def test_a_results_stream_made_without_batches_confirms_each_record(
    client: Client, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = echo_app(client.namespace)
    old = dataclasses.replace(configs.results_config(client.settings), allow_batched=False)
    await client.js.add_stream(old)  # as a taskframe before batches made it
    texts = [f"t{i}" for i in range(600)]
    with caplog.at_level(logging.INFO, logger="taskframe._publish"):
        ids, acks, replies = await drain(client, nats_server.url, app, texts)
    assert sorted(s.stream_seq for s in acks.seen()) == list(range(1, 601))
    assert {s.delivered for s in acks.seen()} == {1}
    assert await client.handle(Echo, ids[-1]).result(timeout=1) == texts[-1]
    said = [r for r in caplog.records if "does not take batched records" in r.getMessage()]
    assert len(said) == 1  # said once, then each record goes alone
    assert replies.single >= 600 - 16


async def test_a_record_refused_in_a_batch_loses_no_other(
    client: Client, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(taskframe._publish, "OVER", 0)  # every record in a batch
    app = echo_app(client.namespace)
    small = dataclasses.replace(configs.results_config(client.settings), max_msg_size=400)
    await client.js.add_stream(small)  # a record over 400 bytes is refused
    texts = [("x" * 600 if i in (700, 900) else f"t{i}") for i in range(1200)]
    ids, acks, replies = await drain(client, nats_server.url, app, texts)
    # The two refused records' tasks are not acked; each other task is, once, on its
    # first delivery, with its record stored, though its batch ended at the refusal.
    acked = [s.stream_seq for s in acks.seen(kinds=("+ACK",))]
    assert sorted(acked) == [n for n in range(1, 1201) if n not in (701, 901)]
    assert {s.delivered for s in acks.seen()} == {1}
    # Both refused inside a batch; the records after them in it were stored on their own.
    assert sum(b'"err_code":10054' in said for said in replies.said) == 2
    for index in (699, 701, 899, 901, 1199):
        assert await client.handle(Echo, ids[index]).result(timeout=1) == texts[index]
    status = await client.status(ids[700])
    assert status is None or status.state != "succeeded"


async def test_a_server_with_no_room_for_another_batch_gets_the_records_one_by_one(
    client: Client, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = echo_app(client.namespace)
    await provision(app, client)
    # 1,000 batches opened on the results stream by someone else (the server's limit):
    # each stays open until it has been idle for 10 s.
    results = topology.result_subject(client.namespace, "")
    inbox = client.nc.new_inbox()
    opened: list[bytes] = []

    async def heard(msg: Msg) -> None:
        opened.append(msg.data)

    sub = await client.nc.subscribe(f"{inbox}.>", cb=heard)
    for n in range(1000):
        reply = f"{inbox}.fill{n}.10.fail.1.0.$FI"
        await client.nc.publish(f"{results}fill{n}", b"{}", reply=reply)
    await eventually(lambda: len(opened) >= 1000, "1,000 batches opened")
    assert not [data for data in opened if b'"error"' in data]
    texts = [f"t{i}" for i in range(600)]
    with caplog.at_level(logging.INFO, logger="taskframe._publish"):
        ids, acks, replies = await drain(client, nats_server.url, app, texts)
    await sub.unsubscribe()
    assert sorted(s.stream_seq for s in acks.seen()) == list(range(1, 601))
    assert {s.delivered for s in acks.seen()} == {1}
    assert await client.handle(Echo, ids[-1]).result(timeout=1) == texts[-1]
    assert any(b'"err_code":10211' in said for said in replies.said)
    assert [r for r in caplog.records if "too many batches open" in r.getMessage()]
