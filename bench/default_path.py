"""The default path against raw nats-py: a CLI worker whose task keeps its result.

`python -m bench.same_work --default-path` runs, per round and interleaved on one
nats-server (file storage), four drains of an N-task backlog stored before the consumer
starts:

* ``raw pull+ack`` — raw nats-py's continuous pull (pull requests kept outstanding for up to
  750 messages, as ``bench.same_work``'s requests of 500 renewed below 250), each message's
  JSON body validated with pydantic in the subscription callback, then ``ack()``; on a
  stream and consumer configured exactly as taskframe's, with the same messages (a UUID
  ``Nats-Msg-Id`` header and the task's JSON body);
* ``raw pull+KV put+ack`` — the same, plus what a task that keeps its result costs on the
  wire: one status record (about 150 bytes of JSON) put under the task's id into a
  stream configured exactly as taskframe's results bucket
  (`taskframe._stream_configs.results_config`), published pipelined with a reply inbox, and the
  task acked only once the PubAck of its own record arrived. At most ``--kv-window``
  messages (default 1024) are requested or awaiting their PubAck at once; a taskframe
  worker with default options holds at most 64 running + an adaptive prefetch of 64-960
  waiting, and up to 1024 more whose ack awaits their record's confirmation;
* ``taskframe worker (CLI), result kept`` — ``python -m taskframe worker
  bench.default_path_app:app`` as a subprocess with default options;
* ``taskframe worker (CLI), results=False`` — the same task served with ``results=False``.

Rates: from the first delivery to the last ack, so a consumer's start-up is not counted but
all of its work on the N tasks is. Raw loops time themselves: ``N / (last ack - first
delivery)``. The CLI worker is timed from outside by polling its consumer every 5 ms: from
the first poll that sees tasks delivered to the first that sees all N acked, counting the
tasks not yet acked at the first. CPU per task: user + system time of the consuming
process (the bench process for raw loops) and of nats-server over the same span.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import BaseModel

from bench import procs
from bench.default_path_app import NAMESPACE_ENV, QUEUE, RESULTS_ENV, TASK_NAME, Noop, build_app
from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe import connect, provision
from taskframe._server import NatsServer, server_binary
from taskframe._topology import QueueOptions
from taskframe.settings import Settings

REPO = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
_POLL = 0.005
_DRAIN_TIMEOUT = 300.0


class _Body(BaseModel):
    n: int


@dataclass
class Drain:
    """One drained backlog: rate and CPU per task."""

    row: str
    n: int
    rate: float
    """Tasks acked per second."""
    worker_us: float
    """CPU of the consuming process per task (us)."""
    server_us: float
    """CPU of nats-server per task (us)."""
    worker_switches: float = 0.0
    """Context switches of the consuming process per task."""
    server_switches: float = 0.0
    """Context switches of nats-server (all threads) per task."""
    stored: int | None = None
    """Records in the results stream afterwards (None: no results kept)."""
    extra: dict[str, float] = field(default_factory=dict)
    """More figures, for callers that measure more (throwaway experiments)."""


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_switches(pid: int) -> int:
    """Context switches of process `pid` so far, over all its threads (wake-ups, mostly)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in status.splitlines():
            if "ctxt_switches:" in line:
                total += int(line.split()[1])
    return total


class _Span:
    """CPU and context switches of the consumer and the server between `start()` and `stop()`."""

    def __init__(self, server_pid: int, worker_pid: int | None) -> None:
        self._server = server_pid
        self._worker = worker_pid  # None: this process
        self.started = self.stopped = 0.0
        self._at_start = (0.0, 0.0, 0, 0)
        self.worker_cpu = self.server_cpu = 0.0
        self.worker_switches = self.server_switches = 0

    def _read(self) -> tuple[float, float, int, int]:
        worker = self._worker or os.getpid()
        mine = time.process_time() if self._worker is None else proc_cpu(worker)
        return mine, proc_cpu(self._server), proc_switches(worker), proc_switches(self._server)

    def start(self) -> None:
        """Mark the span's start."""
        self.started = time.perf_counter()
        self._at_start = self._read()

    def stop(self) -> None:
        """Mark the span's end."""
        self.stopped = time.perf_counter()
        now, then = self._read(), self._at_start
        self.worker_cpu, self.server_cpu = now[0] - then[0], now[1] - then[1]
        self.worker_switches, self.server_switches = now[2] - then[2], now[3] - then[3]


def _settings(namespace: str) -> Settings:
    return Settings(namespace=namespace)


