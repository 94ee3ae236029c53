"""A 3-node nats-server cluster with R3 streams: leaders killed, quorum lost, a node frozen.

Every node is a real process on loopback ports (taskframe._cluster.NatsCluster). Workers
run as `taskframe worker tests.fault_apps:app` subprocesses given all three URLs and
TASKFRAME_REPLICAS=3; the producer runs in the test. Each fault scenario prints one line
`FAULT-FIGURES {json}` (acknowledged, executed, lost, duplicated, dead, time to recover)
for the summary; run with `-s` to see them.
"""

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from taskframe import Client, ConnectError, PublishError, ResultTimeoutError, connect, provision
from taskframe import _topology as topology
from taskframe._cluster import NatsCluster, fixed_specs, node_config
from taskframe.provision import ensure_queue
from taskframe.testing import eventually
from tests.fault_apps import Work, build_app
from tests.faultkit import APP, CONSOLE_SCRIPT, TASKFRAME, Proc, Procs
from tests.ledger import RECORDED, Figures
from tests.test_batched_records import Echo, drain, echo_app

REPO = Path(__file__).resolve().parent.parent
ACK_WAIT = 2.0
# Clients here ping every 2 s (Settings.ping_interval; 10 s by default) and give up after 3
# unanswered pings, so a client on a frozen server fails over within about 8 s.
CLIENT_PING_INTERVAL = 2.0
CLIENT_MAX_PINGS = 3
RESULTS_WITHIN = 40.0  # seconds after a fault for every acknowledged task's result


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(3, root=tmp_path / "cluster") as running:
        try:
            yield running
        finally:
            for spec, node in zip(running.specs, running.nodes, strict=True):
                node.signal(signal.SIGCONT)  # a frozen node ignores SIGTERM until thawed
                (tmp_path / f"{spec.name}.log").write_text("\n".join(node.log))


def cluster_worker(procs: Procs, cluster: NatsCluster, concurrency: int = 8) -> Proc:
    """A worker subprocess given every node's URL, provisioning R3 streams."""
    return procs.spawn(
        *TASKFRAME, "worker", APP, "--url", cluster.urls, "--concurrency", str(concurrency),
        "--grace", "5", ack_wait=ACK_WAIT, TASKFRAME_REPLICAS="3",
        TASKFRAME_PING_INTERVAL=str(CLIENT_PING_INTERVAL),
    )  # fmt: skip


async def start_workers(
    procs: Procs, cluster: NatsCluster, count: int, concurrency: int = 8
) -> list[Proc]:
    """Start `count` workers one after the other, each once the previous one is ready.

    One at a time, so that a scenario starts from ready workers without the retries of
    workers creating the same new R3 streams at once (test_workers_starting_together_...
    covers those).
    """
    workers = []
    for _ in range(count):
        workers.append(cluster_worker(procs, cluster, concurrency))
        await workers[-1].wait_log("worker ready", timeout=20)
    return workers


@dataclass
class Producer:
    """Enqueues `Work` tasks one at a time, noting which the server confirmed and when."""

    tf: Client
    acked: dict[str, float] = field(default_factory=dict)  # id -> wall time confirmed
    failed: list[str] = field(default_factory=list)  # the PublishError messages
    slowest: float = 0.0

    async def enqueue(self, seconds: float = 0.02) -> str | None:
        started = time.monotonic()
        try:
            run = await self.tf.enqueue(Work(seconds=seconds))
        except PublishError as exc:
            self.failed.append(str(exc))
            return None
        finally:
            self.slowest = max(self.slowest, time.monotonic() - started)
        self.acked[run.id] = time.time()
        return run.id

    async def run(self, count: int, pause: float) -> None:
        for _ in range(count):
            await self.enqueue()
            await asyncio.sleep(pause)


