"""The soak's parts that can be checked in a second (a real run takes minutes: python -m
bench.soak): its fault plan, its books kept with the fault suite's ledger, its report."""

import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.soak.books import Books
from bench.soak.faults import plan
from bench.soak.options import parse_args
from taskframe import Client

REPO = Path(__file__).resolve().parent.parent


def test_the_fault_plan_keeps_faults_apart_and_off_the_ends() -> None:
    opts = parse_args(["--minutes", "10", "--kill-every", "60", "--server-every", "200"])
    planned = plan(opts)
    times = [t for t, _ in planned]
    assert times == sorted(times)
    assert all(b - a >= 10 for a, b in itertools.pairwise(times))
    assert max(times) < 10 * 60 - 30
    assert {kind for _, kind in planned} == {"kill9", "sigterm", "server"}
    assert [t for t, kind in planned if kind == "server"] == [205.0, 405.0]
    # Nothing fits in a minute once the last 30 s are left out and faults are 200 s apart.
    assert plan(parse_args(["--minutes", "1", "--kill-every", "0", "--term-every", "0"])) == []


async def test_the_books_account_for_tasks_with_the_ledger_and_for_events_by_group(
    client: Client, tmp_path: Path
) -> None:
    books = Books.in_directory(tmp_path)
    journal = books.journal
    now = time.time()
    for task_id, kind in (("a", "noop"), ("b", "flaky"), ("c", "doubler"), ("d", "doomed")):
        books.ledger.acknowledge(task_id)  # as the ledger's enqueue does once confirmed
        books.confirmed(task_id, kind, now - 120)
    books.published("e1", now)
    journal.write("done", "a", 1)
    journal.write("fail", "b", 1)
    journal.write("done", "b", 2)
    journal.write("reject", "d", 1)
    journal.write("alpha", "e1", 1)
    journal.write("tick", "t1", 1)
    books.read()
    assert (books.pending(), books.overdue(now)) == (2, 1)  # c overdue; e1 waits for beta
    journal.write("beta", "e1", 1)
    books.read()
    assert books.pending() == 1

    checks = await books.checks(client, drained_s=0.4, interrupted=False)
    assert (checks["acked_tasks"], checks["completed"], checks["lost"]) == (4, 2, 2)
    assert checks["lost_ids"] == ["c", "d"]  # d was rejected, but no dead letter holds it
    assert (checks["doomed_dead"], checks["doomed_missing"]) == (0, 1)
    assert checks["ledger_problems"].startswith("soak: 2 lost: ['c', 'd']")
    assert (checks["event_deliveries_lost"], checks["schedule_ticks"]) == (0, 1)
    assert (checks["first_attempt_failures"], checks["passed"]) == (1, False)
    journal.close()


def test_the_committed_result_renders_again(tmp_path: Path) -> None:
    shutil.copy(REPO / "bench" / "results" / "soak" / "soak.json", tmp_path / "soak.json")
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--render", str(tmp_path / "soak.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "soak.md").read_text()
    result = json.loads((tmp_path / "soak.json").read_text())
    assert "## Ledger: PASS" in report
    assert f"## Faults injected: {len(result['faults'])}" in report
