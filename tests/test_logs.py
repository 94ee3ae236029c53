"""Task fields on log records, and the CLI's text and JSON formats (taskframe/_logs.py)."""

import json
import logging
import signal

import pytest

from taskframe import Client, TaskFailed
from taskframe import _wire as wire
from taskframe._logs import TextFormatter, trace_id
from taskframe.testing import NatsServer, running_worker
from tests.fault_apps import Fail, Logged, build_app
from tests.faultkit import Procs

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{TRACE}-00f067aa0ba902b7-01", TRACE),
        (f"01-{TRACE}-00f067aa0ba902b7-01-future", TRACE),  # a later version may add parts
        (f"00-{TRACE}-00f067aa0ba902b7-01-extra", None),
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", None),
        (f"ff-{TRACE}-00f067aa0ba902b7-01", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        ("nonsense", None),
    ],
)
def test_trace_id_is_read_from_a_valid_traceparent_only(header: str, expected: str | None) -> None:
    assert trace_id({"traceparent": header}) == expected
    assert trace_id(None) is None


async def test_the_text_format_shows_the_task_name_and_id_of_ctx_log_records(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskframe")
    async with running_worker(build_app(client.namespace, None), client, queues=["work"]):
        run = await client.enqueue(Logged(note="hello"))
        assert await run.result(timeout=10) == run.id
    [record] = [r for r in caplog.records if r.getMessage() == "handling hello"]
    line = TextFormatter().format(record)
    assert f"taskframe.task [{record.process}] [Logged {run.id} #1] handling hello" in line
    assert (record.queue, record.attempt) == ("work", 1)  # type: ignore[attr-defined]
    others = [r for r in caplog.records if r.name == "taskframe.worker"]
    assert others
    plain = TextFormatter().format(others[0])  # no task: no tag
    assert plain.endswith(f"taskframe.worker [{others[0].process}] {others[0].getMessage()}")


async def test_a_json_worker_writes_one_object_per_line_with_each_tasks_fields(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    worker = procs.worker(nats_server.url, extra=("--log-format", "json"))
    await worker.wait_log('"message": "worker ready')
    runs = await client.enqueue_many(Logged(note=f"n{i}") for i in range(3))
    failing = await client.enqueue(Logged(note="boom", fail=True))
    traced_id = wire.new_task_id()
    await client.js.publish(
        wire.task_subject(client.namespace, "work", "Logged"),
        Logged(note="traced").model_dump_json().encode(),
        headers={
            **wire.task_headers(traced_id),
            "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
        },
    )
    dead = await client.enqueue(Fail())
    for run in [*runs, failing, client.handle(Logged, traced_id)]:
        assert await run.result(timeout=10) == run.id
    with pytest.raises(TaskFailed):
        await dead.result(timeout=10)
    worker.signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0

    lines = [json.loads(line) for line in worker.text().splitlines()]  # every line is JSON
    for entry in lines:
        assert {"time", "level", "logger", "message", "pid"} <= entry.keys()
        assert entry["time"].endswith("Z")
    handled = {e["message"]: e for e in lines if e["logger"] == "taskframe.task"}
    for i, run in enumerate(runs):
        entry = handled[f"handling n{i}"]
        assert (entry["task"], entry["task_id"], entry["attempt"]) == ("Logged", run.id, 1)
        assert entry["queue"] == "work"
        assert "trace_id" not in entry
        assert "exc_info" not in entry
    assert handled["handling boom"]["task_id"] == failing.id
    assert handled["handling boom"]["exc_info"] == "ValueError: boom"
    assert handled["handling traced"]["task_id"] == traced_id
    assert handled["handling traced"]["trace_id"] == TRACE
    about_dead = [e for e in lines if e.get("task_id") == dead.id]
    assert [e["attempt"] for e in about_dead] == [1, 2, 3]  # two retries, then dead
    assert all(e["logger"] == "taskframe.worker" and e["task"] == "Fail" for e in about_dead)
    assert "is dead" in about_dead[-1]["message"]
