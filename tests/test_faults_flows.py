"""Flows under faults: worker processes killed with SIGKILL again and again during a chord,
and the server killed and restarted in the middle of a chain. The workers run
`tests.flow_apps:app` in subprocesses (short ack_wait); their handlers write the journal,
and each scenario accounts for its steps with `tests.ledger.Ledger`."""

import asyncio
import json
import signal
import time
from collections import Counter

from taskframe import Client, TaskState, chain, chord, connect, group
from taskframe import _topology as topology
from taskframe.testing import NatsServer, eventually
from tests.faultkit import TASKFRAME, Proc, Procs
from tests.flow_apps import Collect, Double, Plus, Square
from tests.ledger import Ledger

FLOW_APP = "tests.flow_apps:app"
MEMBERS = 200
MAX_KILLS = 6


def flow_worker(procs: Procs, url: str, ack_wait: float = 1.0) -> Proc:
    return procs.spawn(
        *TASKFRAME, "worker", FLOW_APP, "--url", url, "--concurrency", "8", ack_wait=ack_wait
    )


async def test_chord_of_200_with_workers_killed_repeatedly_calls_back_once_after_all(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    workers = [flow_worker(procs, nats_server.url) for _ in range(3)]
    for worker in workers:
        await worker.wait_log("worker ready")
    ledger = Ledger(f"chord of {MEMBERS}, worker kill -9 repeatedly", procs.journal)
    members = group(*(Square(n=n, seconds=0.2) for n in range(MEMBERS)))
    flow = await client.enqueue(chord(members, then=Collect()))
    ledger.acknowledge(*(f"{flow.id}.{i}" for i in range(MEMBERS + 1)))
    callback = f"{flow.id}.{MEMBERS}"
    result = asyncio.create_task(flow.result(timeout=90))

    kills = 0
    while not result.done() and kills < MAX_KILLS:
        victim = next(w for w in workers if w.alive)

        def busy(pid: int = victim.pid) -> bool:
            return result.done() or bool(procs.journal.entries("start", pid=pid))

        await eventually(busy, "the victim to be running a step")
        victim.signal(signal.SIGKILL)
        ledger.died(victim.pid)
        assert await victim.wait_exit() == -signal.SIGKILL
        kills += 1
        workers.append(flow_worker(procs, nats_server.url))
        await workers[-1].wait_log("worker ready", timeout=30)  # the pace of the kills

    assert await result == [n * n for n in range(MEMBERS)]
    note = f"{kills} workers killed; members at-least-once, the callback once"
    await ledger.close_books(client, note=note)
    assert kills >= 3
    killed_runs = [e for e in procs.journal.entries("start") if e.pid in ledger.deaths]
    assert killed_runs, "no kill hit a running step"
    [called] = procs.journal.entries("done", callback)
    first_done: dict[str, float] = {}
    for entry in procs.journal.entries("done"):
        first_done.setdefault(entry.task_id, entry.at)
    assert len(first_done) == MEMBERS + 1
    assert min(e.at for e in procs.journal.entries("start", callback)) >= max(
        at for task_id, at in first_done.items() if task_id != callback
    )  # after the last member
    info = await client.js.stream_info(topology.queue_stream(client.namespace, "flows"))
    assert info.state.last_seq == MEMBERS + 1  # the callback was stored once
    counter = await client.js.get_last_msg(
        topology.joins_stream(client.namespace), topology.join_subject(client.namespace, flow.id, 1)
    )
    assert json.loads(counter.data or b"")["val"] == str(MEMBERS)  # each member counted once
    assert (await flow.status()).state is TaskState.SUCCEEDED
    assert called.attempt >= 1


async def test_server_kill_9_mid_chain_the_chain_completes_each_step_once(
    own_server: NatsServer, namespace: str, procs: Procs
) -> None:
    worker = flow_worker(procs, own_server.url, ack_wait=2.0)
    await worker.wait_log("worker ready")
    ledger = Ledger("server kill -9 in the middle of a chain", procs.journal)
    async with connect(own_server.url, namespace=namespace) as tf:
        flow = await tf.enqueue(chain(Square(n=3, seconds=0.3), Double(seconds=1.0), Plus(add=1)))
        steps = [f"{flow.id}.{i}" for i in range(3)]
        ledger.acknowledge(*steps)
        await eventually(lambda: procs.journal.entries("start", steps[1]), "the second step")
        await asyncio.to_thread(own_server.kill)
        await worker.wait_log("disconnected from NATS")
        await asyncio.to_thread(own_server.start)
        back = time.time()

        assert await flow.result(timeout=60) == 19
        recovered = ledger.first_done_after(back)
        await ledger.close_books(tf, recover_s=recovered, note="killed while the second step ran")
        done = Counter(e.task_id for e in procs.journal.entries("done"))
        assert done == Counter(steps)  # each step completed once
        starts = [e.task_id for e in procs.journal.entries("start")]
        assert list(dict.fromkeys(starts)) == steps  # in order, each after the one before
        # The step running through the outage may start again (its lease ran out while the
        # server was away); the ones before and after it ran once.
        assert (starts.count(steps[0]), starts.count(steps[2])) == (1, 1)
        status = await flow.status()
    assert [s.state for s in status.steps] == [TaskState.SUCCEEDED] * 3
    assert worker.alive
