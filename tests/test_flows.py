"""Flows (taskframe.flows): chains, groups and chords run on real workers, steps read what
came before them, a dead step fails its flow, cancel, and `taskframe status` of a flow."""

import asyncio
import json
import time
from pathlib import Path

import pytest

from taskframe import (
    Client,
    FlowFailedError,
    TaskCancelledError,
    TaskState,
    chain,
    chord,
    group,
)
from taskframe import _topology as topology
from taskframe._flow_records import read_plan
from taskframe._flow_steps import FlowSteps
from taskframe._results import status_record
from taskframe.errors import ConfigError
from taskframe.testing import NatsServer, eventually, running_worker
from tests.faultkit import TASKFRAME, Procs
from tests.flow_apps import Boom, Collect, Double, Gather, Plus, Probe, Square, build
from tests.journal import Journal


async def test_chain_runs_each_step_after_the_one_before_and_passes_its_result(
    client: Client, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal")
    flow = await client.enqueue(chain(Square(n=3), Double(), Plus(add=1)))
    async with running_worker(build(client.namespace, journal), client):
        assert await flow.result(timeout=15) == 19  # (3 * 3) * 2 + 1
        status = await flow.status()
    assert status.state is TaskState.SUCCEEDED
    assert [(s.task, s.state) for s in status.steps] == [
        ("Square", TaskState.SUCCEEDED),
        ("Double", TaskState.SUCCEEDED),
        ("Plus", TaskState.SUCCEEDED),
    ]
    lines = [(e.kind, e.task_id) for e in journal.entries()]
    ids = [s.id for s in status.steps]
    assert lines == [(kind, i) for i in ids for kind in ("start", "done")]  # one at a time


async def test_chord_callback_runs_once_after_every_member_with_their_results_in_order(
    client: Client, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal")
    members = group(*(Square(n=n, seconds=0.05 * (n % 3)) for n in range(12)))
    flow = await client.enqueue(chord(members, then=Collect()))
    async with running_worker(build(client.namespace, journal), client, concurrency=8):
        assert await flow.result(timeout=15) == [n * n for n in range(12)]
    callback = f"{flow.id}.12"
    [started] = journal.entries("start", callback)
    last_member = max(e.at for e in journal.entries("done") if e.task_id != callback)
    assert started.at >= last_member
    counter = await client.js.get_last_msg(
        topology.joins_stream(client.namespace), topology.join_subject(client.namespace, flow.id, 1)
    )
    assert json.loads(counter.data or b"")["val"] == "12"  # each member counted once


async def test_nested_group_of_chains_then_a_step_reading_the_group(client: Client) -> None:
    flow = await client.enqueue(
        chain(
            group(chain(Square(n=1), Double()), chain(Square(n=2), Double()), Square(n=5)),
            Gather(),
        )
    )
    single = await client.enqueue(group(Square(n=4)))
    async with running_worker(build(client.namespace), client, concurrency=4):
        assert await flow.result(timeout=15) == [2, 8, 25]
        assert await single.result(timeout=15) == [16]
        assert [s.task for s in (await flow.status()).steps] == [
            "Square", "Double", "Square", "Double", "Square", "Gather",
        ]  # fmt: skip


async def test_a_dead_member_fails_the_flow_and_the_callback_never_runs(
    client: Client, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal")
    flow = await client.enqueue(chord(group(Square(n=2), Boom(), Square(n=3)), then=Collect()))
    async with running_worker(build(client.namespace, journal), client) as worker:
        with pytest.raises(FlowFailedError) as failed:
            await flow.result(timeout=15)
        status = await flow.status()
        assert worker.stats.dead == 1
    error = failed.value
    assert (error.step_id, error.step_task) == (f"{flow.id}.1", "Boom")
    assert error.error_type == "RuntimeError"
    assert "boom" in str(error)
    assert f"{flow.id}.1" in str(error)
    assert [e.attempt for e in journal.entries("start", f"{flow.id}.1")] == [1, 2]
    assert not journal.entries(task_id=f"{flow.id}.3")
    assert status.state is TaskState.DEAD
    assert [s.state for s in status.steps] == [
        TaskState.SUCCEEDED, TaskState.DEAD, TaskState.SUCCEEDED, None,
    ]  # fmt: skip
    assert await client.status(f"{flow.id}.3") is None


async def test_cancel_stops_the_running_step_and_nothing_after_it_runs(
    client: Client, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal")
    flow = await client.enqueue(chain(Square(n=2, seconds=30), Double()))
    async with running_worker(build(client.namespace, journal), client):
        await eventually(lambda: journal.entries("start"), "the first step to start")
        assert await flow.cancel() is True
        with pytest.raises(TaskCancelledError):
            await flow.result(timeout=5)
        first = client.handle(Square, f"{flow.id}.0")
        with pytest.raises(TaskCancelledError):
            await first.result(timeout=10)
        assert await flow.cancel() is False
    assert not journal.entries("done")
    assert not journal.entries(task_id=f"{flow.id}.1")
    assert [s.state for s in (await flow.status()).steps] == [TaskState.CANCELLED] * 2


async def test_a_step_reads_what_came_before_it_or_gets_a_clear_error(client: Client) -> None:
    first = await client.enqueue(chain(Probe()))
    after_group = await client.enqueue(chain(group(Square(n=1), Square(n=2)), Probe()))
    after_square = await client.enqueue(chain(Square(n=7), Probe()))
    plain = await client.enqueue(Probe())
    async with running_worker(build(client.namespace), client):
        assert "nothing comes before step" in await first.result(timeout=15)
        assert "is a group: read it with ctx.members()" in await after_group.result(timeout=15)
        assert await after_square.result(timeout=15) == "read 49"
        assert "is not a step of a flow" in await plain.result(timeout=15)


async def test_a_key_names_one_flow_and_bad_flows_are_refused(client: Client) -> None:
    one = await client.enqueue(chain(Square(n=2), Double()), key="order-7")
    again = await client.enqueue(chain(Square(n=2), Double()), key="order-7")
    assert (again.id, again.duplicate, one.duplicate) == (one.id, True, False)
    async with running_worker(build(client.namespace), client):
        assert await again.result(timeout=15) == 8
    info = await client.js.stream_info(topology.queue_stream(client.namespace, "flows"))
    assert info.state.messages == 0
    with pytest.raises(ConfigError, match="at least one step"):
        group()
    with pytest.raises(ConfigError, match="takes a group"):
        chord(chain(Square(n=1)), then=Collect())  # type: ignore[arg-type]


async def test_taskframe_status_shows_a_flow_and_its_steps(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    flow = await client.enqueue(chord(group(Square(n=2), Boom()), then=Collect()))
    async with running_worker(build(client.namespace), client):
        with pytest.raises(FlowFailedError):
            await flow.result(timeout=15)
    scope = ("--namespace", client.namespace, "--url", nats_server.url)
    text, as_json = await asyncio.gather(
        procs.run(*TASKFRAME, "status", flow.id, *scope),
        procs.run(*TASKFRAME, "status", flow.id, *scope, "--json"),
    )
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[:2] == [f"FLOW     {flow.id}", "STATE    dead"]
    assert "Boom" in lines[2]
    assert "RuntimeError: boom" in lines[2]
    assert lines[3].split() == ["STEP", "ID", "TASK", "STATE", "ATTEMPT", "ERROR"]
    assert lines[4].split()[:5] == ["0", f"{flow.id}.0", "Square", "succeeded", "1"]
    assert lines[5].split()[:5] == ["1", f"{flow.id}.1", "Boom", "dead", "2"]
    assert lines[6].split() == ["2", f"{flow.id}.2", "Collect", "pending", "0", "-"]
    shown = json.loads(as_json.stdout)
    assert (shown["state"], [s["state"] for s in shown["steps"]]) == (
        "dead",
        ["succeeded", "dead", None],
    )


async def test_a_join_older_than_its_duplicate_window_goes_on_only_with_every_record(
    client: Client,
) -> None:
    """Past the join's duplicate window a redelivered member may be counted twice: the
    count reaching the group's size is then checked against the members' records."""
    flow = await client.enqueue(chord(group(Square(n=1), Square(n=2)), then=Collect()))
    plan = await read_plan(client, flow.id)
    assert plan is not None
    steps = FlowSteps(client)
    assert await steps._joined(flow.id, plan, 1, 2) is False  # one of two members
    assert await steps._joined(flow.id, plan, 1, 2) is False  # recounted: dropped
    subject = topology.join_subject(client.namespace, flow.id, 1)
    await client.js.publish(subject, b"", headers={"Nats-Incr": "1"})  # a recount, too late
    plan.created = time.time() - topology.JOIN_DUPLICATE_WINDOW
    assert await steps._joined(flow.id, plan, 1, 2) is False  # 2 of 2, but no records
    for leaf in (0, 1):
        record = status_record(f"{flow.id}.{leaf}", "Square", TaskState.SUCCEEDED, 1)
        await client.js.publish(
            topology.result_subject(client.namespace, f"{flow.id}.{leaf}"), record
        )
    assert await steps._joined(flow.id, plan, 1, 3) is True
    plan.created = time.time()
    assert await steps._joined(flow.id, plan, 1, 3) is True  # young: its count is believed


async def test_a_step_of_no_stored_flow_runs_as_a_plain_task_and_the_worker_goes_on(
    client: Client,
) -> None:
    await client.enqueue(Square(n=0))  # creates the queue's stream
    headers = {"Nats-Msg-Id": "no-such-flow.0", "Tf-Flow": "no-such-flow"}
    subject = f"{client.namespace}.tasks.flows.Square"
    await client.js.publish(subject, Square(n=4).model_dump_json().encode(), headers=headers)
    flow = await client.enqueue(chain(Square(n=3), Double()))
    async with running_worker(build(client.namespace), client):
        assert await client.handle(Square, "no-such-flow.0").result(timeout=15) == 16
        assert await flow.result(timeout=15) == 18
