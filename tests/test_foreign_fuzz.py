"""Arbitrary raw messages against one running worker: each one stored ends exactly once.

A raw protocol connection publishes subject tails under `<ns>.tasks.fuzz.`, header blocks
and bodies drawn by hypothesis (well-formed ones among them) to one worker that runs
across all examples. After each batch, every message the server stored has either run and
succeeded or has exactly one dead letter, the queue is empty, and a good task still
completes: no message stalls the worker, however it is made.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from taskframe import App, Client, Context, Task
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe.testing import NatsServer, eventually, running_worker
from tests.rawnats import PubAck, RawNats, header_block

Raw = tuple[bytes, bytes | None, bytes | None]
"""One message as drawn: subject tail, raw header block, body (None: a valid Probe)."""


class Probe(Task[int], queue="fuzz"):
    """Returns its mark, which names the message it came in."""

    mark: int


# Not drawn: the bytes the server splits the protocol line on, the token separator, and DEL.
# nats-server 2.15.1 stores a subject holding DEL (0x7f) but may never deliver it (its
# subject tree seems to use that byte as a marker), so no worker could settle it.
_LEFT_OUT = frozenset(b" \t\r\n.\x7f")
_TOKEN = st.text("abcXYZ019_-", min_size=1, max_size=6).map(str.encode)
_ODD_TOKEN = st.lists(
    st.integers(0, 255).filter(lambda b: b not in _LEFT_OUT), min_size=1, max_size=6
).map(bytes)
_TAILS = st.one_of(
    st.just(b"Probe"),
    _TOKEN.map(lambda lane: b"Probe." + lane),
    st.lists(
        st.one_of(_TOKEN, _ODD_TOKEN, st.sampled_from([b"*", b">"])), min_size=1, max_size=3
    ).map(b".".join),
)
_LINE = st.binary(max_size=10).filter(lambda b: b"\r" not in b and b"\n" not in b)
_KNOWN_NAMES = (b"Tf-Task", b"Tf-Id", b"Nats-Msg-Id", b"Tf-Event", b"traceparent", b"Status")
_NAMES = st.sampled_from([*_KNOWN_NAMES, b"Nats-Expected-Stream", b"Tf-Traceback"]) | _LINE.filter(
    lambda b: b != b""
)
_VALUES = st.sampled_from([b"Probe", b"Nope", b"{stream}", b"order-1", b"a.b", b""]) | _LINE
_HEADERS = st.one_of(
    st.none(),
    st.lists(st.tuples(_NAMES, _VALUES), min_size=1, max_size=3).map(
        lambda pairs: header_block(*pairs)
    ),
    st.binary(max_size=24),  # not even a header block
)
_BODIES = (
    st.none() | st.sampled_from([b"{}", b'{"mark": "x"}', b"null", b""]) | st.binary(max_size=24)
)
_BATCHES = st.lists(st.tuples(_TAILS, _HEADERS, _BODIES), min_size=1, max_size=4)
_PLAINLY_VALID = re.compile(rb"Probe(\.[A-Za-z0-9_-]+)?")


@dataclass
class Fuzz:
    """The worker, the raw connection and what they did, kept across examples."""

    client: Client
    url: str
    raw: RawNats
    ran: Counter[int]
    marks: itertools.count[int] = field(default_factory=itertools.count)
    dead: dict[int, list[str]] = field(default_factory=dict)
    """Task stream sequence to the reasons of its dead letters."""
    dead_read: int = 0

    @property
    def prefix(self) -> bytes:
        return f"{self.client.namespace}.tasks.fuzz.".encode()

    async def publish(self, subject: bytes, body: bytes, headers: bytes | None) -> PubAck:
        """Publish; a connection the server closed over it is opened again."""
        try:
            return await self.raw.publish(subject, body, headers, timeout=2)
        except ConnectionError as exc:
            await self.raw.close()
            self.raw = await RawNats.connect(self.url)
            return PubAck(error=str(exc))

    async def read_dead(self) -> None:
        """Read the dead letters stored since the last call."""
        js, stream = self.client.js, topology.dead_stream(self.client.namespace)
        last = (await js.stream_info(stream)).state.last_seq
        for seq in range(self.dead_read + 1, last + 1):
            headers = (await js.get_msg(stream, seq)).headers or {}
            # Its message id is `<task id>:<task stream sequence>[:...]`; ids hold no colon.
            origin = int(headers[wire.MSG_ID].split(":")[1])
            self.dead.setdefault(origin, []).append(headers[wire.DEAD_REASON])
        self.dead_read = last

    async def queue_empty(self) -> bool:
        """Whether the queue holds nothing: stored, pending or unacknowledged."""
        js, ns = self.client.js, self.client.namespace
        stream = topology.queue_stream(ns, "fuzz")
        stored = (await js.stream_info(stream)).state.messages
        consumer = await js.consumer_info(stream, topology.WORKERS)
        return stored == 0 and not consumer.num_pending and not consumer.num_ack_pending


@pytest.fixture
async def fuzz(client: Client, nats_server: NatsServer) -> AsyncIterator[Fuzz]:
    """One worker and one raw connection for every example of the test."""
    ran: Counter[int] = Counter()
    app = App(client.namespace)

    @app.handle(Probe, max_attempts=2)
    async def probe(job: Probe, ctx: Context) -> int:
        ran[job.mark] += 1
        return job.mark

    async with running_worker(app, client, concurrency=8):
        state = Fuzz(client, nats_server.url, await RawNats.connect(nats_server.url), ran)
        try:
            yield state
        finally:
            await state.raw.close()


@settings(
    max_examples=40,
    derandomize=True,  # the same examples on every run, so CI is stable
    database=None,
    deadline=None,
    # No shrinking: a failing batch is small as drawn, and each failing try waits out
    # its settle deadline, so shrinking would outlast the test's timeout.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=_BATCHES)
@example(batch=[(b"Probe\xff\xfe", None, None)])  # not UTF-8
@example(batch=[(b"Pro\x0bbe", None, None)])  # a byte nats-py took for a separator
@example(batch=[(b"Probe", header_block((wire.TASK, "Send Email")), None)])
@example(batch=[(b"Probe", header_block((wire.MSG_ID, "order 42")), None)])
@example(batch=[(b"Probe", b"NATS/1.0", None)])  # shorter than a header block
@example(batch=[(b"Probe", header_block(("Nats-Expected-Stream", "{stream}")), b"{}")])
@example(batch=[(b"Probe", header_block(("A(b", "\xff"), ("Tf-Id", "x")), b"{}")])
async def test_every_stored_message_ends_exactly_once_and_the_worker_goes_on(
    fuzz: Fuzz, batch: list[Raw]
) -> None:
    stored: dict[int, tuple[int | None, bool]] = {}  # sequence: (its mark, plainly valid)
    stream = topology.queue_stream(fuzz.client.namespace, "fuzz").encode()
    for tail, headers, body in batch:
        mark = next(fuzz.marks) if body is None else None
        data = json.dumps({"mark": mark}).encode() if body is None else body
        block = None if headers is None else headers.replace(b"{stream}", stream)
        ack = await fuzz.publish(fuzz.prefix + tail, data, block)
        if ack.stored:  # not stored: refused (Nats-TTL, a wrong expected stream) or a repeat
            valid = headers is None and body is None and _PLAINLY_VALID.fullmatch(tail)
            stored[ack.seq] = (mark, bool(valid))

    def accounted(seq: int, mark: int | None) -> bool:
        return seq in fuzz.dead or (mark is not None and fuzz.ran[mark] > 0)

    async def settled() -> bool:
        await fuzz.read_dead()
        return all(accounted(s, m) for s, (m, _) in stored.items()) and await fuzz.queue_empty()

    await eventually(settled, f"every message of {batch!r} settled", timeout=10)
    for seq, (mark, plain) in stored.items():
        ran = fuzz.ran[mark] if mark is not None else 0
        dead = fuzz.dead.get(seq, [])
        assert ran + len(dead) == 1, f"seq {seq}: ran {ran} time(s), dead letters {dead}"
        assert not plain or ran == 1, f"seq {seq} was plainly valid but is dead: {dead}"

    mark = next(fuzz.marks)  # and the worker still works
    run = await fuzz.client.enqueue(Probe(mark=mark))
    assert await run.result(timeout=10) == mark
