"""Handler-side timestamps ("marks") and the harness-side recorder that waits on them.

Every benchmark task handler calls :func:`mark` with its task index. A mark is
``(index, time.monotonic_ns())``. On Linux ``monotonic_ns`` reads
``CLOCK_MONOTONIC``, which is system-wide, so marks taken in a worker
subprocess are directly comparable with producer timestamps taken here.

Delivery of marks to the :class:`Recorder`:

* in-process workers: :func:`install_in_process` routes marks straight into
  the recorder (no syscalls, same event loop);
* worker subprocesses: marks are 16-byte records written to a FIFO whose path
  is in ``$BENCH_PROBE_FIFO``. Writes up to ``PIPE_BUF`` bytes are atomic, so
  many writer processes/threads never interleave records, and the harness
  reads them via the event loop -- no polling. The cost for the worker is one
  ``write(2)`` per task (~1-2 us), the price of crossing the process boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import time
from array import array
from collections.abc import AsyncIterator, Callable
from itertools import repeat
from pathlib import Path

FIFO_ENV = "BENCH_PROBE_FIFO"
RECORD = struct.Struct("<qq")  # (task index, CLOCK_MONOTONIC ns)
_F_SETPIPE_SZ = 1031  # from linux/fcntl.h; Python's fcntl lacks the constant before 3.10 docs
_PIPE_SIZE = 1 << 20  # a larger pipe buffer means writers block less if we lag briefly

Sink = Callable[[int, int], None]
_sink: Sink | None = None
_fifo_fd: int | None = None
_fifo_pid: int | None = None


def mark(index: int) -> None:
    """Record that the handler for task ``index`` ran. Call from handlers only."""
    ns = time.monotonic_ns()
    sink = _sink
    if sink is not None:
        sink(index, ns)
        return
    _write_fifo(index, ns)


def _write_fifo(index: int, ns: int) -> None:
    global _fifo_fd, _fifo_pid
    pid = os.getpid()
    if _fifo_fd is None or _fifo_pid != pid:
        # Opened lazily and per process: prefork pools fork after import time.
        _fifo_fd = os.open(os.environ[FIFO_ENV], os.O_WRONLY)
        _fifo_pid = pid
    os.write(_fifo_fd, RECORD.pack(index, ns))


def install_in_process(recorder: Recorder) -> None:
    """Route this process's marks straight into ``recorder``."""
    global _sink
    _sink = recorder.add


class Recorder:
    """Collects marks and lets the harness await counts or specific task indices.

    In-process workers share this process, so its memory counts towards their
    peak RSS: timestamps live in a flat ``array('q')`` (8 bytes per task)
    rather than a dict of Python ints (~100 bytes per task).
    """

    _UNSEEN = -1
    _DENSE_LIMIT = 50_000_000  # indices above this (warm-up tasks) go to a dict

    def __init__(self) -> None:
        self._dense: array[int] = array("q")
        self._sparse: dict[int, int] = {}
        self.distinct = 0
        self.total = 0
        self.min_ns: int | None = None
        self.max_ns: int | None = None
        self._count_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._index_waiters: dict[int, asyncio.Future[int]] = {}

    @property
    def duplicates(self) -> int:
        return self.total - self.distinct

    def reset(self) -> None:
        """Forget marks (e.g. warm-up tasks); pending waiters are kept."""
        self._dense = array("q")
        self._sparse.clear()
        self.distinct = self.total = 0
        self.min_ns = self.max_ns = None

    def ns_of(self, index: int) -> int | None:
        if 0 <= index < self._DENSE_LIMIT:
            if index < len(self._dense) and self._dense[index] != self._UNSEEN:
                return self._dense[index]
            return None
        return self._sparse.get(index)

    def _store(self, index: int, ns: int) -> bool:
        """Remember the first timestamp of ``index``; False if already seen."""
        if 0 <= index < self._DENSE_LIMIT:
            dense = self._dense
            if index >= len(dense):  # grow geometrically, amortised O(1)
                missing = max(index + 1, 2 * len(dense), 1024) - len(dense)
                dense.extend(repeat(self._UNSEEN, missing))
            if dense[index] != self._UNSEEN:
                return False
            dense[index] = ns
            return True
        if index in self._sparse:
            return False
        self._sparse[index] = ns
        return True

    def add(self, index: int, ns: int) -> None:
        self.total += 1
        self.min_ns = ns if self.min_ns is None else min(self.min_ns, ns)
        self.max_ns = ns if self.max_ns is None else max(self.max_ns, ns)
        if not self._store(index, ns):
            return  # a redelivery; counted in ``duplicates``
        self.distinct += 1
        waiter = self._index_waiters.pop(index, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(ns)
        if self._count_waiters:
            still: list[tuple[int, asyncio.Future[None]]] = []
            for target, fut in self._count_waiters:
                if self.distinct >= target:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((target, fut))
            self._count_waiters = still

    async def wait_distinct(self, target: int, timeout_s: float) -> None:
        """Wait until ``target`` distinct tasks were marked (TimeoutError otherwise)."""
        if self.distinct >= target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._count_waiters.append((target, fut))
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"only {self.distinct}/{target} tasks done after {timeout_s:.0f}s"
            ) from None

    async def wait_index(self, index: int, timeout_s: float) -> int:
        """Wait for the mark of task ``index`` and return its timestamp (ns)."""
        seen = self.ns_of(index)
        if seen is not None:
            return seen
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._index_waiters[index] = fut
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise TimeoutError(f"task {index} not handled within {timeout_s:.1f}s") from None
        finally:
            self._index_waiters.pop(index, None)


@contextlib.asynccontextmanager
async def fifo_source(recorder: Recorder, path: Path) -> AsyncIterator[Path]:
    """Create a FIFO at ``path`` and feed records written to it into ``recorder``.

    We hold a write end ourselves so the read end never sees EOF while worker
    processes come and go.
    """
    os.mkfifo(path)
    read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    keep_fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    with contextlib.suppress(OSError):
        fcntl.fcntl(read_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    carry = bytearray()
    size = RECORD.size

    def on_readable() -> None:
        try:
            data = os.read(read_fd, 1 << 16)
        except BlockingIOError:
            return
        carry.extend(data)
        whole = len(carry) - len(carry) % size
        for index, ns in RECORD.iter_unpack(carry[:whole]):
            recorder.add(index, ns)
        del carry[:whole]

    loop = asyncio.get_running_loop()
    loop.add_reader(read_fd, on_readable)
    try:
        yield path
    finally:
        loop.remove_reader(read_fd)
        os.close(keep_fd)
        os.close(read_fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
