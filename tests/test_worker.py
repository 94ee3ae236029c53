import asyncio
import json

import pytest

from taskframe import App, Client, Context, TaskFailed, TaskState, Worker
from taskframe._topology import dead_stream
from taskframe.provision import ensure_queue
from taskframe.testing import running_worker, work_until
from tests.apps import Add, AlwaysFails, Flaky, Quiet, Slow, build


async def raw_publish(client: Client, task: str, body: bytes) -> None:
    """Publish as a producer without taskframe would: subject and body only."""
    await ensure_queue(client.js, client.settings, "math")
    await client.js.publish(f"{client.namespace}.tasks.math.{task}", body)


async def dead_letters(client: Client) -> list[dict[str, str]]:
    info = await client.js.stream_info(dead_stream(client.namespace))
    letters = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await client.js.get_msg(dead_stream(client.namespace), seq)
        letters.append({**(msg.headers or {}), "body": (msg.data or b"").decode()})
    return letters


async def test_handler_result_comes_back_typed(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(Add(a=2, b=3))
    async with running_worker(build(client.namespace, calls), client):
        assert await run.result(timeout=5) == 5
    status = await run.status()
    assert status.state is TaskState.SUCCEEDED
    assert status.attempt == 1
    assert calls == [f"add:{run.id}:1"]


async def test_failures_retry_with_backoff_until_success(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(Flaky(succeed_on=3))
    async with running_worker(build(client.namespace, calls), client):
        assert await run.result(timeout=10) == "ok on 3"
    assert calls == ["flaky:1", "flaky:2", "flaky:3"]


async def test_always_failing_task_is_dead_after_exactly_max_attempts(client: Client) -> None:
    calls: list[str] = []
    bad = await client.enqueue(AlwaysFails())
    good = await client.enqueue(Add(a=1, b=1))
    async with running_worker(build(client.namespace, calls), client) as worker:
        with pytest.raises(TaskFailed) as failed:
            await bad.result(timeout=10)
        assert await good.result(timeout=5) == 2  # the worker kept going
        assert worker.stats.dead == 1
    assert failed.value.attempts == 3
    assert failed.value.error_type == "RuntimeError"
    assert "handler always raises" in failed.value.message
    assert calls.count("fails:1") == calls.count("fails:2") == calls.count("fails:3") == 1
    [letter] = await dead_letters(client)
    assert letter["Tf-Dead-Reason"] == "failed"
    assert letter["Tf-Attempts"] == "3"
    assert letter["Tf-Error-Type"] == "RuntimeError"
    assert "handler always raises" in json.loads(letter["Tf-Traceback"])
    assert letter["Tf-Id"] == bad.id
    assert json.loads(letter["body"]) == {"note": ""}


async def test_reject_goes_to_dead_letters_at_once(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(AlwaysFails(note="reject"))
    async with running_worker(build(client.namespace, calls), client):
        with pytest.raises(TaskFailed, match="not worth retrying"):
            await run.result(timeout=5)
    assert calls == ["fails:1"]
    status = await run.status()
    assert status.error is not None
    assert status.error.reason == "rejected"


async def test_retry_signal_uses_its_delay_and_counts_attempts(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(AlwaysFails(note="retry-now"))
    async with running_worker(build(client.namespace, calls), client):
        with pytest.raises(TaskFailed):
            await run.result(timeout=5)
    assert calls == ["fails:1", "fails:2", "fails:3"]


async def test_timeout_fails_the_attempt(client: Client) -> None:
    app = App(client.namespace)

    @app.handle(Slow, timeout=0.2, max_attempts=1)
    async def slow(job: Slow, ctx: Context) -> float:
        await asyncio.sleep(job.seconds)
        return job.seconds

    run = await client.enqueue(Slow(seconds=30))
    async with running_worker(app, client):
        with pytest.raises(TaskFailed, match=r"timeout of 0\.2s") as failed:
            await run.result(timeout=5)
    assert failed.value.error_type == "TimeoutError"


@pytest.mark.parametrize(
    ("payload", "reason", "error"),
    [
        (b"{not json", "invalid", "ValidationError"),
        (b'{"a": "one", "b": 2}', "invalid", "ValidationError"),
        (b'{"a": 1}', "invalid", "ValidationError"),
    ],
)
async def test_bad_payload_is_dead_at_once_with_the_reason(
    client: Client, payload: bytes, reason: str, error: str
) -> None:
    calls: list[str] = []
    await raw_publish(client, "Add", payload)
    good = await client.enqueue(Add(a=1, b=1))
    async with running_worker(build(client.namespace, calls), client) as worker:
        assert await good.result(timeout=5) == 2
        await _until(lambda: worker.stats.dead == 1)
    [letter] = await dead_letters(client)
    assert letter["Tf-Dead-Reason"] == reason
    assert letter["Tf-Error-Type"] == error
    assert letter["Tf-Attempts"] == "1"
    assert letter["body"] == payload.decode()
    assert [c for c in calls if c.startswith("add")] == [f"add:{good.id}:1"]


async def test_unknown_task_is_dead_with_the_reason(client: Client) -> None:
    await raw_publish(client, "NoSuchTask", b"{}")
    worker = await work_until(build(client.namespace), client, lambda w: w.stats.dead == 1)
    assert worker.stats.retried == 0
    [letter] = await dead_letters(client)
    assert letter["Tf-Dead-Reason"] == "unknown-task"
    assert "NoSuchTask" in letter["Tf-Error"]


async def test_plain_publish_without_headers_is_accepted(client: Client) -> None:
    """Another language's producer may send only the subject and the JSON body."""
    calls: list[str] = []
    await raw_publish(client, "Add", b'{"a": 40, "b": 2}')
    await work_until(build(client.namespace, calls), client, lambda w: w.stats.succeeded == 1)
    assert len(calls) == 1
    assert calls[0].startswith("add:math-1:1")


async def test_sync_handlers_run_in_threads_alongside_async_ones(client: Client) -> None:
    import threading

    app = App(client.namespace)
    threads: set[str] = set()

    @app.handle(Add)
    def add(job: Add, ctx: Context) -> int:
        threads.add(threading.current_thread().name)
        return job.a + job.b

    runs = await client.enqueue_many(Add(a=i, b=0) for i in range(20))
    async with running_worker(app, client):
        assert [await r.result(timeout=5) for r in runs] == list(range(20))
    assert threads
    assert all(name.startswith("taskframe") for name in threads)


async def test_tasks_without_results_write_no_status(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(Quiet(n=7))
    await work_until(build(client.namespace, calls), client, lambda w: w.stats.succeeded == 1)
    assert calls == ["quiet:7"]
    assert await client.status(run.id) is None


async def test_concurrency_bounds_running_tasks(client: Client) -> None:
    app = App(client.namespace)
    running = 0
    peak = 0

    @app.handle(Slow)
    async def slow(job: Slow, ctx: Context) -> float:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(job.seconds)
        running -= 1
        return job.seconds

    runs = await client.enqueue_many(Slow(seconds=0.05) for _ in range(40))
    async with running_worker(app, client, concurrency=4):
        for run in runs:
            await run.result(timeout=10)
    assert peak == 4


async def test_stop_hands_unstarted_tasks_back_and_finishes_running_ones(client: Client) -> None:
    calls: list[str] = []
    app = build(client.namespace, calls)
    runs = await client.enqueue_many(Slow(seconds=0.3) for _ in range(10))
    worker = Worker(app, client, concurrency=2, prefetch=8, grace=5.0)
    task = asyncio.create_task(worker.run())
    await _until(lambda: worker.stats.running == 2)
    worker.stop()
    await task
    assert worker.stats.succeeded == 2
    # Everything else went back to the queue at once and a new worker takes it.
    async with running_worker(app, client, concurrency=10):
        results = [await r.result(timeout=10) for r in runs]
    assert results == [0.3] * 10
    assert len([c for c in calls if c.startswith("slow")]) == 10


async def test_worker_repr_reads_well(client: Client) -> None:
    worker = Worker(build(client.namespace), client, queues=["math"])
    assert repr(worker) == (
        f"<Worker {client.namespace} queues=['math'] running=0 succeeded=0 retried=0 dead=0 lost=0>"
    )


async def _until(condition: object, timeout: float = 5.0) -> None:
    """Wait for a worker-side condition that has no event of its own (tests only)."""
    assert callable(condition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