async def _provision_raw(nc: NATS, namespace: str, results: bool) -> tuple[str, str]:
    """taskframe's queue stream and consumer (and results stream) for a raw loop."""
    js = nc.jetstream()
    settings = _settings(namespace)
    await js.add_stream(configs.queue_config(settings, QUEUE))
    _, consumer = configs.lane_configs(
        settings, QUEUE, QueueOptions(), topology.DEFAULT_MAX_IN_FLIGHT
    )[0]
    stream = topology.queue_stream(namespace, QUEUE)
    await js.add_consumer(stream, consumer)
    if results:
        await js.add_stream(configs.results_config(settings))
    assert consumer.name is not None
    return stream, consumer.name


async def _fill_raw(nc: NATS, namespace: str, n: int, window: int = 4000) -> None:
    """Store `n` task messages as `enqueue_many` would: UUID `Nats-Msg-Id`, JSON body."""
    prefix = nc.new_inbox() + "."
    confirmed = 0
    errors: list[bytes] = []
    room = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        nonlocal confirmed
        if not msg.data or b'"error"' in msg.data:
            errors.append(msg.data)
        confirmed += 1
        room.set()

    sub = await nc.subscribe(prefix + "*", cb=on_reply, pending_msgs_limit=-1)
    subject = f"{namespace}.tasks.{QUEUE}.{TASK_NAME}"
    for i in range(n):
        while i - confirmed >= window:
            room.clear()
            await asyncio.wait_for(room.wait(), 30)
        body = Noop(n=i).model_dump_json().encode()
        task_id = _task_id()
        await nc.publish(subject, body, reply=f"{prefix}{i}", headers={"Nats-Msg-Id": task_id})
    while confirmed < n:
        room.clear()
        await asyncio.wait_for(room.wait(), 30)
    await sub.unsubscribe()
    if errors:
        raise RuntimeError(f"{len(errors)} enqueues refused: {errors[0]!r}")


def _task_id() -> str:
    """A UUIDv7-shaped id, as taskframe gives a task."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-{h[16:20]}-{h[20:]}"


async def _stream_messages(nc: NATS, stream: str) -> int:
    info = await nc.jetstream().stream_info(stream)
    return int(info.state.messages)


async def _left(nc: NATS, stream: str) -> int:
    """Messages left in a work stream, once acks sent just now were applied (up to 5 s)."""
    await nc.flush()
    for _ in range(100):
        left = await _stream_messages(nc, stream)
        if not left:
            break
        await asyncio.sleep(0.05)
    return left


async def _remove(nc: NATS, *streams: str) -> None:
    js = nc.jetstream()
    for stream in streams:
        try:
            await js.delete_stream(stream)
        except Exception as exc:  # already gone is fine; anything else is worth a line
            print(f"  (could not delete {stream}: {exc!r})", file=sys.stderr)


class _RawLoop:
    """A raw continuous pull: requests kept outstanding on one inbox, handled inline.

    `handle(msg)` gets every delivery; whoever settles a message calls `settled()`. The
    pull asks for more whenever at least a quarter of `window` is free, where `window`
    bounds held (delivered, unsettled) plus requested-but-undelivered messages.
    """

    def __init__(self, nc: NATS, stream: str, consumer: str, n: int, window: int) -> None:
        self.nc = nc
        self.n = n
        self.window = window
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.pending = 0  # asked for, not delivered
        self.held = 0  # delivered, not settled
        self.count = 0
        self.done = asyncio.Event()
        self._wanted = asyncio.Event()
        self.first = 0.0
        self.last = 0.0
        self.span: _Span | None = None
        """Started at the first delivery, stopped at the last ack."""
        self.delivered_any = False
        self.inbox = ""

    def settled(self) -> None:
        """One message was acked."""
        self.held -= 1
        self.count += 1
        if self.count == self.n:
            if self.span is not None:
                self.span.stop()
            self.done.set()
        if self.window - self.held - self.pending >= self.window // 4:
            self._wanted.set()

    def delivered(self, msg: Msg) -> bool:
        """Account for a delivery; False for a status message (the request ended)."""
        if not msg.reply:
            headers = msg.headers or {}
            if headers.get("Status") != "100":
                owed = int(headers.get("Nats-Pending-Messages", "0") or 0)
                self.pending = max(0, self.pending - owed)
                self._wanted.set()
            return False
        self.pending -= 1
        self.held += 1
        if not self.delivered_any:
            self.delivered_any = True
            if self.span is not None:
                self.span.start()
        return True

    async def pull(self) -> None:
        """Keep requests outstanding until every message was settled."""
        while not self.done.is_set():
            free = self.window - self.held - self.pending
            if free >= self.window // 4:
                request = json.dumps({"batch": free, "expires": 5_000_000_000}).encode()
                await self.nc.publish(self._next, request, reply=self.inbox)
                self.pending += free
            self._wanted.clear()
            await self._wanted.wait()

    async def run(self, handle: Callable[[Msg], Awaitable[None]]) -> None:
        """Subscribe, pull, and wait until `n` messages were settled."""
        self.inbox = self.nc.new_inbox()

        async def on_msg(msg: Msg) -> None:
            if self.delivered(msg):
                await handle(msg)

        sub = await self.nc.subscribe(self.inbox, cb=on_msg, pending_msgs_limit=-1)
        puller = asyncio.create_task(self.pull())
        try:
            await asyncio.wait_for(self.done.wait(), _DRAIN_TIMEOUT)
        finally:
            puller.cancel()
            await sub.unsubscribe()


async def raw_pull(url: str, tag: str, n: int, server_pid: int, window: int = 750) -> Drain:
    """Raw continuous pull, pydantic decode, ack inline (no result stored)."""
    namespace = f"rp{tag}"
    nc = await nats.connect(url)
    try:
        stream, consumer = await _provision_raw(nc, namespace, results=False)
        await _fill_raw(nc, namespace, n)
        loop = _RawLoop(nc, stream, consumer, n, window)
        loop.span = span = _Span(server_pid, None)

        async def handle(msg: Msg) -> None:
            _Body.model_validate_json(msg.data)
            await msg.ack()
            loop.settled()

        await loop.run(handle)
        left = await _left(nc, stream)
        await _remove(nc, stream)
    finally:
        await nc.close()
    if left:
        raise RuntimeError(f"raw pull: {left} messages left in {stream}")
    return _drain("raw pull+ack", n, n, span)


def _record(task_id: str, result: int) -> bytes:
    """A status record as a raw user would write it: the same fields and size as taskframe's."""
    return json.dumps(
        {
            "id": task_id,
            "task": TASK_NAME,
            "state": "succeeded",
            "attempt": 1,
            "updated_at": datetime.now(UTC).isoformat(timespec="microseconds"),
            "error": None,
            "result": result,
        },
        separators=(",", ":"),
    ).encode()


