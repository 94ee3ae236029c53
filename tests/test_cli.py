"""The `taskframe` command, run for real in subprocesses against a real server."""

import asyncio
import os
import re
import signal
import socket
import uuid
from collections import Counter
from pathlib import Path

import nats
import pytest

from taskframe import App, Client, Context, TaskState, connect, provision
from taskframe._topology import WORKERS, dead_stream, queue_stream, results_stream
from taskframe.testing import NatsServer, eventually, running_worker
from tests.fault_apps import Fail, Hog, Other, Work, build_app
from tests.faultkit import APP, CONSOLE_SCRIPT, TASKFRAME, Procs


def table(output: str) -> dict[tuple[str, str], dict[str, int]]:
    """The rows of `taskframe queues`, by (namespace, queue)."""
    lines = output.strip().splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = {}
    for line in lines[1:]:
        values = re.split(r"\s{2,}", line.strip())
        row = dict(zip(header, values, strict=True))
        counts = list(row.items())[2:-1]
        rows[row["NAMESPACE"], row["QUEUE"]] = {k: int(v) for k, v in counts}
        assert row["PAUSED"] == "no"
    return rows


COMMANDS = [
    "worker",
    "server",
    "enqueue",
    "provision",
    "queues",
    "dead",
    "schedules",
    "status",
    "pause",
    "resume",
    "purge",
    "cancel",
    "workers",
]


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ((), COMMANDS),
        (
            ("worker",),
            [
                *("--concurrency", "--processes", "--grace", "--queue", "--url"),
                *("--max-tasks-per-process", "--max-memory-mb", "--log-format"),
            ],
        ),
        (("worker",), ["TASKFRAME_URL", "nats://127.0.0.1:4222"]),  # where the URL comes from
        (("server",), ["--port", "--store", "--config", "./nats.conf"]),
        (("enqueue",), ["--key", "--wait", "--url", "payload"]),
        (("provision",), ["--url", "app"]),
        (("queues",), ["--namespace", "--url", "--json"]),
        (("dead",), ["--namespace", "--queue", "--limit", "--replay", "--task", "--id", "--json"]),
        (("schedules",), ["--namespace", "--url", "--json"]),
        (("cancel",), ["--namespace", "--url", "TASK_ID"]),
        (("workers",), ["--namespace", "--json", "--url", "TASKFRAME_NAMESPACE"]),
    ],
    ids=[
        "taskframe",
        "worker",
        "worker-url-source",
        "server",
        "enqueue",
        "provision",
        "queues",
        "dead",
        "schedules",
        "cancel",
        "workers",
    ],
)
async def test_help_of_each_command_exits_0_and_names_its_options(
    procs: Procs, command: tuple[str, ...], mentions: list[str]
) -> None:
    result = await procs.run(CONSOLE_SCRIPT, *command, "--help", COLUMNS="200")
    assert result.returncode == 0, result.stderr
    for word in mentions:
        assert word in result.stdout


async def test_enqueue_prints_the_id_and_with_wait_the_result(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    procs.worker(nats_server.url)
    result = await procs.run(
        CONSOLE_SCRIPT, "enqueue", APP, "Add", '{"a":1,"b":2}', "--url", nats_server.url,
        "--wait", "10",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    task_id, value = result.stdout.splitlines()
    assert str(uuid.UUID(task_id)) == task_id
    assert value == "3"
    status = await client.status(task_id)
    assert status is not None
    assert (status.state, status.result) == (TaskState.SUCCEEDED, 3)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("Add", "{not json"), 2, "invalid Add"),
        (("Add", '{"a": 1}'), 2, "Field required"),
        (("Nope", "{}"), 2, "has no task 'Nope'"),
        (("Add", '{"a": 1, "b": 2}'), 1, "cannot reach NATS"),
    ],
    ids=["bad-json", "missing-field", "unknown-task", "no-server"],
)
async def test_enqueue_refuses_bad_input_with_a_clear_error(
    procs: Procs, args: tuple[str, str], code: int, message: str
) -> None:
    nowhere = "nats://127.0.0.1:1"
    result = await procs.run(*TASKFRAME, "enqueue", APP, *args, "--url", nowhere, COLUMNS="200")
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


async def test_an_app_that_cannot_be_loaded_is_a_clear_error(procs: Procs) -> None:
    result = await procs.run(*TASKFRAME, "provision", "tests.no_such_module:app", COLUMNS="200")
    assert result.returncode == 2
    assert "cannot load tests.no_such_module:app" in result.stderr
    assert "Traceback" not in result.stderr


