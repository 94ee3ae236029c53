"""The wire format: subjects, headers and bodies, documented in docs/wire-format.md.

A task message is published to `<namespace>.tasks.<queue>.<TaskName>` with the task model's
JSON as its body. Every header is optional for a producer in another language: a message
without them is accepted when its body validates against the model its subject names.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from taskframe.errors import ConfigError

MSG_ID = "Nats-Msg-Id"
TASK = "Tf-Task"
EVENT = "Tf-Event"
SCHEDULE_NAME = "Tf-Schedule"
SCHEDULE = "Nats-Schedule"
SCHEDULE_TARGET = "Nats-Schedule-Target"
SCHEDULE_TIME_ZONE = "Nats-Schedule-Time-Zone"
ID = "Tf-Id"
FLOW = "Tf-Flow"

# Bodies (docs/wire-format.md, "Compressed bodies" and "Large bodies"): ENCODING `zstd`
# says the body is a zstd frame of the JSON; PAYLOAD names the object in the namespace's
# payloads bucket that holds the body, and the message's own body is then empty.
ENCODING = "Tf-Encoding"
PAYLOAD = "Tf-Payload"

# Dead letters carry the original body and headers plus these.
DEAD_REASON = "Tf-Dead-Reason"
ERROR_TYPE = "Tf-Error-Type"
ERROR = "Tf-Error"
TRACEBACK = "Tf-Traceback"
ATTEMPTS = "Tf-Attempts"
ORIGINAL_SUBJECT = "Tf-Subject"
DIED_AT = "Tf-Died-At"

_V7_CLEAR = ~((0xF << 76) | (0x3 << 62))
_V7_SET = (0x7 << 76) | (0x2 << 62)
_MAX_HEADER_VALUE = 4096


def new_task_id() -> str:
    """A UUIDv7: unique, and sortable by creation time (RFC 9562)."""
    rand = int.from_bytes(os.urandom(10))
    value = (time.time_ns() // 1_000_000) << 80 | rand
    value = (value & _V7_CLEAR) | _V7_SET
    h = f"{value:032x}"  # formatted by hand: uuid.UUID costs more than the rest of an enqueue
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_rfc3339() -> str:
    """The current UTC time in RFC 3339 with microseconds."""
    return rfc3339(datetime.now(UTC))


def rfc3339(moment: datetime) -> str:
    """`moment` (timezone-aware) in UTC, RFC 3339 with microseconds, as the server parses it."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def task_subject(namespace: str, queue: str, name: str, lane: str | None = None) -> str:
    """The subject a task of `name` is published to: a 5th token names a priority lane."""
    if lane is None or lane == "default":
        return f"{namespace}.tasks.{queue}.{name}"
    return f"{namespace}.tasks.{queue}.{name}.{lane}"


def once_subject(namespace: str, queue: str, task_id: str) -> str:
    """The subject holding the schedule of one delayed task until it fires."""
    return f"{namespace}.sched.{queue}.at.{task_id}"


def periodic_subject(namespace: str, queue: str, name: str) -> str:
    """The subject holding the periodic schedule `name`."""
    return f"{namespace}.sched.{queue}.cron.{name}"


def dead_subject(namespace: str, queue: str, name: str) -> str:
    """The subject a dead letter of a task of `name` is stored under."""
    return f"{namespace}.dead.{queue}.{name}"


def dead_event_subject(namespace: str, group: str, name: str) -> str:
    """The subject a dead letter of event `name` for subscriber `group` is stored under."""
    return f"{namespace}.dead._events.{group}.{name}"


def event_subject(namespace: str, name: str) -> str:
    """The subject an event of `name` is published to."""
    return f"{namespace}.events.{name}"


def task_headers(task_id: str) -> dict[str, str]:
    """The headers of a task message: as few as possible, since each costs every consumer.

    The message id is the task id (an idempotency key is the task id, so one key names one
    task in every language); the task name is in the subject and the enqueue time in the
    stream's own timestamp.
    """
    return {MSG_ID: task_id}


def message_id(headers: dict[str, str] | None, fallback: str) -> str:
    """The task (or event) id of a delivered message: Tf-Id, else Nats-Msg-Id, else `fallback`."""
    if headers:
        return headers.get(ID) or headers.get(MSG_ID) or fallback
    return fallback


def delivery(reply: str) -> tuple[int, int, int]:
    """(delivery count, stream sequence, messages still pending) from a JetStream ack subject.

    Parsed here, cheaply, rather than through nats-py's `Msg.metadata`, which also builds a
    datetime for every message.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>` (9 tokens), or
    with `<domain>.<account hash>` after `ACK` and a trailing token (12 tokens).
    """
    tokens = reply.split(".")
    offset = 2 if len(tokens) >= 11 else 0
    return int(tokens[4 + offset]), int(tokens[5 + offset]), int(tokens[8 + offset])


def stored_at(reply: str) -> float:
    """When the server stored a delivered message (seconds since the epoch), from its ack
    subject's timestamp token (nanoseconds)."""
    tokens = reply.split(".")
    offset = 2 if len(tokens) >= 11 else 0
    return int(tokens[7 + offset]) / 1e9


def delivered(reply: str) -> tuple[str, int, int]:
    """(key, delivery count, stream sequence) of an ack subject, read at once. The key,
    `<stream>.<consumer>.<stream sequence>`, names one message, whichever delivery."""
    tokens = reply.split(".")
    offset = 2 if len(tokens) >= 11 else 0
    sequence = tokens[5 + offset]
    key = f"{tokens[2 + offset]}.{tokens[3 + offset]}.{sequence}"
    return key, int(tokens[4 + offset]), int(sequence)


def encode(model: BaseModel) -> bytes:
    """The body of a message: the model as JSON."""
    return model.model_dump_json().encode()


def header_size(headers: dict[str, str]) -> int:
    """The size of `headers` on the wire (NATS/1.0 line, `k: v` lines, blank line)."""
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2


def one_line(text: str) -> str:
    """`text` as a header value: one line, bounded in size."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_HEADER_VALUE else flat[: _MAX_HEADER_VALUE - 1] + "…"


def json_header(text: str) -> str:
    """Multi-line `text` (a traceback) as a header value: a JSON string, its tail kept."""
    return json.dumps(text[-_MAX_HEADER_VALUE:])


def dumps(value: Any) -> bytes:
    """Compact JSON for values taskframe writes itself."""
    return json.dumps(value, separators=(",", ":")).encode()


def due_at(delay: float | None, at: datetime | None) -> datetime | None:
    """When a task enqueued with `delay` seconds or `at` a time is due; None: at once."""
    if delay is not None and at is not None:
        raise ConfigError("give delay or at, not both")
    if at is not None:
        if at.tzinfo is None:
            raise ConfigError("at must be timezone-aware, e.g. datetime.now(UTC)")
        return at
    if delay is not None and delay > 0:
        return datetime.now(UTC) + timedelta(seconds=delay)
    return None
