"""The flows' test app, in-process (`build(namespace)`) and in worker subprocesses
(`tests.flow_apps:app`, namespace and journal from TEST_NAMESPACE and TEST_JOURNAL, as
tests/fault_apps.py)."""

import asyncio
import os
from pathlib import Path

from taskframe import App, Backoff, Context, Task
from tests.journal import Journal

FAST = Backoff(initial=0.05, maximum=0.2)


class Square(Task[int], queue="flows"):
    n: int
    seconds: float = 0.0


class Double(Task[int], queue="flows"):
    """Doubles the result of the step before it."""

    seconds: float = 0.0


class Plus(Task[int], queue="flows"):
    """Adds `add` to the result of the Double before it."""

    add: int


class Collect(Task[list[int]], queue="flows"):
    """Returns the results of the group before it, in member order."""


class Gather(Task[list[object]], queue="flows"):
    """Returns the results of the group before it, untyped (members of any kind)."""


class Boom(Task[None], queue="flows"):
    """Fails on every attempt."""


class Probe(Task[str], queue="flows"):
    """Returns why `ctx.previous(Square)` refused, or "read N"."""


def build(namespace: str, journal: Journal | None = None) -> App:
    """The app in `namespace`; handlers write `start` and `done` lines to `journal`."""
    app = App(namespace)

    def note(kind: str, ctx: Context) -> None:
        if journal is not None:
            journal.write(kind, ctx.task_id, ctx.attempt)

    @app.handle(Square, max_attempts=10, backoff=FAST)  # survives the kills of its workers
    async def square(job: Square, ctx: Context) -> int:
        note("start", ctx)
        await asyncio.sleep(job.seconds)
        note("done", ctx)
        return job.n * job.n

    @app.handle(Double, backoff=FAST)
    async def double(job: Double, ctx: Context) -> int:
        note("start", ctx)
        value = await ctx.previous(Square)
        await asyncio.sleep(job.seconds)
        note("done", ctx)
        return 2 * value

    @app.handle(Plus, backoff=FAST)
    async def plus(job: Plus, ctx: Context) -> int:
        note("start", ctx)
        value = await ctx.previous(Double) + job.add
        note("done", ctx)
        return value

    @app.handle(Collect, max_attempts=10, backoff=FAST)
    async def collect(job: Collect, ctx: Context) -> list[int]:
        note("start", ctx)
        squares = await ctx.members(Square)
        note("done", ctx)
        return squares

    @app.handle(Gather, backoff=FAST)
    async def gather(job: Gather, ctx: Context) -> list[object]:
        note("start", ctx)
        return await ctx.members()

    @app.handle(Boom, max_attempts=2, backoff=FAST)
    async def boom(job: Boom, ctx: Context) -> None:
        note("start", ctx)
        raise RuntimeError("boom")

    @app.handle(Probe)
    async def probe(job: Probe, ctx: Context) -> str:
        try:
            value = await ctx.previous(Square)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return f"read {value}"

    return app


_journal = os.environ.get("TEST_JOURNAL")
app = build(
    os.environ.get("TEST_NAMESPACE", "flows"), Journal(Path(_journal)) if _journal else None
)
