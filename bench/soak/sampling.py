"""What the soak samples every few seconds: each worker's /proc figures, the in-process
probe's task and object counts (bench/soak/app.py), and the totals from the books."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.soak.books import Books
from bench.soak.processes import Processes
from taskframe import Client


def proc_status(pid: int) -> dict[str, int] | None:
    """RSS (kB), threads and open fds of `pid` from /proc, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "Threads"):
            values[key] = int(rest.split()[0])
    return {"rss_kb": values.get("VmRSS", 0), "threads": values.get("Threads", 0), "fds": fds}


def _new_lines(path: Path, offsets: dict[str, int]) -> list[str]:
    """Whole lines appended to `path` since the offset remembered for it."""
    key = str(path)
    with path.open("rb") as f:
        f.seek(offsets.get(key, 0))
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
    offsets[key] = offsets.get(key, 0) + end
    return data[:end].decode().splitlines()


@dataclass
class Samples:
    """Every sample of the run, by source; `t` is seconds since the run started."""

    totals: list[dict[str, Any]] = field(default_factory=list)
    proc: list[dict[str, Any]] = field(default_factory=list)
    probe: list[dict[str, Any]] = field(default_factory=list)
    _probe_offsets: dict[str, int] = field(default_factory=dict)

    async def take(self, tf: Client, books: Books, processes: Processes) -> None:
        """One sample of everything."""
        t = round(processes.now(), 2)
        books.read()
        self.read_probes(processes)
        for slot, proc in processes.workers.items():
            status = proc_status(proc.pid)
            if status is not None and proc.poll() is None:
                self.proc.append({"t": t, "slot": slot, "pid": proc.pid, **status})
        server_rss = None
        if processes.server is not None and processes.server.process is not None:
            found = proc_status(processes.server.process.pid)
            server_rss = found["rss_kb"] if found else None
        dead = None
        with contextlib.suppress(Exception):  # the server may be restarting
            queues = await asyncio.wait_for(tf.queues(), 1.0)
            dead = sum(q.dead for q in queues)
        self.totals.append(
            {
                "t": t,
                "enqueued": len(books.kinds),
                "events": len(books.events),
                "completed": len(books.done),
                "pending": books.pending(),
                "overdue": books.overdue(time.time()),
                "dead": dead,
                "enqueue_failed": books.enqueue_failed,
                "server_rss_kb": server_rss,
                "driver_tasks": len(asyncio.all_tasks()),
            }
        )

    def read_probes(self, processes: Processes) -> None:
        """Take in the probe lines the workers wrote since the last call."""
        for path in sorted(processes.data.glob("probe-*.jsonl")):
            for line in _new_lines(path, self._probe_offsets):
                sample = json.loads(line)
                sample["t"] = round(sample["t"] - processes.t0, 2)
                self.probe.append(sample)

    async def every(
        self, seconds: float, stop: asyncio.Event, tf: Client, books: Books, processes: Processes
    ) -> None:
        """Take a sample every `seconds` until `stop` is set."""
        while not stop.is_set():
            await self.take(tf, books, processes)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
