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
"""

from __future__ import annotations

import logging
import re
import types

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.protocol import parser

__all__ = ["TolerantClient"]

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
        await _parse(self, data)


class TolerantClient(NATS):
    """A nats-py client that reads every message the server delivers, whatever its bytes."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = _Parser(self)

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> Msg:
        # As nats-py's, but a subject that is not UTF-8 is kept (surrogate-escaped), not fatal.
        return self.msg_class(
            subject=subject.decode(errors="surrogateescape"),
            reply=reply.decode(errors="surrogateescape"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )

    async def _process_headers(self, headers: bytes | None) -> dict[str, str] | None:
        try:
            return await super()._process_headers(headers)
        except Exception:  # a block shorter than its version line: nats-py indexes past it
            assert headers is not None  # nats-py returns None for no headers before parsing
            _, _, lines = headers.partition(b"\r\n")
            # Its line parser skips names that are not ASCII and decodes values leniently.
            return self._parse_header_lines(lines) or None

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        try:
            await super()._process_msg(sid, subject, reply, data, headers)
        except Exception:
            # Last resort, for what the cases above do not foresee: one message is dropped
            # (a JetStream delivery comes back after ack_wait), not the whole connection.
            log.exception("message on %r dropped: nats-py could not read it", subject[:200])
