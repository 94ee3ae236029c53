"""Enqueue inside a database transaction: the task is stored if and only if it commits.
Needs SQLAlchemy 2 and a driver (`pip install 'taskframe[outbox]' psycopg[binary]`).

    outbox = taskframe.outbox.Outbox("shop")
    with Session(engine) as session, session.begin():
        session.add(Order(id=7))
        task_id = outbox.enqueue(session, ShipOrder(order=7), key="ship:7")

`enqueue` writes the encoded message as a row of `taskframe_outbox` in the session's
transaction (sync or async sessions alike): a rollback leaves nothing to send. A relay
(`taskframe relay --db URL`, or `Relay(...).run()` next to a worker) sends committed rows
in order with `Nats-Msg-Id` set, then deletes them; see docs/outbox.md.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

try:
    from sqlalchemy import Engine, create_engine
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taskframe.outbox needs SQLAlchemy 2: pip install 'taskframe[outbox]'"
    ) from exc

from taskframe import _wire as wire
from taskframe._message import Message, event_message, task_message
from taskframe._outbox_relay import Relay
from taskframe._outbox_table import NOTIFY_SQL, OutboxRow, metadata, outbox_table
from taskframe.models import Event, Task, check_token

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

__all__ = ["NOTIFY_SQL", "Outbox", "Relay", "create_table", "metadata", "outbox_table"]


class Outbox:
    """Writes tasks and events of `namespace` into the outbox table of a session's database.

    Holds no connection: the session does the writing, so the rows share its transaction.
    """

    def __init__(self, namespace: str) -> None:
        check_token("namespace", namespace)
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"<Outbox namespace={self.namespace!r}>"

    def enqueue(
        self,
        session: Session | AsyncSession,
        task: Task[Any],
        *,
        key: str | None = None,
        delay: float | None = None,
        at: datetime | None = None,
        priority: str | None = None,
    ) -> str:
        """Add `task` to `session`'s transaction and return its id; arguments as
        `Client.enqueue`. The relay stores it after the commit; the delay counts from now.

        A handle for its result: `client.handle(type(task), task_id)`.
        """
        run_at = wire.due_at(delay, at)
        return self._add(session, task_message(self.namespace, task, key, priority, run_at))

    def publish(self, session: Session | AsyncSession, event: Event) -> str:
        """Add `event` to `session`'s transaction and return its id."""
        return self._add(session, event_message(self.namespace, event))

    def _add(self, session: Session | AsyncSession, message: Message) -> str:
        msg_id = message.headers.get(wire.MSG_ID, message.id)
        headers = json.dumps(message.headers, separators=(",", ":"))
        row = OutboxRow(
            self.namespace, msg_id, message.id, message.queue, message.subject, headers,
            message.body,
        )  # fmt: skip
        session.add(row)
        return message.id


def create_table(db: str | Engine) -> None:
    """Create the outbox table (and on PostgreSQL its wake-up trigger) if missing.

    The same as applying docs/outbox.md's SQL, or an Alembic migration of `metadata`.
    """
    engine = create_engine(db) if isinstance(db, str) else db
    try:
        metadata.create_all(engine)
    finally:
        if engine is not db:
            engine.dispose()
