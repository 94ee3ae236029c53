import dataclasses
import json

import pytest

from taskframe import Client, TaskFailed, TaskState
from taskframe._deadletters import dead_letters, fit, replay
from taskframe.provision import ensure_queue
from taskframe.testing import running_worker, work_until
from tests.apps import Add, AlwaysFails, build


async def test_dead_letters_are_listed_with_their_reason(client: Client) -> None:
    calls: list[str] = []
    run = await client.enqueue(AlwaysFails(note="x"))
    async with running_worker(build(client.namespace, calls), client):
        with pytest.raises(TaskFailed):
            await run.result(timeout=10)
    [letter] = await dead_letters(client.js, client.namespace)
    assert letter.task_id == run.id
    assert (letter.reason, letter.error_type, letter.attempts) == ("failed", "RuntimeError", 3)
    assert letter.original_subject == f"{client.namespace}.tasks.math.AlwaysFails"
    assert json.loads(letter.body) == {"note": "x"}
    assert letter.traceback is not None
    assert "handler always raises" in letter.traceback
    assert await dead_letters(client.js, client.namespace, queue="other") == []


async def test_replay_enqueues_again_with_the_same_id_and_removes_the_letter(
    client: Client,
) -> None:
    await ensure_queue(client.js, client.settings, "math")
    await client.js.publish(f"{client.namespace}.tasks.math.Add", b'{"a": "x", "b": 1}')
    app = build(client.namespace)
    await work_until(app, client, lambda w: w.stats.dead == 1)
    [letter] = await dead_letters(client.js, client.namespace)
    assert letter.reason == "invalid"
    # Fix the payload by hand, as an operator would, then replay it.
    fixed = dataclasses.replace(letter, body=Add(a=41, b=1).model_dump_json().encode())
    await replay(client, fixed)
    assert await dead_letters(client.js, client.namespace) == []
    worker = await work_until(app, client, lambda w: w.stats.succeeded == 1)
    assert worker.stats.dead == 0
    status = await client.status(letter.task_id)
    assert status is not None
    assert status.result == 42


async def test_a_task_at_the_size_limit_still_gets_its_dead_letter(client: Client) -> None:
    # Invalid JSON just under max_payload: its dead letter's headers would push it over,
    # and an over-size publish would cost the worker its connection.
    await ensure_queue(client.js, client.settings, "math")
    limit = client.nc.max_payload
    body = b'{"a": "' + b"x" * (limit - 900) + b'"'
    note = {"Tf-Note": "n" * 600}
    await client.js.publish(f"{client.namespace}.tasks.math.Add", body, headers=note)
    worker = await work_until(build(client.namespace), client, lambda w: w.stats.dead == 1)
    assert client.nc.is_connected
    assert worker.stats.dead == 1
    [letter] = await dead_letters(client.js, client.namespace)
    assert letter.reason == "invalid"
    assert letter.body == body  # the task's own header made room, its body is kept
    assert "Tf-Note" not in letter.headers


def test_fit_drops_what_is_worth_least_first() -> None:
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


async def test_a_replayed_task_is_queued_again_until_it_runs(client: Client) -> None:
    run = await client.enqueue(AlwaysFails(note="x"))
    calls: list[str] = []
    await work_until(build(client.namespace, calls), client, lambda w: w.stats.dead == 1)
    assert (await run.status()).state is TaskState.DEAD
    [letter] = await dead_letters(client.js, client.namespace)
    await replay(client, letter)
    status = await run.status()
    assert (status.state, status.attempt) == (TaskState.QUEUED, 0)
    await work_until(build(client.namespace, calls), client, lambda w: w.stats.dead == 1)
    assert (await run.status()).state is TaskState.DEAD


async def test_a_non_ascii_error_reads_back_as_written_and_replays(client: Client) -> None:
    run = await client.enqueue(AlwaysFails(note="unicode"))
    await work_until(build(client.namespace), client, lambda w: w.stats.dead == 1)
    [letter] = await dead_letters(client.js, client.namespace)
    assert letter.error == "café ü: handler always raises"
    assert all(isinstance(value, str) for value in letter.headers.values())
    await replay(client, letter)
    assert (await run.status()).state is TaskState.QUEUED
