"""Settling (taskframe.settle): what happens to a delivery once its attempt ended.

Acked with its record, retried after a delay, or buried as a dead letter (stored before the
message is terminated, cut down to fit the server's max_payload).
"""

import asyncio
import json

import pytest

from taskframe import (
    App,
    Backoff,
    Client,
    Context,
    Event,
    TaskFailed,
    TaskState,
    connect,
    provision,
)
from taskframe import _topology as topology
from taskframe._deadletters import fit
from taskframe.testing import NatsServer, eventually, running_worker
from tests.apps import Add, AlwaysFails, Flaky, Quiet, Slow, build


class OrderPlaced(Event):
    order: int


async def test_failures_retry_with_backoff_until_success(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(Flaky(succeed_on=3))
    async with running_worker(build(client.namespace, calls), client) as worker:
        assert await run.result(timeout=10) == "ok on 3"
        assert worker.stats.retried == 2
    assert calls == ["flaky:1", "flaky:2", "flaky:3"]
    status = await run.status()
    assert (status.state, status.attempt) == (TaskState.SUCCEEDED, 3)


async def test_a_task_that_always_fails_is_dead_after_exactly_max_attempts(client: Client) -> None:
    calls: list[str] = []
    bad = await client.enqueue(AlwaysFails(note="x"))
    good = await client.enqueue(Add(a=1, b=1))
    async with running_worker(build(client.namespace, calls), client) as worker:
        with pytest.raises(TaskFailed) as failed:
            await bad.result(timeout=10)
        assert await good.result(timeout=5) == 2  # the worker kept going
        assert worker.stats.dead == 1
    assert (failed.value.task_id, failed.value.attempts, failed.value.state) == (bad.id, 3, "dead")
    assert failed.value.error_type == "RuntimeError"
    assert "handler always raises" in failed.value.message
    assert calls.count("fails:1") == calls.count("fails:2") == calls.count("fails:3") == 1

    [letter] = await client.dead_letters()
    assert letter.task_id == bad.id
    assert (letter.reason, letter.error_type, letter.attempts) == ("failed", "RuntimeError", 3)
    assert letter.error == "handler always raises"
    assert letter.original_subject == f"{client.namespace}.tasks.math.AlwaysFails"
    assert letter.subject == f"{client.namespace}.dead.math.AlwaysFails"
    assert json.loads(letter.body) == {"note": "x"}
    assert letter.traceback is not None
    assert "handler always raises" in letter.traceback
    status = await bad.status()
    assert status.error is not None
    assert (status.state, status.error.reason) == (TaskState.DEAD, "failed")


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
    [letter] = await client.dead_letters()
    assert (letter.reason, letter.attempts, letter.error) == ("rejected", 1, "not worth retrying")


async def test_retry_signal_uses_its_delay_and_counts_attempts(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(AlwaysFails(note="retry-now"))
    async with running_worker(build(client.namespace, calls), client):
        with pytest.raises(TaskFailed) as failed:
            await run.result(timeout=5)
    assert calls == ["fails:1", "fails:2", "fails:3"]
    assert failed.value.error_type == "Retry"


async def test_a_record_the_broker_cannot_store_yet_holds_its_task_instead_of_running_it_again(
    client: Client, nats_server: NatsServer
) -> None:
    """Its results stream gone for four ack_waits, as when a cluster's results stream has no
    leader yet: the finished task is held (its lease renewed) until its record is stored,
    not redelivered, run again, and in the end buried as lost."""
    calls: list[str] = []
    app = build(client.namespace, calls)
    async with connect(nats_server.url, namespace=client.namespace, ack_wait=1.0) as tf:
        run = await tf.enqueue(Slow(seconds=0.3))
        async with running_worker(app, tf) as worker:
            await eventually(lambda: calls, "the handler started")
            await tf.js.delete_stream(topology.results_stream(tf.namespace))
            await eventually(lambda: worker.stats.confirming == 1, "its record waiting")
            await asyncio.sleep(4.0)  # a message left unsettled would come back every second
            assert (worker.stats.confirming, len(calls)) == (1, 1)
            await provision(app, tf)
            assert await run.result(timeout=10) == 0.3
            await eventually(lambda: worker.stats.succeeded == 1, "the task acked")
            assert worker.stats.lost == 0
    assert calls == [f"slow:{run.id}:1"]


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


async def test_tasks_without_results_are_acked_with_no_status(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(Quiet(n=7))
    async with running_worker(build(client.namespace, calls), client) as worker:
        await eventually(lambda: worker.stats.succeeded == 1, "the quiet task to be acked")
    assert calls == ["quiet:7"]
    assert await client.status(run.id) is None


async def test_a_failing_subscriber_retries_then_dead_letters(client: Client) -> None:
    attempts: list[int] = []
    app = App(client.namespace)

    @app.subscribe(OrderPlaced, group="flaky", max_attempts=2, backoff=Backoff(0.05))
    async def flaky(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("subscriber down")

    async with running_worker(app, client) as worker:
        await client.publish(OrderPlaced(order=7))
        await eventually(lambda: worker.stats.dead == 1, "the event to be dead-lettered")
    assert attempts == [1, 2]
    [letter] = await client.dead_letters()
    assert letter.subject == f"{client.namespace}.dead._events.flaky.OrderPlaced"
    assert (letter.reason, letter.attempts) == ("failed", 2)
    assert json.loads(letter.body) == {"order": 7}


async def test_a_task_at_the_size_limit_still_gets_its_dead_letter(client: Client) -> None:
    # Invalid JSON just under max_payload: its dead letter's headers would push it over,
    # and an over-size publish would cost the worker its connection.
    limit = client.nc.max_payload
    body = b'{"a": "' + b"x" * (limit - 900) + b'"'
    note = {"Tf-Note": "n" * 600}
    app = build(client.namespace)
    await provision(app, client)
    await client.js.publish(f"{client.namespace}.tasks.math.Add", body, headers=note)
    async with running_worker(app, client) as worker:
        await eventually(lambda: worker.stats.dead == 1, "the big task to be dead-lettered")
    assert client.nc.is_connected
    [letter] = await client.dead_letters()
    assert letter.reason == "invalid"
    assert letter.body == body  # the task's own header made room, its body is kept
    assert "Tf-Note" not in letter.headers


def test_a_dead_letter_is_cut_to_fit_dropping_what_is_worth_least_first() -> None:
    headers = {"Tf-Id": "t", "Tf-Error": "e" * 500, "Tf-Traceback": "t" * 900, "X-Own": "o" * 50}
    body = b"b" * 1000
    assert fit(headers, body, 10_000) == (headers, body)
    kept, same = fit(headers, body, 1900)
    assert same == body
    assert "Tf-Traceback" not in kept
    assert len(kept["Tf-Error"]) == 200
    assert kept["X-Own"] == "o" * 50
    kept, same = fit(headers, body, 1250)
    assert same == body
    assert "X-Own" not in kept
    assert kept["Tf-Id"] == "t"
    kept, empty = fit(headers, body, 600)
    assert empty == b""
    assert kept["Tf-Error"].endswith("[body of 1000 bytes not kept]")
