"""nats-server and redis-server instances owned by one benchmark run.

Both bind to 127.0.0.1 on a free port, keep their data in the run's temporary
directory and are considered ready when they print their "ready" log line --
an event we wait for (bounded), rather than sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bench import procs

READY_TIMEOUT_S = 30.0


def free_port() -> int:
    """A currently unused loopback TCP port (tiny race until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_binary(name: str) -> str:
    """Locate a server binary, preferring the one next to our interpreter (the venv)."""
    import sys

    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found on PATH")
    return found


def binary_version(binary: str) -> str:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    return (out.stdout or out.stderr).strip()


@dataclass
class Server:
    name: str
    url: str
    version: str
    proc: asyncio.subprocess.Process
    log: Path


async def _drain_until_ready(
    stream: asyncio.StreamReader, log: Path, marker: bytes, ready: asyncio.Event
) -> None:
    """Copy server output to its log file; flag readiness when ``marker`` shows up."""
    with log.open("ab") as sink:
        while line := await stream.readline():
            sink.write(line)
            sink.flush()
            if marker in line:
                ready.set()


@contextlib.asynccontextmanager
async def _managed(
    name: str, argv: list[str], url: str, version: str, marker: bytes, workdir: Path
) -> AsyncIterator[Server]:
    log = workdir / f"{name}.log"
    proc = await procs.spawn(argv, stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    ready = asyncio.Event()
    drain = asyncio.create_task(_drain_until_ready(proc.stdout, log, marker, ready))
    try:
        exited = asyncio.create_task(proc.wait())
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait(
            {exited, waiter}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        exited.cancel()
        waiter.cancel()
        if not ready.is_set():
            reason = "exited" if exited in done else f"not ready after {READY_TIMEOUT_S}s"
            raise RuntimeError(f"{name} {reason}:\n{procs.tail(log)}")
        yield Server(name=name, url=url, version=version, proc=proc, log=log)
    finally:
        await procs.terminate(proc)
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain


@contextlib.asynccontextmanager
async def nats_server(workdir: Path) -> AsyncIterator[Server]:
    """JetStream-enabled nats-server with file storage in ``workdir/nats-store``."""
    binary = find_binary("nats-server")
    port = free_port()
    store = workdir / "nats-store"
    store.mkdir(parents=True, exist_ok=True)
    argv = [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    async with _managed(
        "nats-server",
        argv,
        f"nats://127.0.0.1:{port}",
        binary_version(binary),
        b"Server is ready",
        workdir,
    ) as server:
        yield server


@contextlib.asynccontextmanager
async def redis_server(workdir: Path) -> AsyncIterator[Server]:
    """redis-server without persistence (no RDB snapshots, no AOF)."""
    binary = find_binary("redis-server")
    port = free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--daemonize",
        "no",
    ]
    async with _managed(
        "redis-server",
        argv,
        f"redis://127.0.0.1:{port}/0",
        binary_version(binary),
        b"Ready to accept connections",
        workdir,
    ) as server:
        yield server
