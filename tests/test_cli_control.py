"""The operator's `taskframe` commands (pause, resume, purge, status, dead filters, --json),
run for real in subprocesses against a real server."""

import asyncio
import json

from taskframe import Client, connect, provision
from taskframe.testing import NatsServer, eventually, running_worker
from tests.fault_apps import Add, Fail, Work, build_app
from tests.faultkit import TASKFRAME, Procs


async def _paused(client: Client) -> bool:
    return [q.paused for q in await client.queues() if q.queue == "work"] == [True]


async def test_a_paused_queue_starts_nothing_in_worker_processes_across_a_server_restart(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    url = own_server.url
    scope = ("--namespace", namespace, "--url", url)
    async with connect(url, namespace=namespace) as client:
        await provision(build_app(namespace, None), client, queues=["work"])
        paused = await procs.run(*TASKFRAME, "pause", "work", *scope)
        assert paused.returncode == 0, paused.stderr
        assert f"paused queue work of namespace {namespace}" in paused.stdout
        workers = [procs.worker(url), procs.worker(url)]  # each provisions the queue again
        for worker in workers:
            await worker.wait_log("worker ready")
        runs = await client.enqueue_many(Work() for _ in range(6))
        await asyncio.sleep(1.0)  # pulling from a paused queue: nothing may start

        own_server.stop()
        own_server.start()
        for worker in workers:
            await worker.wait_log("reconnected to NATS")
        await eventually(lambda: _paused(client), "the queue to read paused after the restart")
        await asyncio.sleep(1.0)
        assert procs.journal.entries("start") == []
        listed = await procs.run(*TASKFRAME, "queues", *scope, "--json")
        [row] = [q for q in json.loads(listed.stdout) if q["queue"] == "work"]
        assert (row["queue"], row["waiting"], row["in_flight"], row["paused"]) == (
            "work",
            6,
            0,
            True,
        )

        resumed = await procs.run(*TASKFRAME, "resume", "work", *scope)
        assert resumed.returncode == 0, resumed.stderr
        assert [await r.result(timeout=10) for r in runs] == [r.id for r in runs]
        assert not await _paused(client)


async def test_purge_refuses_without_yes_then_removes_the_waiting_tasks(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    await client.enqueue_many(Work() for _ in range(3))
    command = (*TASKFRAME, "purge", "work", "--namespace", client.namespace)
    refused = await procs.run(*command, "--url", nats_server.url)
    assert refused.returncode == 2
    assert "add --yes" in refused.stderr
    assert [q.waiting for q in await client.queues()] == [3]

    purged = await procs.run(*command, "--url", nats_server.url, "--yes")
    assert purged.returncode == 0, purged.stderr
    assert f"purged 3 task(s) from queue work of namespace {client.namespace}" in purged.stdout
    assert [q.waiting for q in await client.queues()] == [0]


async def test_dead_filters_select_what_is_listed_and_replayed(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ns = client.namespace
    first, second = [await client.enqueue(Fail(note=note)) for note in ("a", "b")]
    async with running_worker(build_app(ns, None), client, queues=["work"]) as worker:
        await eventually(lambda: worker.stats.dead == 2, "both tasks to be dead")
    listing = (*TASKFRAME, "dead", "--namespace", ns, "--url", nats_server.url, "--json")
    by_id, by_task, by_reason = await asyncio.gather(
        procs.run(*listing, "--id", first.id),
        procs.run(*listing, "--task", "Work"),
        procs.run(*listing, "--reason", "rejected"),
    )
    [letter] = json.loads(by_id.stdout)
    assert (letter["task_id"], letter["reason"], letter["attempts"]) == (first.id, "failed", 3)
    assert json.loads(letter["body"]) == {"note": "a"}
    assert json.loads(by_task.stdout) == json.loads(by_reason.stdout) == []

    replay = (*listing[:-1], "--replay", "--task", "Fail", "--reason", "failed", "--id", first.id)
    replayed = await procs.run(*replay)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 task(s)" in replayed.stdout
    assert [d.task_id for d in await client.dead_letters()] == [second.id]


async def test_status_and_every_listing_print_json(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ns = client.namespace
    app = build_app(ns, None)
    app.schedule("0 0 3 * * *", Work(), name="nightly")
    run = await client.enqueue(Add(a=1, b=2))
    async with running_worker(app, client, queues=["work"]):
        assert await run.result(timeout=10) == 3
    scope = ("--namespace", ns, "--url", nats_server.url)
    status_json, status_text, missing, queues, schedules = await asyncio.gather(
        procs.run(*TASKFRAME, "status", run.id, *scope, "--json"),
        procs.run(*TASKFRAME, "status", run.id, *scope),
        procs.run(*TASKFRAME, "status", "no-such-task", *scope),
        procs.run(*TASKFRAME, "queues", *scope, "--json"),
        procs.run(*TASKFRAME, "schedules", *scope, "--json"),
    )
    status = json.loads(status_json.stdout)
    assert (status["id"], status["state"], status["attempt"], status["result"]) == (
        run.id,
        "succeeded",
        1,
        3,
    )
    assert status["updated_at"]
    lines = status_text.stdout.splitlines()
    shown = lines[2:4] + lines[5:]
    assert shown == ["STATE    succeeded", "ATTEMPT  1", "ERROR    -", "RESULT   3"]
    assert missing.returncode == 1
    assert "no status record for task no-such-task" in missing.stderr
    assert "Traceback" not in missing.stderr
    [queue] = json.loads(queues.stdout)
    assert queue == {
        "namespace": ns,
        "queue": "work",
        "waiting": 0,
        "in_flight": 0,
        "redelivered": 0,
        "dead": 0,
        "paused": False,
        "lanes": ["workers"],
    }
    [schedule] = json.loads(schedules.stdout)
    assert (schedule["name"], schedule["task"], schedule["expression"]) == (
        "nightly",
        "Work",
        "0 0 3 * * *",
    )
    assert schedule["next_fire"].endswith("03:00:00+00:00")
