import dataclasses
import json

import pytest

from taskframe import Client, TaskFailed
from taskframe.deadletters import dead_letters, replay
from taskframe.testing import running_worker, work_until
from taskframe.topology import ensure_queue
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
