"""Helpers for tests that run the real `taskframe` CLI in subprocesses.

    with Procs(tmp_path, namespace) as procs:    # kills whatever is left at the end
        worker = procs.worker(url, concurrency=2)  # taskframe worker tests.fault_apps:app
        await worker.wait_log("worker ready")
        ...
        assert procs.ledger.count("done", task_id) == 1

Every wait polls a real condition (a log line, a ledger line, a process exit) against a
deadline, so a test that goes wrong fails with a message instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nats.js import JetStreamContext

from taskframe import topology

REPO = Path(__file__).resolve().parent.parent
APP = "tests.fault_apps:app"
TASKFRAME = (sys.executable, "-m", "taskframe")
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("taskframe"))


async def until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Poll `condition` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def until_async(
    condition: Callable[[], Awaitable[object]], what: str, timeout: float = 15.0
) -> None:
    """`until` for a condition that must ask the server."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger line: a handler started, finished or failed one delivery of a task."""

    kind: str
    task_id: str
    attempt: int
    pid: int
    at: float


class Ledger:
    """The lines `tests.fault_apps` handlers append, read back."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(
        self, kind: str | None = None, task_id: str | None = None, pid: int | None = None
    ) -> list[Entry]:
        """Complete lines, in file order, optionally filtered."""
        if not self.path.exists():
            return []
        found = []
        for line in self.path.read_text().splitlines(keepends=True):
            parts = line.split()
            if not line.endswith("\n") or len(parts) != 5:
                continue  # a line still being written
            entry = Entry(parts[0], parts[1], int(parts[2]), int(parts[3]), float(parts[4]))
            if (
                (kind is None or entry.kind == kind)
                and (task_id is None or entry.task_id == task_id)
                and (pid is None or entry.pid == pid)
            ):
                found.append(entry)
        return found

    def count(self, kind: str, task_id: str) -> int:
        """How many `kind` lines `task_id` has."""
        return len(self.entries(kind, task_id))

    def pids(self, kind: str = "done") -> set[int]:
        """The processes that wrote `kind` lines."""
        return {e.pid for e in self.entries(kind)}


@dataclass(frozen=True, slots=True)
class Result:
    """A finished CLI command."""

    returncode: int
    stdout: str
    stderr: str


class Proc:
    """A long-running CLI subprocess; stdout and stderr go to one log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: close() also reaches its children
        )

    def __repr__(self) -> str:
        return f"<Proc pid={self.pid} {' '.join(self.args[2:4])} rc={self.process.poll()}>"

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        """Whether the process has not exited."""
        return self.process.poll() is None

    def text(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the process (never to its group)."""
        os.kill(self.pid, sig)

    async def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 15.0) -> None:
        """Wait until the log matches `pattern` (a regex) `count` times."""

        def seen() -> bool:
            if not self.alive and len(re.findall(pattern, self.text())) < count:
                raise AssertionError(
                    f"{self!r} exited before logging {pattern!r}:\n{self.text()[-3000:]}"
                )
            return len(re.findall(pattern, self.text())) >= count

        await until(seen, f"{pattern!r} x{count} in the log of {self!r}", timeout)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit and return its exit code (-N: killed by signal N)."""
        await until(lambda: not self.alive, f"{self!r} to exit", timeout)
        return self.process.wait()

    def close(self) -> None:
        """Kill the process and any children it left in its group, reap it, close its log."""
        if self.process.returncode is None:  # not reaped yet, so the group id is still ours
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        try:
            self.process.wait(10)
        finally:
            self._log.close()


class Procs:
    """The subprocesses of one test, sharing its namespace and ledger."""

    def __init__(self, tmp: Path, namespace: str) -> None:
        self.tmp = tmp
        self.namespace = namespace
        self.ledger = Ledger(tmp / "ledger.txt")
        self.procs: list[Proc] = []

    def env(self, ack_wait: float | None = 1.0, **extra: str) -> dict[str, str]:
        """The environment of a subprocess: no inherited TASKFRAME_* settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFRAME_")}
        env.update(
            TEST_NAMESPACE=self.namespace,
            TEST_LEDGER=str(self.ledger.path),
            PYTHONUNBUFFERED="1",
        )
        if ack_wait is not None:
            env["TASKFRAME_ACK_WAIT"] = str(ack_wait)
        env.update(extra)
        return env

    def spawn(self, *args: str, ack_wait: float | None = 1.0, **env: str) -> Proc:
        """Start a long-running command."""
        log = self.tmp / f"proc-{len(self.procs)}.log"
        proc = Proc(list(args), self.env(ack_wait, **env), log)
        self.procs.append(proc)
        return proc

    def worker(
        self,
        url: str,
        *,
        concurrency: int = 4,
        grace: float = 10.0,
        ack_wait: float = 1.0,
        extra: tuple[str, ...] = (),
    ) -> Proc:
        """Start `python -m taskframe worker tests.fault_apps:app` against `url`."""
        return self.spawn(
            *TASKFRAME,
            "worker",
            APP,
            "--url",
            url,
            "--concurrency",
            str(concurrency),
            "--grace",
            str(grace),
            *extra,
            ack_wait=ack_wait,
        )

    async def run(
        self, *args: str, timeout: float = 30.0, ack_wait: float | None = None, **env: str
    ) -> Result:
        """Run a command to completion without blocking the event loop."""
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=REPO,
            env=self.env(ack_wait, **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise AssertionError(f"{' '.join(args)} did not finish within {timeout}s") from None
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())

    def close(self) -> None:
        """Kill and reap every process still running."""
        for proc in self.procs:
            proc.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def dead_letters(js: JetStreamContext, namespace: str) -> list[dict[str, Any]]:
    """Every dead letter of `namespace`: its headers, plus its body under "body" (bytes)."""
    stream = topology.dead_stream(namespace)
    info = await js.stream_info(stream)
    letters: list[dict[str, Any]] = []
    if info.state.messages == 0:
        return letters
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        letters.append({**(msg.headers or {}), "body": msg.data or b""})
    return letters


async def queue_counts(js: JetStreamContext, namespace: str, queue: str) -> tuple[int, int, int]:
    """(messages stored, pending delivery, delivered but unacknowledged) for `queue`."""
    stream = topology.queue_stream(namespace, queue)
    info = await js.stream_info(stream)
    consumer = await js.consumer_info(stream, topology.WORKERS)
    return info.state.messages, consumer.num_pending or 0, consumer.num_ack_pending or 0


async def until_drained(js: JetStreamContext, namespace: str, queue: str) -> None:
    """Wait until `queue` holds nothing: no message stored, pending or awaiting an ack."""
    deadline = time.monotonic() + 10.0
    while (counts := await queue_counts(js, namespace, queue)) != (0, 0, 0):
        if time.monotonic() > deadline:
            raise AssertionError(f"{queue} not drained: (stored, pending, unacked) = {counts}")
        await asyncio.sleep(0.05)
