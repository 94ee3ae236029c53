"""Records in JetStream fast-ingest batches: one confirmation for many records.

A worker stores one status record per task and acks the task only once the server has
confirmed storing it. One confirmation per record is a message to read per task; in a
fast-ingest batch (a stream with `allow_batched`, nats-server 2.14+) the server stores
each record as it comes and confirms "everything through batch sequence N" every few
records instead. A task is still acked only after a confirmation that covers its own
record. What the server sends, and when, is in docs/server-behaviour.md ("Fast-ingest
batches").

Every record ends once: confirmed (by an ack frame or the batch's final count that covers
it) or failed (an error frame for it, a final count short of it, or no word within its
timeout, which `Publisher` watches). A failed record goes down the caller's awaited path,
which stores it on its own; storing a record twice is harmless.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from taskframe._tolerant import Sender
from taskframe.errors import PublishError

log = logging.getLogger("taskframe._publish")

FLOW = 100
"""The most records the server stores between two confirmations (it starts lower)."""
OVER = 16
"""Records awaiting confirmation above which the next one goes in a batch: a worker that
stores a record now and then gets each confirmed at once, as before."""
LINGER = 0.002
"""Seconds without a new record after which the open batch is ended, so that the server
confirms its last records (it confirms only every few otherwise)."""
_DISABLED = 10205  # "batch publish is disabled": the stream has no allow_batched
_UNKNOWN = 10208  # "batch publish ID unknown": the server ended or never began it
_BUSY = 10211  # "batch publish too many inflight": the server holds 1,000 open batches
PAUSE = 1.0
"""Seconds a connection sends its records one by one after the server refused a batch for
having too many open (other workers' batches end within moments)."""
_KEPT = 16  # batches ended but not yet answered, kept to read their last frames

Confirm = Callable[[int, BaseException | None], None]
"""Ends a record by its token: None when stored, else why not."""


@dataclass(slots=True, eq=False)
class _Batch:
    id: str
    end_subject: str
    reconnects: int
    reply: str
    """Its records' reply subject, up to their sequence."""
    sent: int = 0
    waiting: deque[tuple[int, int]] = field(default_factory=deque)  # (batch seq, token)
    open: bool = True


class Batches:
    """The open batch of one connection's records, and the frames that answer batches.

    Args:
        send: publishes a message without waiting (`TolerantClient.publish_now`).
        confirm: ends a record by its token.
        prefix: the reply subscription's prefix; a batch's replies go to
            `<prefix><batch id>.<flow>.fail.<seq>.<operation>.$FI`.
        reconnects: how many times the connection reconnected so far: a batch does not
            outlive a reconnect (records lost in the cut would fail the whole batch).
    """

    def __init__(
        self, send: Sender, confirm: Confirm, prefix: str, reconnects: Callable[[], int]
    ) -> None:
        self._send = send
        self._confirm = confirm
        self._prefix = prefix
        self._reconnects = reconnects
        self._open: _Batch | None = None
        self._answering: OrderedDict[str, _Batch] = OrderedDict()
        self.enabled = True
        """False once the server said batches are disabled, or while it has too many open
        (`resumed`): records go one by one."""
        self._resume_at = 0.0

    def add(self, subject: str, body: bytes, token: int, end_subject: str) -> None:
        """Publish a record in the open batch (opened if none is), ended later with a
        marker on `end_subject` (a subject of the same stream that stores nothing)."""
        batch = self._open
        if batch is None or batch.end_subject != end_subject:
            batch = self._start(end_subject)
        sent = batch.sent = batch.sent + 1
        self._send(subject, body, f"{batch.reply}{sent}.{1 if sent > 1 else 0}.$FI")
        batch.waiting.append((sent, token))

    def _start(self, end_subject: str) -> _Batch:
        self.end()
        name = secrets.token_hex(8)
        reply = f"{self._prefix}{name}.{FLOW}.fail."
        batch = _Batch(name, end_subject, self._reconnects(), reply)
        self._open = self._answering[batch.id] = batch
        while len(self._answering) > _KEPT:
            _, old = self._answering.popitem(last=False)
            self._fail(old, 0, PublishError("no final answer for its batch"))
        return batch

    def end(self) -> None:
        """End the open batch: the server then confirms its last records."""
        if self._open is not None:
            self._close(self._open)

    def _close(self, batch: _Batch, *, end: bool = True) -> None:
        """Send no more records in `batch`; with `end`, end it on the server (unless done
        already): its final count, or that it is unknown, settles what still waits."""
        if batch is self._open:
            self._open = None
        if not batch.open:
            return
        batch.open = False
        if not end or not batch.sent:
            return
        reply = f"{batch.reply}{batch.sent + 1}.3.$FI"
        try:
            self._send(batch.end_subject, b"", reply)
        except Exception as exc:  # cut off: its records time out and are stored one by one
            log.debug("end of batch %s not sent: %r", batch.id, exc)

    def resumed(self) -> bool:
        """Whether batches may be used again: the pause after a refusal for too many open
        batches is over (never after the stream said batches are disabled)."""
        if self._resume_at and time.monotonic() >= self._resume_at:
            self.enabled, self._resume_at = True, 0.0
        return self.enabled

    def sent(self) -> int:
        """Records sent in the open batch (0 if none is open)."""
        return self._open.sent if self._open is not None else 0

    def stale(self) -> bool:
        """Whether the open batch must be ended: a reconnect since it opened."""
        batch = self._open
        return batch is not None and batch.reconnects != self._reconnects()

    def on_frame(self, tail: bytes, data: bytes) -> None:
        """Read a frame answering a batch: `tail` is its reply subject after the prefix."""
        parts = tail.split(b".")
        batch = self._answering.get(parts[0].decode(errors="replace"))
        if batch is None:
            return  # a batch forgotten already: its records timed out
        try:
            frame: Any = json.loads(data)
            sequence = int(parts[3]) if len(parts) == 6 else 0
        except (ValueError, UnicodeDecodeError):
            frame, sequence = None, 0
        if not isinstance(frame, dict):
            self._close(batch)
            self._fail(batch, 0, PublishError(f"unreadable batch confirmation {data[:200]!r}"))
        elif frame.get("type") == "ack":
            self._stored(batch, int(frame.get("seq") or 0))
        elif frame.get("type") == "gap":
            self._close(batch, end=False)  # the server ended it: its final count follows
        elif "error" in frame:
            self._refused(batch, sequence, frame)
        elif "count" in frame:  # final: everything through `count` is stored, nothing after
            self._stored(batch, int(frame.get("count") or 0))
            self._close(batch, end=False)
            self._fail(batch, 0, PublishError("its batch ended before it was stored"))
            self._answering.pop(batch.id, None)
        else:  # a plain confirmation of one record: a server that does not batch
            self._end_one(batch, sequence, None)

    def _refused(self, batch: _Batch, sequence: int, frame: dict[str, Any]) -> None:
        """An error frame: the record `sequence` was not stored; if the batch is unknown or
        batches are disabled, none of its records still waiting will be."""
        error = frame.get("error") or {}
        code = error.get("err_code")
        failure = PublishError(f"record refused in its batch: {error.get('description', '')}")
        if code == _DISABLED and self.enabled:
            log.info(
                "the results stream does not take batched records (created before taskframe "
                "asked for allow_batched): each record is confirmed alone"
            )
            self.enabled = False
        elif code == _BUSY and self.enabled:
            log.info("the server has too many batches open: records go one by one for %gs", PAUSE)
            self.enabled, self._resume_at = False, time.monotonic() + PAUSE
        if code in (_DISABLED, _UNKNOWN, _BUSY):
            self._close(batch, end=False)  # nothing to end on the server
            self._fail(batch, 0, failure)
            self._answering.pop(batch.id, None)
            return
        self._close(batch)  # the server ends it at the refusal: a final count follows
        self._fail(batch, sequence, failure)

    def _stored(self, batch: _Batch, through: int) -> None:
        waiting, confirm = batch.waiting, self._confirm
        while waiting and waiting[0][0] <= through:
            confirm(waiting.popleft()[1], None)

    def _fail(self, batch: _Batch, sequence: int, error: BaseException) -> None:
        """Fail the record `sequence` (0: every one still waiting)."""
        if sequence:
            self._end_one(batch, sequence, error)
            return
        while batch.waiting:
            self._confirm(batch.waiting.popleft()[1], error)

    def _end_one(self, batch: _Batch, sequence: int, error: BaseException | None) -> None:
        """End the record `sequence` of `batch`, if it still waits: stored (`error` None)
        or not."""
        for index, (number, token) in enumerate(batch.waiting):
            if number == sequence:
                del batch.waiting[index]
                self._confirm(token, error)
                return
