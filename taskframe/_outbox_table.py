"""The outbox table: one row per message waiting in the caller's database for the relay.

Its migration, as SQLAlchemy (`outbox_table`, with `metadata` for Alembic autogenerate)
and as plain SQL (docs/outbox.md), and the PostgreSQL trigger that wakes relays on commit.
"""

from __future__ import annotations

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
    func,
)

TABLE = "taskframe_outbox"
CHANNEL = "taskframe_outbox"
"""The PostgreSQL NOTIFY channel the trigger signals on each committed insert."""

metadata = MetaData()

outbox_table = Table(
    TABLE,
    metadata,
    # Relays send rows in this order. SQLite autoincrements only an INTEGER primary key.
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("namespace", String(128), nullable=False),
    Column("msg_id", String(512), nullable=False),  # the Nats-Msg-Id the relay sends
    Column("task_id", String(64), nullable=False),
    Column("queue", String(128)),  # None for an event
    Column("subject", String(512), nullable=False),
    Column("headers", Text, nullable=False),  # JSON object
    Column("body", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index(f"{TABLE}_namespace_seq", "namespace", "seq"),
)

NOTIFY_SQL = f"""\
CREATE OR REPLACE FUNCTION {TABLE}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', '');
  RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS {TABLE}_notify ON {TABLE};
CREATE TRIGGER {TABLE}_notify AFTER INSERT ON {TABLE}
  FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_notify();
"""
"""PostgreSQL only: NOTIFY relays once per inserting statement, delivered at commit."""

_trigger = DDL(NOTIFY_SQL).execute_if(dialect="postgresql")  # type: ignore[no-untyped-call]
event.listen(outbox_table, "after_create", _trigger)


class OutboxRow:
    """One waiting message (mapped onto `outbox_table`)."""

    def __init__(
        self,
        namespace: str,
        msg_id: str,
        task_id: str,
        queue: str | None,
        subject: str,
        headers: str,
        body: bytes,
    ) -> None:
        self.namespace = namespace
        self.msg_id = msg_id
        self.task_id = task_id
        self.queue = queue
        self.subject = subject
        self.headers = headers
        self.body = body


def _map() -> None:
    from sqlalchemy.orm import registry

    registry().map_imperatively(OutboxRow, outbox_table)


_map()