async def outcome(tf: Client, procs: Procs, acked: dict[str, float]) -> dict[str, Any]:
    """Wait for every acknowledged task's result; count executions, losses, duplicates.

    Waits for results, not for handlers to have run: a task that ran while its result could
    not be stored (no quorum) is not acked, so it runs again once the cluster is back, up
    to a feed's silence limit (15 s) plus ack_wait later.
    """
    results = await asyncio.gather(
        *(tf.handle(Work, task_id).result(timeout=RESULTS_WITHIN) for task_id in acked),
        return_exceptions=True,
    )
    done = Counter(e.task_id for e in procs.journal.entries("done"))
    dead_info = await tf.js.stream_info(topology.dead_stream(tf.namespace))
    letters = await tf.dead_letters(limit=1000)
    return {
        "acknowledged": len(acked),
        "executed": sum(done.values()),
        "lost": sum(1 for task_id in acked if task_id not in done),
        "no_result": sum(1 for r, task_id in zip(results, acked, strict=True) if r != task_id),
        "duplicated": sum(n - 1 for n in done.values() if n > 1),
        "unconfirmed_executed": sum(1 for task_id in done if task_id not in acked),
        "dead": dead_info.state.messages,
        "dead_reasons": dict(Counter(letter.reason for letter in letters)),
    }


_TITLES = {
    "leader-kill": (
        "3-node cluster: stream leader kill -9 under load",
        "first_task_after_kill_done_s",
    ),
    "quorum-loss": (
        "3-node cluster: 2 of 3 nodes killed, then back",
        "first_enqueue_after_restart_s",
    ),
    "sigstop": ("3-node cluster: a node SIGSTOPped past the ping timeout", "healthy_after_thaw_s"),
}


def report(scenario: str, figures: dict[str, Any]) -> None:
    """Print the scenario's figures and add them to the session's fault table."""
    print(f"\nFAULT-FIGURES {json.dumps({'scenario': scenario, **figures})}")  # noqa: T201
    title, recover = _TITLES[scenario]
    detail = {k: v for k, v in figures.items() if k.endswith("_s") or k == "leader"}
    RECORDED.append(
        Figures(
            scenario=title,
            acknowledged=figures["acknowledged"],
            executed=figures["acknowledged"] - figures["lost"],
            lost=figures["lost"],
            duplicated=figures["duplicated"],
            dead=figures["dead"],
            unknown=figures.get("failed_enqueues", 0),
            recover_s=figures.get(recover),
            note=", ".join(f"{k} {v}" for k, v in detail.items() if k != recover),
            test=os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
        )
    )


def warnings(procs: Procs, most: int = 60) -> str:
    """The workers' last warnings and errors, distinct, to explain a failed scenario."""
    lines = [
        re.sub(r"^\S+ \S+ ", "", line)  # without the time
        for proc in procs.procs
        for line in proc.text().splitlines()
        if " WARNING " in line or " ERROR " in line
    ]
    return "\n".join(list(dict.fromkeys(lines))[-most:])


def connections(cluster: NatsCluster, name: str) -> dict[str, int]:
    """How many client connections called `name` each running node has (from /connz)."""
    counts = {}
    for spec, node in zip(cluster.specs, cluster.nodes, strict=True):
        if not node.running:
            continue
        url = f"http://127.0.0.1:{spec.http_port}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=2) as reply:
            conns = json.loads(reply.read()).get("connections") or []
        counts[spec.name] = sum(1 for c in conns if c.get("name") == name)
    return counts


def test_committed_cluster_configs_are_what_the_cluster_generates() -> None:
    specs = fixed_specs(3)
    for spec in specs:
        committed = (REPO / "deploy" / "cluster" / f"{spec.name}.conf").read_text()
        assert committed == node_config(spec, specs)


async def test_server_cluster_command_starts_3_nodes_and_stops_them_on_sigint(
    tmp_path: Path, procs: Procs
) -> None:
    command = ("server", "--cluster", "3", "--port", "-1", "--store", str(tmp_path / "s" / "x"))
    server = procs.spawn(CONSOLE_SCRIPT, *command)
    try:
        await server.wait_log("clients use --url", timeout=30)
        match = re.search(r"clients use --url (\S+)", server.text())
        assert match is not None
        urls = match.group(1).split(",")
        assert len(urls) == 3
        async with connect(urls, namespace="clitest", replicas=3) as tf:
            run = await tf.enqueue(Work())
            info = await tf.js.stream_info(topology.queue_stream("clitest", "work"))
            assert info.config.num_replicas == 3
            assert run.id
        server.signal(signal.SIGINT)
        assert await server.wait_exit(timeout=20) == 0
    finally:
        if server.alive:  # the CLI stops its nodes itself; SIGKILL would orphan them
            server.signal(signal.SIGINT)
            await server.wait_exit(timeout=20)
    assert "cluster stopped." in server.text()
    assert sorted(p.name for p in (tmp_path / "s" / "cluster").glob("n?")) == ["n1", "n2", "n3"]


