"""The App that `python -m bench.same_work --default-path` runs as users run it.

    taskframe worker bench.default_path_app:app

A no-op task that keeps its result (taskframe's default): the handler returns the task's
number, which the worker stores as the task's status record before it acks. Read at import
(the CLI imports this module):

* ``BENCH_DP_NAMESPACE``: the App's namespace (default ``dp``);
* ``BENCH_DP_RESULTS``: ``0`` serves the same task with ``results=False``;
* ``TASKFRAME_URL`` and the other ``TASKFRAME_*`` settings, as for any worker.
"""

from __future__ import annotations

import os

from taskframe import App, Context, Task

NAMESPACE_ENV = "BENCH_DP_NAMESPACE"
RESULTS_ENV = "BENCH_DP_RESULTS"
QUEUE = "bench"
TASK_NAME = "Noop"


class Noop(Task[int], queue=QUEUE, name=TASK_NAME):
    """A no-op task whose result (its number) is kept, as by default."""

    n: int


class NoopNoResult(Noop, name=TASK_NAME, results=False):
    """The same task on the wire, served by a worker that stores no result."""


async def noop(job: Noop, ctx: Context) -> int:
    """Do nothing; return the task's number as its result."""
    return job.n


def build_app(namespace: str, *, results: bool = True) -> App:
    """An App serving `Noop`, keeping results (the default) or not."""
    app = App(namespace)
    model: type[Noop] = Noop if results else NoopNoResult
    app.handle(model)(noop)
    return app


app = build_app(os.environ.get(NAMESPACE_ENV) or "dp", results=os.environ.get(RESULTS_ENV) != "0")
