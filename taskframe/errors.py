"""The errors taskframe raises, and the two signals a handler may raise.

    TaskframeError
      ConfigError          bad settings, a clashing registration, a stream that conflicts
      ConnectError         NATS cannot be reached, or JetStream did not answer
        UnreachableError       no server answered at all
      PermissionDeniedError  the server refused an operation
      PublishError         the server did not confirm that a message was stored
        PayloadTooLargeError   the message exceeds the server's max_payload
        StoreFullError         no room: the server's, the account's or the stream's store is full
        StreamMissingError     no stream stores the subject
      PayloadError         a body that cannot be read: its object is gone, or it is corrupt
      TaskFailed           a task ended without a result (failed or dead)
        TaskCancelledError     it was cancelled (`Client.cancel`) before it finished
        FlowFailedError        a step of a flow ended dead, so the flow did too
      ResultTimeoutError   no result arrived within the time asked for
      AttemptTimeoutError  a handler ran past its timeout (recorded as the attempt's error)

    Retry(delay)           signal: try this task again later (counts as an attempt)
    Reject(reason)         signal: dead-letter this task now, without more attempts

`Retry` and `Reject` are not `TaskframeError`s, so an `except TaskframeError` in a
handler cannot swallow them by accident.
"""

from __future__ import annotations


class TaskframeError(Exception):
    """Base class of every error taskframe raises."""


class ConfigError(TaskframeError):
    """Invalid settings, a clashing registration, or a stream that conflicts with ours."""


class ConnectError(TaskframeError):
    """NATS could not be reached, refused the login, or JetStream did not answer."""


class UnreachableError(ConnectError):
    """No NATS server answered at all: none is running there, or not yet."""


class PermissionDeniedError(TaskframeError):
    """The server refused an operation for lack of permission."""

    def __init__(self, operation: str, detail: str) -> None:
        self.operation = operation
        self.detail = detail
        super().__init__(f"permission denied for {operation}: {detail}")


class PublishError(TaskframeError):
    """The server did not confirm that a message was stored; it may not have been."""


class PayloadTooLargeError(PublishError):
    """The encoded message exceeds the server's `max_payload`; nothing was sent."""

    def __init__(self, subject: str, size: int, max_payload: int) -> None:
        self.subject = subject
        self.size = size
        self.max_payload = max_payload
        super().__init__(
            f"message for {subject} is {size} bytes with headers, "
            f"over the server's max_payload of {max_payload} bytes"
        )


class StoreFullError(PublishError):
    """The server refused to store a message for lack of room; nothing was stored.

    Its file or memory store (`max_file_store`, `max_memory_store`), the account's
    JetStream limit, or the stream's own `max_bytes` / `max_msgs` is used up. Raised at
    once, without retries: sending again is refused too until room is made, which workers
    draining a backlog do by themselves (or an operator, raising a limit).

    Attributes:
        subject: where the message was sent.
        description: the server's words, e.g. "insufficient resources".
        code: the server's status code (503; 400 for an account's limit).
        err_code: the server's JetStream error code: `SERVER_FULL`, `ACCOUNT_FULL` or
            `STREAM_FULL`.
        stream: the stream that refused, when the server named it.
        task_ids: the tasks that were not stored (set by `enqueue` and `enqueue_many`).
    """

    SERVER_FULL = 10023
    """The server's `max_file_store` or `max_memory_store` is used up ("insufficient resources")."""
    ACCOUNT_FULL = 10002
    """The account's JetStream storage limit is used up."""
    STREAM_FULL = 10077
    """The stream's `max_bytes` or `max_msgs` is reached and it discards new messages."""

    def __init__(
        self,
        subject: str,
        description: str,
        code: int,
        err_code: int,
        stream: str | None = None,
        task_ids: tuple[str, ...] = (),
    ) -> None:
        self.subject = subject
        self.description = description
        self.code = code
        self.err_code = err_code
        self.stream = stream
        self.task_ids = task_ids
        if err_code == self.SERVER_FULL:
            why = "the server's JetStream store is full"
        elif err_code == self.ACCOUNT_FULL:
            why = "the account's JetStream storage limit is reached"
        else:
            why = f"stream {stream or '?'} is at its limit"
        tasks = f"; {len(task_ids)} task(s) not stored: {list(task_ids[:10])}" if task_ids else ""
        super().__init__(
            f"no room to store a message on {subject}: {why} "
            f"(server: {description!r}, code {code}, err_code {err_code}){tasks}"
        )

    def for_tasks(self, task_ids: tuple[str, ...]) -> StoreFullError:
        """The same refusal, naming the tasks that were not stored."""
        return StoreFullError(
            self.subject, self.description, self.code, self.err_code, self.stream, task_ids
        )


class StreamMissingError(PublishError):
    """No stream stores the subject (the server had no responder for it)."""


class PayloadError(TaskframeError):
    """A message body that cannot be decoded: its object in the payloads bucket is gone
    (deleted or expired), its compression is corrupt, or the `compression` extra that
    reads it is not installed."""


class TaskFailed(TaskframeError):
    """A task ended without a result: its handler failed on every attempt, or it was rejected."""

    def __init__(
        self, task_id: str, error_type: str, message: str, attempts: int, state: str
    ) -> None:
        self.task_id = task_id
        self.error_type = error_type
        self.message = message
        self.attempts = attempts
        self.state = state
        super().__init__(
            f"task {task_id} {state} after {attempts} attempt(s): {error_type}: {message}"
        )


class TaskCancelledError(TaskFailed):
    """The task was cancelled before it finished: it did not run, or its handler was stopped.

    A `TaskFailed` (its `state` is "cancelled"), so code that handles a task ending
    without a result handles this too, and may tell it apart.
    """

    def __init__(self, task_id: str, attempts: int = 0) -> None:
        super().__init__(task_id, "Cancelled", "cancelled on request", attempts, "cancelled")


class FlowFailedError(TaskFailed):
    """A step of a flow ended dead: the flow failed, and nothing after that step ran.

    Attributes:
        flow_id: the flow's id (also its `task_id`).
        step_id: the task id of the step that died.
        step_task: that step's task name.
        error_type, message: the step's error (`message` names the step too).
    """

    def __init__(
        self, flow_id: str, step_id: str, step_task: str, error_type: str, message: str
    ) -> None:
        super().__init__(flow_id, error_type, message, 1, "dead")
        self.flow_id = flow_id
        self.step_id = step_id
        self.step_task = step_task
        self.args = (f"flow {flow_id} failed: {message}",)


class ResultTimeoutError(TaskframeError, TimeoutError):
    """No final result arrived within the time asked for; the task may still finish."""


class AttemptTimeoutError(TaskframeError, TimeoutError):
    """The handler ran past its timeout and was cancelled."""


class Retry(Exception):
    """Raise in a handler to try the task again after `delay` seconds (default: the backoff).

    The attempt counts towards `max_attempts`.
    """

    def __init__(self, delay: float | None = None) -> None:
        self.delay = delay
        super().__init__(f"retry requested (delay={delay})")


class Reject(Exception):
    """Raise in a handler to send the task to the dead-letter stream now, with `reason`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