async def test_queues_shows_waiting_in_flight_and_dead_counts(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ns = client.namespace
    await client.enqueue_many(Work() for _ in range(3))  # queue "work" has no worker

    app = App(ns)
    holding = asyncio.Event()
    release = asyncio.Event()

    @app.handle(Other)
    async def hold(job: Other, ctx: Context) -> str:
        holding.set()
        await release.wait()
        return ctx.task_id

    async with running_worker(app, client, queues=["other"]):
        raw = await nats.connect(nats_server.url)
        try:
            await raw.publish(f"{ns}.tasks.other.Other", b"garbage")
            await raw.flush()
        finally:
            await raw.close()
        held = await client.enqueue(Other())
        await asyncio.wait_for(holding.wait(), 10)
        await eventually(client.dead_letters, "the garbage to be dead-lettered")
        result = await procs.run(*TASKFRAME, "queues", "--namespace", ns, "--url", nats_server.url)
        release.set()
        assert await held.result(timeout=10) == held.id

    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows == {
        (ns, "other"): {"WAITING": 0, "IN FLIGHT": 1, "REDELIVERED": 0, "DEAD": 1},
        (ns, "work"): {"WAITING": 3, "IN FLIGHT": 0, "REDELIVERED": 0, "DEAD": 0},
    }


async def test_queues_of_an_empty_namespace_says_so(nats_server: NatsServer, procs: Procs) -> None:
    result = await procs.run(
        *TASKFRAME, "queues", "--namespace", "nothing_here", "--url", nats_server.url
    )
    assert result.returncode == 0, result.stderr
    assert "no taskframe queues" in result.stdout


async def test_provision_creates_streams_and_consumers_and_can_run_again(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ns = client.namespace
    for _ in range(2):
        result = await procs.run(
            *TASKFRAME, "provision", APP, "--url", nats_server.url, ack_wait=1.0
        )
        assert result.returncode == 0, result.stderr
        assert f"provisioned namespace {ns}" in result.stdout
    for queue in ("other", "work"):
        stream = queue_stream(ns, queue)
        info = await client.js.stream_info(stream)
        assert info.config.retention == "workqueue"
        assert f"{ns}.tasks.{queue}.>" in (info.config.subjects or [])
        consumer = await client.js.consumer_info(stream, WORKERS)
        assert consumer.config.ack_wait == 1.0
    assert (await client.js.stream_info(dead_stream(ns))).config.retention == "limits"
    assert (await client.js.stream_info(results_stream(ns))).config.max_msgs_per_subject


async def test_dead_lists_dead_letters_and_replays_them(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ns = client.namespace
    run = await client.enqueue(Fail(note="once"))
    async with running_worker(build_app(ns, None), client, queues=["work"]) as worker:
        await eventually(lambda: worker.stats.dead == 1, "the task to be dead")
    command = (*TASKFRAME, "dead", "--namespace", ns, "--url", nats_server.url)
    listed = await procs.run(*command, COLUMNS="200")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["SEQ", "QUEUE", "TASK", "ID", "REASON", "ATTEMPTS", "ERROR"]
    assert row.split()[:6] == ["1", "work", "Fail", run.id, "failed", "3"]
    assert "RuntimeError: fails on purpose (attempt 3)" in row

    replayed = await procs.run(*command, "--replay")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1 task(s)" in replayed.stdout
    assert await client.dead_letters() == []
    assert (await run.status()).state is TaskState.QUEUED
    empty = await procs.run(*command)
    assert "(no dead letters)" in empty.stdout


async def test_schedules_lists_the_schedules_the_broker_holds(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ns = client.namespace
    app = build_app(ns, None)
    app.schedule("0 0 3 * * *", Work(), name="nightly", time_zone="Europe/Amsterdam")
    await provision(app, client, queues=["work"])
    result = await procs.run(*TASKFRAME, "schedules", "--namespace", ns, "--url", nats_server.url)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == [
        "NAMESPACE",
        "QUEUE",
        "NAME",
        "TASK",
        "SCHEDULE",
        "NEXT",
        "FIRE",
        "(UTC)",
    ]
    assert row.split()[:8] == [ns, "work", "nightly", "Work", "0", "0", "3", "*"]
    assert "(Europe/Amsterdam)" in row


async def test_server_command_serves_until_sigint_then_exits_0(
    tmp_path: Path, procs: Procs
) -> None:
    server = procs.spawn(
        CONSOLE_SCRIPT, "server", "--port", "-1", "--store", str(tmp_path / "store")
    )
    try:
        await server.wait_log(r"listening on nats://127\.0\.0\.1:\d+")
        match = re.search(r"listening on (nats://127\.0\.0\.1:(\d+))", server.text())
        assert match is not None
        url, port = match.group(1), int(match.group(2))
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            account = await nc.jetstream().account_info()
            assert account.limits is not None  # JetStream is on
        finally:
            await nc.close()
        server.signal(signal.SIGINT)
        assert await server.wait_exit() == 0
    finally:
        if server.alive:  # the CLI stops its nats-server itself; SIGKILL would orphan it
            server.signal(signal.SIGINT)
            await server.wait_exit()
    assert "nats-server stopped." in server.text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert (tmp_path / "store" / "jetstream").is_dir()


async def test_a_worker_started_before_its_server_waits_for_it(
    tmp_path: Path, namespace: str, procs: Procs
) -> None:
    with socket.socket() as probe:  # a free port, for a server that is not there yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = procs.worker(f"nats://127.0.0.1:{port}")
    await worker.wait_log("cannot reach NATS .* trying again")  # getting ready takes a retry
    assert worker.alive
    with NatsServer(port=port, store_dir=tmp_path / "late") as server:
        await worker.wait_log("worker ready", timeout=20)
        async with connect(server.url, namespace=namespace) as client:
            run = await client.enqueue(Work())
            assert await run.result(timeout=10) == run.id
        worker.signal(signal.SIGTERM)
        assert await worker.wait_exit() == 0


async def test_worker_processes_share_the_work_are_restarted_and_stop_on_sigterm(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    supervisor = procs.spawn(
        *TASKFRAME, "worker", APP, "--url", nats_server.url, "--processes", "2",
        "--concurrency", "2", "--grace", "5",
    )  # fmt: skip
    await supervisor.wait_log("worker ready", count=2)
    runs = await client.enqueue_many(Work(seconds=0.3) for _ in range(8))
    assert [await r.result(timeout=15) for r in runs] == [r.id for r in runs]
    children = procs.journal.pids()
    assert len(children) == 2
    assert supervisor.pid not in children

    victim = min(children)
    os.kill(victim, signal.SIGKILL)
    await supervisor.wait_log(rf"worker process {victim} exited with -9; restarting")
    await supervisor.wait_log("worker ready", count=3)
    more = await client.enqueue_many(Work(seconds=0.3) for _ in range(8))
    assert [await r.result(timeout=15) for r in more] == [r.id for r in more]
    survivors = {e.pid for e in procs.journal.entries("done") if e.task_id in {r.id for r in more}}
    assert victim not in survivors
    assert len(survivors) == 2

    supervisor.signal(signal.SIGTERM)
    assert await supervisor.wait_exit(timeout=15) == 0
    assert supervisor.text().count("worker stopped") == 2

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await eventually(lambda: all(gone(pid) for pid in survivors | children), "every child to exit")


async def test_cancel_exits_0_once_then_1_and_1_for_an_unknown_task(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    run = await client.enqueue(Work(seconds=1.0))
    command = (*TASKFRAME, "cancel", "--namespace", client.namespace, "--url", nats_server.url)
    first = await procs.run(*command, run.id)
    assert (first.returncode, first.stdout.strip()) == (0, f"cancelled {run.id}"), first.stderr
    assert (await run.status()).state is TaskState.CANCELLED
    again = await procs.run(*command, run.id)
    assert again.returncode == 1
    assert "already finished, or is not known" in again.stderr
    unknown = await procs.run(*command, str(uuid.uuid4()))
    assert unknown.returncode == 1


async def test_worker_processes_are_recycled_after_max_tasks_losing_and_repeating_none(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    supervisor = procs.spawn(
        *TASKFRAME, "worker", APP, "--url", nats_server.url, "--processes", "2",
        "--concurrency", "2", "--max-tasks-per-process", "20", "--grace", "5", ack_wait=None,
    )  # fmt: skip
    await supervisor.wait_log("worker ready", count=2)
    runs = await client.enqueue_many(Work() for _ in range(100))
    assert [await r.result(timeout=20) for r in runs] == [r.id for r in runs]
    for run in runs:
        assert (procs.journal.count("start", run.id), procs.journal.count("done", run.id)) == (1, 1)
    per_process = Counter(e.pid for e in procs.journal.entries("start"))
    assert max(per_process.values()) <= 20
    recycled = re.findall(
        r"worker process (\d+) recycled: it started 20 tasks \(--max-tasks-per-process 20\); "
        "starting a replacement",
        supervisor.text(),
    )
    assert len(recycled) >= 4
    assert all(per_process[int(pid)] == 20 for pid in recycled)
    supervisor.signal(signal.SIGTERM)
    assert await supervisor.wait_exit() == 0


async def test_a_worker_process_past_max_memory_is_recycled_and_loses_no_task(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    supervisor = procs.spawn(
        *TASKFRAME, "worker", APP, "--url", nats_server.url, "--concurrency", "2",
        "--max-memory-mb", "100", ack_wait=None,
    )  # fmt: skip
    await supervisor.wait_log("worker ready")
    hog = await client.enqueue(Hog(mib=96))
    runs = await client.enqueue_many(Work(seconds=0.05) for _ in range(20))
    await supervisor.wait_log(
        r"worker process \d+ recycled: its memory is \d+ MiB, above --max-memory-mb 100; "
        "starting a replacement"
    )
    [hogger] = {e.pid for e in procs.journal.entries("done", hog.id)}
    assert f"worker process {hogger} recycled" in supervisor.text()
    await supervisor.wait_log("worker ready", count=2)
    more = await client.enqueue_many(Work() for _ in range(5))
    everything = [hog, *runs, *more]
    assert [await r.result(timeout=10) for r in everything] == [r.id for r in everything]
    for run in everything:
        assert (procs.journal.count("start", run.id), procs.journal.count("done", run.id)) == (1, 1)
    assert hogger not in {e.pid for r in more for e in procs.journal.entries("done", r.id)}
    supervisor.signal(signal.SIGTERM)
    assert await supervisor.wait_exit() == 0
