"""taskframe: typed, asyncio-native tasks and events on NATS JetStream."""

from taskframe.app import App, Handler
from taskframe.client import Client, TaskRun, connect
from taskframe.context import Context
from taskframe.errors import (
    ConfigError,
    ConnectError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PublishError,
    Reject,
    ResultTimeoutError,
    Retry,
    StoreFullError,
    TaskFailed,
    TaskframeError,
    UnreachableError,
)
from taskframe.models import Event, Task
from taskframe.results import ErrorInfo, TaskState, TaskStatus
from taskframe.retry import Backoff
from taskframe.settings import Settings
from taskframe.worker import Worker

__all__ = [
    # Defining tasks and handlers
    "App",
    "Backoff",
    "Context",
    "Event",
    "Handler",
    "Task",
    # Producing and reading results
    "Client",
    "ErrorInfo",
    "TaskRun",
    "TaskState",
    "TaskStatus",
    "connect",
    # Running
    "Settings",
    "Worker",
    # Errors and signals
    "ConfigError",
    "ConnectError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublishError",
    "Reject",
    "ResultTimeoutError",
    "Retry",
    "StoreFullError",
    "TaskFailed",
    "TaskframeError",
    "UnreachableError",
]
