"""Task and Event: the pydantic models that are the contract between producers and workers.

A producer needs only these models. Class options are given as keywords:

    class ResizeImage(Task[str], queue="images"):   # the handler returns a str
        url: str

    class ImageResized(Event, name="image.resized"):
        url: str
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter

from taskframe.errors import ConfigError

R = TypeVar("R")

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_EVENT_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
RESERVED_QUEUES = frozenset({"DEAD", "EVENTS"})


def check_token(kind: str, value: str) -> str:
    """Return `value` if it is usable as one NATS subject token and stream-name part."""
    if not _TOKEN.match(value):
        raise ConfigError(
            f"{kind} {value!r} must match [A-Za-z0-9_-]+ (it becomes a subject token)"
        )
    return value


class Task(BaseModel, Generic[R]):
    """Base class of task models. Parametrize with the handler's result type: `Task[int]`.

    Class keywords:
        queue: the queue (one JetStream stream) the task goes to; default "default".
        name: the task name on the wire; default the class name.
        results: whether workers store the outcome for `TaskRun.result()`; default True.
            Turn it off for fire-and-forget tasks to save one write per task.
        priority: the lane tasks of this model go to unless `enqueue()` says otherwise.
    """

    model_config = ConfigDict(frozen=True)

    __tf_name__: ClassVar[str] = "Task"
    __tf_queue__: ClassVar[str] = "default"
    __tf_results__: ClassVar[bool] = True
    __tf_priority__: ClassVar[str | None] = None

    def __init_subclass__(
        cls,
        queue: str | None = None,
        name: str | None = None,
        results: bool | None = None,
        priority: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.__tf_name__ = check_token("task name", name or cls.__name__.split("[")[0])
        if queue is not None:
            if queue in RESERVED_QUEUES or queue.startswith("_"):
                raise ConfigError(f"queue name {queue!r} is reserved")
            cls.__tf_queue__ = check_token("queue", queue)
        if results is not None:
            cls.__tf_results__ = results
        if priority is not None:
            cls.__tf_priority__ = check_token("priority", priority)


class Event(BaseModel):
    """Base class of event models: facts published to every subscriber group.

    Class keywords:
        name: the event name on the wire (dots allowed); default the class name.
    """

    model_config = ConfigDict(frozen=True)

    __tf_name__: ClassVar[str] = "Event"

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        event_name = name or cls.__name__
        if not _EVENT_NAME.match(event_name):
            raise ConfigError(
                f"event name {event_name!r} must be dot-separated [A-Za-z0-9_-] tokens"
            )
        cls.__tf_name__ = event_name


def result_type(model: type[Task[Any]]) -> Any:
    """The result type a task model declares through `Task[R]`, or `Any` if it declares none."""
    for base in model.__mro__:
        meta = getattr(base, "__pydantic_generic_metadata__", None)
        if meta and meta["origin"] is Task and meta["args"]:
            return meta["args"][0]
    return Any


def result_adapter(model: type[Task[Any]]) -> TypeAdapter[Any]:
    """A validator for the results of `model`."""
    return TypeAdapter(result_type(model))