async def raw_kv(url: str, tag: str, n: int, server_pid: int, window: int = 1024) -> Drain:
    """Raw continuous pull, decode, one pipelined KV put per message, ack on its PubAck."""
    namespace = f"rk{tag}"
    nc = await nats.connect(url)
    try:
        stream, consumer = await _provision_raw(nc, namespace, results=True)
        await _fill_raw(nc, namespace, n)
        loop = _RawLoop(nc, stream, consumer, n, window)
        loop.span = span = _Span(server_pid, None)
        key_prefix = f"$KV.{topology.results_bucket(namespace)}."
        reply_prefix = nc.new_inbox() + "."
        cut = len(reply_prefix)
        held: dict[str, Msg] = {}
        tokens = itertools.count()
        refused: list[bytes] = []

        async def on_puback(reply: Msg) -> None:
            msg = held.pop(reply.subject[cut:])
            if not reply.data or b'"error"' in reply.data:
                refused.append(reply.data)  # not stored: the task must not be acked
                loop.done.set()  # and the run is void
                return
            await msg.ack()
            loop.settled()

        async def handle(msg: Msg) -> None:
            body = _Body.model_validate_json(msg.data)
            task_id = (msg.headers or {})["Nats-Msg-Id"]
            token = str(next(tokens))
            held[token] = msg
            record = _record(task_id, body.n)
            await nc.publish(key_prefix + task_id, record, reply=reply_prefix + token)

        acks = await nc.subscribe(reply_prefix + "*", cb=on_puback, pending_msgs_limit=-1)
        await loop.run(handle)
        await acks.unsubscribe()
        if refused:
            raise RuntimeError(f"raw KV: {len(refused)} puts refused: {refused[0]!r}")
        left = await _left(nc, stream)
        results = f"KV_{topology.results_bucket(namespace)}"
        stored = await _stream_messages(nc, results)
        await _remove(nc, stream, results)
    finally:
        await nc.close()
    if left:
        raise RuntimeError(f"raw KV: {left} messages left in {stream}")
    return _drain(f"raw pull+KV put+ack (window {window})", n, n, span, stored)


