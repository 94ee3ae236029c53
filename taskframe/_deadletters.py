"""Dead letters, the tasks that ended in the dead-letter stream: written, read, replayed.

A dead letter is the task's message as it was delivered (body and headers) plus headers
saying why it died; `taskframe dead` lists them and replays them to their queue.
"""

from __future__ import annotations

import contextlib
import email.header
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import APIError, NotFoundError

from taskframe import _inbound as inbound
from taskframe import _payloads as payloads
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._publish import publish_stored
from taskframe._results import ErrorInfo, TaskState, status_record
from taskframe._retry import answered
from taskframe.errors import PayloadError

if TYPE_CHECKING:
    from taskframe.client import Client

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

# Deleting a message that is not there: "no message found" (docs/server-behaviour.md).
_NO_MESSAGE = 10057

# The header names nats-py sends (RFC 7230 tokens): it raises BadHeaderError on any other.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _copied(headers: dict[str, str] | None) -> dict[str, str]:
    """The delivered headers a dead letter keeps: those it can carry, values made printable.

    Left out: the message id and earlier dead-letter headers (written anew), names nats-py
    will not send, and `Nats-*` headers, which the server acts on (`Nats-Expected-Stream`,
    `Nats-Rollup`, ...): copied, they could make it refuse the dead letter itself.
    """
    return {
        name: inbound.printable(value)
        for name, value in (headers or {}).items()
        if name not in _DEAD_HEADERS
        and _HEADER_NAME.fullmatch(name)
        and not name.lower().startswith("nats-")
    }


def dead_letter_headers(
    msg: Msg, task_id: str, attempt: int, reason: str, error: ErrorInfo
) -> dict[str, str]:
    """The headers of `msg`'s dead letter: its own, and why and when it died.

    Its message id names the message (its stream sequence), so a message is stored as a
    dead letter once, however often it is buried (a resend after a confirmation timed out,
    a redelivery after its termination was lost).
    """
    headers = _copied(msg.headers)
    headers.update(
        {
            wire.MSG_ID: f"{task_id}:{wire.delivery(msg.reply)[1]}",
            wire.ID: task_id,
            wire.DEAD_REASON: reason,
            wire.ERROR_TYPE: wire.one_line(error.type),
            wire.ERROR: wire.one_line(error.message),
            wire.ATTEMPTS: str(attempt),
            wire.ORIGINAL_SUBJECT: inbound.printable(msg.subject),
            wire.DIED_AT: wire.now_rfc3339(),
        }
    )
    if error.traceback:
        headers[wire.TRACEBACK] = wire.json_header(error.traceback)
    return headers


def fit(headers: dict[str, str], body: bytes, max_payload: int) -> tuple[dict[str, str], bytes]:
    """A dead letter that fits the server's `max_payload`, cut down in order of least worth.

    A task near the limit grows past it with the dead letter's headers, and an over-size
    publish costs the worker its connection. Dropped in turn: the traceback, the error
    text beyond 200 characters, the task's own headers, and last the body itself (its
    size is then in `Tf-Error`), so that the letter is always stored.
    """
    own = set(_copied(headers)) - {wire.ID}

    def size(h: dict[str, str], b: bytes) -> int:
        return len(b) + wire.header_size(h)

    if size(headers, body) <= max_payload:
        return headers, body
    trimmed = {k: v for k, v in headers.items() if k != wire.TRACEBACK}
    trimmed[wire.ERROR] = trimmed.get(wire.ERROR, "")[:200]
    if size(trimmed, body) <= max_payload:
        return trimmed, body
    trimmed = {k: v for k, v in trimmed.items() if k not in own}
    if size(trimmed, body) <= max_payload:
        return trimmed, body
    trimmed[wire.ERROR] = f"{trimmed[wire.ERROR][:150]} [body of {len(body)} bytes not kept]"
    return trimmed, b""


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


def _text(value: object) -> str:
    """A header value as read back by nats-py's stream API: a non-ASCII one arrives as an
    `email.header.Header` of raw bytes, which is UTF-8 (taskframe writes nothing else)."""
    if isinstance(value, str):
        return value
    parts = email.header.decode_header(value)  # type: ignore[arg-type]
    raw = b"".join(p if isinstance(p, bytes) else p.encode() for p, _ in parts)
    return raw.decode("utf-8", "replace")


