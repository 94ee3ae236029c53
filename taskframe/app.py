"""App: the registry of a namespace's handlers, subscribers, queue options and schedules.

    app = App("media")
    app.queue("images", priorities=("high", "default", "low"), max_in_flight=20)

    @app.handle(ResizeImage, max_attempts=5, timeout=30.0)
    async def resize(job: ResizeImage, ctx: Context) -> str: ...

    @app.subscribe(ImageResized, group="search-index")
    async def index(event: ImageResized, ctx: Context) -> None: ...

    app.schedule("0 0 3 * * *", Cleanup(), name="nightly-cleanup")

An App is a plain object with no connection; a worker runs it, and a producer needs only
the models.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar, overload

from pydantic import BaseModel, TypeAdapter

from taskframe._cron import Schedule
from taskframe._retry import DEFAULT_BACKOFF, Backoff
from taskframe._topology import DEFAULT_LANE, QueueOptions
from taskframe.context import Context
from taskframe.errors import ConfigError
from taskframe.hooks import Hook
from taskframe.models import Event, Task, check_token, result_type
from taskframe.schedules import Periodic

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T", bound=Task[Any])
E = TypeVar("E", bound=Event)
R = TypeVar("R")

HandlerFn = Callable[[M, Context], R]


@dataclass(frozen=True, slots=True)
class Handler(Generic[M]):
    """One registered task handler or event subscriber, and its delivery policy."""

    model: type[M]
    fn: Callable[[M, Context], Any]
    max_attempts: int
    timeout: float | None
    backoff: Backoff
    is_async: bool
    result: TypeAdapter[Any]
    exactly_once: bool = False
    name: str = ""
    """The task or event name this handler answers to."""
    keeps_result: bool = False
    """Whether the worker stores this handler's outcome in the results bucket."""


