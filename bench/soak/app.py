"""The App the soak workers run (`python -m taskframe worker bench.soak.app:app`).

Every handler writes one line to the handlers' journal (tests/journal.py, the fault suite's
format) before it returns, so the driver can match acknowledged task ids against
completions without asking the broker: `done`, `fail` (a Flaky first attempt), `reject` (a
Doomed task), `tick` (the schedule) and, for events, the subscriber group's name.

The worker process cannot be made to run code in its event loop from here at import time
(the CLI imports the app before `asyncio.run`), so the first handler call in a process
starts a probe task on the loop that samples RSS, the asyncio task count (by task name)
and the gc object count every `SOAK_PROBE_PERIOD` seconds into `probe-<pid>.jsonl`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

from taskframe import App, Context, Event, Reject, Retry, Task
from tests.journal import Journal

NAMESPACE = os.environ.get("SOAK_NAMESPACE", "soak")
QUEUE = "soak"
GROUPS = ("alpha", "beta")
_DIR = Path(os.environ.get("SOAK_DIR", "."))
_PROBE_PERIOD = float(os.environ.get("SOAK_PROBE_PERIOD", "2.0"))
_DIGITS = re.compile(r"\d+")

app = App(NAMESPACE)
journal = Journal(_DIR / "journal.txt")


class Noop(Task[None], queue=QUEUE, results=False):
    """Does nothing: the bulk of the load, measuring pure framework overhead."""


class Sleepy(Task[None], queue=QUEUE, results=False):
    """Holds a runner for `ms` milliseconds, so tasks overlap and leases are renewed."""

    ms: int


class Flaky(Task[None], queue=QUEUE, results=False):
    """Fails its first attempt, then succeeds: exercises nak with a delay."""


class Doubler(Task[int], queue=QUEUE):
    """Stores a result (the results KV path)."""

    n: int


class Doomed(Task[None], queue=QUEUE):
    """Always rejected: an intended dead letter."""


class Tick(Task[None], queue=QUEUE, results=False):
    """Fired by the broker's schedule every second."""


class Ping(Event):
    """Published by the producer; both subscriber groups must see each one."""

    n: int


app.schedule(task=Tick(), every=1.0, name="soak-tick")

_probe: asyncio.Task[None] | None = None


def _record(kind: str, ctx: Context) -> None:
    journal.write(kind, ctx.task_id, ctx.attempt)
    _start_probe()


def _start_probe() -> None:
    global _probe
    if _probe is None:
        # Kept in a module global: the loop holds only a weak reference to its tasks.
        _probe = asyncio.get_running_loop().create_task(_sample(), name="soak-probe")


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _sample() -> None:
    fd = os.open(_DIR / f"probe-{os.getpid()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    while True:
        tasks = asyncio.all_tasks()
        # Runner and feed names end in numbers or ids; drop them so the counts group by role.
        names = Counter(_DIGITS.sub("#", t.get_name()) for t in tasks)
        sample = {
            "t": time.time(),
            "pid": os.getpid(),
            "rss_kb": _rss_kb(),
            "tasks": len(tasks),
            "task_names": dict(names.most_common(12)),
            "gc_objects": len(gc.get_objects()),
            "threads": threading.active_count(),
        }
        os.write(fd, (json.dumps(sample) + "\n").encode())
        await asyncio.sleep(_PROBE_PERIOD)


@app.handle(Noop, max_attempts=5, timeout=10.0)
async def noop(task: Noop, ctx: Context) -> None:
    _record("done", ctx)


@app.handle(Sleepy, max_attempts=5, timeout=10.0)
async def sleepy(task: Sleepy, ctx: Context) -> None:
    await asyncio.sleep(task.ms / 1000)
    _record("done", ctx)


@app.handle(Flaky, max_attempts=5, timeout=10.0)
async def flaky(task: Flaky, ctx: Context) -> None:
    if ctx.attempt == 1:
        _record("fail", ctx)
        raise Retry(0.2)
    _record("done", ctx)


@app.handle(Doubler, max_attempts=5, timeout=10.0)
async def doubler(task: Doubler, ctx: Context) -> int:
    _record("done", ctx)
    return task.n * 2


@app.handle(Doomed, max_attempts=5, timeout=10.0)
async def doomed(task: Doomed, ctx: Context) -> None:
    _record("reject", ctx)
    raise Reject("soak: intended dead letter")


@app.handle(Tick, max_attempts=5, timeout=10.0)
async def tick(task: Tick, ctx: Context) -> None:
    _record("tick", ctx)


@app.subscribe(Ping, group=GROUPS[0], max_attempts=5, timeout=10.0)
async def ping_alpha(event: Ping, ctx: Context) -> None:
    _record(GROUPS[0], ctx)


@app.subscribe(Ping, group=GROUPS[1], max_attempts=5, timeout=10.0)
async def ping_beta(event: Ping, ctx: Context) -> None:
    _record(GROUPS[1], ctx)
