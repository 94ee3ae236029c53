"""Hooks: the one extension point around enqueues and attempts.

Metrics, tracing and your own code all plug in here. Subclass `Hook`, override what you
need, and register an instance:

    class Timing(Hook):
        def attempt_ended(self, attempt: AttemptInfo) -> None:
            print(attempt.name, attempt.outcome, attempt.duration)

    app.add_hook(Timing())      # the worker calls it; its client (ctx.enqueue) too
    client.add_hook(Timing())   # enqueue and publish on this client

Hook methods are plain functions, called inline: keep them quick (start a task of your own
for anything that waits). One that raises is logged and ignored; it never breaks a task.
An app or client without hooks pays nothing for them.

`attempt_started` and `attempt_ended` run in the asyncio task that runs the handler, so a
context variable set in `attempt_started` is seen by the handler (a plain `def` handler
gets a copy of that context in its thread); reset it in `attempt_ended`, since the same
asyncio task runs the worker's next attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["AttemptInfo", "EnqueueInfo", "Hook", "Outcome"]

log = logging.getLogger("taskframe.hooks")

Outcome = Literal["succeeded", "retried", "dead", "lost", "cancelled"]
"""How an attempt ended.

succeeded  the handler returned; the task is acked once its record is stored (or it had
           already completed: an exactly-once task, or an over-delivered one that succeeded)
retried    it failed with attempts left, and goes back to its queue after its backoff
dead       its dead letter was stored (`AttemptInfo.reason` says why) and it will not run again
lost       this worker lost its hold on it (paused or cut off past its lease, or it could not
           settle it): the server redelivers it, here or to another worker
cancelled  the worker stopped while it ran, and handed it back at once
"""


@dataclass(slots=True)
class EnqueueInfo:
    """A task (or event) about to be stored by a client, and after."""

    namespace: str
    queue: str
    """The task's queue; empty for an event."""
    name: str
    """The task or event name."""
    task_id: str
    """The task's (or event's) id."""
    headers: dict[str, str]
    """The message's headers. `before_enqueue` may add its own (a `traceparent`, say): the
    handler sees them in `ctx.headers`. Names starting with `Nats-` or `Tf-` are taskframe's."""
    kind: Literal["task", "event"] = "task"


@dataclass(slots=True)
class AttemptInfo:
    """One attempt at a delivered task or event, from its start to its outcome."""

    namespace: str
    queue: str
    """The task's queue; empty for an event."""
    group: str
    """The subscriber group of an event; empty for a task."""
    name: str
    """The task or event name (`_invalid` for a message that cannot be used)."""
    task_id: str
    attempt: int
    """This attempt's number, 1 for the first delivery."""
    max_attempts: int
    """The handler's `max_attempts` (this attempt's number if no handler takes the message)."""
    headers: Mapping[str, str]
    """The delivered message's headers."""
    stored_at: float
    """When the server stored the message (seconds since the epoch): for a retry, when it
    was first enqueued."""
    queued: float
    """Seconds from `stored_at` to the start of this attempt."""
    outcome: Outcome | None = None
    """Set before `attempt_ended`."""
    reason: str = ""
    """Why it is dead: failed, rejected, invalid, unknown-task, lost."""
    error: BaseException | None = None
    """What the handler raised, if it did."""
    duration: float = 0.0
    """Seconds from the start of the attempt to its outcome; set before `attempt_ended`."""
    scratch: dict[str, Any] = field(default_factory=dict)
    """Room for hooks to keep what they need between the start and the end (a span)."""


class Hook:
    """Called around enqueues and attempts; every method does nothing unless overridden."""

    def before_enqueue(self, info: EnqueueInfo) -> None:
        """A client is about to store a task or event; `info.headers` may be changed."""

    def after_enqueue(self, info: EnqueueInfo, error: BaseException | None) -> None:
        """The server confirmed storing it (`error` None), or it was not stored."""

    def attempt_started(self, attempt: AttemptInfo) -> None:
        """A worker starts an attempt, before it decodes the task and runs the handler."""

    def attempt_ended(self, attempt: AttemptInfo) -> None:
        """The attempt has its `outcome`; called exactly once per `attempt_started`."""


def before_enqueue(hooks: list[Hook], info: EnqueueInfo) -> None:
    """Call every hook's `before_enqueue`, logging what raises."""
    for hook in hooks:
        try:
            hook.before_enqueue(info)
        except Exception:
            log.exception("hook %r failed in before_enqueue of %s", hook, info.task_id)


def after_enqueue(hooks: list[Hook], info: EnqueueInfo, error: BaseException | None) -> None:
    """Call every hook's `after_enqueue`, logging what raises."""
    for hook in hooks:
        try:
            hook.after_enqueue(info, error)
        except Exception:
            log.exception("hook %r failed in after_enqueue of %s", hook, info.task_id)


def attempt_started(hooks: list[Hook], attempt: AttemptInfo) -> None:
    """Call every hook's `attempt_started`, logging what raises."""
    for hook in hooks:
        try:
            hook.attempt_started(attempt)
        except Exception:
            log.exception("hook %r failed in attempt_started of %s", hook, attempt.task_id)


def attempt_ended(hooks: list[Hook], attempt: AttemptInfo) -> None:
    """Call every hook's `attempt_ended` (last registered first), logging what raises."""
    for hook in reversed(hooks):
        try:
            hook.attempt_ended(attempt)
        except Exception:
            log.exception("hook %r failed in attempt_ended of %s", hook, attempt.task_id)