async def dead_letter_page(
    js: JetStreamContext,
    namespace: str,
    *,
    queue: str | None = None,
    task: str | None = None,
    reason: str | None = None,
    task_id: str | None = None,
    after: int = 0,
    limit: int = 100,
    scan: int | None = None,
) -> tuple[list[DeadLetter], int]:
    """The oldest `limit` dead letters of `namespace` after sequence `after`, filtered, and
    the sequence to continue after (0 once the stream holds no more).

    `queue` and `task` are matched by the server (the letter's subject), `reason` and
    `task_id` here, one letter at a time: at most `scan` letters are read (if given), so a
    filter that matches few letters still reads a bounded page.
    """
    stream = topology.dead_stream(namespace)
    subject = topology.dead_filter(namespace, queue, task)
    found: list[DeadLetter] = []
    last, read = after, 0
    while len(found) < limit and (scan is None or read < scan):
        try:
            msg = await answered(
                f"dead letters of {namespace}", js.get_msg, stream, last + 1, subject, False, True
            )
        except NotFoundError:  # no more (or no dead-letter stream yet)
            return found, 0
        last, read = msg.seq or last + 1, read + 1
        letter = _letter(msg)
        if reason in (None, letter.reason) and task_id in (None, letter.task_id):
            found.append(letter)
    return found, last


async def delete(js: JetStreamContext, namespace: str, seq: int) -> bool:
    """Remove dead letter `seq`; False if there is none (deleted or replayed already)."""
    stream = topology.dead_stream(namespace)
    try:
        return await answered(f"dead letter {seq}", js.delete_msg, stream, seq)
    except NotFoundError:  # no dead-letter stream
        return False
    except APIError as exc:
        if exc.err_code == _NO_MESSAGE:
            return False
        raise


def _letter(msg: RawStreamMsg) -> DeadLetter:
    headers = {name: _text(value) for name, value in (msg.headers or {}).items()}
    body = msg.data or b""
    if headers.get(wire.ENCODING) == payloads.ZSTD:  # shown, and replayed, as its JSON
        with contextlib.suppress(PayloadError):
            body = payloads.unpack(body)
            del headers[wire.ENCODING]
    return DeadLetter(
        seq=msg.seq or 0,
        subject=msg.subject or "",
        task_id=headers.get(wire.ID, ""),
        reason=headers.get(wire.DEAD_REASON, ""),
        error_type=headers.get(wire.ERROR_TYPE, ""),
        error=headers.get(wire.ERROR, ""),
        attempts=int(headers.get(wire.ATTEMPTS, "0") or 0),
        original_subject=headers.get(wire.ORIGINAL_SUBJECT, ""),
        died_at=headers.get(wire.DIED_AT, ""),
        body=body,
        headers=headers,
        stored_at=msg.time,
    )


async def replay(client: Client, letter: DeadLetter) -> None:
    """Enqueue a dead letter again on its original subject, then delete it.

    The task keeps its id (so its status and claim follow it) and starts again at attempt 1;
    its status goes back to `queued` first (its `dead` record is deleted). It is enqueued
    before the letter is deleted: a crash in between leaves a copy, never nothing.
    """
    ns, settings, task_id = client.namespace, client.settings, letter.task_id
    deleted = {"KV-Operation": "DEL"}
    await publish_stored(client.nc, settings, topology.result_subject(ns, task_id), b"", deleted)
    queued = status_record(task_id, letter.subject.rsplit(".", 1)[-1], TaskState.QUEUED, 0)
    await publish_stored(client.nc, settings, topology.progress_subject(ns, task_id), queued)
    headers = {k: v for k, v in letter.headers.items() if k not in _DEAD_HEADERS}
    headers[wire.ID] = task_id
    headers[wire.MSG_ID] = f"{task_id}:replay:{letter.seq}"
    await publish_stored(client.nc, settings, letter.original_subject, letter.body, headers)
    await client.js.delete_msg(topology.dead_stream(client.namespace), letter.seq)
