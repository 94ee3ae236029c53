"""The worker's fast lane in `taskframe._tolerant`: its parser and header reader give what
nats-py's code gives (with the tolerant patterns), and `listen` / `publish_now` carry
messages on a real server."""

from __future__ import annotations

import asyncio
import gc
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS
from nats.errors import ConnectionClosedError
from nats.protocol import parser

from taskframe import Client
from taskframe._tolerant import TolerantClient, _fields, _parse, _Parser
from taskframe.testing import NatsServer, eventually

HEADER_BYTES = [b"a", b"B", b":", b" ", b"\t", b"\r\n", b"\x1c", b"\x0b", b"\xff", b"\xc3\xa9"]


@settings(max_examples=500)
@given(st.lists(st.sampled_from(HEADER_BYTES), max_size=40))
def test_header_fields_are_what_nats_py_reads(parts: list[bytes]) -> None:
    block = b"".join(parts)
    assert _fields(block) == (NATS._parse_header_lines(block) or None)


class Recorder:
    """What a parser hands its client: every message and every other operation, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def _hand(self, *args: Any) -> bool:
        return False  # nothing listened to: every message goes to `_process_msg`

    async def _process_msg(self, *args: Any) -> None:
        self.seen.append(("msg", *args))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.seen.append(("info", info))


TOKEN = st.binary(min_size=1, max_size=8).map(
    lambda b: bytes(c for c in b if c not in b" \t\r\n") or b"x"
)


@st.composite
def operation(draw: st.DrawFn) -> bytes:
    """One server operation as it goes on the wire (payloads may hold CRLF)."""
    kind = draw(st.sampled_from(["msg", "hmsg", "ping", "pong", "ok", "err"]))
    if kind in ("ping", "pong", "ok"):
        return {"ping": b"PING\r\n", "pong": b"PONG\r\n", "ok": b"+OK\r\n"}[kind]
    if kind == "err":
        return b"-ERR 'Permissions Violation'\r\n"
    subject, sid = draw(TOKEN), draw(st.integers(1, 99))
    reply = draw(st.one_of(st.just(b""), TOKEN))
    payload = draw(st.binary(max_size=30))
    gap = b" " + reply if reply else b""
    if kind == "msg":
        return b"MSG %b %d%b %d\r\n%b\r\n" % (subject, sid, gap, len(payload), payload)
    head = b"NATS/1.0\r\n" + draw(st.sampled_from([b"", b"Tf-Id: a\r\n"])) + b"\r\n"
    size = len(head) + len(payload)
    return b"HMSG %b %d%b %d %d\r\n%b%b\r\n" % (subject, sid, gap, len(head), size, head, payload)


class PatternParser(parser.Parser):
    """nats-py's parser on the tolerant patterns alone: what `_Parser` must agree with."""

    async def parse(self, data: bytes = b"") -> None:
        await _parse(self, data)


async def parsed(make: type[parser.Parser], chunks: list[bytes]) -> list[tuple[Any, ...]]:
    recorder = Recorder()
    reader = make(recorder)
    for chunk in chunks:
        await reader.parse(chunk)
    return recorder.seen


@settings(max_examples=300, deadline=None)
@given(st.lists(operation(), min_size=1, max_size=12), st.lists(st.integers(1, 60), max_size=8))
def test_the_parser_hands_over_what_the_patterns_read_however_the_bytes_are_cut(
    operations: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(operations)
    chunks, at = [], 0
    for cut in cuts:
        chunks.append(stream[at : at + cut])
        at += cut
    chunks.append(stream[at:])
    ours = asyncio.run(parsed(_Parser, chunks))
    theirs = asyncio.run(parsed(PatternParser, chunks))
    assert ours == theirs
    assert len(ours) == sum(op != b"+OK\r\n" for op in operations)  # +OK is swallowed


async def test_listen_and_publish_now_carry_messages_in_order_and_stop_at_unsubscribe(
    client: Client, nats_server: NatsServer
) -> None:
    nc = client.nc
    assert isinstance(nc, TolerantClient)
    got: list[tuple[str, bytes, dict[str, str] | None]] = []
    sub = await nc.listen("tolerant.x", lambda msg: got.append((msg.reply, msg.data, msg.headers)))
    for i in range(100):
        nc.publish_now("tolerant.x", b"%d" % i, reply=f"r.{i}")
    await nc.publish("tolerant.x", b"h", headers={"Tf-Id": "a.b", "Odd": " spaced "})
    await eventually(lambda: len(got) == 101, "101 messages listened to")
    assert got[:100] == [(f"r.{i}", b"%d" % i, None) for i in range(100)]
    assert got[100] == ("", b"h", {"Tf-Id": "a.b", "Odd": "spaced"})
    await sub.unsubscribe()
    nc.publish_now("tolerant.x", b"late")
    await nc.flush()
    assert len(got) == 101


async def test_listen_raw_gets_subject_body_and_headers_status_lines_included(
    client: Client,
) -> None:
    nc = client.nc
    assert isinstance(nc, TolerantClient)
    got: list[tuple[bytes, bytes, dict[str, str] | None]] = []
    sub = await nc.listen_raw("tolerant.raw.*", lambda *message: got.append(message))
    nc.publish_now("tolerant.raw.1", b"plain")
    await nc.publish("tolerant.raw.2", b"h", headers={"Tf-Id": "a.b"})
    nc.publish_now("tolerant.nobody.listens", b"", reply="tolerant.raw.3")  # the server: 503
    await eventually(lambda: len(got) == 3, "3 messages listened to")
    assert got[:2] == [
        (b"tolerant.raw.1", b"plain", None),
        (b"tolerant.raw.2", b"h", {"Tf-Id": "a.b"}),
    ]
    subject, body, headers = got[2]
    assert (subject, body, (headers or {}).get("Status")) == (b"tolerant.raw.3", b"", "503")
    await sub.unsubscribe()
    nc.publish_now("tolerant.raw.4", b"late")
    await nc.flush()
    assert len(got) == 3


async def test_publish_now_on_a_closed_connection_raises(nats_server: NatsServer) -> None:
    nc = TolerantClient()
    await nc.connect(nats_server.url)
    await nc.close()
    with pytest.raises(ConnectionClosedError):
        nc.publish_now("tolerant.closed", b"x")


async def test_reconnect_attempts_to_a_frozen_server_leave_no_socket_open(
    tmp_path: Path,
) -> None:
    with NatsServer(port=-1, store_dir=tmp_path) as server:
        nc = TolerantClient()
        quick: dict[str, Any] = {"ping_interval": 0.2, "max_outstanding_pings": 1}
        quick |= {"connect_timeout": 0.3, "reconnect_time_wait": 0.1}  # nats-py types: int
        await nc.connect(server.url, max_reconnect_attempts=-1, **quick)
        server.signal(signal.SIGSTOP)  # it still accepts connections, and never answers
        try:
            await eventually(lambda: nc._err is not None and nc.stats["reconnects"] == 0,
                             "a reconnect attempt to time out")  # fmt: skip
            await eventually(lambda: isinstance(nc._err, TimeoutError), "a connect timeout")
        finally:
            server.signal(signal.SIGCONT)
        await eventually(lambda: nc.is_connected and nc.stats["reconnects"] >= 1, "reconnected")
        await nc.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
