"""Prometheus metrics (taskframe.metrics): `taskframe worker --metrics-port` serves exact
counts of what its attempts came to, and the server's queue counts; with `--processes 2`
one endpoint adds up both children. prometheus-client stays optional."""

import asyncio
import os
import re
import signal
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskframe import Client
from taskframe._server import NatsServer
from taskframe.testing import eventually
from tests.fault_apps import Fail, Work
from tests.faultkit import REPO, TASKFRAME, Procs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at /metrics, by name and labels."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scraped(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    try:
        return await scrape(port)
    except OSError:
        return None  # not serving yet


async def run_100_with_20_dead(client: Client, port: int) -> dict[str, float]:
    """Enqueue 80 tasks that succeed and 20 that fail all 3 attempts; once /metrics has
    them all, its samples of the `work` queue (labels other than the queue's dropped)."""
    await eventually(lambda: scraped(port), "/metrics to answer")
    await client.enqueue_many([Work(seconds=0.02) for _ in range(80)] + [Fail() for _ in range(20)])
    ns = client.namespace

    async def settled() -> dict[str, float]:
        samples = await scrape(port)
        mine = {
            name + "".join(f",{k}={v}" for k, v in labels if k not in ("namespace", "queue")): v
            for (name, labels), v in samples.items()
            if ("namespace", ns) in labels and ("queue", "work") in labels
        }
        done = mine.get("taskframe_tasks_total,outcome=dead,task=Fail") == 20
        return mine if done and mine.get("taskframe_queue_in_flight") == 0 else {}

    return await eventually(settled, "20 dead tasks counted", timeout=30)


def assert_counts(samples: dict[str, float]) -> None:
    assert samples["taskframe_tasks_total,outcome=succeeded,task=Work"] == 80
    assert samples["taskframe_tasks_total,outcome=retried,task=Fail"] == 40
    assert samples["taskframe_tasks_total,outcome=dead,task=Fail"] == 20
    assert "taskframe_tasks_total,outcome=dead,task=Work" not in samples
    # every attempt's duration; how long each task waited for its first attempt
    assert samples["taskframe_task_duration_seconds_count,task=Work"] == 80
    assert samples["taskframe_task_duration_seconds_count,task=Fail"] == 60
    assert samples["taskframe_task_duration_seconds_bucket,le=+Inf,task=Fail"] == 60
    assert samples["taskframe_task_queued_seconds_count,task=Work"] == 80
    assert samples["taskframe_task_queued_seconds_count,task=Fail"] == 20
    assert samples["taskframe_tasks_running"] == 0
    # the server's counts, read when scraped
    assert samples["taskframe_queue_dead"] == 20
    assert samples["taskframe_queue_waiting"] == 0
    assert samples["taskframe_queue_paused"] == 0


async def test_a_worker_serves_exact_counts(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    port = free_port()
    procs.worker(nats_server.url, concurrency=16, extra=("--metrics-port", str(port)))
    assert_counts(await run_100_with_20_dead(client, port))


async def test_a_pool_serves_one_endpoint_adding_up_its_processes(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    port = free_port()
    pool = procs.worker(
        nats_server.url, concurrency=4, extra=("--processes", "2", "--metrics-port", str(port))
    )
    await pool.wait_log("worker ready", count=2)
    samples = await run_100_with_20_dead(client, port)
    assert_counts(samples)
    pids = {
        dict(labels).get("pid")
        for (name, labels) in await scrape(port)
        if name == "taskframe_tasks_total"
    }
    assert pids == {None}  # summed over the children, not one series each
    starts = [line.split() for line in procs.journal.path.read_text().splitlines()]
    starts = [fields for fields in starts if fields[0] == "start"]
    assert len(starts) == 140  # every attempt counted once...
    assert len({fields[3] for fields in starts}) == 2  # ...and both children ran some
    pool.signal(signal.SIGTERM)
    assert await pool.wait_exit() == 0
    found = re.search(r"write their samples to (\S+)", pool.text())
    assert found is not None
    assert not await asyncio.to_thread(os.path.exists, found[1])  # removed with the pool


async def test_importing_taskframe_does_not_import_prometheus_client(procs: Procs) -> None:
    check = "import taskframe, sys; assert 'prometheus_client' not in sys.modules"
    result = await procs.run(*TASKFRAME[:1], "-c", check)
    assert result.returncode == 0, result.stderr


async def test_without_the_extra_metrics_port_is_a_clear_error(
    procs: Procs, tmp_path: Path
) -> None:
    missing = tmp_path / "shadow" / "prometheus_client"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError('No module named prometheus_client')")
    result = await procs.run(
        *TASKFRAME, "worker", "tests.fault_apps:app", "--metrics-port", str(free_port()),
        PYTHONPATH=f"{missing.parent}:{REPO}",
    )  # fmt: skip
    assert result.returncode == 2
    assert "pip install 'taskframe[metrics]'" in result.stderr


@pytest.mark.parametrize("extra", [(), ("--processes", "2")], ids=["worker", "pool"])
async def test_a_port_in_use_is_a_clear_error(
    nats_server: NatsServer, procs: Procs, extra: tuple[str, ...]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await procs.run(
            *TASKFRAME, "worker", "tests.fault_apps:app", "--url", nats_server.url,
            "--metrics-port", str(port), *extra,
        )  # fmt: skip
    assert result.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
