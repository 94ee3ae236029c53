"""Log records about tasks, and the two formats the CLI writes logs in.

A record about one task carries its fields as attributes (logging's `extra`): `task`,
`task_id`, `attempt`, `queue` (or `group`, for an event) and `trace_id` when the message
has a W3C `traceparent` header. `ctx.log` adds them to every record a handler logs, and
the worker to its own records about a task (retries, dead letters, lost leases).

    text  2026-11-30 19:04:05,123 INFO    taskframe.task [4242] [Resize 0193…c2 #1] resized
    json  {"time": "2026-11-30T19:04:05.123Z", "level": "INFO", "logger": "taskframe.task",
           "message": "resized", "pid": 4242, "task": "Resize", "task_id": "0193…c2", ...}
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

TASK_FIELDS = ("task", "task_id", "attempt", "queue", "group", "trace_id")
"""The record attributes that describe a task, in the order the JSON format writes them."""

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TEXT = "%(asctime)s %(levelname)-7s %(name)s [%(process)d] %(message)s"


class LogFormat(StrEnum):
    """How the CLI writes its logs."""

    TEXT = "text"
    JSON = "json"


def trace_id(headers: Mapping[str, str] | None) -> str | None:
    """The trace id of a W3C `traceparent` header, or None if there is none or it is invalid."""
    raw = (headers or {}).get("traceparent")
    if not isinstance(raw, str):
        return None
    match = _TRACEPARENT.match(raw.strip())
    if match is None or match[1] == "ff" or (match[1] == "00" and match[5]):
        return None
    trace = match[2]
    return None if trace == "0" * 32 or match[3] == "0" * 16 else trace


def task_fields(
    task: str,
    task_id: str,
    attempt: int,
    *,
    queue: str | None = None,
    group: str | None = None,
    trace: str | None = None,
) -> dict[str, Any]:
    """The `extra` of a record about one attempt at a task (unknown fields left out)."""
    fields: dict[str, Any] = {"task": task, "task_id": task_id, "attempt": attempt}
    if queue:
        fields["queue"] = queue
    if group:
        fields["group"] = group
    if trace:
        fields["trace_id"] = trace
    return fields


class TextFormatter(logging.Formatter):
    """One line per record; a record about a task shows `[<task> <task_id> #<attempt>]`."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        task_id = getattr(record, "task_id", None)
        if task_id is None:
            return super().formatMessage(record)
        attempt = getattr(record, "attempt", None)
        tag = f"[{getattr(record, 'task', '?')} {task_id}{f' #{attempt}' if attempt else ''}]"
        message = record.message
        record.message = f"{tag} {message}"
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (ISO 8601, UTC), level, logger,
    message, pid, the task's fields when known, and `exc_info` (the traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in TASK_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure(level: str, fmt: LogFormat = LogFormat.TEXT) -> None:
    """Send every log record (and Python's warnings) to stderr in `fmt`, from `level` up."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.captureWarnings(True)
