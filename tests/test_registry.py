"""The worker registry (taskframe/_registry.py): `Client.workers()` and `taskframe workers`."""

import json
import os
import re
import signal
import socket
import time

from taskframe import Client, WorkerInfo, connect
from taskframe._stream_configs import workers_config
from taskframe._topology import worker_subject, workers_stream
from taskframe.provision import ensure_stream
from taskframe.testing import NatsServer, eventually, running_worker
from tests.fault_apps import Work, build_app
from tests.faultkit import APP, CONSOLE_SCRIPT, TASKFRAME, Procs

HEARTBEAT = 1.0


async def pids(client: Client) -> set[int]:
    return {w.pid for w in await client.workers()}


async def test_workers_lists_each_process_drops_a_killed_one_and_forgets_stopped_ones(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    supervisor = procs.spawn(
        *TASKFRAME, "worker", APP, "--url", nats_server.url, "--processes", "2",
        "--concurrency", "2", "--grace", "5", TASKFRAME_WORKER_HEARTBEAT=str(HEARTBEAT),
    )  # fmt: skip
    await supervisor.wait_log("worker ready", count=2)
    children = {int(p) for p in re.findall(r"\[(\d+)\] worker ready", supervisor.text())}
    assert len(children) == 2
    assert supervisor.pid not in children

    listed = await procs.run(
        CONSOLE_SCRIPT, "workers", "--namespace", client.namespace, "--url", nats_server.url,
        "--json",
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert {r["pid"] for r in records} == children
    for record in records:
        assert record["queues"] == ["once", "other", "poison", "work"]
        assert record["concurrency"] == 2
        assert record["heartbeat"] == HEARTBEAT
        assert WorkerInfo.model_validate(record).namespace == client.namespace

    victim = min(children)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()

    async def victim_gone() -> bool:
        return victim not in await pids(client)

    await eventually(victim_gone, "the killed worker to drop out", timeout=3 * HEARTBEAT)
    assert time.monotonic() - killed < 3 * HEARTBEAT + 0.2
    await supervisor.wait_log("worker ready", count=3)  # its replacement registers anew
    await eventually(lambda: _two_without(client, victim), "the replacement's record")

    supervisor.signal(signal.SIGTERM)
    assert await supervisor.wait_exit() == 0
    assert await client.workers() == []  # purged on exit, not left to expire


async def _two_without(client: Client, victim: int) -> bool:
    now = await pids(client)
    return len(now) == 2 and victim not in now


async def test_a_record_says_what_its_worker_serves_and_goes_at_once_when_it_stops(
    client: Client, nats_server: NatsServer, namespace: str, procs: Procs
) -> None:
    # A 2 s heartbeat keeps a record 5 s: gone at once after the stop means purged.
    async with connect(nats_server.url, namespace=namespace, worker_heartbeat=2.0) as tf:
        app = build_app(namespace, None)
        async with running_worker(app, tf, queues=["work"], concurrency=3) as worker:
            [info] = await client.workers()  # registered before it is ready
            assert (info.id, info.pid, info.host) == (worker.id, os.getpid(), socket.gethostname())
            assert (info.queues, info.groups, info.concurrency) == (("work",), (), 3)
            assert (info.heartbeat, info.stopping, info.succeeded) == (2.0, False, 0)
            assert info.started <= info.last_seen
            runs = await client.enqueue_many(Work() for _ in range(3))
            assert [await r.result(timeout=10) for r in runs] == [r.id for r in runs]

            async def counted() -> bool:
                [info] = await client.workers()
                return info.succeeded == 3

            await eventually(counted, "the next record to count the 3 tasks", timeout=5)
            table = await procs.run(
                CONSOLE_SCRIPT, "workers", "--namespace", namespace, "--url", nats_server.url
            )
            header, row = table.stdout.splitlines()
            assert header.split()[:4] == ["ID", "HOST", "PID", "QUEUES"]
            # ID HOST PID QUEUES CONCURRENCY RUNNING SUCCEEDED RETRIED ...
            assert row.split()[:8] == [
                worker.id,
                info.host,
                str(os.getpid()),
                "work",
                "3",
                "0",
                "3",
                "0",
            ]
        assert await client.workers() == []


async def test_a_deleted_registry_is_made_again_and_a_bad_record_is_left_out(
    client: Client, nats_server: NatsServer, namespace: str
) -> None:
    async with connect(nats_server.url, namespace=namespace, worker_heartbeat=HEARTBEAT) as tf:
        await ensure_stream(client.js, workers_config(client.settings))
        junk = worker_subject(namespace, "junk")
        await client.js.publish(junk, b"{not json", headers={"Nats-TTL": "30s"})
        await client.js.publish(worker_subject(namespace, "odd"), b'{"id": "x"}')
        assert await client.workers() == []
        async with running_worker(build_app(namespace, None), tf, queues=["work"]) as worker:
            assert [w.id for w in await client.workers()] == [worker.id]
            await client.js.delete_stream(workers_stream(namespace))
            assert await client.workers() == []

            async def back() -> list[str]:
                return [w.id for w in await client.workers()]

            assert await eventually(back, "the record back", timeout=3 * HEARTBEAT) == [worker.id]
