"""App: the registry of a namespace's task handlers.

    app = App("media")

    @app.handle(ResizeImage, max_attempts=5, timeout=30.0)
    async def resize(job: ResizeImage, ctx: Context) -> str: ...

An App is a plain object with no connection; a worker runs it, and a producer needs only
the task models.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter

from taskframe.context import Context
from taskframe.errors import ConfigError
from taskframe.models import Task, check_token, result_type
from taskframe.retry import DEFAULT_BACKOFF, Backoff

T = TypeVar("T", bound=Task[Any])
R = TypeVar("R")

HandlerFn = Callable[[T, Context], R]


@dataclass(frozen=True, slots=True)
class Handler(Generic[T]):
    """One registered task handler and its delivery policy."""

    model: type[T]
    fn: Callable[[T, Context], Any]
    max_attempts: int
    timeout: float | None
    backoff: Backoff
    is_async: bool
    result: TypeAdapter[Any]

    @property
    def name(self) -> str:
        """The task name this handler answers to."""
        return self.model.__tf_name__

    @property
    def queue(self) -> str:
        """The queue this handler's tasks arrive on."""
        return self.model.__tf_queue__


class App:
    """The handlers of one namespace. Pass it to a worker; producers need only the models."""

    def __init__(self, namespace: str) -> None:
        self.namespace = check_token("namespace", namespace)
        self.handlers: dict[tuple[str, str], Handler[Any]] = {}

    def __repr__(self) -> str:
        return (
            f"<App {self.namespace!r} handlers={len(self.handlers)} queues={sorted(self.queues)}>"
        )

    @property
    def queues(self) -> set[str]:
        """The queues that have at least one handler."""
        return {queue for queue, _ in self.handlers}

    def handle(
        self,
        model: type[T],
        *,
        max_attempts: int = 3,
        timeout: float | None = 300.0,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> Callable[[HandlerFn[T, R]], HandlerFn[T, R]]:
        """Register the decorated function as the handler of `model`.

        Args:
            model: the task model; the handler's first parameter must accept it.
            max_attempts: deliveries before the task goes to the dead-letter stream,
                the first one included.
            timeout: seconds one attempt may run; None for no limit. A plain `def` handler
                that times out keeps its thread until it returns (threads cannot be killed).
            backoff: delays between attempts.

        The handler may be `async def` (runs on the event loop) or plain `def` (runs in a
        thread pool). Its return annotation is the result type, validated before storing.
        """
        if not (isinstance(model, type) and issubclass(model, Task)):
            raise ConfigError(f"{model!r} is not a Task model")
        if max_attempts < 1:
            raise ConfigError("max_attempts counts deliveries and must be at least 1")
        if timeout is not None and timeout <= 0:
            raise ConfigError("timeout must be positive seconds, or None")

        def register(fn: HandlerFn[T, R]) -> HandlerFn[T, R]:
            key = (model.__tf_queue__, model.__tf_name__)
            if key in self.handlers:
                raise ConfigError(
                    f"task {model.__tf_name__} on queue {model.__tf_queue__} already has a "
                    f"handler: {self.handlers[key].fn.__qualname__}"
                )
            self.handlers[key] = Handler(
                model=model,
                fn=fn,
                max_attempts=max_attempts,
                timeout=timeout,
                backoff=backoff,
                is_async=inspect.iscoroutinefunction(fn),
                result=TypeAdapter(_returns(fn, model)),
            )
            return fn

        return register


def _returns(fn: Callable[..., Any], model: type[Task[Any]]) -> Any:
    """The result type: the handler's return annotation, checked against `Task[R]`."""
    declared = result_type(model)
    declared = type(None) if declared is None else declared
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):
        hints = {}
    if "return" not in hints:
        return declared
    returned = hints["return"]
    if declared is not Any and returned != declared:
        raise ConfigError(
            f"{fn.__qualname__} returns {returned!r} but {model.__name__} declares "
            f"Task[{declared!r}]"
        )
    return returned
