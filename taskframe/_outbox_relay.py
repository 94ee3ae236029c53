"""The relay: sends the committed rows of the outbox table, in order, then deletes them.

A row is deleted only after the server confirmed storing its message. A relay that dies in
between leaves the row, and the next pass sends it again with the same `Nats-Msg-Id`, which
the stream drops as a duplicate within its duplicate window. On PostgreSQL each pass locks
its rows (`FOR UPDATE SKIP LOCKED`) until they are deleted, so relays running at once take
different rows; a commit wakes the relay through the table's NOTIFY trigger, and polling
every `poll_interval` covers a missed or absent notification. SQLite takes one relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import nats.errors
from nats.js.errors import NoStreamResponseError
from sqlalchemy import Connection, Engine, Row, create_engine, delete, select
from sqlalchemy.exc import DBAPIError

from taskframe import _stream_configs as configs
from taskframe._outbox_table import CHANNEL, outbox_table
from taskframe._publish import check_size, publisher
from taskframe.client import Client
from taskframe.errors import ConnectError, PayloadTooLargeError
from taskframe.provision import ensure_queue, ensure_stream

log = logging.getLogger("taskframe.outbox")
T = TypeVar("T")

_COLUMNS = (outbox_table.c.seq, outbox_table.c.queue, outbox_table.c.subject,
            outbox_table.c.headers, outbox_table.c.body)  # fmt: skip


class Relay:
    """Sends the outbox rows of `client`'s namespace from database `db` (a URL or an
    Engine) to the broker: `await relay.run()` until `relay.stop()`, or `drain()` once.

    `batch` rows are sent per pass, pipelined. `listen=False` turns off the PostgreSQL
    wake-up and leaves polling alone.
    """

    def __init__(
        self,
        client: Client,
        db: str | Engine,
        *,
        batch: int = 500,
        poll_interval: float = 1.0,
        listen: bool = True,
    ) -> None:
        self.client = client
        self.engine = create_engine(db) if isinstance(db, str) else db
        self._owns_engine = isinstance(db, str)
        self.batch = batch
        self.poll_interval = poll_interval
        self.sent = 0
        """Rows sent and deleted so far."""
        self._postgres = self.engine.dialect.name == "postgresql"
        self._listen = listen and self._postgres and self.engine.dialect.driver == "psycopg"
        self._db: ThreadPoolExecutor | None = None
        self._conn: Connection | None = None
        self._stopping = asyncio.Event()
        self._known: set[str | None] = set()
        self._unsendable: set[int] = set()  # rows left in the table, not taken again

    def __repr__(self) -> str:
        return f"<Relay namespace={self.client.namespace!r} db={self.engine.url!r}>"

    def stop(self) -> None:
        """Ask `run` to return after the pass it is in (within `poll_interval`)."""
        self._stopping.set()

    async def _in_db(self, work: Any, *args: Any) -> Any:
        # One thread holds the connection: drivers (sqlite3) tie a connection to a thread.
        if self._db is None:
            self._db = ThreadPoolExecutor(1, thread_name_prefix="taskframe-relay-db")
        return await asyncio.get_running_loop().run_in_executor(self._db, work, *args)

    async def _close(self) -> None:
        """Let go of the connection and its thread (an engine made from a URL too)."""
        await self._in_db(self._reset)
        if self._owns_engine:
            await self._in_db(self.engine.dispose)
        if self._db is not None:
            self._db.shutdown()
            self._db = None

    async def run(self) -> None:
        """Send committed rows as they come until `stop()`. A database or broker that fails
        a pass is logged and tried again after `poll_interval`, never raised."""
        listener = _Listener(self.engine) if self._listen else None
        try:
            if listener is not None:
                try:
                    await asyncio.to_thread(listener.open)
                except Exception as exc:  # reconnected by `wait`; polling meanwhile
                    log.warning("outbox LISTEN failed, polling: %r", exc)
            while not self._stopping.is_set():
                try:
                    full = await self.drain_pass() == self.batch
                except (DBAPIError, nats.errors.Error, OSError) as exc:
                    # The database or the broker is away: the rows wait, the relay goes on.
                    log.warning("outbox pass failed, trying again: %r", exc)
                    await self._in_db(self._reset)
                    full = False
                if not full:
                    await self._wait(listener)
        finally:
            if listener is not None:
                await asyncio.to_thread(listener.close)
            await self._close()

    async def drain(self) -> int:
        """Send every committed row now; return how many were sent."""
        before = self.sent
        try:
            while True:  # until a short pass, or one that got nowhere (the broker is away)
                last = self._progress()
                if await self.drain_pass() < self.batch or self._progress() == last:
                    break
        finally:
            await self._close()
        return self.sent - before

    def _progress(self) -> tuple[int, int]:
        return self.sent, len(self._unsendable)

    async def _wait(self, listener: _Listener | None) -> None:
        if listener is not None:
            await asyncio.to_thread(listener.wait, self.poll_interval)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.poll_interval)

    async def drain_pass(self) -> int:
        """Send one batch of rows and delete those confirmed; return how many were taken."""
        rows = await self._in_db(self._take)
        try:
            confirmed = await self._send(rows)
            await self._in_db(self._delete, confirmed)
        except BaseException:
            await self._in_db(self._reset)  # rolls back: the rows are taken again
            raise
        self.sent += len(confirmed)
        if rows and not confirmed:  # the broker takes nothing: do not spin
            await asyncio.sleep(self.poll_interval)
        return len(rows)

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(DBAPIError):
                self._conn.close()
            self._conn = None

    def _take(self) -> Sequence[Row[Any, Any, Any, Any, Any]]:
        conn = self._connection()
        conn.begin()
        query = (
            select(*_COLUMNS)
            .where(outbox_table.c.namespace == self.client.namespace)
            .where(outbox_table.c.seq.not_in(self._unsendable))
            .order_by(outbox_table.c.seq)
            .limit(self.batch)
        )
        if self._postgres:
            return conn.execute(query.with_for_update(skip_locked=True)).all()
        rows = conn.execute(query).all()
        conn.commit()  # SQLite: no read lock held while sending; a new transaction deletes
        conn.begin()
        return rows

    def _delete(self, seqs: list[int]) -> None:
        conn = self._connection()
        if seqs:
            conn.execute(delete(outbox_table).where(outbox_table.c.seq.in_(seqs)))
        conn.commit()

    async def _send(self, rows: Sequence[Row[Any, Any, Any, Any, Any]]) -> list[int]:
        """Send `rows` pipelined; return the seqs of those the server confirmed."""
        nc, sender = self.client.nc, publisher(self.client.nc)
        for queue in {row.queue for row in rows} - self._known:
            await self._provision(queue)
        sent: list[tuple[int, str | None, asyncio.Future[Any]]] = []
        for row in rows:
            try:
                headers = json.loads(row.headers)
                check_size(row.subject, row.body, headers, nc.max_payload)
            except (ValueError, PayloadTooLargeError) as exc:
                log.error("outbox row %d cannot be sent, left in the table: %s", row.seq, exc)
                self._unsendable.add(row.seq)
                continue
            sent.append((row.seq, row.queue, await sender.send(row.subject, row.body, headers)))
        if sent:
            await asyncio.wait([f for *_, f in sent], timeout=self.client.settings.publish_timeout)
        confirmed = []
        for seq, queue, future in sent:
            if not future.done():
                future.cancel()
            elif (error := future.exception()) is None:
                confirmed.append(seq)
            elif isinstance(error, NoStreamResponseError):
                self._known.discard(queue)  # provisioned before the next pass
            else:
                log.warning("outbox row %d not stored, sent again later: %s", seq, error)
        if len(confirmed) < len(sent):
            sender.abandon()
        return confirmed

    async def _provision(self, queue: str | None) -> None:
        client = self.client
        try:
            if queue is None:
                await ensure_stream(client.js, configs.events_config(client.settings))
            else:
                await ensure_queue(client.js, client.settings, queue)
        except ConnectError as exc:
            log.warning("cannot provision %s for the outbox: %s", queue or "events", exc)
            return
        self._known.add(queue)


class _Listener:
    """A PostgreSQL connection of its own that LISTENs for the outbox trigger's NOTIFY."""

    def __init__(self, engine: Engine) -> None:
        self._url = engine.url.set(drivername="postgresql").render_as_string(False)
        self._conn: Any = None

    def open(self) -> None:
        import psycopg

        self._conn = psycopg.connect(self._url, autocommit=True)
        self._conn.execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> None:
        """Return at the first notification, or after `timeout` seconds."""
        try:
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                pass
        except Exception as exc:  # a lost connection: poll until it is back
            log.warning("outbox LISTEN connection lost, reconnecting: %s", exc)
            self.close()
            try:
                self.open()
            except Exception as again:
                log.warning("outbox LISTEN reconnect failed, polling: %s", again)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
