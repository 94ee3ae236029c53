"""Status records (taskframe._results.status_record): the bytes docs/wire-format.md shows.

Records without an error are filled into a template; they must be byte for byte what
`json.dumps` writes, for any id and name (those JSON would escape take the slow path).
"""

import json
import random
import string
from datetime import datetime

import pytest

from taskframe import TaskState
from taskframe._results import ErrorInfo, parse_record, status_record
from taskframe._wire import rfc3339


def _reference(
    record: bytes,
    task_id: str,
    task: str,
    state: TaskState,
    attempt: int,
    result_json: bytes | None,
    error: ErrorInfo | None,
) -> bytes:
    """What json.dumps writes for the same fields (with the record's own timestamp)."""
    fields = {
        "id": task_id,
        "task": task,
        "state": state.value,
        "attempt": attempt,
        "updated_at": json.loads(record)["updated_at"],
        "error": error.model_dump() if error else None,
    }
    body = json.dumps(fields, separators=(",", ":")).encode()
    return body if result_json is None else body[:-1] + b',"result":' + result_json + b"}"


def test_a_record_has_the_documented_fields_in_order() -> None:
    record = status_record("01a2-b", "ResizeImage", TaskState.SUCCEEDED, 1, result_json=b'"a"')
    fields = json.loads(record)
    assert list(fields) == ["id", "task", "state", "attempt", "updated_at", "error", "result"]
    assert fields["result"] == "a"
    stamp = fields["updated_at"]
    moment = datetime.fromisoformat(stamp)
    assert stamp == rfc3339(moment)  # as every other timestamp taskframe writes
    assert abs(moment.timestamp() - datetime.now().timestamp()) < 5
    assert parse_record(record).state is TaskState.SUCCEEDED


@pytest.mark.parametrize("seed", range(4))
def test_the_template_writes_what_json_dumps_writes(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = string.printable + '\x00\x1f\x7f\x80é☃"\\/'
    for attempt in range(2000):
        task_id = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
        task = rng.choice(["Noop", "Resize_image-2", task_id])
        state = rng.choice(list(TaskState))
        result_json = rng.choice([None, b"1", b'"x"', b'{"a":[1,2]}'])
        error = rng.choice([None, None, ErrorInfo(type="E", message='m\n"q"', reason="failed")])
        record = status_record(task_id, task, state, attempt, result_json=result_json, error=error)
        assert record == _reference(record, task_id, task, state, attempt, result_json, error)