async def test_provisioning_with_replicas_3_creates_r3_streams_consumers_and_buckets(
    cluster: NatsCluster, namespace: str, procs: Procs
) -> None:
    result = await procs.run(
        *TASKFRAME, "provision", APP, "--url", cluster.urls, TASKFRAME_REPLICAS="3"
    )
    assert result.returncode == 0, result.stderr
    async with connect(cluster.urls, namespace=namespace, replicas=3) as tf:
        names = [
            topology.queue_stream(namespace, "work"),
            topology.queue_stream(namespace, "other"),
            topology.dead_stream(namespace),
            f"KV_{topology.results_bucket(namespace)}",
        ]
        for name in names:
            info = await tf.js.stream_info(name)
            assert info.config.num_replicas == 3, name
            assert info.cluster is not None
            assert info.cluster.leader in cluster.names
            peers = {p.name for p in info.cluster.replicas or []}
            assert peers | {info.cluster.leader} == set(cluster.names), name
        consumer = await tf.js.consumer_info(names[0], topology.WORKERS)
        assert consumer.cluster is not None
        assert len(consumer.cluster.replicas or []) == 2  # R3 like its stream
        run = await tf.enqueue(Work())
        assert (await tf.js.stream_info(names[0])).state.messages == 1
        assert not run.duplicate


async def test_r3_is_a_setting_not_a_code_path(cluster: NatsCluster, namespace: str) -> None:
    async with connect(cluster.urls, namespace=namespace, replicas=3) as tf:
        await provision(build_app(namespace, None), tf)
        info = await tf.js.stream_info(topology.queue_stream(namespace, "work"))
        assert info.config.num_replicas == 3
    async with connect(cluster.urls, namespace=namespace + "x") as tf:
        await provision(build_app(namespace + "x", None), tf)
        info = await tf.js.stream_info(topology.queue_stream(namespace + "x", "work"))
        assert info.config.num_replicas == 1


async def test_a_workers_records_go_in_batches_on_an_r3_results_stream(
    cluster: NatsCluster, namespace: str
) -> None:
    async with connect(cluster.urls, namespace=namespace, replicas=3) as tf:
        app = echo_app(namespace)
        texts = [f"t{i}" for i in range(1500)]
        ids, acks, replies = await drain(tf, cluster.urls, app, texts, replicas=3)
        assert sorted(s.stream_seq for s in acks.seen()) == list(range(1, 1501))
        assert {s.delivered for s in acks.seen()} == {1}
        assert replies.frames > 0
        assert replies.single + replies.frames < 1500 / 4
        assert await tf.handle(Echo, ids[-1]).result(timeout=5) == "t1499"
        info = await tf.js.stream_info(topology.results_stream(namespace))
        assert (info.config.num_replicas, info.state.messages) == (3, 1500)


async def test_workers_starting_together_on_a_new_namespace_all_become_ready(
    cluster: NatsCluster, procs: Procs
) -> None:
    workers = [cluster_worker(procs, cluster, 2) for _ in range(3)]
    for worker in workers:
        await worker.wait_log("worker ready", timeout=20)
    assert all(worker.alive for worker in workers)


