"""The processes a soak runs: its nats-server and its two worker processes, each worker
lifetime (spawn to exit) on record."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.soak import app as soak_app
from taskframe._server import NatsServer, default_config
from taskframe.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
READY = "worker ready"


@dataclass
class Lifetime:
    """One worker process, from spawn to exit."""

    slot: int
    pid: int
    start: float
    log: str
    end: float | None = None
    ended_by: str = "running"  # kill9, sigterm, end (the final graceful stop), crashed
    exit_code: int | None = None


def _die_with_parent() -> None:
    """preexec_fn: the kernel kills the worker if this driver dies without cleaning up."""
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


class Processes:
    """The server (file store in `tmp`, the same port across restarts) and worker slots."""

    def __init__(self, tmp: Path, data: Path, concurrency: int, clock: float) -> None:
        self.tmp = tmp
        self.data = data
        self.store = tmp / "store"
        self.concurrency = concurrency
        self.t0 = clock
        self.server: NatsServer | None = None
        self.port = -1
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.lifetimes: list[Lifetime] = []

    def now(self) -> float:
        """Seconds since the run started."""
        return time.time() - self.t0

    @property
    def url(self) -> str:
        """The server's URL (its port stays the same across restarts)."""
        return f"nats://127.0.0.1:{self.port}"

    def start_server(self) -> None:
        """Start nats-server on its port (a free one the first time) and store."""
        server = NatsServer(port=self.port, store_dir=self.store, config=default_config())
        server.start()
        self.server, self.port = server, server.port

    def restart_server(self) -> None:
        """SIGKILL nats-server and start it again on the same port and store."""
        assert self.server is not None
        self.server.kill()
        for _ in range(20):  # the port may take a moment to be free again
            try:
                self.start_server()
                return
            except ConfigError:
                time.sleep(0.5)
        raise RuntimeError("nats-server did not come back on its port")

    def spawn_worker(self, slot: int) -> Lifetime:
        """Start `taskframe worker bench.soak.app:app` in worker slot `slot`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFRAME_")}
        env.update(SOAK_DIR=str(self.data), SOAK_NAMESPACE=soak_app.NAMESPACE)
        env["PYTHONUNBUFFERED"] = "1"
        n = sum(1 for lt in self.lifetimes if lt.slot == slot)
        log = self.tmp / f"worker{slot}-{n}.log"
        command = [sys.executable, "-m", "taskframe", "worker", "bench.soak.app:app"]
        command += ["--url", self.url, "--concurrency", str(self.concurrency), "--grace", "10"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.workers[slot] = proc
        lifetime = Lifetime(slot, proc.pid, self.now(), str(log))
        self.lifetimes.append(lifetime)
        return lifetime

    def lifetime_of(self, slot: int) -> Lifetime:
        """The latest lifetime of worker slot `slot`."""
        return next(lt for lt in reversed(self.lifetimes) if lt.slot == slot)

    async def wait_ready(self, lifetime: Lifetime, timeout: float = 60.0) -> None:
        """Wait until the worker logs that it is ready; fail if it exits first."""
        deadline = time.monotonic() + timeout
        proc = self.workers[lifetime.slot]
        # Small local files, read a few times a second: not worth a thread hop.
        while READY not in Path(lifetime.log).read_text(errors="replace"):  # noqa: ASYNC240
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(lifetime.log).read_text(errors="replace")[-2000:]  # noqa: ASYNC240
                raise RuntimeError(f"worker {lifetime.pid} did not get ready:\n{tail}")
            await asyncio.sleep(0.1)

    async def wait_exit(self, slot: int, timeout: float, how: str) -> None:
        """Wait for slot `slot`'s worker to exit (killing it after `timeout`), note how."""
        proc = self.workers[slot]
        deadline = time.monotonic() + timeout
        # Popen has no awaitable exit; polling a few times a second is enough here.
        while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if proc.poll() is None:  # the graceful stop overran: that is a finding, not a hang
            how += "+killed"
            proc.kill()
        lifetime = self.lifetime_of(slot)
        lifetime.end, lifetime.ended_by = self.now(), how
        lifetime.exit_code = proc.wait()

    async def stop_workers(self) -> None:
        """SIGTERM every worker and wait for each to drain and exit."""
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for slot in self.workers:
            if self.lifetime_of(slot).end is None:
                await self.wait_exit(slot, 30, "end")

    def kill_everything(self) -> None:
        """Last resort on the way out: nothing this run started may outlive it."""
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.server is not None:
            self.server.kill()
