"""Helpers for tests that run the real `taskframe` CLI in subprocesses.

    with Procs(tmp_path, namespace) as procs:    # kills whatever is left at the end
        worker = procs.worker(url, concurrency=2)  # taskframe worker tests.fault_apps:app
        await worker.wait_log("worker ready")
        ...
        assert procs.journal.count("done", task_id) == 1

Every wait polls a real condition (a log line, a journal line, a process exit) with
`taskframe.testing.eventually`, so a test that goes wrong fails with a message instead
of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from taskframe import Client
from taskframe.testing import eventually
from tests.journal import Journal

REPO = Path(__file__).resolve().parent.parent
APP = "tests.fault_apps:app"
TASKFRAME = (sys.executable, "-m", "taskframe")
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("taskframe"))


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

        await eventually(seen, f"{pattern!r} x{count} in the log of {self!r}", timeout=timeout)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit and return its exit code (-N: killed by signal N)."""
        await eventually(lambda: not self.alive, f"{self!r} to exit", timeout=timeout)
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
    """The subprocesses of one test, sharing its namespace and the handlers' journal."""

    def __init__(self, tmp: Path, namespace: str) -> None:
        self.tmp = tmp
        self.namespace = namespace
        self.journal = Journal(tmp / "journal.txt")
        self.procs: list[Proc] = []

    def env(self, ack_wait: float | None = 1.0, **extra: str) -> dict[str, str]:
        """The environment of a subprocess: no inherited TASKFRAME_* settings, and this
        checkout first on the path (a console script would import the installed package)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFRAME_")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])]),
            TEST_NAMESPACE=self.namespace,
            TEST_JOURNAL=str(self.journal.path),
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
        ack_wait: float | None = 1.0,
        extra: tuple[str, ...] = (),
        **env: str,
    ) -> Proc:
        """Start `python -m taskframe worker tests.fault_apps:app` against `url`.

        `ack_wait=None` leaves the default (10 s); `env` adds variables, for instance
        TASKFRAME_PING_INTERVAL.
        """
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
            **env,
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
        """Kill and reap every process still running; close the journal."""
        for proc in self.procs:
            proc.close()
        self.journal.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def drained(client: Client, queue: str) -> bool:
    """Whether `queue` has nothing waiting and nothing in flight, summed over its lanes."""
    [info] = [q for q in await client.queues() if q.queue == queue]
    return info.waiting == info.in_flight == 0


async def until_drained(client: Client, queue: str, timeout: float = 10.0) -> None:
    """Wait until `queue` has nothing waiting and nothing in flight."""
    await eventually(lambda: drained(client, queue), f"queue {queue} to drain", timeout=timeout)


@dataclass(frozen=True, slots=True)
class Write:
    """One write to a KV bucket, as a subscriber to the bucket's subjects saw it go by."""

    key: str
    record: dict[str, Any]
    """The JSON body: a status record or a claim ({} for a body that is not a JSON object)."""
    at: float
    """Wall-clock time it was seen, which is about when the server got it."""
    conditional: bool = False
    """A compare-and-set (`Nats-Expected-Last-Subject-Sequence`): the stream may have refused it."""
    final: bool = True
    """Written to the bucket's key; False for a non-final status on `<ns>.progress.<id>`."""

    @property
    def state(self) -> str:
        """The record's `state` ("" if it has none)."""
        return str(self.record.get("state", ""))

    @property
    def attempt(self) -> int:
        """A status record's `attempt` (0 if it has none)."""
        return int(self.record.get("attempt", 0))


