"""Several worker processes, one per core: started, restarted when they die, stopped together.

A child that dies after it became ready (say, a task that crashes the interpreter) is
restarted at once: the task itself ends in the dead-letter stream once its attempts are
used up. A child that dies before it is ready (a bad URL, a provisioning conflict) is
restarted with a growing delay, and after ten such deaths in a row the supervisor gives up.
Children say they are ready by writing one byte to a pipe the supervisor gives them.
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
_GIVE_UP = 10


def announce_ready() -> None:
    """Tell the supervising process this worker is ready; nothing when not supervised."""
    fd = os.environ.pop(READY_FD, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"1")
        os.close(int(fd))
    except (OSError, ValueError):  # the supervisor is gone; nothing to tell
        pass


class _Child:
    def __init__(self, command: list[str]) -> None:
        read, write = os.pipe()
        self.process = subprocess.Popen(
            command, pass_fds=(write,), env={**os.environ, READY_FD: str(write)}
        )
        os.close(write)
        os.set_blocking(read, False)
        self._pipe: int | None = read
        self.ready = False
        self.reported = False

    def poll(self) -> bool:
        """Whether the child still runs; notes when it became ready."""
        if not self.ready and self._pipe is not None:
            with contextlib.suppress(BlockingIOError):
                self.ready = os.read(self._pipe, 1) == b"1"
        alive = self.process.poll() is None
        if not alive and self._pipe is not None:
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
    return max(child.process.returncode for child in children)


def _sleep_unless(stop: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop():
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
