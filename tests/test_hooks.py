"""Hooks (taskframe.hooks): called around enqueues and attempts by real clients and workers,
in order, with each attempt's outcome; what they add to headers reaches the handler; one
that raises breaks nothing."""

import asyncio
import contextvars
import logging
import time
from collections import defaultdict

import pytest

from taskframe import (
    App,
    AttemptInfo,
    Client,
    ConfigError,
    Context,
    EnqueueInfo,
    Event,
    Hook,
    Reject,
    Task,
)
from taskframe.testing import eventually, running_worker
from tests.apps import FAST
from tests.conftest import Workers

current: contextvars.ContextVar[str] = contextvars.ContextVar("current", default="")


class Fine(Task[str], queue="hooked"):
    pass


class FineSync(Task[str], queue="hooked"):
    pass


class Flaky(Task[str], queue="hooked"):
    pass


class Doomed(Task[None], queue="hooked"):
    pass


class Refused(Task[None], queue="hooked"):
    pass


class Spawn(Task[str], queue="hooked"):
    pass


class Shipped(Event):
    pass


class Recorder(Hook):
    """Records every call; sets `current` for the attempt, as a tracing hook would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.attempts: dict[str, list[AttemptInfo]] = defaultdict(list)
        self.enqueued: list[tuple[EnqueueInfo, BaseException | None]] = []

    def before_enqueue(self, info: EnqueueInfo) -> None:
        self.calls.append(("before_enqueue", info.name))
        info.headers["x-trace"] = f"trace-{info.task_id}"

    def after_enqueue(self, info: EnqueueInfo, error: BaseException | None) -> None:
        self.calls.append(("after_enqueue", info.name))
        self.enqueued.append((info, error))

    def attempt_started(self, attempt: AttemptInfo) -> None:
        self.calls.append(("started", attempt.task_id, str(attempt.attempt)))
        attempt.scratch["token"] = current.set(f"{attempt.task_id}/{attempt.attempt}")

    def attempt_ended(self, attempt: AttemptInfo) -> None:
        current.reset(attempt.scratch.pop("token"))
        self.calls.append(("ended", attempt.task_id, str(attempt.attempt)))
        self.attempts[attempt.task_id].append(attempt)


class Raising(Hook):
    def before_enqueue(self, info: EnqueueInfo) -> None:
        raise RuntimeError("hook bug")

    def after_enqueue(self, info: EnqueueInfo, error: BaseException | None) -> None:
        raise RuntimeError("hook bug")

    def attempt_started(self, attempt: AttemptInfo) -> None:
        raise RuntimeError("hook bug")

    def attempt_ended(self, attempt: AttemptInfo) -> None:
        raise RuntimeError("hook bug")


def build(namespace: str, calls: list[str] | None = None) -> App:
    app, calls = App(namespace), [] if calls is None else calls

    @app.handle(Fine)
    async def fine(job: Fine, ctx: Context) -> str:
        return f"{current.get()}|{ctx.headers.get('x-trace', '')}"

    @app.handle(FineSync)
    def fine_sync(job: FineSync, ctx: Context) -> str:
        return current.get()

    @app.handle(Flaky, max_attempts=2, backoff=FAST)
    async def flaky(job: Flaky, ctx: Context) -> str:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return current.get()

    @app.handle(Doomed, max_attempts=2, backoff=FAST)
    async def doomed(job: Doomed, ctx: Context) -> None:
        raise ValueError(f"attempt {ctx.attempt}")

    @app.handle(Refused)
    async def refused(job: Refused, ctx: Context) -> None:
        raise Reject("not for us")

    @app.subscribe(Shipped, group="mailer")
    async def mail(event: Shipped, ctx: Context) -> None:
        calls.append(ctx.headers.get("x-trace", ""))

    @app.handle(Spawn)
    async def spawn(job: Spawn, ctx: Context) -> str:
        return (await ctx.enqueue(Fine())).id

    return app


def outcomes(hook: Recorder, task_id: str) -> list[tuple[int, str | None, str]]:
    return [(a.attempt, a.outcome, a.reason) for a in hook.attempts[task_id]]


async def test_attempts_are_seen_in_order_with_their_outcome(client: Client) -> None:
    app, hook = build(client.namespace), Recorder()
    app.add_hook(hook)
    async with running_worker(app, client):
        fine, sync, flaky = [await client.enqueue(t) for t in (Fine(), FineSync(), Flaky())]
        doomed, refused = [await client.enqueue(t) for t in (Doomed(), Refused())]
        before = time.time()
        # a context variable set in attempt_started is the handler's, in a thread too
        assert (await fine.result(timeout=10)).startswith(f"{fine.id}/1|")
        assert await sync.result(timeout=10) == f"{sync.id}/1"
        assert await flaky.result(timeout=10) == f"{flaky.id}/2"
        await eventually(lambda: len(hook.attempts[doomed.id]) == 2, "doomed twice")
        await eventually(lambda: hook.attempts[refused.id], "refused")
    assert outcomes(hook, fine.id) == [(1, "succeeded", "")]
    assert outcomes(hook, flaky.id) == [(1, "retried", ""), (2, "succeeded", "")]
    assert outcomes(hook, doomed.id) == [(1, "retried", ""), (2, "dead", "failed")]
    assert outcomes(hook, refused.id) == [(1, "dead", "rejected")]
    assert [type(a.error).__name__ for a in hook.attempts[doomed.id]] == ["ValueError"] * 2
    assert isinstance(hook.attempts[refused.id][0].error, Reject)
    assert hook.attempts[fine.id][0].error is None
    for task_id, seen in hook.attempts.items():
        calls = [c for c in hook.calls if c[0] in ("started", "ended") and c[1] == task_id]
        numbers = [str(n) for n in range(1, len(seen) + 1)]
        assert calls == [(kind, task_id, n) for n in numbers for kind in ("started", "ended")]
        for a in seen:
            assert (a.namespace, a.queue, a.group) == (client.namespace, "hooked", "")
            assert a.max_attempts in (2, 3)
            assert 0 <= a.queued < 10
            assert 0 <= a.duration < 10
            assert before - 10 < a.stored_at <= time.time()
    assert current.get() == ""


async def test_headers_added_before_enqueue_reach_the_handler(
    client: Client, workers: Workers
) -> None:
    app, producer, worker_hook = build(client.namespace), Recorder(), Recorder()
    client.add_hook(producer)
    app.add_hook(worker_hook)
    async with workers(app, 1):
        run = await client.enqueue(Fine())
        trace = (await run.result(timeout=10)).split("|")[1]
        spawned = await client.enqueue(Spawn())
        child_id = await spawned.result(timeout=10)
        await eventually(lambda: worker_hook.attempts[child_id], "the spawned task to run")
    assert trace == f"trace-{run.id}"
    assert producer.calls == [
        ("before_enqueue", "Fine"),
        ("after_enqueue", "Fine"),
        ("before_enqueue", "Spawn"),
        ("after_enqueue", "Spawn"),
    ]
    assert [(i.task_id, i.queue, i.kind, e) for i, e in producer.enqueued] == [
        (run.id, "hooked", "task", None),
        (spawned.id, "hooked", "task", None),
    ]
    # ctx.enqueue goes through the worker's client, which calls the app's hooks
    assert [(i.task_id, e) for i, e in worker_hook.enqueued] == [(child_id, None)]
    assert worker_hook.attempts[child_id][0].headers["x-trace"] == f"trace-{child_id}"
    assert not client.hooks[1:]  # the worker lent the app's hooks to its own client only


async def test_a_raising_hook_breaks_no_task(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    app, recorder = build(client.namespace), Recorder()
    app.add_hook(Raising())
    app.add_hook(recorder)
    client.add_hook(Raising())
    with caplog.at_level(logging.ERROR, logger="taskframe.hooks"):
        async with running_worker(app, client):
            runs = [await client.enqueue(Fine()) for _ in range(3)]
            results = await asyncio.gather(*(r.result(timeout=10) for r in runs))
    assert [r.split("|")[0] for r in results] == [f"{r.id}/1" for r in runs]
    assert all(outcomes(recorder, r.id) == [(1, "succeeded", "")] for r in runs)
    failed = {r.getMessage().split(" failed in ")[1].split(" of ")[0] for r in caplog.records}
    assert failed == {"before_enqueue", "after_enqueue", "attempt_started", "attempt_ended"}


async def test_events_are_seen_with_their_group(client: Client) -> None:
    delivered: list[str] = []
    app, hook = build(client.namespace, delivered), Recorder()
    app.add_hook(hook)
    client.add_hook(hook)
    async with running_worker(app, client):
        event_id = await client.publish(Shipped())
        await eventually(lambda: hook.attempts[event_id], "the event's attempt")
    [(info, error)] = hook.enqueued
    assert (info.task_id, info.kind, info.queue, error) == (event_id, "event", "", None)
    [seen] = hook.attempts[event_id]
    assert (seen.name, seen.queue, seen.group, seen.outcome) == (
        "Shipped",
        "",
        "mailer",
        "succeeded",
    )
    assert delivered == [f"trace-{event_id}"]


def test_only_hooks_can_be_added(client: Client) -> None:
    with pytest.raises(ConfigError, match=r"not a taskframe\.hooks\.Hook"):
        App("x").add_hook(print)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"not a taskframe\.hooks\.Hook"):
        client.add_hook(object())  # type: ignore[arg-type]