@pytest.mark.timeout(120)  # a fault, recovery, then up to RESULTS_WITHIN
async def test_killing_the_stream_leader_under_load_loses_no_acknowledged_task(
    cluster: NatsCluster, namespace: str, procs: Procs
) -> None:
    workers = await start_workers(procs, cluster, 2)
    stream = topology.queue_stream(namespace, "work")
    async with connect(cluster.urls, namespace=namespace, replicas=3) as tf:
        producer = Producer(tf)
        producing = asyncio.create_task(producer.run(300, 0.01))
        await eventually(lambda: len(producer.acked) >= 100, "100 tasks enqueued")
        leader = await cluster.stream_leader(stream)
        await asyncio.to_thread(cluster.kill, leader)
        killed, killed_wall = time.monotonic(), time.time()
        new_leader = await cluster.stream_leader(stream)
        elected = time.monotonic() - killed
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.start_node, leader)
        await asyncio.to_thread(cluster.wait_healthy)
        healthy = time.monotonic() - killed
        await asyncio.wait_for(producing, 40)
        figures = await outcome(tf, procs, producer.acked)

    after = [at for at in producer.acked.values() if at > killed_wall]
    done_at = {e.task_id: e.at for e in procs.journal.entries("done")}
    first_done = min(
        (done_at[i] for i, at in producer.acked.items() if at > killed_wall and i in done_at),
        default=float("nan"),
    )
    report(
        "leader-kill",
        {
            **figures,
            "failed_enqueues": len(producer.failed),
            "slowest_enqueue_s": round(producer.slowest, 2),
            "new_leader_s": round(elected, 2),
            "killed_node_healthy_s": round(healthy, 2),
            "first_task_after_kill_done_s": round(first_done - killed_wall, 2),
            "leader": f"{leader}->{new_leader}",
        },
    )
    assert new_leader != leader
    assert after, "no enqueue was confirmed after the kill"
    assert figures["lost"] == 0
    assert figures["no_result"] == 0
    assert figures["dead"] == 0
    assert all(worker.alive for worker in workers)


@pytest.mark.timeout(120)  # a fault, recovery, then up to RESULTS_WITHIN
async def test_quorum_loss_fails_enqueues_clearly_and_recovers_every_acknowledged_task(
    cluster: NatsCluster, namespace: str, procs: Procs
) -> None:
    workers = await start_workers(procs, cluster, 2, concurrency=4)
    stream = topology.queue_stream(namespace, "work")
    # Short publish timeouts keep the outage's failed enqueues quick; they are settings.
    async with connect(
        cluster.urls, namespace=namespace, replicas=3, publish_timeout=1.0, publish_attempts=2
    ) as tf:
        producer = Producer(tf)
        for _ in range(60):
            await producer.enqueue(seconds=0.1)
        await eventually(lambda: len(procs.journal.entries("done")) >= 10, "10 tasks done")
        leader = await cluster.stream_leader(stream)
        victims = [leader, next(n for n in cluster.names if n != leader)]
        for victim in victims:
            await asyncio.to_thread(cluster.kill, victim)
        lost_quorum = time.monotonic()

        bound = 2 * (tf.settings.publish_timeout + 2.0) + 10.0  # + reconnecting to the survivor
        outage: list[float] = []
        for _ in range(3):
            started = time.monotonic()
            async with asyncio.timeout(bound):
                assert await producer.enqueue() is None, "an enqueue was confirmed without quorum"
            outage.append(round(time.monotonic() - started, 2))
        assert len(producer.failed) == 3
        assert all(f"{namespace}.tasks.work" in m for m in producer.failed), producer.failed
        # Creating a stream needs the quorum: the server answers 503 "JetStream system
        # temporarily unavailable", which must end in a ConnectError, not a raw nats-py error
        # (an enqueue that finds no stream provisions its queue: CI once saw it leak).
        started = time.monotonic()
        with pytest.raises(ConnectError, match="JetStream did not answer about stream"):
            await ensure_queue(tf.js, tf.settings, "new")
        provision_s = round(time.monotonic() - started, 2)
        # Reading a status without the quorum can fail the same way (a bucket the client has
        # not opened yet: 503); a waiter keeps waiting through it and ends at its own timeout.
        async with connect(cluster.urls, namespace=f"{namespace}x") as other:
            with pytest.raises(ResultTimeoutError):
                await other.handle(Work, "never-enqueued").result(timeout=2.0)

        # A worker started during the outage waits for JetStream instead of exiting.
        late = cluster_worker(procs, cluster, concurrency=4)
        await late.wait_log("cannot provision yet", timeout=40)

        for victim in victims:
            await asyncio.to_thread(cluster.start_node, victim)
        restarted = time.monotonic()
        await asyncio.to_thread(cluster.wait_healthy)
        healthy = time.monotonic() - restarted
        await late.wait_log("worker ready", timeout=30)
        await eventually(
            producer.enqueue, "an enqueue confirmed after the restart", timeout=30, interval=0.1
        )
        first_enqueue = time.monotonic() - restarted
        for _ in range(40):
            await producer.enqueue()
        figures = await outcome(tf, procs, producer.acked)

    report(
        "quorum-loss",
        {
            **figures,
            "failed_enqueues": len(producer.failed),
            "failed_enqueue_s": outage,
            "failed_provision_s": provision_s,
            "errors": sorted({m.replace(namespace, "<ns>") for m in producer.failed})[:4],
            "down_s": round(restarted - lost_quorum, 2),
            "healthy_after_restart_s": round(healthy, 2),
            "first_enqueue_after_restart_s": round(first_enqueue, 2),
        },
    )
    assert (figures["lost"], figures["no_result"], figures["dead"]) == (0, 0, 0), warnings(procs)
    assert all(worker.alive for worker in [*workers, late])


