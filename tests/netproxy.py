"""A loopback TCP proxy that injects network faults, run in the test's own event loop.

    async with NetProxy("127.0.0.1", server.port) as proxy:
        worker = procs.worker(proxy.url)            # nats://127.0.0.1:<the proxy's port>
        await until(lambda: proxy.links, "the worker to connect")
        proxy.blackhole()                           # both directions, every connection
        ...
        proxy.heal()                                # what was held flows on, in order

Every connection accepted is a `Link` with two `Pipe`s: `up` (client to server) and
`down` (server to client). Each fault applies to one direction or both (`Direction`), and
to every connection (the `NetProxy` methods, which also apply to connections accepted
later) or to one (the same methods on a `Link`):

- `blackhole()`: stop forwarding, keep the connections open and keep the bytes. Nothing
  is lost: on `heal()` the held bytes flow on in order, as TCP retransmission would deliver
  them once a partition ends. Neither end is told anything, which is what a network
  partition (or a frozen middlebox) looks like: a half-open connection until some
  timeout notices. The proxy reads ahead at most `Pipe.READ_AHEAD` chunks; beyond that it
  stops reading and the kernel's buffers, then TCP flow control, push back on the sender.
- `drop()`: stop forwarding and discard the bytes, counted in `Pipe.dropped`. A byte stream
  with a hole in it is corrupt: after `heal()` a NATS peer typically sees a protocol error
  and closes the connection. That is the point of the mode: bytes that never arrive.
- `delay(seconds)`: forward every chunk, in order, `seconds` after the proxy read it.
- `cut()`: close the connections with a reset. Cutting `Direction.BOTH` closes both ends;
  cutting one direction closes only the end that direction leads to (`UP`: the server's
  side, `DOWN`: the client's side) and leaves the other end open but connected to nothing
  (its bytes are discarded, nothing reaches it): a half-open connection from that end's
  point of view. While a proxy-wide cut is in force, new connections are accepted and
  reset at once (the client sees its connection reset before the server said anything:
  to nats-py a failed attempt, like a refusal), so the listening port stays the proxy's
  and `heal()` needs no re-bind; after `heal()` they are forwarded again. A cut
  connection stays closed: TCP has no way back.
- `heal()`: forward again, at once, whatever is held.

A mode change applies to the chunk each pipe forwards next, so bytes held by a blackhole
are discarded if the pipe is switched to `drop()`, and forwarded at once by `heal()`. A
sender's close is held and delayed like its bytes but never dropped: when its turn comes
the proxy closes both ends. The bytes a client wrote before it closed its socket are
delivered at `heal()`, as the kernel of a closed socket keeps retransmitting them (one
approximation: a sender's reset is passed on like a close, after its held bytes, where
real TCP would discard what was not yet acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self


class Direction(enum.Flag):
    """Which way bytes flow: `UP` client to server, `DOWN` server to client."""

    UP = enum.auto()
    DOWN = enum.auto()
    BOTH = UP | DOWN


@dataclass(frozen=True, slots=True)
class Mode:
    """What a pipe does with the bytes it reads."""

    kind: Literal["forward", "blackhole", "drop", "delay"]
    seconds: float = 0.0

    def __str__(self) -> str:
        return f"delay({self.seconds:g}s)" if self.kind == "delay" else self.kind


FORWARD = Mode("forward")
BLACKHOLE = Mode("blackhole")
DROP = Mode("drop")


@dataclass(frozen=True, slots=True)
class _Chunk:
    at: float  # loop time the proxy read it
    data: bytes  # b"": the sender closed its side


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with RST, as a middlebox that kills it does (no orderly FIN)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Pipe:
    """One direction of one connection: reads from one socket, forwards to the other."""

    READ_AHEAD = 1024
    """Chunks (of up to 64 KiB) read but not yet forwarded, before the reader waits."""

    def __init__(
        self,
        name: str,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        mode: Mode,
        ended: asyncio.Event,
    ) -> None:
        self.name = name
        self.mode = mode
        self.forwarded = 0
        """Bytes written to the other end."""
        self.dropped = 0
        """Bytes discarded (`drop()`, or the other end was cut)."""
        self.held = 0
        """Bytes read but not yet forwarded or dropped."""
        self.source_gone = False  # its source end was cut: its end of input means nothing
        self.sink_gone = False  # its sink end was cut: what it reads goes nowhere
        self._source = source
        self._sink = sink
        self._ended = ended
        self._queue: asyncio.Queue[_Chunk] = asyncio.Queue(self.READ_AHEAD)
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<Pipe {self.name} {self.mode} forwarded={self.forwarded} held={self.held} "
            f"dropped={self.dropped}>"
        )

    def set(self, mode: Mode) -> None:
        """Apply `mode` from the next chunk on (and to a chunk waiting for its turn)."""
        self.mode = mode
        self._changed.set()
        self._changed = asyncio.Event()  # a fresh one for the next change

    async def read(self) -> None:
        """Read until the source ends; queue every chunk with the time it came."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self._source.read(65536)
            except OSError:
                data = b""  # reset by the peer: to the other side, a close
            if not data and self.source_gone:
                return  # we cut that end ourselves: the other end stays half-open
            self.held += len(data)
            await self._queue.put(_Chunk(loop.time(), data))
            if not data:
                return

    async def write(self) -> None:
        """Forward queued chunks as the mode says; an end of input closes the link."""
        loop = asyncio.get_running_loop()
        while True:
            chunk = await self._queue.get()
            mode = await self._turn(chunk, loop)
            self.held -= len(chunk.data)
            if not chunk.data:
                self._ended.set()
                return
            if mode.kind == "drop" or self.sink_gone:
                self.dropped += len(chunk.data)
                continue
            try:
                self._sink.write(chunk.data)
                await self._sink.drain()
            except OSError:
                self._ended.set()  # the other end went away: close the link
                return
            self.forwarded += len(chunk.data)

    async def _turn(self, chunk: _Chunk, loop: asyncio.AbstractEventLoop) -> Mode:
        """Wait until `chunk` may go (forwarded or dropped); the mode it goes under."""
        while True:
            changed, mode = self._changed, self.mode
            if mode.kind == "blackhole":
                await changed.wait()
                continue
            if mode.kind == "delay" and (wait := chunk.at + mode.seconds - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait)
                continue
            return mode


