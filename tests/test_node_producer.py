"""A producer in JavaScript, written from docs/wire-format.md alone, against a real
`taskframe worker`: its tasks (with and without a key, on a lane) and its event run, a body
its schema refuses is dead-lettered under its key, its
bodies and the records it reads match the JSON Schema `taskframe schema` exported, and
results are read both ways by the key rule.

tests/node/producer.mjs uses the official NATS client for Node (`@nats-io/jetstream`);
./scripts/node installs Node and its packages (tests/node/package-lock.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from taskframe import Client
from taskframe.testing import NatsServer
from tests.contract_app import Greet
from tests.faultkit import TASKFRAME, Procs

NODE_DIR = Path(__file__).resolve().parent / "node"
APP = "tests.contract_app:app"


def node() -> str:
    found = shutil.which("node")
    assert found, "node is missing: run ./scripts/node"
    assert (NODE_DIR / "node_modules" / "@nats-io" / "jetstream").is_dir(), (
        "tests/node has no node_modules: run ./scripts/node"
    )
    return found


async def test_a_node_producer_enqueues_publishes_and_reads_results_by_the_documented_rules(
    client: Client, nats_server: NatsServer, procs: Procs, tmp_path: Path
) -> None:
    schemas = tmp_path / "schema"
    made = await procs.run(*TASKFRAME, "schema", APP, "--out", str(schemas))
    assert made.returncode == 0, made.stderr
    worker = procs.spawn(*TASKFRAME, "worker", APP, "--url", nats_server.url, ack_wait=None)
    await worker.wait_log("worker ready")  # it created the streams a foreign producer needs
    from_python = await client.enqueue(Greet(name="python"), key="py-1")

    ran = await procs.run(
        node(),
        str(NODE_DIR / "producer.mjs"),
        nats_server.url,
        client.namespace,
        str(schemas),
        from_python.id,
        timeout=45,
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    ids, records = out["ids"], out["records"]

    assert ids["keyed"] == "order-x"
    assert out["againId"] == "order-x"
    assert out["duplicate"] is True
    bad = records.pop("bad")
    assert (bad["state"], bad["error"]["reason"]) == ("dead", "invalid")
    assert {name: r["result"] for name, r in records.items()} == {
        "plain": "hello plain",
        "keyed": "hello keyed",
        "high": "hello high",
        "python": "hello python",  # Node read a task Python enqueued, by its key
        "event": "hello event",  # the subscriber's follow-up to Node's event, id greeted-1
    }
    assert {r["id"] for r in records.values()} | {bad["id"]} == set(ids.values())
    [letter] = await client.dead_letters()
    assert (letter.task_id, letter.headers["Tf-Id"], letter.reason) == ("bad-1", "bad-1", "invalid")

    # Python names Node's tasks by the same rules: the key, or <queue>-<stream sequence>.
    again = await client.enqueue(Greet(name="keyed"), key="order-x")
    assert (again.id, again.duplicate) == ("order-x", True)
    assert await again.result(timeout=10) == "hello keyed"
    plain = client.handle(Greet, ids["plain"])
    assert await plain.result(timeout=10) == "hello plain"
