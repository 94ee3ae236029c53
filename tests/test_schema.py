"""`taskframe.schema`: JSON Schema of every body and an AsyncAPI 3.0 document of a
namespace; and status records, as workers really write them, against the documented shape.

The AsyncAPI document is also validated against the published AsyncAPI 3.0 JSON Schema by
tests/node/producer.mjs (tests/test_node_producer.py), with `@asyncapi/specs`.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from nats.js.errors import NotFoundError
from pydantic import BaseModel
from typer.testing import CliRunner

import taskframe.cli  # noqa: F401  (registers every command on `cli`)
from taskframe import (
    App,
    Backoff,
    Client,
    Context,
    Event,
    Task,
    asyncapi_document,
    json_schemas,
)
from taskframe import _inbound as inbound
from taskframe import _topology as topology
from taskframe._cli_common import cli
from taskframe.testing import eventually, running_worker


class Size(BaseModel):
    w: int
    h: int


class Resize(Task[Size], queue="images"):
    url: str
    size: Size


class Resized(Event, name="image.resized"):
    url: str


def shop() -> App:
    app = App("shop")
    app.queue("images", priorities=["high", "default"])

    @app.handle(Resize)
    async def resize(task: Resize, ctx: Context) -> Size:
        return task.size

    @app.subscribe(Resized, group="index")
    async def index(event: Resized, ctx: Context) -> None:
        pass

    return app


def test_json_schemas_cover_every_task_result_and_event_and_the_status_record() -> None:
    schemas = json_schemas(shop())
    assert set(schemas) == {
        "tasks/images/Resize.json",
        "results/images/Resize.json",
        "events/image.resized.json",
        "status.json",
    }
    task = schemas["tasks/images/Resize.json"]
    assert task["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert task["required"] == ["url", "size"]
    assert task["properties"]["size"] == {"$ref": "#/$defs/Size"}
    assert set(task["$defs"]["Size"]["required"]) == {"w", "h"}
    assert schemas["results/images/Resize.json"]["required"] == ["w", "h"]
    status = schemas["status.json"]
    assert status["required"] == ["id", "task", "state", "attempt", "updated_at", "error"]
    assert "result" in status["properties"]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert part in node, f"{ref} does not resolve ({part!r} missing)"
        node = node[part]
    return node


def test_the_asyncapi_document_names_every_subject_and_every_reference_resolves() -> None:
    doc = asyncapi_document(shop(), version="2.1.0")
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["version"] == "2.1.0"
    addresses = {channel["address"] for channel in doc["channels"].values()}
    assert addresses == {
        "shop.tasks.images.Resize",
        "shop.tasks.images.Resize.high",
        "shop.events.image.resized",
        "$KV.TF_shop_results.{taskId}",
    }
    for ref in refs(doc):
        resolve(doc, ref)
    for name, operation in doc["operations"].items():
        channel = resolve(doc, operation["channel"]["$ref"])
        for message in operation["messages"]:
            assert message["$ref"].startswith(operation["channel"]["$ref"] + "/messages/"), name
        assert operation["action"] in ("send", "receive")
        assert channel["messages"]
    key = re.compile(r"^[\w\d\.\-_]+$")  # the AsyncAPI 3.0 rule for channel and component keys
    assert all(key.match(k) for k in [*doc["channels"], *doc["operations"]])
    headers = doc["components"]["messages"]["task.images.Resize"]["headers"]["properties"]
    assert set(headers) == {
        "Nats-Msg-Id",
        "Tf-Id",
        "Tf-Task",
        "traceparent",
        "Tf-Encoding",
        "Tf-Payload",
    }
    assert headers["Nats-Msg-Id"]["pattern"] == f"^{inbound.TASK_ID.pattern}$"
    assert "Size" in doc["components"]["schemas"]  # nested models are hoisted, refs rewritten


def test_the_schema_command_writes_the_files(tmp_path: Path) -> None:
    ran = CliRunner().invoke(cli, ["schema", "tests.contract_app:app", "--out", str(tmp_path)])
    assert ran.exit_code == 0, ran.output
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.json"))
    assert written == [
        "asyncapi.json",
        "events/greeting.sent.json",
        "results/greetings/Greet.json",
        "status.json",
        "tasks/greetings/Greet.json",
    ]
    assert json.loads((tmp_path / "results/greetings/Greet.json").read_text())["type"] == "string"


# The table in docs/wire-format.md, "Status records": keys each state's record has.
ALWAYS = {"id", "task", "state", "attempt", "updated_at", "error"}
ERROR_KEYS = {"type", "message", "traceback", "reason"}


class Ok(Task[int], queue="records"):
    pass


class Boom(Task[None], queue="records"):
    pass


class Flaky(Task[None], queue="records"):
    pass


class Hold(Task[None], queue="records"):
    pass


async def raw_record(client: Client, subject: str) -> dict[str, Any] | None:
    stream = topology.results_stream(client.namespace)
    try:
        msg = await client.js.get_last_msg(stream, subject, direct=True)
    except NotFoundError:  # not written yet
        return None
    return json.loads(msg.data) if msg.data else None


async def test_status_records_of_every_state_have_the_documented_keys(client: Client) -> None:
    app, release = App(client.namespace), asyncio.Event()

    @app.handle(Ok)
    async def ok(task: Ok, ctx: Context) -> int:
        return 7

    @app.handle(Boom, max_attempts=1)
    async def boom(task: Boom, ctx: Context) -> None:
        raise ValueError("boom")

    @app.handle(Flaky, max_attempts=2, backoff=Backoff(initial=60.0))
    async def flaky(task: Flaky, ctx: Context) -> None:
        raise ValueError("flaky")

    @app.handle(Hold)
    async def hold(task: Hold, ctx: Context) -> None:
        await release.wait()

    ns = client.namespace
    runs = {t.__name__: await client.enqueue(t()) for t in (Ok, Boom, Flaky, Hold)}
    final = {name: topology.result_subject(ns, run.id) for name, run in runs.items()}
    progress = {name: topology.progress_subject(ns, run.id) for name, run in runs.items()}
    async with running_worker(app, client):
        running = await eventually(lambda: raw_record(client, progress["Hold"]), "running")
        failed = await eventually(lambda: raw_record(client, progress["Flaky"]), "failed")
        succeeded = await eventually(lambda: raw_record(client, final["Ok"]), "succeeded")
        dead = await eventually(lambda: raw_record(client, final["Boom"]), "dead")
        assert await client.cancel(runs["Hold"].id)
        cancelled = await eventually(lambda: raw_record(client, final["Hold"]), "cancelled")
        release.set()

    records = {"running": running, "failed": failed, "succeeded": succeeded, "dead": dead}
    records["cancelled"] = cancelled
    assert {state: r["state"] for state, r in records.items()} == {s: s for s in records}
    for state, record in records.items():
        assert set(record) == ALWAYS | ({"result"} if state == "succeeded" else set()), state
        assert isinstance(record["attempt"], int)
        assert record["updated_at"].endswith("Z")
    assert succeeded["result"] == 7
    assert succeeded["error"] is None
    assert running["error"] is None
    assert cancelled["error"] is None
    assert set(failed["error"]) == ERROR_KEYS
    assert failed["error"]["reason"] is None
    assert set(dead["error"]) == ERROR_KEYS
    assert dead["error"]["reason"] == "failed"
    assert dead["error"]["type"] == "ValueError"
    assert dead["id"] == runs["Boom"].id
