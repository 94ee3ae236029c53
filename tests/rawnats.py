"""A bare NATS client over a plain TCP connection: it sends whatever bytes it is given.

nats-py checks subjects and headers before it sends them, so it cannot play a careless
producer in another language. This one can: a subject or a header block is any bytes the
server accepts, and each publish waits for the server's PubAck (or its error).

    raw = await RawNats.connect(server.url)
    ack = await raw.publish(b"ns.tasks.q.\\xff", b"{}", header_block(("Tf-Task", "A B")))
    await raw.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_CONNECT = {"verbose": False, "pedantic": False, "headers": True, "protocol": 1, "echo": False}


@dataclass(frozen=True, slots=True)
class PubAck:
    """What the server said about one publish: stored (with its sequence) or an error."""

    seq: int = 0
    duplicate: bool = False
    error: str = ""

    @property
    def stored(self) -> bool:
        """Whether the stream holds a new message for this publish."""
        return self.seq > 0 and not self.duplicate and not self.error


def header_block(*pairs: tuple[str | bytes, str | bytes]) -> bytes:
    """A header block as NATS sends it: the version line, `name: value` lines, a blank line."""
    lines = [b"NATS/1.0\r\n"]
    for name, value in pairs:
        n = name.encode() if isinstance(name, str) else name
        v = value.encode() if isinstance(value, str) else value
        lines.append(n + b": " + v + b"\r\n")
    return b"".join(lines) + b"\r\n"


class RawNats:
    """One raw connection: publishes wait for their PubAck on a private inbox."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._inbox = b"_RAW_INBOX." + str(id(self)).encode()
        self._tokens = itertools.count()
        self._waiting: dict[bytes, asyncio.Future[PubAck]] = {}
        self._errors: list[str] = []
        self._pongs: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str) -> RawNats:
        """Connect to `url` (nats://127.0.0.1:port) and subscribe to the reply inbox."""
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        await reader.readline()  # INFO
        raw = cls(reader, writer)
        writer.write(b"CONNECT " + json.dumps(_CONNECT).encode() + b"\r\n")
        writer.write(b"SUB " + raw._inbox + b".* 1\r\nPING\r\n")
        await writer.drain()
        while (line := await reader.readline()) != b"PONG\r\n":
            if not line or line.startswith(b"-ERR"):
                raise ConnectionError(f"server refused the raw connection: {line!r}")
        raw._task = asyncio.create_task(raw._read(), name="rawnats-read")
        return raw

    @property
    def closed(self) -> bool:
        """Whether the server closed the connection (it does after some protocol errors)."""
        return self._task is None or self._task.done()

    def send(
        self, subject: bytes, body: bytes, headers: bytes | None = None, reply: bytes = b""
    ) -> None:
        """Write one PUB (or HPUB, with the raw header block `headers`); no confirmation."""
        if self.closed:
            raise ConnectionError("raw connection closed")
        args = subject + (b" " + reply if reply else b"")
        if headers is None:
            self._writer.write(b"PUB " + args + b" " + str(len(body)).encode() + b"\r\n")
        else:
            sizes = f"{len(headers)} {len(headers) + len(body)}".encode()
            self._writer.write(b"HPUB " + args + b" " + sizes + b"\r\n" + headers)
        self._writer.write(body + b"\r\n")

    async def ping(self, timeout: float = 5.0) -> None:
        """Wait until the server answered a PING: it has read everything sent before."""
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        self._writer.write(b"PING\r\n")
        await self._writer.drain()
        async with asyncio.timeout(timeout):
            await pong

    async def publish(
        self, subject: bytes, body: bytes, headers: bytes | None = None, timeout: float = 5.0
    ) -> PubAck:
        """Publish `body` (with the raw header block `headers`) and wait for the PubAck."""
        token = str(next(self._tokens)).encode()
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        self.send(subject, body, headers, reply=self._inbox + b"." + token)
        await self._writer.drain()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise ConnectionError(f"no PubAck for {subject!r}; errors: {self._errors}") from None
        finally:
            self._waiting.pop(token, None)

    async def close(self) -> None:
        """Close the connection and stop reading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                if line.startswith((b"MSG ", b"HMSG ")):
                    await self._on_msg(line)
                elif line == b"PING\r\n":
                    self._writer.write(b"PONG\r\n")
                elif line == b"PONG\r\n" and self._pongs:
                    self._pongs.pop(0).set_result(None)
                elif line.startswith(b"-ERR"):
                    self._errors.append(line.decode(errors="replace").strip())
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            error = ConnectionError(f"raw connection closed; errors: {self._errors}")
            futures: list[asyncio.Future[Any]] = [*self._waiting.values(), *self._pongs]
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def _on_msg(self, line: bytes) -> None:
        args = line.split()
        size = int(args[-1])
        header_size = int(args[-2]) if args[0] == b"HMSG" else 0
        data = await self._reader.readexactly(size + 2)
        body = data[header_size:size]
        future = self._waiting.get(args[1].rsplit(b".", 1)[-1])
        if future is None or future.done():
            return
        if not body:  # a status only: 503, no stream listens on the subject
            future.set_result(PubAck(error=data[:header_size].decode(errors="replace").strip()))
            return
        answer: dict[str, Any] = json.loads(body)
        if "error" in answer:
            future.set_result(PubAck(error=str(answer["error"].get("description", answer))))
        else:
            future.set_result(PubAck(seq=answer["seq"], duplicate=answer.get("duplicate", False)))
