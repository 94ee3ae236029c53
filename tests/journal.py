"""The handlers' journal: one line per thing a handler did, appended by worker processes.

    journal = Journal(path)
    journal.write("start", ctx.task_id, ctx.attempt)     # in a handler, in any process
    ...
    journal.entries("done", task_id)                     # in the test (or the soak driver)

A line is `<kind> <task id> <attempt> <pid> <unix time>`. The fault suite's handlers
(tests/fault_apps.py) write `start`, `done` and `fail`; the soak's (bench/soak/app.py) also
`reject`, `tick` and one kind per event subscriber group. Each line is one unbuffered
O_APPEND write, so any number of processes can share one file and a process killed with
SIGKILL leaves whole lines or none. The reader reads each byte once: every call parses only
what was appended since the last one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal line: a handler started, finished or failed one delivery of a task."""

    kind: str
    task_id: str
    attempt: int
    pid: int
    at: float


class Journal:
    """One journal file: written by handlers, read back by the test that started them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._read = 0
        self._entries: list[Entry] = []

    def __repr__(self) -> str:
        return f"<Journal {self.path} entries={len(self._entries)}>"

    def write(self, kind: str, task_id: str, attempt: int) -> None:
        """Append one line (opened on first use and kept open: a handler may write often)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        line = f"{kind} {task_id} {attempt} {os.getpid()} {time.time():.6f}\n"
        os.write(self._fd, line.encode())

    def close(self) -> None:
        """Close the file `write` opened (the reader keeps no file open)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def entries(
        self, kind: str | None = None, task_id: str | None = None, pid: int | None = None
    ) -> list[Entry]:
        """Every complete line so far, in file order, optionally filtered."""
        self._read_new()
        return [
            e
            for e in self._entries
            if (kind is None or e.kind == kind)
            and (task_id is None or e.task_id == task_id)
            and (pid is None or e.pid == pid)
        ]

    def count(self, kind: str, task_id: str) -> int:
        """How many `kind` lines `task_id` has."""
        return len(self.entries(kind, task_id))

    def pids(self, kind: str = "done") -> set[int]:
        """The processes that wrote `kind` lines."""
        return {e.pid for e in self.entries(kind)}

    def _read_new(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._read)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._read += end
        for line in data[:end].decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 5:
                kind, task_id, attempt, pid, at = parts
                self._entries.append(Entry(kind, task_id, int(attempt), int(pid), float(at)))