def _drain(row: str, n: int, acked: int, span: _Span, stored: int | None = None) -> Drain:
    """A `Drain` from `acked` tasks acked during `span`."""
    elapsed = span.stopped - span.started
    return Drain(
        row=row,
        n=n,
        rate=acked / elapsed,
        worker_us=span.worker_cpu / acked * 1e6,
        server_us=span.server_cpu / acked * 1e6,
        worker_switches=span.worker_switches / acked,
        server_switches=span.server_switches / acked,
        stored=stored,
    )


def worker_argv() -> list[str]:
    """The worker command users run (`taskframe worker module:app`), default options."""
    return [sys.executable, "-m", "taskframe", "worker", "bench.default_path_app:app"]


async def cli(
    url: str,
    tag: str,
    n: int,
    server_pid: int,
    *,
    results: bool,
    argv: Sequence[str] | None = None,
    row: str | None = None,
    env: dict[str, str] | None = None,
) -> Drain:
    """Store a backlog with `enqueue_many`, then drain it with a `taskframe worker` process.

    `argv` replaces the worker command (throwaway experiments run a patched worker);
    `env` adds to its environment.
    """
    namespace = f"{'cr' if results else 'cn'}{tag}"
    app = build_app(namespace, results=results)
    async with connect(url, namespace=namespace) as client:
        await provision(app, client)  # as `taskframe provision` before a deploy
        await client.enqueue_many(Noop(n=i) for i in range(n))
    nc = await nats.connect(url)
    stream = topology.queue_stream(namespace, QUEUE)
    info = topology.consumer_info_subject(stream, topology.WORKERS)
    full_env = {
        **os.environ,
        "TASKFRAME_URL": url,
        NAMESPACE_ENV: namespace,
        RESULTS_ENV: "1" if results else "0",
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p),
        **(env or {}),
    }
    with tempfile.NamedTemporaryFile(prefix="dp-worker-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        proc = await procs.spawn(
            list(argv or worker_argv()), env=full_env, cwd=REPO, stdout=log, stderr=log
        )
    try:
        span = _Span(server_pid, proc.pid)
        first_done = await _watch(nc, info, n, span, proc, log_path)
    finally:
        await procs.terminate(proc, grace_s=40)
        os.remove(log_path)  # a failed watch quoted its tail already
    try:
        left = await _left(nc, stream)
        kv = f"KV_{topology.results_bucket(namespace)}"
        stored = await _stream_messages(nc, kv)
        dead = await _stream_messages(nc, topology.dead_stream(namespace))
        await _remove(nc, stream, kv, topology.dead_stream(namespace))
    finally:
        await nc.close()
    if left or dead or (results and stored != n):
        raise RuntimeError(f"CLI worker: {left} left, {dead} dead, {stored} stored of {n}")
    label = row or f"taskframe worker (CLI), {'result kept' if results else 'results=False'}"
    return _drain(label, n, n - first_done, span, stored if results else None)


async def _watch(
    nc: NATS, info: str, n: int, span: _Span, proc: asyncio.subprocess.Process, log: Path
) -> int:
    """Poll the consumer until every task is acked; return how many were at the span's start.

    The span starts at the first poll that sees tasks delivered, and ends at the first that
    sees every task acked.
    """
    first_done = -1
    deadline = time.monotonic() + _DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"worker exited {proc.returncode}:\n{procs.tail(log)}")
        reply = await nc.request(info, b"", timeout=5)
        state = json.loads(reply.data)
        if "error" not in state:
            done = n - state["num_pending"] - state["num_ack_pending"]
            if first_done < 0 and state["num_pending"] < n:  # the first deliveries went out
                span.start()
                first_done = done
            if done >= n:
                span.stop()
                return first_done
        await asyncio.sleep(_POLL)
    raise RuntimeError(f"worker did not drain {n} tasks in {_DRAIN_TIMEOUT}s:\n{procs.tail(log)}")


async def measure(
    url: str, server_pid: int, n: int, rounds: int, kv_window: int = 1024
) -> dict[str, list[Drain]]:
    """Every row once per round, interleaved; each round starts one row later than the last.

    Rows, in table order (the first two are the references every ratio is taken to): raw
    pull + ack, raw pull + KV put + ack, the CLI worker keeping results, and without.
    """
    rows: dict[str, Callable[[str], Awaitable[Drain]]] = {
        "raw-pull": lambda tag: raw_pull(url, tag, n, server_pid),
        "raw-kv": lambda tag: raw_kv(url, tag, n, server_pid, kv_window),
        "cli-result": lambda tag: cli(url, tag, n, server_pid, results=True),
        "cli-noresult": lambda tag: cli(url, tag, n, server_pid, results=False),
    }
    names = list(rows)
    drains: dict[str, list[Drain]] = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for position, name in enumerate(order):
            drain = await rows[name](f"{index}x{position}")
            drains[name].append(drain)
            print(
                f"round {index + 1} {drain.row}: {drain.rate:,.0f}/s, worker "
                f"{drain.worker_us:.1f} us/task, server {drain.server_us:.1f} us/task",
                flush=True,
            )
    return drains


