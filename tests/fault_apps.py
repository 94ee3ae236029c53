"""The app that fault and CLI tests run in worker subprocesses (`tests.fault_apps:app`).

The CLI needs a module-level App, so this one is built at import from the environment:
TEST_NAMESPACE names its namespace, TEST_JOURNAL (optional) the handlers' journal
(tests/journal.py), where every handler writes `start` and `done` lines, so a test can see
which process ran which delivery of which task.
"""

import asyncio
import os
from pathlib import Path

from taskframe import App, Backoff, Context, Task
from tests.journal import Journal

FAST = Backoff(initial=0.05, maximum=0.2)


class Work(Task[str], queue="work"):
    """Sleeps `seconds`, then returns its task id."""

    seconds: float = 0.0


class Fail(Task[None], queue="work"):
    """Raises on every attempt."""

    note: str = ""


class Add(Task[int], queue="work"):
    a: int
    b: int


class Other(Task[str], queue="other"):
    """A second queue, for tests that serve or inspect queues separately."""

    seconds: float = 0.0


class Once(Task[str], queue="once"):
    """Like `Work`, but exactly-once: claimed in the claims bucket before it runs."""

    seconds: float = 0.0


class Bulky(Task[str], queue="work"):
    """Returns its task id; `pad` makes it as big as a test needs (to fill a store)."""

    pad: str = ""


class BulkyQuiet(Task[None], queue="work", results=False):
    """Like `Bulky`, fire-and-forget: no result is stored."""

    pad: str = ""


class Logged(Task[str], queue="work"):
    """Logs `note` through `ctx.log` (with an exception if `fail`); returns its task id."""

    note: str = ""
    fail: bool = False


class Poison(Task[None], queue="poison"):
    """Kills the worker process that runs it, on every delivery."""


class Hog(Task[str], queue="work"):
    """Allocates `mib` MiB and keeps it as long as its process lives: a leak, to recycle."""

    mib: int = 0


POISON_ATTEMPTS = 2
_hoard: list[bytes] = []


def build_app(namespace: str, journal: Journal | None) -> App:
    """The app in `namespace`, writing to `journal` when it is given."""
    app = App(namespace)

    def note(kind: str, ctx: Context) -> None:
        if journal is not None:
            journal.write(kind, ctx.task_id, ctx.attempt)

    @app.handle(Work, max_attempts=5, timeout=60.0)
    async def work(job: Work, ctx: Context) -> str:
        note("start", ctx)
        await asyncio.sleep(job.seconds)
        note("done", ctx)
        return ctx.task_id

    @app.handle(Fail, max_attempts=3, backoff=FAST)
    async def fail(job: Fail, ctx: Context) -> None:
        note("start", ctx)
        raise RuntimeError(f"fails on purpose (attempt {ctx.attempt})")

    @app.handle(Add)
    async def add(job: Add, ctx: Context) -> int:
        return job.a + job.b

    @app.handle(Once, exactly_once=True, timeout=60.0)
    async def once(job: Once, ctx: Context) -> str:
        note("start", ctx)
        await asyncio.sleep(job.seconds)
        note("done", ctx)
        return ctx.task_id

    @app.handle(Bulky)
    async def bulky(job: Bulky, ctx: Context) -> str:
        note("start", ctx)
        note("done", ctx)
        return ctx.task_id

    @app.handle(BulkyQuiet)
    async def bulky_quiet(job: BulkyQuiet, ctx: Context) -> None:
        note("start", ctx)
        note("done", ctx)

    @app.handle(Poison, max_attempts=POISON_ATTEMPTS)
    async def poison(job: Poison, ctx: Context) -> None:
        note("start", ctx)
        os._exit(1)  # no cleanup, no settle: what a segfault in a C extension looks like

    @app.handle(Hog)
    async def hog(job: Hog, ctx: Context) -> str:
        note("start", ctx)
        _hoard.append(b"x" * (job.mib * 2**20))  # written, so resident
        note("done", ctx)
        return ctx.task_id

    @app.handle(Other, timeout=60.0)
    async def other(job: Other, ctx: Context) -> str:
        note("start", ctx)
        await asyncio.sleep(job.seconds)
        note("done", ctx)
        return ctx.task_id

    app.handle(Logged)(logged)
    return app


async def logged(job: Logged, ctx: Context) -> str:
    """Logs through ctx.log, with the error it was given to raise (as exc_info)."""
    error = ValueError(job.note) if job.fail else None
    ctx.log.info("handling %s", job.note, exc_info=error)
    return ctx.task_id


_journal = os.environ.get("TEST_JOURNAL")
app = build_app(
    os.environ.get("TEST_NAMESPACE", "faults"), Journal(Path(_journal)) if _journal else None
)
