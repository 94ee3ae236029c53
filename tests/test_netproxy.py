"""The network-fault proxy (tests/netproxy.py) does what each of its modes says.

Against a plain TCP echo server in the test's loop, then a real nats-server with a nats-py
client. Absence ("nothing arrived") is asserted through the proxy's own counters: a pipe
that forwarded 0 bytes delivered nothing, whatever the timing.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
import nats.errors
import pytest

from taskframe.testing import NatsServer, eventually
from tests.netproxy import Direction, NetProxy


@dataclass
class Conn:
    """One connection the echo server accepted."""

    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    first_at: float | None = None  # monotonic time of its first bytes
    ended: bool = False


class Echo:
    """A TCP echo server in the test's loop that remembers what each connection sent."""

    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            conn.writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(writer)
        self.conns.append(conn)
        try:
            while data := await reader.read(65536):
                conn.first_at = conn.first_at or time.monotonic()
                conn.received += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            conn.ended = True
            writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[NetProxy]:
    async with NetProxy("127.0.0.1", echo.port) as running:
        yield running


@contextlib.asynccontextmanager
async def dial(proxy: NetProxy) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection through `proxy`, closed at the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 5)


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the other end closed or reset the connection (waits up to 5 s for it)."""
    try:
        return await asyncio.wait_for(reader.read(100), 5) == b""
    except ConnectionResetError:
        return True


async def test_forwards_both_ways_and_says_where(echo: Echo, proxy: NetProxy) -> None:
    async with dial(proxy) as (reader, writer):
        writer.write(b"hello")
        assert await read(reader, 5) == b"hello"
        [link] = proxy.links
        assert f"127.0.0.1:{proxy.port} -> 127.0.0.1:{echo.port}" in repr(proxy)
        assert "links=1" in repr(proxy)
        assert (link.up.forwarded, link.down.forwarded) == (5, 5)
        assert "up=forward (fwd 5" in repr(link)
        assert proxy.url == f"nats://127.0.0.1:{proxy.port}"


async def test_blackhole_keeps_the_connection_and_the_bytes_until_heal(
    echo: Echo, proxy: NetProxy
) -> None:
    async with dial(proxy) as (reader, writer):
        writer.write(b"0")
        assert await read(reader, 1) == b"0"
        [link] = proxy.links
        [conn] = echo.conns

        proxy.blackhole(Direction.UP)
        writer.write(b"held")
        await eventually(lambda: link.up.held == 4, "the proxy to hold 4 bytes", timeout=5)
        assert link.up.forwarded == 1  # so the server has nothing new
        assert bytes(conn.received) == b"0"
        assert "up=blackhole" in repr(proxy)
        proxy.heal(Direction.UP)
        assert await read(reader, 4) == b"held"  # there and back, in order

        proxy.blackhole(Direction.DOWN)
        writer.write(b"back")
        await eventually(
            lambda: bytes(conn.received) == b"0heldback", "the server to get it", timeout=5
        )
        await eventually(lambda: link.down.held == 4, "the echo to be held", timeout=5)
        assert link.down.forwarded == 5  # so the client has nothing new
        proxy.heal()
        assert await read(reader, 4) == b"back"
        assert not conn.ended
        assert not link.closed


async def test_drop_discards_the_bytes_and_heal_forwards_new_ones(
    echo: Echo, proxy: NetProxy
) -> None:
    async with dial(proxy) as (reader, writer):
        writer.write(b"0")
        assert await read(reader, 1) == b"0"
        [link] = proxy.links
        proxy.drop(Direction.UP)
        writer.write(b"lost")
        await eventually(lambda: link.up.dropped == 4, "the proxy to drop 4 bytes", timeout=5)
        proxy.heal()
        writer.write(b"kept")
        assert await read(reader, 4) == b"kept"
        assert bytes(echo.conns[0].received) == b"0kept"
        assert (link.up.held, link.up.dropped) == (0, 4)

        proxy.drop(Direction.DOWN)
        writer.write(b"gone")
        await eventually(lambda: link.down.dropped == 4, "the echo to be dropped", timeout=5)
        proxy.heal()
        writer.write(b"here")
        assert await read(reader, 4) == b"here"


async def test_delay_forwards_every_chunk_in_order_after_the_delay(
    echo: Echo, proxy: NetProxy
) -> None:
    async with dial(proxy) as (reader, writer):
        writer.write(b"0")
        assert await read(reader, 1) == b"0"
        [conn] = echo.conns
        conn.first_at = None
        proxy.delay(0.4, Direction.UP)
        sent = time.monotonic()
        for part in (b"1", b"2", b"3"):
            writer.write(part)
            await writer.drain()
        await eventually(lambda: len(conn.received) == 4, "the delayed bytes", timeout=5)
        assert bytes(conn.received) == b"0123"
        assert conn.first_at is not None
        assert conn.first_at - sent >= 0.4
        assert await read(reader, 3) == b"123"

        proxy.heal(Direction.UP)
        proxy.delay(0.3, Direction.DOWN)
        conn.first_at = None
        writer.write(b"4")
        assert await read(reader, 1) == b"4"
        back = time.monotonic()
        assert conn.first_at is not None  # the server echoed it at once; the proxy held it
        assert back - conn.first_at >= 0.29


async def test_delay_holds_back_the_first_bytes_by_the_delay(echo: Echo, proxy: NetProxy) -> None:
    proxy.delay(0.4)  # a new connection gets the proxy-wide mode too
    async with dial(proxy) as (reader, writer):
        sent = time.monotonic()
        writer.write(b"x")
        await eventually(
            lambda: echo.conns and echo.conns[0].first_at, "the server to get it", timeout=5
        )
        first_at = echo.conns[0].first_at
        assert first_at is not None
        assert first_at - sent >= 0.4
        assert await read(reader, 1) == b"x"
        assert time.monotonic() - sent >= 0.8  # delayed there and back


async def test_cut_resets_both_ends_refuses_new_connections_until_heal(
    echo: Echo, proxy: NetProxy
) -> None:
    async with dial(proxy) as (reader, writer):
        writer.write(b"0")
        assert await read(reader, 1) == b"0"
        proxy.cut()
        assert await closed_by_peer(reader)
        await eventually(
            lambda: echo.conns[0].ended, "the server to see the connection go", timeout=5
        )
        await eventually(lambda: not proxy.links, "the link to be forgotten", timeout=5)

    async with dial(proxy) as (reader, writer):  # accepted by the kernel, then reset
        assert await closed_by_peer(reader)
    assert proxy.refused == 1
    assert len(echo.conns) == 1
    assert "cut=BOTH" in repr(proxy)

    proxy.heal()
    async with dial(proxy) as (reader, writer):
        writer.write(b"again")
        assert await read(reader, 5) == b"again"
    assert (proxy.accepted, proxy.refused) == (2, 1)


async def test_cutting_one_direction_leaves_the_other_end_half_open(
    echo: Echo, proxy: NetProxy
) -> None:
    async with dial(proxy) as (reader, writer):
        writer.write(b"0")
        assert await read(reader, 1) == b"0"
        [link] = proxy.links
        [conn] = echo.conns
        link.cut(Direction.DOWN)  # the client's end goes; the server's stays open
        assert await closed_by_peer(reader)
        conn.writer.write(b"ping")  # the server still talks: the proxy reads and discards it
        await eventually(
            lambda: link.down.dropped == 4, "the server's bytes to be discarded", timeout=5
        )
        assert not link.closed
        assert proxy.links == [link]
        assert "cut=DOWN" in repr(link)
        link.cut(Direction.UP)  # now the server's end too
        await eventually(lambda: conn.ended, "the server to see the connection go", timeout=5)
        assert link.closed
        assert not proxy.links
    async with dial(proxy) as (reader, writer):  # a per-link cut refuses nothing
        writer.write(b"new")
        assert await read(reader, 3) == b"new"


async def test_faults_apply_to_one_connection_or_to_all(echo: Echo, proxy: NetProxy) -> None:
    async with dial(proxy) as (r1, w1), dial(proxy) as (r2, w2):
        for w, r in ((w1, r1), (w2, r2)):
            w.write(b"0")
            assert await read(r, 1) == b"0"
        one, two = proxy.links
        one.blackhole()
        w1.write(b"held")
        w2.write(b"free")
        assert await read(r2, 4) == b"free"
        await eventually(lambda: one.up.held == 4, "link one to hold its bytes", timeout=5)
        assert "up=forward" in repr(proxy)  # the proxy-wide mode did not change
        one.heal()
        assert await read(r1, 4) == b"held"

        proxy.blackhole(Direction.DOWN)
        async with dial(proxy) as (r3, w3):
            await eventually(lambda: len(proxy.links) == 3, "the third connection", timeout=5)
            three = proxy.links[2]
            w3.write(b"new")
            await eventually(
                lambda: three.down.held == 3, "the new link to hold the echo", timeout=5
            )
            assert two.down.mode == three.down.mode
            proxy.heal()
            assert await read(r3, 3) == b"new"


async def test_a_nats_client_through_the_proxy(nats_server: NatsServer) -> None:
    disconnected, reconnected = asyncio.Event(), asyncio.Event()

    async def on_disconnect() -> None:
        disconnected.set()

    async def on_reconnect() -> None:
        reconnected.set()

    async with NetProxy("127.0.0.1", nats_server.port) as proxy:
        direct = await nats.connect(nats_server.url)
        nc = await nats.connect(
            proxy.url,
            ping_interval=30,  # only the proxy may tell this client anything
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        try:
            sub = await direct.subscribe("netproxy.test")
            await direct.flush()
            [link] = proxy.links

            proxy.blackhole()
            sent = link.up.forwarded
            await nc.publish("netproxy.test", b"during")
            await eventually(lambda: link.up.held > 0, "the publish to be held", timeout=5)
            assert link.up.forwarded == sent  # so the server has not seen it
            assert nc.is_connected  # and nothing told the client
            # No `nc.flush(timeout)` here: in nats-py 2.16 a flush that times out leaves its
            # cancelled future in the PONG queue, and the PONG that comes after the heal
            # kills the client's read loop (InvalidStateError): the client goes deaf.
            proxy.heal()
            assert (await sub.next_msg(timeout=5)).data == b"during"
            await nc.flush(timeout=5)

            proxy.cut()
            await asyncio.wait_for(disconnected.wait(), 5)
            await eventually(
                lambda: proxy.refused >= 1, "a reconnect attempt to be refused", timeout=5
            )
            assert not reconnected.is_set()
            proxy.heal()
            await asyncio.wait_for(reconnected.wait(), 5)
            await nc.publish("netproxy.test", b"after")
            assert (await sub.next_msg(timeout=5)).data == b"after"
        finally:
            await nc.close()
            await direct.close()