class App:
    """The handlers of one namespace. Pass it to a worker; producers need only the models."""

    def __init__(self, namespace: str) -> None:
        self.namespace = check_token("namespace", namespace)
        self.handlers: dict[tuple[str, str], Handler[Any]] = {}
        self.subscribers: dict[tuple[str, str], Handler[Any]] = {}
        self.queue_options: dict[str, QueueOptions] = {}
        self.schedules: dict[str, Periodic] = {}
        self.hooks: list[Hook] = []
        """Called by every worker of this app, and by its client (see `add_hook`)."""

    def __repr__(self) -> str:
        return (
            f"<App {self.namespace!r} handlers={len(self.handlers)} queues={sorted(self.queues)}"
            f" groups={sorted(self.groups)}>"
        )

    def add_hook(self, hook: Hook) -> None:
        """Have workers call `hook` around every attempt (`taskframe.hooks`); a worker's
        client, which `ctx.enqueue` uses, calls it around enqueues and publishes too."""
        if not isinstance(hook, Hook):
            raise ConfigError(f"{hook!r} is not a taskframe.hooks.Hook")
        self.hooks.append(hook)

    @property
    def queues(self) -> set[str]:
        """The queues that have at least one handler."""
        return {queue for queue, _ in self.handlers}

    @property
    def groups(self) -> set[str]:
        """The event subscriber groups."""
        return {group for group, _ in self.subscribers}

    def options(self, queue: str) -> QueueOptions:
        """The options of `queue` (defaults unless `queue()` set them)."""
        return self.queue_options.get(queue, QueueOptions())

    def queue(
        self,
        name: str,
        *,
        priorities: Sequence[str] = (),
        max_in_flight: int | None = None,
        rate_limit: str | None = None,
        duplicate_window: float | None = None,
        compression: bool = False,
    ) -> None:
        """Set how every worker of this namespace serves queue `name`.

        Args:
            priorities: lane names, highest first, including "default" (the lane of
                tasks enqueued without a priority). Under a backlog a worker always starts
                a task from the highest non-empty lane.
            max_in_flight: tasks held at once by all workers together (server-enforced,
                per lane).
            rate_limit: task starts per period across all workers, e.g. "100/s".
            duplicate_window: seconds an idempotency key is remembered by the stream.
            compression: store the queue's stream compressed on disk (the server's s2),
                applied by provisioning; task bodies are compressed by `compress_over`.
        """
        check_token("queue", name)
        lanes = tuple(check_token("priority", p) for p in priorities)
        if lanes and DEFAULT_LANE not in lanes:
            raise ConfigError(f"priorities {lanes} must include {DEFAULT_LANE!r}")
        if len(set(lanes)) != len(lanes):
            raise ConfigError(f"priorities {lanes} repeat a lane")
        if max_in_flight is not None and max_in_flight < 1:
            raise ConfigError("max_in_flight must be at least 1")
        if rate_limit is not None:
            from taskframe._ratelimit import RateLimit

            RateLimit.parse(rate_limit)
        self.queue_options[name] = QueueOptions(
            lanes, max_in_flight, rate_limit, duplicate_window, compression
        )

    def handle(
        self,
        model: type[T],
        *,
        max_attempts: int = 3,
        timeout: float | None = 300.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        exactly_once: bool = False,
    ) -> Callable[[HandlerFn[T, R]], HandlerFn[T, R]]:
        """Register the decorated function as the handler of task `model`.

        Args:
            model: the task model; the handler's first parameter must accept it.
            max_attempts: deliveries before the task goes to the dead-letter stream,
                the first one included.
            timeout: seconds one attempt may run; None for no limit. A plain `def` handler
                that times out keeps its thread until it returns (threads cannot be killed).
            backoff: delays between attempts.
            exactly_once: claim each task in a KV bucket before running it, so a task that
                completed never runs again and never runs on two workers at once (see the
                README for exactly what this does and does not promise).

        The handler may be `async def` (runs on the event loop) or plain `def` (runs in a
        thread pool). Its return annotation is the result type, validated before storing.
        """
        if not (isinstance(model, type) and issubclass(model, Task)):
            raise ConfigError(f"{model!r} is not a Task model")
        _check_policy(max_attempts, timeout)

        def register(fn: HandlerFn[T, R]) -> HandlerFn[T, R]:
            key = (model.__tf_queue__, model.__tf_name__)
            if key in self.handlers:
                raise ConfigError(
                    f"task {model.__tf_name__} on queue {model.__tf_queue__} already has a "
                    f"handler: {self.handlers[key].fn.__qualname__}"
                )
            self.handlers[key] = _handler(
                model,
                fn,
                max_attempts,
                timeout,
                backoff,
                TypeAdapter(_returns(fn, model)),
                exactly_once=exactly_once,
            )
            return fn

        return register

    def subscribe(
        self,
        model: type[E],
        *,
        group: str,
        max_attempts: int = 3,
        timeout: float | None = 300.0,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> Callable[[HandlerFn[E, R]], HandlerFn[E, R]]:
        """Register the decorated function as `group`'s subscriber to event `model`.

        Every group gets every event; the workers of one group share its events. A group
        exists from the moment a worker (or `taskframe provision`) creates it: events
        published before that are not kept for it.
        """
        if not (isinstance(model, type) and issubclass(model, Event)):
            raise ConfigError(f"{model!r} is not an Event model")
        check_token("group", group)
        _check_policy(max_attempts, timeout)

        def register(fn: HandlerFn[E, R]) -> HandlerFn[E, R]:
            key = (group, model.__tf_name__)
            if key in self.subscribers:
                raise ConfigError(f"group {group} already subscribes to {model.__tf_name__}")
            self.subscribers[key] = _handler(
                model, fn, max_attempts, timeout, backoff, TypeAdapter(Any)
            )
            return fn

        return register

    @overload
    def schedule(
        self, cron: str, task: Task[Any], *, name: str, time_zone: str | None = None
    ) -> Periodic: ...

    @overload
    def schedule(self, *, task: Task[Any], every: float | timedelta, name: str) -> Periodic: ...

    def schedule(
        self,
        cron: str | None = None,
        task: Task[Any] | None = None,
        *,
        every: float | timedelta | None = None,
        name: str,
        time_zone: str | None = None,
    ) -> Periodic:
        """Have the broker enqueue `task` on a schedule, once per tick however many workers run.

        `cron` has six fields, seconds first ("0 */5 * * * *"), or is "@hourly", "@daily",
        "@every 90s"...; `every` is a period in seconds (or a timedelta) instead. Workers
        create, update and remove the broker's schedules to match what the App declares.
        """
        if task is None or not isinstance(task, Task):
            raise ConfigError("schedule() needs the task to enqueue")
        if (cron is None) == (every is None):
            raise ConfigError("schedule() takes either a cron expression or every=, not both")
        check_token("schedule name", name)
        if name in self.schedules:
            raise ConfigError(f"a schedule named {name!r} is already declared")
        if every is not None:
            seconds = every.total_seconds() if isinstance(every, timedelta) else float(every)
            parsed = Schedule.every(seconds)
        else:
            assert cron is not None
            parsed = Schedule.parse(cron, time_zone=time_zone)
        periodic = Periodic(name, task, parsed.expression, time_zone)
        self.schedules[name] = periodic
        return periodic


def _handler(
    model: type[M],
    fn: Callable[[M, Context], Any],
    max_attempts: int,
    timeout: float | None,
    backoff: Backoff,
    result: TypeAdapter[Any],
    *,
    exactly_once: bool = False,
) -> Handler[M]:
    return Handler(
        model=model,
        fn=fn,
        max_attempts=max_attempts,
        timeout=timeout,
        backoff=backoff,
        is_async=inspect.iscoroutinefunction(fn),
        result=result,
        exactly_once=exactly_once,
        name=getattr(model, "__tf_name__", model.__name__),
        keeps_result=bool(getattr(model, "__tf_results__", False)),
    )


def _check_policy(max_attempts: int, timeout: float | None) -> None:
    if max_attempts < 1:
        raise ConfigError("max_attempts counts deliveries and must be at least 1")
    if timeout is not None and timeout <= 0:
        raise ConfigError("timeout must be positive seconds, or None")


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
