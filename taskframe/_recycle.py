"""Recycling a worker process: it stops at a limit, drains, and its supervisor replaces it.

`taskframe worker --max-tasks-per-process N` stops a process once it has started N tasks
(`Worker(max_tasks=N)`: it never starts one more); `--max-memory-mb M` once its resident
memory is above M MiB, checked every second. Either way the process drains as on SIGTERM
(running tasks finish, tasks it only prefetched are handed back at once), tells the
supervisor why and exits with `_supervisor.RECYCLED`, and the supervisor starts a
replacement at once. So a handler or library that leaks is bounded, and no task is lost
or run twice for it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import sys

from taskframe._supervisor import Supervisor
from taskframe.worker import Worker

log = logging.getLogger("taskframe._recycle")

CHECK_EVERY = 1.0
"""Seconds between two looks at the process's memory."""


def resident_mib() -> float:
    """This process's resident memory in MiB (its peak, where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, else KiB
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class Recycler:
    """Watches one worker's limits; `why` says which one it reached, if any."""

    def __init__(self, worker: Worker, max_memory_mb: int | None) -> None:
        self.worker = worker
        self.max_memory_mb = max_memory_mb
        self._memory: str | None = None

    def __repr__(self) -> str:
        return (
            f"<Recycler max_tasks={self.worker.max_tasks} max_memory_mb={self.max_memory_mb} "
            f"why={self.why!r}>"
        )

    @property
    def why(self) -> str | None:
        """Why the worker stopped, if it stopped at a limit; None otherwise."""
        limit = self.worker.max_tasks
        if limit is not None and self.worker.stats.started >= limit:
            return f"it started {limit} tasks (--max-tasks-per-process {limit})"
        return self._memory

    async def watch(self) -> None:
        """Stop the worker once its process's memory is above the limit (run it as a task).

        A process above the limit before it ran any task is not stopped: a replacement
        would start just as big. It says so once instead.
        """
        limit = self.max_memory_mb
        if limit is None:
            return
        await self.worker.ready.wait()
        warned = False
        while True:
            await asyncio.sleep(CHECK_EVERY)
            used = resident_mib()
            if used <= limit:
                continue
            if self.worker.stats.started == 0:
                if not warned:
                    log.warning(
                        "this worker process takes %.0f MiB before it ran any task, above "
                        "--max-memory-mb %d: recycling it would not help; raise the limit",
                        used,
                        limit,
                    )
                    warned = True
                continue
            self._memory = f"its memory is {used:.0f} MiB, above --max-memory-mb {limit}"
            log.warning("recycling this worker process: %s", self._memory)
            self.worker.stop()
            return


async def serve(worker: Worker, supervisor: Supervisor, max_memory_mb: int | None) -> str | None:
    """Run `worker` (telling `supervisor` once it is ready) until it stops.

    Returns why it was recycled, which the supervisor is told too; None if it was stopped.
    """
    recycler = Recycler(worker, max_memory_mb)

    def announce(ready: asyncio.Task[object]) -> None:
        if not ready.cancelled():  # cancelled: the worker stopped before it was ready
            # What the process made so far (modules, the app, its models' schemas) lives as
            # long as it: the cyclic collector need not look through it again.
            gc.freeze()
            supervisor.ready()

    ready = asyncio.create_task(worker.ready.wait())
    ready.add_done_callback(announce)
    watch = asyncio.create_task(recycler.watch())
    try:
        await worker.run(handle_signals=True)
    finally:
        ready.cancel()
        watch.cancel()
    if (why := recycler.why) is not None:
        supervisor.recycled(why)
    return why
