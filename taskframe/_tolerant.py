"""A nats-py client whose read loop survives whatever bytes the server delivers.

The server stores and delivers what any publisher sent, and a raw publisher (one that
speaks the protocol over a socket) can send a subject or a header block that nats-py's
reader does not expect. nats-py then ends its read loop: the connection stays open but
unread until the ping timeout, or it reconnects, and the redelivery of the same message
does it again, so one message stops a worker for good. Reproduced:

    subject bytes not UTF-8           UnicodeDecodeError in `_build_message`
    subject with \\x0b or \\x0c          ProtocolError: nats-py reads those as separators
    header block shorter than         IndexError in `_process_headers`
      "NATS/1.0\\r\\n"

`TolerantClient` reads such a message as a message instead (bytes that are not UTF-8
are kept with `surrogateescape`), so the worker sees it and dead-letters it
(`taskframe._inbound`).

It also has the worker's fast lane (`listen`, `publish_now`): deliveries and
confirmations handed to a plain function from the read loop, and acks and records queued
for the flusher without a coroutine each. nats-py puts every message in a queue that a
task of its own empties, and awaits three coroutines per publish; at tens of thousands of
messages a second those hops are a quarter of a worker's CPU (bench/DEFAULT_PATH.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
import types
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.client import Srv
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, ConnectionDrainingError, MaxPayloadError
from nats.protocol import parser
from nats.protocol.command import pub_cmd

__all__ = ["TolerantClient", "listen", "listen_raw", "sender"]

Listener = Callable[[Msg], None]
"""A plain function given each message of a `listen` subscription, in the read loop."""

RawListener = Callable[[bytes, bytes, dict[str, str] | None], None]
"""A plain function given the subject, body and headers of each message of a `listen_raw`
subscription, in the read loop: no `Msg` is built (for replies read once and dropped)."""

_CONNECTED = NATS.CONNECTED
_PLAIN = b"NATS/1.0\r\n"  # a header block without a status line: the common case

log = logging.getLogger("taskframe._tolerant")

# nats-py's patterns, with the separators the server writes (spaces; tabs to be safe) in
# place of `\s`, which also matches \x0b and \x0c: bytes the server accepts in a subject.
_ARG = rb"([^ \t\r\n]+)"
_MSG = re.compile(rb"\AMSG[ \t]+%b[ \t]+%b[ \t]+(%b[ \t]+)?(\d+)\r\n" % (_ARG, _ARG, _ARG))
_HMSG = re.compile(
    rb"\AHMSG[ \t]+%b[ \t]+%b[ \t]+(%b[ \t]+)?(\d+)[ \t]+(\d+)\r\n" % (_ARG, _ARG, _ARG)
)

# nats-py's own `Parser.parse`, reading those patterns instead of its module's: the same
# code (no copy to keep in step), and other clients in the process keep theirs.
_parse = types.FunctionType(
    parser.Parser.parse.__code__,
    {**vars(parser), "MSG_RE": _MSG, "HMSG_RE": _HMSG},
    "parse",
    parser.Parser.parse.__defaults__,
)


class _Parser(parser.Parser):
    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        if self.state == parser.AWAITING_CONTROL_LINE:
            await self._messages(buf)
        await _parse(self, b"")  # the rest: other operations, a partial message, odd bytes

    async def _messages(self, buf: bytearray) -> None:
        """Hand over every whole MSG and HMSG at the start of `buf`, as `_parse` would, for
        less than half its cost; stop at anything else for `_parse` to read.

        The server writes single spaces between the arguments: a line split otherwise
        (a tab) is left to `_parse`'s patterns.
        """
        nc = self.nc
        process, hand = nc._process_msg, nc._hand
        while True:
            if buf.startswith(b"HMSG "):
                end = buf.find(b"\r\n")
                parts = bytes(buf[5:end]).split(b" ") if end > 0 else ()
                if len(parts) == 5:
                    subject, sid, reply, head, size = parts
                elif len(parts) == 4:
                    (subject, sid, head, size), reply = parts, b""
                else:
                    return
            elif buf.startswith(b"MSG "):
                end = buf.find(b"\r\n")
                parts = bytes(buf[4:end]).split(b" ") if end > 0 else ()
                if len(parts) == 4:
                    subject, sid, reply, size = parts
                elif len(parts) == 3:
                    (subject, sid, size), reply = parts, b""
                else:
                    return
                head = b"0"
            else:
                return
            if not (sid.isdigit() and head.isdigit() and size.isdigit()):
                return
            start, total, split = end + 2, int(size), int(head)
            if len(buf) < start + total + 2:
                return  # not all here yet
            headers = bytes(buf[start : start + split]) if split else None
            payload = bytes(buf[start + split : start + total])
            del buf[: start + total + 2]
            number = int(sid)
            if not hand(number, subject, reply, payload, headers):
                await process(number, subject, reply, payload, headers)


class TolerantClient(NATS):
    """A nats-py client that reads every message the server delivers, whatever its bytes."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = _Parser(self)
        self._listeners: dict[int, Listener] = {}
        self._raw: dict[int, RawListener] = {}

    async def listen(self, subject: str, listener: Listener) -> Subscription:
        """Subscribe `listener`, called in the read loop with each message as it is read:
        no queue and no task between them. It must be quick and must not wait; what it
        raises is logged and the message dropped."""
        sub = await self.subscribe(subject, pending_msgs_limit=-1)
        self._listeners[sub._id] = listener
        return sub

    async def listen_raw(self, subject: str, listener: RawListener) -> Subscription:
        """`listen`, but `listener` gets the message's subject, body and headers."""
        sub = await self.subscribe(subject, pending_msgs_limit=-1)
        self._raw[sub._id] = listener
        return sub

    async def _connect_to_server(self, s: Srv) -> None:
        # nats-py keeps one transport object and gives it a new socket on each attempt: a
        # connection that failed after its TCP connect (a frozen server still accepts, in
        # the kernel, and never sends INFO) was replaced without being closed.
        if self._transport is not None:
            self._transport.close()  # type: ignore[no-untyped-call]
        await super()._connect_to_server(s)

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._listeners.pop(sid, None)
        self._raw.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    def publish_now(self, subject: str, payload: bytes = b"", reply: str = "") -> None:
        """`publish` for a caller that must not wait: the command goes in the pending
        buffer and the flusher is woken, as `publish` does, without its coroutines.

        Subjects are not checked: only for subjects the server gave (a message's reply
        subject) or that taskframe built from checked parts.
        """
        status = self._status
        if status != _CONNECTED:
            if status == NATS.CLOSED:
                raise ConnectionClosedError
            if status == NATS.DRAINING_PUBS:
                raise ConnectionDrainingError
        size = len(payload)
        if size > self._max_payload:
            raise MaxPayloadError
        command = pub_cmd(subject, reply, payload)
        stats = self.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += size
        self._pending.append(command)
        self._pending_data_size += len(command)
        flushes = self._flush_queue
        # As `publish`: while reconnecting, the buffer is kept and sent once connected.
        if flushes is not None and (status == _CONNECTED or self.is_connected) and flushes.empty():
            flushes.put_nowait(asyncio.get_running_loop().create_future())

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> Msg:
        # As nats-py's, but a subject that is not UTF-8 is kept (surrogate-escaped), not fatal.
        # Arguments by position: a dataclass takes them at half the cost of keywords.
        return self.msg_class(
            self,
            subject.decode("utf-8", "surrogateescape"),
            reply.decode("utf-8", "surrogateescape"),
            data,
            headers,
            None,  # _metadata
            False,  # _ackd
            sid,
        )

    async def _process_headers(self, headers: bytes | None) -> dict[str, str] | None:
        try:
            return await super()._process_headers(headers)
        except Exception:  # a block shorter than its version line: nats-py indexes past it
            assert headers is not None  # nats-py returns None for no headers before parsing
            _, _, lines = headers.partition(b"\r\n")
            # Its line parser skips names that are not ASCII and decodes values leniently.
            return self._parse_header_lines(lines) or None

    def _hand(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> bool:
        """Give a message to its `listen`er or `listen_raw`er, in the read loop, unless its
        header block has a status line; False if it was not given (`_process_msg` then)."""
        raw = self._raw.get(sid)
        listener = self._listeners.get(sid) if raw is None else None
        if (raw is None and listener is None) or (headers and not headers.startswith(_PLAIN)):
            return False
        try:
            fields = _fields(headers[10:]) if headers else None
            self._give(sid, subject, reply, data, fields, raw, listener)
        except Exception:
            _dropped(subject)
        return True

    def _give(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        fields: dict[str, str] | None,
        raw: RawListener | None,
        listener: Listener | None,
    ) -> None:
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        if raw is not None:
            raw(subject, data, fields)
        elif listener is not None:
            listener(self._build_message(sid, subject, reply, data, fields))

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        try:
            listener = self._listeners.get(sid)
            raw = self._raw.get(sid)
            if listener is None and raw is None:
                await super()._process_msg(sid, subject, reply, data, headers)
                return
            if not headers:
                fields = None
            elif headers.startswith(_PLAIN):
                fields = _fields(headers[10:])
            else:  # a status line (a pull request's end, no responders): nats-py reads it
                fields = await self._process_headers(headers)
            self._give(sid, subject, reply, data, fields, raw, listener)
        except Exception:
            _dropped(subject)


def _dropped(subject: bytes) -> None:
    # Last resort, for what the cases above do not foresee: one message is dropped (a
    # JetStream delivery comes back after ack_wait), not the whole connection.
    log.exception("message on %r dropped: nats-py could not read it", subject[:200])


_NAMES_KEPT = 256
_names: dict[bytes, str | None] = {}
"""Header names already read (a worker sees few): the key each gives, or None if skipped."""


def _fields(block: bytes) -> dict[str, str] | None:
    """nats-py's `_parse_header_lines` of a header block (None if empty): the same
    result, for less (each name read once)."""
    fields = {}
    if block.endswith(b"\r\n\r\n"):  # as the server writes it: the empty lines give nothing
        block = block[:-4]
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        try:
            key = _names[name]
        except KeyError:
            key = _name(name)
            if len(_names) >= _NAMES_KEPT:  # bounded, whatever producers send
                _names.clear()
            _names[name] = key
        if key is not None:
            fields[key] = value.strip().decode("utf-8", "replace")
    return fields or None


def _name(name: bytes) -> str | None:
    """The key a header name gives, or None where nats-py skips it (not ASCII, or
    whitespace inside)."""
    if not name.isascii():
        return None
    key = name.strip().decode()
    return key if not key or key.split() == [key] else None


async def listen(nc: NATS, subject: str, listener: Listener) -> Subscription:
    """`TolerantClient.listen` on a TolerantClient; an ordinary subscription otherwise."""
    if isinstance(nc, TolerantClient):
        return await nc.listen(subject, listener)

    async def call(msg: Msg) -> None:
        listener(msg)

    return await nc.subscribe(subject, cb=call, pending_msgs_limit=-1)


async def listen_raw(nc: NATS, subject: str, listener: RawListener) -> Subscription:
    """`TolerantClient.listen_raw` on a TolerantClient; an ordinary subscription otherwise."""
    if isinstance(nc, TolerantClient):
        return await nc.listen_raw(subject, listener)

    async def call(msg: Msg) -> None:
        listener(msg.subject.encode(errors="surrogateescape"), msg.data, msg.headers)

    return await nc.subscribe(subject, cb=call, pending_msgs_limit=-1)


Sender = Callable[[str, bytes, str], None]
"""`publish_now` bound to a connection: subject, payload, reply."""

_sending: set[asyncio.Task[None]] = set()


def sender(nc: NATS) -> Sender:
    """`nc.publish_now` on a TolerantClient; a publish in a task otherwise."""
    if isinstance(nc, TolerantClient):
        return nc.publish_now

    def publish(subject: str, payload: bytes = b"", reply: str = "") -> None:
        task = asyncio.get_running_loop().create_task(nc.publish(subject, payload, reply=reply))
        _sending.add(task)
        task.add_done_callback(_sending.discard)

    return publish
