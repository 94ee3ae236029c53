"""Task status records in the results bucket: what `TaskRun.result()` and `status()` read.

One KV key per task id holds the latest record, a JSON object:

    {"id": "...", "task": "ResizeImage", "state": "succeeded", "attempt": 1,
     "result": <the handler's return value as JSON>, "error": null,
     "updated_at": "2026-11-28T04:11:06.123456Z"}

The states run queued → running → (failed → running)* → succeeded | dead | cancelled.
`failed` means an attempt failed and another is scheduled; `dead` means the task is in the
dead-letter stream and will not run again; `cancelled` that it was cancelled on request
(`Client.cancel`) before it finished, and will not run again either.

Final records (succeeded, dead, cancelled) are the bucket's keys. Non-final ones (running,
failed) are stored in the same stream under `<namespace>.progress.<id>`, outside the keys:
a non-final write that reaches the server late (it sat in a connection that was cut)
cannot replace a final record. A reader takes the key, else the progress subject, else
`queued`. Progress reports (`Context.progress`) go to `<namespace>.progress.<id>.report`.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError
from pydantic import BaseModel, ConfigDict

from taskframe import _payloads as payloads
from taskframe import _topology as topology
from taskframe._retry import answered
from taskframe.errors import PublishError


class TaskState(StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    FAILED = "failed"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """Whether the task will not change state again."""
        return self in (TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED)


class ErrorInfo(BaseModel):
    """What went wrong in a task's last failed attempt."""

    model_config = ConfigDict(frozen=True)

    type: str
    message: str
    traceback: str | None = None
    reason: str | None = None
    """Why the task is dead: "failed", "rejected", "invalid", "unknown-task", "lost"."""


class TaskStatus(BaseModel):
    """The latest known status of one task."""

    model_config = ConfigDict(frozen=True)

    id: str
    task: str
    state: TaskState
    attempt: int = 0
    result: Any = None
    error: ErrorInfo | None = None
    updated_at: str = ""


class Progress(BaseModel):
    """The last progress a running task reported (`Context.progress`)."""

    model_config = ConfigDict(frozen=True)

    done: float
    total: float | None = None
    note: str | None = None
    attempt: int = 0
    """The attempt that reported it."""
    updated_at: str = ""


def progress_record(done: float, total: float | None, note: str | None, attempt: int) -> bytes:
    """A progress report as stored on the task's report subject."""
    fields = {"done": done, "total": total, "note": note, "attempt": attempt, "updated_at": _now()}
    return json.dumps(fields, separators=(",", ":")).encode()


def status_record(
    task_id: str,
    task: str,
    state: TaskState,
    attempt: int,
    *,
    result_json: bytes | None = None,
    error: ErrorInfo | None = None,
    plain: bool = False,
) -> bytes:
    """A status record as stored, with an already-encoded result spliced in without re-parsing.

    The fields in the order docs/wire-format.md shows: id, task, state, attempt,
    updated_at, error, then result. Without an error, and with an id and a name that JSON
    writes as they are (always, once `_inbound` checked them), the record is filled into a
    template: the same bytes as `json.dumps` would give, at a fraction of its cost (one is
    written for every task that keeps its result). `plain`: the id and the name are known
    to be such (a worker checked them on arrival, `_inbound`).
    """
    if error is None and (plain or (_plain(task_id) and _plain(task))):
        head = (
            f'{{"id":"{task_id}","task":"{task}","state":"{_STATES[state]}","attempt":{attempt:d},'
            f'"updated_at":"{_now()}","error":null'
        ).encode()
    else:
        fields = {
            "id": task_id,
            "task": task,
            "state": state.value,
            "attempt": attempt,
            "updated_at": _now(),
            "error": error.model_dump() if error else None,
        }
        head = json.dumps(fields, separators=(",", ":")).encode()[:-1]
    if result_json is None:
        return head + b"}"
    return head + b',"result":' + result_json + b"}"


_STATES = {state: state.value for state in TaskState}  # `.value` costs a property call


def _plain(text: str) -> bool:
    """Whether `json.dumps` writes `text` as it is, between quotes (no escapes)."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


_second: tuple[int, str] = (-1, "")  # the last second `_now` formatted, and its text


def _now() -> str:
    """`wire.now_rfc3339()`, the same text, with the second's text kept between calls."""
    global _second
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    if _second[0] != seconds:
        _second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{_second[1]}.{micros:06d}Z"


def parse_record(data: bytes) -> TaskStatus:
    """A stored record as a `TaskStatus`."""
    return TaskStatus.model_validate_json(data)


async def read_status(js: JetStreamContext, namespace: str, task_id: str) -> TaskStatus | None:
    """The final record of `task_id`, else its latest non-final one, else None.

    Direct gets (the bucket allows them, and a locked-down producer may use only those);
    the results stream must exist, or the server has no responder for them.
    """
    stream = topology.results_stream(namespace)
    for subject in (
        topology.result_subject(namespace, task_id),
        topology.progress_subject(namespace, task_id),
    ):
        try:
            msg = await answered(f"status of {task_id}", js.get_last_msg, stream, subject, True)
        except NotFoundError:
            continue
        except APIError as exc:
            raise PublishError(f"cannot read status of {task_id}: {exc.description}") from exc
        if (msg.data or msg.headers) and (msg.headers or {}).get("KV-Operation") is None:
            return parse_record(await payloads.decode(js, namespace, msg.headers, msg.data or b""))
    return None


async def read_progress(js: JetStreamContext, namespace: str, task_id: str) -> Progress | None:
    """The last progress report of `task_id`, or None if it made none (or it expired)."""
    stream, subject = (
        topology.results_stream(namespace),
        topology.report_subject(namespace, task_id),
    )
    try:
        msg = await answered(f"progress of {task_id}", js.get_last_msg, stream, subject, True)
    except NotFoundError:
        return None
    except APIError as exc:
        raise PublishError(f"cannot read progress of {task_id}: {exc.description}") from exc
    return Progress.model_validate_json(msg.data) if msg.data else None
