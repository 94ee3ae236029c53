"""Several worker processes, one per core: started, restarted when they die, stopped together.

A child that dies after it became ready (say, a task that crashes the interpreter) is
restarted at once: the task itself ends in the dead-letter stream once its attempts are
used up. A child that dies before it is ready (a bad URL, a provisioning conflict) is
restarted with a growing delay, and after ten such deaths in a row the supervisor gives up.
A child that exits with `RECYCLED` reached a recycling limit (see _recycle.py) and drained:
it is replaced at once, as planned, not as a crash.
Children talk to the supervisor through a pipe it gives them: one byte when they are ready,
then, if they are recycled, why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable

log = logging.getLogger("taskframe._supervisor")

READY_FD = "TASKFRAME_READY_FD"
RECYCLED = 75
"""The exit code of a worker process that stopped at a recycling limit (sysexits'
EX_TEMPFAIL: "try again", which is what the supervisor does)."""
_GIVE_UP = 10
_READY = b"1"


class Supervisor:
    """This process's line to the `taskframe worker` that supervises it, if one does."""

    def __init__(self) -> None:
        fd = os.environ.pop(READY_FD, "")  # not handed on to what this process starts
        self._fd = int(fd) if fd.isdigit() else None
        if self._fd is not None:
            try:
                os.set_inheritable(self._fd, False)
            except OSError:  # not an open file: whoever set the variable is not listening
                self._fd = None

    @property
    def present(self) -> bool:
        """Whether a supervisor started this process (and so replaces it when recycled)."""
        return self._fd is not None

    def ready(self) -> None:
        """Tell the supervisor this worker is ready."""
        self._say(_READY)

    def recycled(self, why: str) -> None:
        """Tell the supervisor why this worker stops (it then exits with `RECYCLED`)."""
        self._say(why.encode())

    def _say(self, what: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, what)
        except OSError:  # the supervisor is gone; nothing to tell
            os.close(self._fd)
            self._fd = None


class _Child:
    def __init__(self, command: list[str]) -> None:
        read, write = os.pipe()
        self.process = subprocess.Popen(
            command, pass_fds=(write,), env={**os.environ, READY_FD: str(write)}
        )
        os.close(write)
        os.set_blocking(read, False)
        self._pipe: int | None = read
        self._said = b""
        self.reported = False

    @property
    def ready(self) -> bool:
        """Whether the child said it is ready."""
        return self._said.startswith(_READY)

    @property
    def why(self) -> str:
        """What the child said after it was ready: why it was recycled."""
        return self._said[len(_READY) :].decode(errors="replace")

    def poll(self) -> bool:
        """Whether the child still runs; reads what it said meanwhile."""
        alive = self.process.poll() is None  # before reading: a child that exited said it all
        if self._pipe is not None:
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(self._pipe, 4096):
                    self._said += chunk
            if not alive:
                os.close(self._pipe)
                self._pipe = None
        return alive


def supervise(
    command: list[str], processes: int, exited: Callable[[int], None] | None = None
) -> int:
    """Run `processes` copies of `command` until SIGTERM/SIGINT, which they are sent too.

    `exited` is called with the pid of every child that exited, once.
    """
    children = [_Child(command) for _ in range(processes)]
    early_deaths = 0
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        alive = [child.poll() for child in children]
        if stopping and not any(alive):
            break
        for index, child in enumerate(children):
            if not alive[index] and exited is not None and not child.reported:
                child.reported = True
                exited(child.process.pid)
            if alive[index] or stopping:
                continue
            early_deaths = 0 if child.ready else early_deaths + 1
            if child.process.returncode == RECYCLED and child.ready:
                log.info(
                    "worker process %d recycled: %s; starting a replacement",
                    child.process.pid,
                    child.why or "it reached a limit",
                )
                children[index] = _Child(command)
                continue
            if early_deaths >= _GIVE_UP:
                log.error("worker processes keep dying before they are ready; giving up")
                forward(signal.SIGTERM, None)
                return 1
            delay = min(30.0, 0.25 * 2**early_deaths) if early_deaths else 0.0
            log.error(
                "worker process %d exited with %d; restarting it in %.1fs (%s)",
                child.process.pid,
                child.process.returncode,
                delay,
                "it was serving" if child.ready else "it died before it was ready",
            )
            _sleep_unless(lambda: stopping, delay)
            if not stopping:
                children[index] = _Child(command)
        time.sleep(0.2)
    # A child still starting when the signal came had no handler for it yet, and died of it.
    clean = (RECYCLED, -signal.SIGTERM, -signal.SIGINT)
    return max(0 if c.process.returncode in clean else c.process.returncode for c in children)


def _sleep_unless(stop: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop():
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
