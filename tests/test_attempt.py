"""One attempt at a delivery (taskframe._attempt): what a delivery past `max_attempts` means.

The server's delivery count is not a count of attempts (a consumer leader that lost its
quorum counts deliveries that reach no worker), so a task is buried as `lost` only when its
records show that its last allowed attempt started.
"""

import pytest

from taskframe import Client, TaskFailed, provision
from taskframe import _topology as topology
from taskframe._publish import publish_stored
from taskframe._results import TaskState, status_record
from taskframe.testing import running_worker
from tests.apps import Add, build


async def _deliver_unrun(client: Client, times: int) -> None:
    """Deliver the math queue's first message `times` times without running it."""
    sub = await client.js.pull_subscribe_bind(
        topology.WORKERS, stream=topology.queue_stream(client.namespace, "math")
    )
    for _ in range(times):
        [msg] = await sub.fetch(1, timeout=5)
        await msg.nak()
    await sub.unsubscribe()


async def test_a_task_delivered_past_max_attempts_that_never_ran_runs(client: Client) -> None:
    calls: list[str] = []
    app = build(client.namespace, calls)
    await provision(app, client)
    run = await client.enqueue(Add(a=2, b=3))
    await _deliver_unrun(client, 4)  # max_attempts is 3
    async with running_worker(app, client):
        assert await run.result(timeout=10) == 5
    assert calls == [f"add:{run.id}:5"]
    assert await client.dead_letters() == []


async def test_a_task_whose_last_allowed_attempt_started_and_never_ended_is_lost(
    client: Client,
) -> None:
    calls: list[str] = []
    app = build(client.namespace, calls)
    await provision(app, client)
    run = await client.enqueue(Add(a=2, b=3))
    await _deliver_unrun(client, 3)
    # What attempt 3 stored before its worker died (every redelivery does).
    record = status_record(run.id, "Add", TaskState.RUNNING, 3)
    subject = topology.progress_subject(client.namespace, run.id)
    await publish_stored(client.nc, client.settings, subject, record)
    async with running_worker(app, client):
        with pytest.raises(TaskFailed) as failed:
            await run.result(timeout=10)
    assert calls == []
    assert failed.value.state == "dead"
    [letter] = await client.dead_letters()
    assert (letter.task_id, letter.reason, letter.attempts) == (run.id, "lost", 3)