def _code_state() -> str:
    """The commit measured, and whether taskframe/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "taskframe"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
    except OSError:
        return "unknown commit"
    if not dirty:
        return f"`{head}`"
    return f"`{head}` plus uncommitted changes to {len(dirty)} file(s) under taskframe/"


def _versions() -> str:
    server = subprocess.run(
        [server_binary(), "--version"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"Python {platform.python_version()}, nats-py {metadata.version('nats-py')}, "
        f"pydantic {metadata.version('pydantic')}, {server or 'nats-server ?'}"
    )


def report(
    drains: dict[str, list[Drain]], command: str, n: int, rounds: int, loads: tuple[float, float]
) -> str:
    """The markdown report: medians with ratios to both raw references, then every round."""
    names = list(drains)
    pull, kv = drains[names[0]], drains[names[1]]
    median_pull = statistics.median(d.rate for d in pull)
    median_kv = statistics.median(d.rate for d in kv)
    lines = [
        "# The default path: a CLI worker whose task keeps its result, against raw nats-py",
        "",
        f"    {command}",
        "",
        f"{n:,} no-op tasks per drain, {rounds} rounds, rows interleaved (each round starts one",
        "row later), one nats-server (file storage) for the whole run.",
        f"{os.cpu_count()} CPUs, load average {loads[0]:.2f} before and {loads[1]:.2f} after.",
        f"{_versions()}; code at {_code_state()}.",
        "",
        "Every row drains a backlog stored before its consumer started; see",
        "`bench/default_path.py` for exact definitions. Ratios are of medians; the per-round",
        "columns give the range of the same-round ratios. CPU is user + system time per task",
        "while draining, of the consuming process (the bench process for raw loops) and of",
        "nats-server.",
        "",
        "| loop | tasks/s | x raw pull | x raw KV | per round x raw pull | per round x raw KV "
        "| worker CPU us/task | server CPU us/task |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        rows = drains[name]
        rate = statistics.median(d.rate for d in rows)
        to_pull = [d.rate / p.rate for d, p in zip(rows, pull, strict=True)]
        to_kv = [d.rate / k.rate for d, k in zip(rows, kv, strict=True)]
        lines.append(
            f"| {rows[0].row} | {rate:,.0f} | {rate / median_pull:.2f} | {rate / median_kv:.2f} "
            f"| {min(to_pull):.2f}-{max(to_pull):.2f} | {min(to_kv):.2f}-{max(to_kv):.2f} "
            f"| {statistics.median(d.worker_us for d in rows):.0f} "
            f"| {statistics.median(d.server_us for d in rows):.0f} |"
        )
    lines += [
        "",
        "## Every round (tasks/s; ratio to the same round's raw pull and raw KV)",
        "",
        "| round | " + " | ".join(drains[name][0].row for name in names) + " |",
        "| ---: |" + " ---: |" * len(names),
    ]
    for index in range(rounds):
        cells = []
        for name in names:
            drain = drains[name][index]
            cells.append(
                f"{drain.rate:,.0f} ({drain.rate / pull[index].rate:.2f}, "
                f"{drain.rate / kv[index].rate:.2f})"
            )
        lines.append(f"| {index + 1} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Context switches per task (consumer / nats-server, medians): "
        + "; ".join(
            f"{drains[name][0].row} "
            f"{statistics.median(d.worker_switches for d in drains[name]):.2f} / "
            f"{statistics.median(d.server_switches for d in drains[name]):.2f}"
            for name in names
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def run(n: int, rounds: int, out: Path, kv_window: int = 1024) -> None:
    """Start a nats-server, measure every row `rounds` times, print and write the report."""
    command = f"python -m bench.same_work --default-path --n {n} --rounds {rounds}"
    if kv_window != 1024:
        command += f" --kv-window {kv_window}"
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as store, NatsServer(port=-1, store_dir=store) as server:
        assert server.process is not None
        drains = asyncio.run(measure(server.url, server.process.pid, n, rounds, kv_window))
    text = report(drains, command, n, rounds, (before, os.getloadavg()[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
