"""What a delivered message may carry: the one check of everything its producer controlled.

Any program that can publish to NATS can enqueue a task, so a delivered message's subject
tokens, ids and header values may be any bytes the server stores. They end up in subjects
(dead letters), KV keys (status records, claims) and header values (dead letters), where
nats-py refuses, or the server misroutes, anything that is not a plain token. So a worker
checks them once, on arrival, here. A message that fails is dead-lettered with reason
`invalid` under the name `_invalid` and a task id that is always usable; nothing of what
failed goes anywhere but the dead letter's `Tf-Error`, escaped by `printable`.

Accepted (docs/wire-format.md, "What a worker accepts"):

    task name, lane    [A-Za-z0-9_-], 1 to 256 characters: one subject token, as `Task` declares
    event name         tokens of those joined by single dots, 1 to 256 characters in all
    task or event id   [A-Za-z0-9_=/-] runs joined by single dots, 1 to 256 characters in
                       all: a KV key, and plain in a subject
"""

from __future__ import annotations

import re
from typing import NamedTuple

from taskframe import _wire as wire

MAX_LENGTH = 256
"""Longest name or id: well inside the server's 4 KiB protocol line once in a subject."""

INVALID = "_invalid"
"""The name an unusable message is dead-lettered under: `<ns>.dead.<queue>._invalid`."""

TOKEN = re.compile(r"[A-Za-z0-9_-]+")
"""A task name or a lane: one subject token, as `models.check_token` allows (with MAX_LENGTH)."""

EVENT_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
"""An event name: such tokens joined by single dots."""

# The KV key alphabet, every character of which is also plain in a subject token and a
# header value. Dots separate tokens of the key's subject: never leading, trailing or
# doubled, since an empty token makes the subject invalid (the server drops the publish).
TASK_ID = re.compile(r"[A-Za-z0-9_=/-]+(?:\.[A-Za-z0-9_=/-]+)*")
"""A task or event id: a KV key, and one or more plain subject tokens."""

_SHOWN = 200  # characters of a refused value quoted in the error


class Arrival(NamedTuple):
    """What a delivered message names, checked: usable as it is, or why not."""

    name: str
    """The task or event name; `INVALID` when the message cannot be used."""
    task_id: str
    """The task (or event) id: always usable in a subject and as a KV key."""
    problem: str = ""
    """Why the message cannot be used, for its dead letter; empty when it can."""


def task(subject: str, headers: dict[str, str] | None, fallback: str) -> Arrival:
    """Check a task message delivered on `<ns>.tasks.<queue>.<TaskName>[.<lane>]`.

    The name is the `Tf-Task` header, else the subject's 4th token; the id is `Tf-Id`, else
    `Nats-Msg-Id`, else `fallback` (`<queue>-<stream sequence>`, which taskframe makes).
    """
    known = _task_subjects.get(subject)
    if known is None:
        if len(_task_subjects) >= _SUBJECTS_KEPT:  # bounded, whatever producers send
            _task_subjects.clear()
            _task_names.clear()
        known = _task_subjects[subject] = _task_subject(subject)
        if not known[1]:
            _task_names.add(known[0])  # a token: `Tf-Task` usually repeats it
    name, problem = known
    problems = [problem] if problem else []
    if headers and (given := headers.get(wire.TASK)):
        name = given
        if given not in _task_names and not _fits(TOKEN, given):
            problems.append(
                f"task name {quote(given)} (from {wire.TASK}) must be 1 to {MAX_LENGTH} "
                "of [A-Za-z0-9_-]"
            )
    return _arrival(name, headers, fallback, problems)


_SUBJECTS_KEPT = 4096
_task_subjects: dict[str, tuple[str, str]] = {}
"""Task subjects already checked (a queue sees few): the name each gives, and its problem."""
_task_names: set[str] = set()
"""The names that valid subjects among them gave: tokens, as `Tf-Task` must be."""


def _task_subject(subject: str) -> tuple[str, str]:
    tail = subject.split(".")[3:]
    name = tail[0] if tail else ""
    if not 1 <= len(tail) <= 2 or not all(_fits(TOKEN, token) for token in tail):
        return name, (
            f"subject {quote(subject)} must end in <TaskName> or <TaskName>.<lane>, "
            f"each 1 to {MAX_LENGTH} of [A-Za-z0-9_-]"
        )
    return name, ""


def event(subject: str, headers: dict[str, str] | None, fallback: str) -> Arrival:
    """Check an event message delivered on `<ns>.events.<EventName>`.

    The name is the `Tf-Event` header, else the subject after its 2nd token; the id as for
    a task, with `fallback` `event-<stream sequence>`.
    """
    problems = []
    parts = subject.split(".", 2)
    name = parts[2] if len(parts) > 2 else ""
    if not _fits(EVENT_NAME, name):
        problems.append(
            f"subject {quote(subject)} must end in an event name: dot-separated tokens of "
            f"[A-Za-z0-9_-], 1 to {MAX_LENGTH} characters"
        )
    if headers and (given := headers.get(wire.EVENT)):
        name = given
        if not _fits(EVENT_NAME, given):
            problems.append(
                f"event name {quote(given)} (from {wire.EVENT}) must be dot-separated tokens "
                f"of [A-Za-z0-9_-], 1 to {MAX_LENGTH} characters"
            )
    return _arrival(name, headers, fallback, problems)


def _arrival(
    name: str, headers: dict[str, str] | None, fallback: str, problems: list[str]
) -> Arrival:
    task_id = fallback
    for header in (wire.ID, wire.MSG_ID):  # the order of wire.message_id
        if headers and (given := headers.get(header)):
            if _fits(TASK_ID, given):
                task_id = given
            else:
                problems.append(
                    f"task id {quote(given)} (from {header}) must be 1 to {MAX_LENGTH} of "
                    "[A-Za-z0-9_=/-], dots only between them (the message is named "
                    f"{fallback} instead)"
                )
            break
    if problems:
        return Arrival(INVALID, task_id, "; ".join(problems))
    return Arrival(name, task_id)


def _fits(pattern: re.Pattern[str], value: str) -> bool:
    return len(value) <= MAX_LENGTH and pattern.fullmatch(value) is not None


def printable(text: str) -> str:
    """`text` as printable ASCII, safe as a header value that every NATS client reads back.

    Other characters are escaped as in a Python literal: control characters and Latin-1 as
    `\\xNN`, the rest as `\\uNNNN` or `\\UNNNNNNNN`, and bytes that were not UTF-8 (decoded
    with `surrogateescape`) as `\\xNN` of the byte. Printable ASCII text comes back as it is.
    """
    if text.isascii() and text.isprintable():
        return text
    out = []
    for char in text:
        code = ord(char)
        if 0x20 <= code < 0x7F:
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def quote(value: str) -> str:
    """`value` quoted for an error message: printable, and at most 200 characters of it."""
    shown = printable(value[:_SHOWN])
    return f"'{shown}'" + ("..." if len(value) > _SHOWN else "")