class Link:
    """One proxied connection: the client's socket, the server's socket, two pipes."""

    def __init__(
        self,
        number: int,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        modes: dict[Direction, Mode],
        on_close: Callable[[Link], None] = lambda link: None,
    ) -> None:
        self.number = number
        self.peer: tuple[str, int] = (client[1].get_extra_info("peername") or ("?", 0))[:2]
        """The client's address: which process is at the other end."""
        self._client, self._server = client[1], server[1]
        self._ended = asyncio.Event()
        self._on_close = on_close
        self.up = Pipe(f"#{number} up", client[0], server[1], modes[Direction.UP], self._ended)
        self.down = Pipe(
            f"#{number} down", server[0], client[1], modes[Direction.DOWN], self._ended
        )
        self.closed = False
        self._gone = Direction(0)  # the ends that were cut: UP the server's, DOWN the client's
        self._tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        state = " closed" if self.closed else (f" cut={self._gone.name}" if self._gone else "")
        return (
            f"<Link #{self.number} client={self.peer[0]}:{self.peer[1]}{state} "
            f"up={self.up.mode} (fwd {self.up.forwarded}, held {self.up.held}, "
            f"dropped {self.up.dropped}) down={self.down.mode} (fwd {self.down.forwarded}, "
            f"held {self.down.held}, dropped {self.down.dropped})>"
        )

    def pipes(self, direction: Direction) -> Iterator[Pipe]:
        """The pipes of `direction`."""
        if Direction.UP in direction:
            yield self.up
        if Direction.DOWN in direction:
            yield self.down

    def start(self) -> None:
        """Start forwarding (the proxy does this when it accepts the connection)."""
        loop = asyncio.get_running_loop()
        for pipe in (self.up, self.down):
            self._tasks.append(loop.create_task(pipe.read(), name=f"netproxy-read-{pipe.name}"))
            self._tasks.append(loop.create_task(pipe.write(), name=f"netproxy-write-{pipe.name}"))
        self._tasks.append(loop.create_task(self._close_when_ended()))

    async def _close_when_ended(self) -> None:
        await self._ended.wait()
        self._close_sockets()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    def _close_sockets(self) -> None:
        if not self.closed:
            self.closed = True
            for writer in (self._client, self._server):
                writer.close()
            self._on_close(self)

    async def close(self) -> None:
        """Close both sockets and stop forwarding."""
        self._close_sockets()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in (self._client, self._server):
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def blackhole(self, direction: Direction = Direction.BOTH) -> None:
        """Hold `direction`'s bytes (connection open) until `heal()`."""
        for pipe in self.pipes(direction):
            pipe.set(BLACKHOLE)

    def drop(self, direction: Direction = Direction.BOTH) -> None:
        """Discard `direction`'s bytes until `heal()`."""
        for pipe in self.pipes(direction):
            pipe.set(DROP)

    def delay(self, seconds: float, direction: Direction = Direction.BOTH) -> None:
        """Forward `direction`'s bytes `seconds` late, in order, until `heal()`."""
        for pipe in self.pipes(direction):
            pipe.set(Mode("delay", seconds))

    def heal(self, direction: Direction = Direction.BOTH) -> None:
        """Forward `direction` again, held bytes first (a cut end stays cut)."""
        for pipe in self.pipes(direction):
            pipe.set(FORWARD)

    def cut(self, direction: Direction = Direction.BOTH) -> None:
        """Reset the end(s) `direction` leads to; the other end, if any, stays half-open."""
        if Direction.UP in direction and Direction.UP not in self._gone:
            # The server's end goes: what the client sends goes nowhere, and the end of the
            # server's socket is ours, not news for the client.
            self.up.sink_gone = self.down.source_gone = True
            _reset(self._server)
        if Direction.DOWN in direction and Direction.DOWN not in self._gone:
            self.down.sink_gone = self.up.source_gone = True
            _reset(self._client)
        self._gone |= direction
        if self._gone == Direction.BOTH:
            self._ended.set()


