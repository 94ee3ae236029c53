"""Task models and an app shared by the in-process tests."""

import asyncio

from taskframe import App, Backoff, Context, Reject, Retry, Task

FAST = Backoff(initial=0.05, maximum=0.2)


class Add(Task[int], queue="math"):
    a: int
    b: int


class Flaky(Task[str], queue="math"):
    """Fails until attempt `succeed_on`."""

    succeed_on: int


class AlwaysFails(Task[None], queue="math"):
    note: str = ""


class Slow(Task[float], queue="slow"):
    seconds: float


class Quiet(Task[None], queue="math", results=False):
    n: int


def build(namespace: str, calls: list[str] | None = None) -> App:
    """An app in `namespace` whose handlers append what they did to `calls`."""
    app = App(namespace)
    seen = calls if calls is not None else []

    @app.handle(Add)
    async def add(job: Add, ctx: Context) -> int:
        seen.append(f"add:{ctx.task_id}:{ctx.attempt}")
        return job.a + job.b

    @app.handle(Flaky, max_attempts=5, backoff=FAST)
    async def flaky(job: Flaky, ctx: Context) -> str:
        seen.append(f"flaky:{ctx.attempt}")
        if ctx.attempt < job.succeed_on:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return f"ok on {ctx.attempt}"

    @app.handle(AlwaysFails, max_attempts=3, backoff=FAST)
    def always_fails(job: AlwaysFails, ctx: Context) -> None:
        seen.append(f"fails:{ctx.attempt}")
        if job.note == "reject":
            raise Reject("not worth retrying")
        if job.note == "retry-now":
            raise Retry(delay=0.01)
        if job.note == "unicode":
            raise RuntimeError("café ü: handler always raises")
        raise RuntimeError("handler always raises")

    @app.handle(Slow, timeout=5.0)
    async def slow(job: Slow, ctx: Context) -> float:
        seen.append(f"slow:{ctx.task_id}:{ctx.attempt}")
        await asyncio.sleep(job.seconds)
        return job.seconds

    @app.handle(Quiet)
    async def quiet(job: Quiet, ctx: Context) -> None:
        seen.append(f"quiet:{job.n}")

    return app
