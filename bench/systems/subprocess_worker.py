"""Running a peer's own worker CLI as a subprocess (celery, dramatiq)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Mapping
from pathlib import Path
from typing import TypeVar

from bench import procs
from bench.probe import FIFO_ENV
from bench.systems.base import Context, Worker

T = TypeVar("T")
STOP_GRACE_S = 10.0


class SubprocessWorker(Worker):
    def __init__(self, proc: asyncio.subprocess.Process, log: Path, description: str):
        super().__init__(description)
        self.proc = proc
        self.log = log
        self.exited = asyncio.ensure_future(proc.wait())
        self.watch.append(self.exited)

    def peak_rss(self) -> tuple[float, int]:
        # Read while the workers are still alive: VmHWM disappears with them.
        return procs.tree_peak_rss_mb(self.proc.pid)

    async def until(self, awaitable: Awaitable[T]) -> T:
        try:
            return await super().until(awaitable)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{procs.tail(self.log, 1500)}") from None


@contextlib.asynccontextmanager
async def run_worker(
    ctx: Context, argv: list[str], env: Mapping[str, str], description: str, name: str
) -> AsyncIterator[SubprocessWorker]:
    """Start ``argv`` (with the probe FIFO in its environment) for the block's duration."""
    full_env = dict(os.environ)
    full_env.update(env)
    full_env[FIFO_ENV] = str(ctx.probe_fifo)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ctx.repo_root), full_env.get("PYTHONPATH", "")) if p
    )
    log = ctx.workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = await procs.spawn(
            argv, env=full_env, cwd=ctx.repo_root, stdout=out, stderr=subprocess.STDOUT
        )
        worker = SubprocessWorker(proc, log, description)
        try:
            yield worker
        finally:
            await procs.terminate(proc, grace_s=STOP_GRACE_S)
            worker.exited.cancel()