class BucketTap:
    """Every write to one KV bucket while the tap is open, in the order the server relays them.

        async with BucketTap(client, topology.results_bucket(ns)) as statuses:
            ...
            await statuses.caught_up()
            assert [w.attempt for w in statuses.writes(task_id, "succeeded")] == [2]

    A plain subscription on `$KV.<bucket>.>`, not a KV watcher or an ordered consumer: the
    buckets keep one message per key, and a consumer that reaches a key after a newer write
    replaced it never sees the older one, so a burst of stale writes (a worker's buffered
    bytes arriving after a partition heals) would go unseen. The subscription sees every
    publish; `caught_up` checks against the stream's sequence that none went by unseen.
    It also sees publishes the stream refused: status records are written unconditionally,
    so each one seen was stored, but claims are compare-and-set (`Write.conditional`), so
    a claim write seen is only a write attempted. The bucket must exist (a worker creates
    both buckets when it starts).
    """

    def __init__(self, client: Client, bucket: str, progress: str | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.progress = progress
        """A prefix of subjects stored in the same stream beside the keys (`<ns>.progress.`)."""
        self._subs: list[Subscription] = []
        self._writes: list[Write] = []
        self._base = 0

    def __repr__(self) -> str:
        return f"<BucketTap {self.bucket} writes={len(self._writes)}>"

    async def __aenter__(self) -> Self:
        prefix = f"$KV.{self.bucket}."

        async def seen(msg: Msg) -> None:
            try:
                record = json.loads(msg.data) if msg.data else {}
            except ValueError:
                record = {}
            record = record if isinstance(record, dict) else {}
            conditional = "Nats-Expected-Last-Subject-Sequence" in (msg.headers or {})
            final = msg.subject.startswith(prefix)
            key = msg.subject.removeprefix(prefix if final else self.progress or "")
            self._writes.append(Write(key, record, time.time(), conditional, final))

        nc = self.client.nc
        for subjects in (prefix, self.progress):
            if subjects:
                sub = await nc.subscribe(subjects + ">", cb=seen, pending_msgs_limit=-1)
                self._subs.append(sub)
        await nc.flush()  # subscribed before the count starts: nothing stored after it is missed
        self._base = await self._stored()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()

    async def _stored(self) -> int:
        info = await self.client.js.stream_info(f"KV_{self.bucket}")
        return info.state.last_seq

    async def caught_up(self, timeout: float = 10.0) -> None:
        """Wait until every write the stream stored since the tap opened has been seen."""

        async def seen_all() -> bool:
            return len(self._writes) >= await self._stored() - self._base

        await eventually(seen_all, f"{self!r} to see every stored write", timeout=timeout)

    def writes(self, key: str | None = None, state: str | None = None) -> list[Write]:
        """The writes seen so far, in order, optionally of one key and one state."""
        return [
            w
            for w in self._writes
            if (key is None or w.key == key) and (state is None or w.state == state)
        ]


@dataclass(frozen=True, slots=True)
class Settle:
    """One acknowledgement a client sent for a delivery (its body's first word)."""

    kind: str
    """+ACK, -NAK, +TERM, +WPI (in progress) or +NXT."""
    consumer: str
    delivered: int
    """Which delivery of the message it answers: 1 for the first."""
    stream_seq: int
    at: float


class AckTap:
    """Every ack, nak, term and in-progress that any client sends for one stream's messages.

    A plain subscription on `$JS.ACK.>`: an acknowledgement is an ordinary publish to the
    delivery's reply subject, so a second subscriber sees it as the server does. The
    subject names the delivery count, which tells whose delivery it answered when each
    delivery went to a known worker (the first ones to worker A, say).
    """

    SETTLES = ("+ACK", "-NAK", "+TERM")

    def __init__(self, client: Client, stream: str) -> None:
        self.client = client
        self.stream = stream
        self._seen: list[Settle] = []
        self._sub: Subscription | None = None

    def __repr__(self) -> str:
        return f"<AckTap {self.stream} seen={len(self._seen)}>"

    async def __aenter__(self) -> Self:
        async def seen(msg: Msg) -> None:
            # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or with
            # <domain>.<account hash> after ACK and a trailing token.
            tokens = msg.subject.split(".")
            offset = 2 if len(tokens) >= 11 else 0
            if len(tokens) < 9 or tokens[2 + offset] != self.stream:
                return
            words = msg.data.split(maxsplit=1)
            kind = words[0].decode(errors="replace") if words else "+ACK"
            self._seen.append(
                Settle(
                    kind,
                    tokens[3 + offset],
                    int(tokens[4 + offset]),
                    int(tokens[5 + offset]),
                    time.time(),
                )
            )

        self._sub = await self.client.nc.subscribe("$JS.ACK.>", cb=seen, pending_msgs_limit=-1)
        await self.client.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def seen(
        self, *, delivered: int | None = None, kinds: tuple[str, ...] = SETTLES
    ) -> list[Settle]:
        """Acknowledgements seen so far, of `kinds` (settles by default), of one delivery."""
        return [
            s
            for s in self._seen
            if s.kind in kinds and (delivered is None or s.delivered == delivered)
        ]
