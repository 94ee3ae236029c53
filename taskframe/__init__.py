"""taskframe: typed, asyncio-native tasks and events on NATS JetStream."""

from taskframe._deadletters import DeadLetter
from taskframe._queues import QueueInfo
from taskframe._registry import WorkerInfo
from taskframe._results import ErrorInfo, Progress, TaskState, TaskStatus
from taskframe._retry import Backoff
from taskframe._taskrun import TaskRun
from taskframe.app import App
from taskframe.client import Client, connect
from taskframe.context import Context
from taskframe.errors import (
    AttemptTimeoutError,
    ConfigError,
    ConnectError,
    FlowFailedError,
    PayloadError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PublishError,
    Reject,
    ResultTimeoutError,
    Retry,
    StoreFullError,
    StreamMissingError,
    TaskCancelledError,
    TaskFailed,
    TaskframeError,
    UnreachableError,
)
from taskframe.flows import Flow, FlowRun, FlowStatus, StepStatus, chain, chord, group
from taskframe.hooks import AttemptInfo, EnqueueInfo, Hook
from taskframe.models import Event, Task
from taskframe.provision import provision
from taskframe.schedules import Periodic
from taskframe.schema import asyncapi_document, json_schemas, write_schemas
from taskframe.settings import Settings
from taskframe.worker import Worker, WorkerStats

__all__ = [
    # Defining tasks and handlers
    "App",
    "Backoff",
    "Context",
    "Event",
    "Periodic",
    "Task",
    # Producing, reading results, operating
    "Client",
    "DeadLetter",
    "ErrorInfo",
    "Progress",
    "QueueInfo",
    "TaskRun",
    "TaskState",
    "TaskStatus",
    "WorkerInfo",
    "connect",
    # Flows
    "Flow",
    "FlowRun",
    "FlowStatus",
    "StepStatus",
    "chain",
    "chord",
    "group",
    # Running
    "AttemptInfo",
    "EnqueueInfo",
    "Hook",
    "Settings",
    "Worker",
    "WorkerStats",
    "provision",
    # Contracts for producers in other languages
    "asyncapi_document",
    "json_schemas",
    "write_schemas",
    # Errors and signals
    "AttemptTimeoutError",
    "ConfigError",
    "ConnectError",
    "FlowFailedError",
    "PayloadError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublishError",
    "Reject",
    "ResultTimeoutError",
    "Retry",
    "StoreFullError",
    "StreamMissingError",
    "TaskCancelledError",
    "TaskFailed",
    "TaskframeError",
    "UnreachableError",
]