@pytest.mark.timeout(120)
async def test_a_frozen_server_past_the_ping_timeout_loses_no_acknowledged_task(
    cluster: NatsCluster, namespace: str, procs: Procs
) -> None:
    workers = await start_workers(procs, cluster, 2)
    stream = topology.queue_stream(namespace, "work")
    async with connect(
        cluster.urls, namespace=namespace, replicas=3, ping_interval=CLIENT_PING_INTERVAL
    ) as tf:
        assert tf.nc.connected_url is not None
        ports = [node.port for node in cluster.nodes]
        producer_node = cluster.names[ports.index(tf.nc.connected_url.port or 0)]
        leader = await cluster.stream_leader(stream)
        per_node = connections(cluster, f"taskframe:{namespace}")
        per_node[producer_node] -= 1
        # Freeze a node a worker is on, the stream leader if one is, the producer's last.
        target = max(
            (n for n in cluster.names if per_node[n] > 0),
            key=lambda n: (n == leader, n != producer_node),
        )
        producer = Producer(tf)
        producing = asyncio.create_task(producer.run(400, 0.05))
        await eventually(lambda: len(producer.acked) >= 40, "40 tasks enqueued")
        # Past the clients' ping timeout, with room for the others to elect a new stream
        # leader on a busy machine (with 2 s to spare, no leader came in 10 s under load).
        freeze = (CLIENT_MAX_PINGS + 1) * CLIENT_PING_INTERVAL + 6.0
        cluster.signal(target, signal.SIGSTOP)
        frozen_wall = time.time()
        try:
            await asyncio.sleep(freeze)
        finally:
            cluster.signal(target, signal.SIGCONT)
        thawed = time.monotonic()
        await asyncio.to_thread(cluster.wait_healthy)
        healthy = time.monotonic() - thawed
        await asyncio.wait_for(producing, 40)
        figures = await outcome(tf, procs, producer.acked)

    done = procs.journal.entries("done")
    during = [e for e in done if frozen_wall < e.at < frozen_wall + freeze]
    report(
        "sigstop",
        {
            **figures,
            "failed_enqueues": len(producer.failed),
            "slowest_enqueue_s": round(producer.slowest, 2),
            "frozen_s": freeze,
            "frozen_node": target,
            "was_leader": target == leader,
            "workers_on_frozen_node": per_node[target],
            "producer_on_frozen_node": target == producer_node,
            "done_while_frozen": len(during),
            "healthy_after_thaw_s": round(healthy, 2),
        },
    )
    assert during, "no task was done while the node was frozen"
    assert figures["lost"] == 0
    assert figures["no_result"] == 0
    assert figures["dead"] == 0
    assert all(worker.alive for worker in workers)