class NetProxy:
    """Listens on `host`:0 and forwards every connection to `target_host`:`target_port`.

    Start it with `async with` (or `start()` / `close()`), in the loop the test runs in:
    it forwards only while that loop runs, so a test must wait with `await`, never block.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.links: list[Link] = []
        """Open connections, oldest first."""
        self.accepted = 0
        self.refused = 0
        """Connections reset at once because a proxy-wide cut was in force."""
        self._modes = {Direction.UP: FORWARD, Direction.DOWN: FORWARD}
        self._cut = Direction(0)
        self._numbers = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._accepting: set[asyncio.Task[None]] = set()
        self._every: list[Link] = []  # closed ones too: `close()` awaits their sockets

    def __repr__(self) -> str:
        cut = f" cut={self._cut.name}" if self._cut else ""
        return (
            f"<NetProxy {self.host}:{self.port} -> {self.target[0]}:{self.target[1]} "
            f"up={self._modes[Direction.UP]} down={self._modes[Direction.DOWN]}{cut} "
            f"links={len(self.links)} accepted={self.accepted} refused={self.refused}>"
        )

    @property
    def url(self) -> str:
        """The proxy's address as a NATS URL."""
        return f"nats://{self.host}:{self.port}"

    async def start(self) -> Self:
        """Listen on a free port (`port` says which)."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._accepting):
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        for link in self._every:
            await link.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._accepting.add(task)
        try:
            await self._open(reader, writer)
        finally:
            self._accepting.discard(task)

    async def _open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            _reset(writer)
            return
        try:
            server = await asyncio.open_connection(*self.target)
        except OSError:  # the target is down: the client sees what it would see directly
            _reset(writer)
            return
        except asyncio.CancelledError:
            _reset(writer)
            raise
        if self._cut:  # cut while we connected
            self.refused += 1
            _reset(writer)
            _reset(server[1])
            return
        self.accepted += 1
        link = Link(next(self._numbers), (reader, writer), server, dict(self._modes), self._forget)
        self.links.append(link)
        self._every.append(link)
        link.start()

    def _forget(self, link: Link) -> None:
        if link in self.links:
            self.links.remove(link)

    def _set(self, direction: Direction, mode: Mode) -> None:
        for d in (Direction.UP, Direction.DOWN):
            if d in direction:
                self._modes[d] = mode
        for link in self.links:
            for pipe in link.pipes(direction):
                pipe.set(mode)

    def blackhole(self, direction: Direction = Direction.BOTH) -> None:
        """Hold `direction`'s bytes on every connection, and on new ones, until `heal()`."""
        self._set(direction, BLACKHOLE)

    def drop(self, direction: Direction = Direction.BOTH) -> None:
        """Discard `direction`'s bytes on every connection, and on new ones, until `heal()`."""
        self._set(direction, DROP)

    def delay(self, seconds: float, direction: Direction = Direction.BOTH) -> None:
        """Forward `direction`'s bytes `seconds` late on every connection, until `heal()`."""
        self._set(direction, Mode("delay", seconds))

    def heal(self, direction: Direction = Direction.BOTH) -> None:
        """Forward `direction` again everywhere, held bytes first; accept connections again."""
        self._set(direction, FORWARD)
        self._cut &= ~direction

    def cut(self, direction: Direction = Direction.BOTH) -> None:
        """Cut every connection (see `Link.cut`) and reset new ones until `heal()`."""
        self._cut |= direction
        for link in list(self.links):
            link.cut(direction)
