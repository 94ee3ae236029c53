"""taskframe models and App used by the benchmark.

Importable by module path, so the worker CLI can run it in subprocesses::

    taskframe worker bench.systems.taskframe_app:app --processes 2

Configured by environment variables, read at import (the CLI imports the module):

* ``BENCH_TASKFRAME_NAMESPACE``: the App's namespace (default ``bench``);
* ``BENCH_TASKFRAME_RESULTS``: ``1`` serves the task with the model that keeps results
  (``results=True``, taskframe's default), anything else with ``results=False``;
* ``TASKFRAME_URL``, ``TASKFRAME_STORAGE``, ...: taskframe's own settings.

Both models are the same task on the wire (queue ``bench``, task name ``Noop``,
fields ``index`` and ``sleep_ms``): whether a result is stored is decided by the model
the worker's handler is registered for, so one backlog serves either kind of worker.
"""

from __future__ import annotations

import asyncio
import os

from bench.probe import mark
from taskframe import App, Context, Task

NAMESPACE_ENV = "BENCH_TASKFRAME_NAMESPACE"
RESULTS_ENV = "BENCH_TASKFRAME_RESULTS"
DEFAULT_NAMESPACE = "bench"
QUEUE = "bench"
TASK_NAME = "Noop"


class Noop(Task[None], queue=QUEUE, name=TASK_NAME, results=False):
    """A benchmark task: sleep ``sleep_ms`` (mixed workload only), then mark ``index``."""

    index: int
    sleep_ms: int = 0


class NoopWithResult(Noop, name=TASK_NAME, results=True):
    """The same task, served by a worker that stores every outcome in the results bucket."""


async def run_noop(job: Noop, ctx: Context) -> None:
    if job.sleep_ms:
        await asyncio.sleep(job.sleep_ms / 1000)
    mark(job.index)


def build_app(namespace: str, *, results: bool) -> App:
    """An App serving ``Noop`` with or without stored results (default handler policy)."""
    app = App(namespace)
    model: type[Noop] = NoopWithResult if results else Noop
    app.handle(model)(run_noop)
    return app


def namespace_from_env() -> str:
    return os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE


app = build_app(namespace_from_env(), results=os.environ.get(RESULTS_ENV) == "1")
