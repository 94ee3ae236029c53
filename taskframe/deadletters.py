"""Dead letters, the tasks that ended in the dead-letter stream: written, read, replayed.

A dead letter is the task's message as it was delivered (body and headers) plus headers
saying why it died; `taskframe dead` lists them and replays them to their queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from taskframe import topology, wire
from taskframe.client import Client
from taskframe.publish import publish_stored
from taskframe.results import ErrorInfo

_DEAD_HEADERS = {
    wire.DEAD_REASON,
    wire.ERROR_TYPE,
    wire.ERROR,
    wire.TRACEBACK,
    wire.ATTEMPTS,
    wire.ORIGINAL_SUBJECT,
    wire.DIED_AT,
    wire.MSG_ID,
}


def dead_letter_headers(
    msg: Msg, task_id: str, attempt: int, reason: str, error: ErrorInfo
) -> dict[str, str]:
    """The headers of `msg`'s dead letter: its own, and why and when it died.

    Its message id names the message (its stream sequence), so a message is stored as a
    dead letter once, however often it is buried (a resend after a confirmation timed out,
    a redelivery after its termination was lost).
    """
    headers = {k: v for k, v in (msg.headers or {}).items() if k != wire.MSG_ID}
    headers.update(
        {
            wire.MSG_ID: f"{task_id}:{wire.delivery(msg.reply)[1]}",
            wire.ID: task_id,
            wire.DEAD_REASON: reason,
            wire.ERROR_TYPE: wire.one_line(error.type),
            wire.ERROR: wire.one_line(error.message),
            wire.ATTEMPTS: str(attempt),
            wire.ORIGINAL_SUBJECT: msg.subject,
            wire.DIED_AT: wire.now_rfc3339(),
        }
    )
    if error.traceback:
        headers[wire.TRACEBACK] = wire.json_header(error.traceback)
    return headers


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter, as stored."""

    seq: int
    subject: str
    task_id: str
    reason: str
    error_type: str
    error: str
    attempts: int
    original_subject: str
    died_at: str
    body: bytes
    headers: dict[str, str]
    stored_at: datetime | None

    @property
    def traceback(self) -> str | None:
        """The handler's traceback (its last 4 KiB), when there is one."""
        raw = self.headers.get(wire.TRACEBACK)
        return json.loads(raw) if raw else None


async def dead_letters(
    js: JetStreamContext, namespace: str, *, queue: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    """The oldest `limit` dead letters of `namespace` (of one `queue`, if given)."""
    stream = topology.dead_stream(namespace)
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return []
    prefix = f"{namespace}.dead.{queue}." if queue else ""
    found: list[DeadLetter] = []
    seq = info.state.first_seq
    while seq <= info.state.last_seq and len(found) < limit:
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:  # deleted (replayed) meanwhile
            seq += 1
            continue
        seq += 1
        subject = msg.subject or ""
        if prefix and not subject.startswith(prefix):
            continue
        headers = msg.headers or {}
        found.append(
            DeadLetter(
                seq=msg.seq or 0,
                subject=subject,
                task_id=headers.get(wire.ID, ""),
                reason=headers.get(wire.DEAD_REASON, ""),
                error_type=headers.get(wire.ERROR_TYPE, ""),
                error=headers.get(wire.ERROR, ""),
                attempts=int(headers.get(wire.ATTEMPTS, "0") or 0),
                original_subject=headers.get(wire.ORIGINAL_SUBJECT, ""),
                died_at=headers.get(wire.DIED_AT, ""),
                body=msg.data or b"",
                headers=headers,
                stored_at=msg.time,
            )
        )
    return found


async def replay(client: Client, letter: DeadLetter) -> None:
    """Enqueue a dead letter again on its original subject, then delete it.

    The task keeps its id (so its status and claim follow it) and starts again at attempt 1.
    It is enqueued before it is deleted: a crash in between leaves a copy, never nothing.
    """
    headers = {k: v for k, v in letter.headers.items() if k not in _DEAD_HEADERS}
    headers[wire.ID] = letter.task_id
    headers[wire.MSG_ID] = f"{letter.task_id}:replay:{letter.seq}"
    await publish_stored(client.nc, client.settings, letter.original_subject, letter.body, headers)
    await client.js.delete_msg(topology.dead_stream(client.namespace), letter.seq)
