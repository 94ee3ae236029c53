"""The App the soak workers run (`python -m taskframe worker bench.soak_app:app`).

Every handler appends one line to a per-process ledger file before it returns, so the soak
driver can match acknowledged task ids against completions without asking the broker.
Lines are written with one unbuffered `os.write` each: a worker killed with SIGKILL
leaves whole lines or none, and nothing sits in a userspace buffer.

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

NAMESPACE = os.environ.get("SOAK_NAMESPACE", "soak")
QUEUE = "soak"
_DIR = Path(os.environ.get("SOAK_DIR", "."))
_PROBE_PERIOD = float(os.environ.get("SOAK_PROBE_PERIOD", "2.0"))
_DIGITS = re.compile(r"\d+")

app = App(NAMESPACE)


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

_ledger_fd: int | None = None
_probe: asyncio.Task[None] | None = None


def _record(kind: str, task_id: str, attempt: int) -> None:
    global _ledger_fd
    if _ledger_fd is None:
        path = _DIR / f"ledger-{os.getpid()}.txt"
        _ledger_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_ledger_fd, f"{kind} {task_id} {attempt} {time.time():.3f}\n".encode())
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
    _record("done", ctx.task_id, ctx.attempt)


@app.handle(Sleepy, max_attempts=5, timeout=10.0)
async def sleepy(task: Sleepy, ctx: Context) -> None:
    await asyncio.sleep(task.ms / 1000)
    _record("done", ctx.task_id, ctx.attempt)


@app.handle(Flaky, max_attempts=5, timeout=10.0)
async def flaky(task: Flaky, ctx: Context) -> None:
    if ctx.attempt == 1:
        _record("fail", ctx.task_id, ctx.attempt)
        raise Retry(0.2)
    _record("done", ctx.task_id, ctx.attempt)


@app.handle(Doubler, max_attempts=5, timeout=10.0)
async def doubler(task: Doubler, ctx: Context) -> int:
    _record("done", ctx.task_id, ctx.attempt)
    return task.n * 2


@app.handle(Doomed, max_attempts=5, timeout=10.0)
async def doomed(task: Doomed, ctx: Context) -> None:
    _record("reject", ctx.task_id, ctx.attempt)
    raise Reject("soak: intended dead letter")


@app.handle(Tick, max_attempts=5, timeout=10.0)
async def tick(task: Tick, ctx: Context) -> None:
    _record("tick", ctx.task_id, ctx.attempt)


@app.subscribe(Ping, group="alpha", max_attempts=5, timeout=10.0)
async def ping_alpha(event: Ping, ctx: Context) -> None:
    _record("alpha", ctx.task_id, ctx.attempt)


@app.subscribe(Ping, group="beta", max_attempts=5, timeout=10.0)
async def ping_beta(event: Ping, ctx: Context) -> None:
    _record("beta", ctx.task_id, ctx.attempt)
