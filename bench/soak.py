"""A bounded soak: steady load on 2 worker processes with periodic faults, for N minutes.

    python -m bench.soak --minutes 10 --out bench/results/soak

It starts its own nats-server (file storage, temporary store, free loopback port), two
`python -m taskframe worker bench.soak_app:app` processes and a producer in this process,
and while the producer keeps a steady mix of tasks and events going it injects faults:

    every --kill-every s    SIGKILL a victim worker, restart it at once
    every --term-every s    SIGTERM a victim worker (graceful drain), restart it when it exits
    every --server-every s  SIGKILL nats-server, restart it on the same port and store

Victims are worker slot 1 by default, so slot 0 lives through the whole run (seeing every
server restart and every redelivery of its peer's tasks): a leak needs a long lifetime to
show, and a process killed every minute would hide one.

Every 2 s it records each worker's RSS, open fds and threads from /proc, the in-process
probe's asyncio task count and gc object count (see bench/soak_app.py), and the totals:
tasks acknowledged by the server, completed, pending, dead, enqueue failures. At the end
it drains, checks the ledger (every acknowledged task completed, or is an intended dead
letter) and fits a line to RSS and task count over the last 2/3 of each worker lifetime.
Writes soak.md (tables and ASCII charts) and soak.json (raw samples) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import taskframe
from bench import soak_app
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._server import NatsServer, default_config
from taskframe.client import Client, TaskRun
from taskframe.errors import ConfigError, TaskframeError

REPO = Path(__file__).resolve().parent.parent
READY = "worker ready"
# Share of the task rate per kind; Doomed is the only task meant to end as a dead letter.
MIX = {"noop": 0.60, "sleepy": 0.25, "doubler": 0.10, "flaky": 0.045, "doomed": 0.005}
RSS_FLAG_MB_PER_MIN = 1.0
TASKS_FLAG_PER_MIN = 1.0
MIN_TREND_LIFETIME = 120.0  # seconds; shorter lifetimes are dominated by warm-up
LOST_AFTER = 60.0  # an acked task not completed after this long counts as lost so far
SPARK = "▁▂▃▄▅▆▇█"


@dataclass
class Options:
    minutes: float
    out: Path
    rate: float
    event_rate: float
    concurrency: int
    kill_every: float
    term_every: float
    server_every: float
    victims: list[int]
    sample_every: float
    drain_timeout: float
    seed: int
    render: Path | None = None  # only re-render soak.md from this soak.json


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


@dataclass
class Fault:
    t: float
    kind: str
    target: str
    recovered_after: float  # seconds until the replacement was ready (worker or server)


@dataclass
class Ledger:
    """What the producer had confirmed and what the workers wrote down."""

    acked: dict[str, str] = field(default_factory=dict)  # task id -> kind
    acked_at: dict[str, float] = field(default_factory=dict)  # pending only: id -> time
    events: dict[str, set[str]] = field(default_factory=dict)  # event id -> groups missing
    event_at: dict[str, float] = field(default_factory=dict)
    done: Counter[str] = field(default_factory=Counter)  # id -> completions
    rejected: set[str] = field(default_factory=set)
    event_seen: Counter[str] = field(default_factory=Counter)  # "group id" -> deliveries
    ticks: list[float] = field(default_factory=list)
    fails: int = 0
    enqueue_failed: int = 0
    publish_failed: int = 0
    skipped_ticks: int = 0
    results_ok: int = 0
    results_bad: int = 0
    results_timeout: int = 0
    offsets: dict[str, int] = field(default_factory=dict)

    def ingest(self, directory: Path) -> None:
        """Read the complete lines the workers appended since the last call."""
        for path in sorted(directory.glob("ledger-*.txt")):
            for line in _new_lines(path, self.offsets):
                parts = line.split()
                if len(parts) != 4:
                    continue
                kind, task_id, _attempt, at = parts
                if kind == "done":
                    self.done[task_id] += 1
                    self.acked_at.pop(task_id, None)
                elif kind == "reject":
                    self.rejected.add(task_id)
                    self.acked_at.pop(task_id, None)
                elif kind == "fail":
                    self.fails += 1
                elif kind == "tick":
                    self.ticks.append(float(at))
                elif kind in ("alpha", "beta"):
                    self.event_seen[f"{kind} {task_id}"] += 1
                    missing = self.events.get(task_id)
                    if missing is not None:
                        missing.discard(kind)
                        if not missing:
                            self.event_at.pop(task_id, None)

    def pending(self) -> int:
        return len(self.acked_at) + len(self.event_at)

    def overdue(self, now: float) -> int:
        late = sum(1 for t in self.acked_at.values() if now - t > LOST_AFTER)
        return late + sum(1 for t in self.event_at.values() if now - t > LOST_AFTER)


def _new_lines(path: Path, offsets: dict[str, int]) -> list[str]:
    """Whole lines appended to `path` since the offset remembered for it."""
    key = str(path)
    with path.open("rb") as f:
        f.seek(offsets.get(key, 0))
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
    offsets[key] = offsets.get(key, 0) + end
    return data[:end].decode().splitlines()


def _die_with_parent() -> None:
    """preexec_fn: the kernel kills the worker if this driver dies without cleaning up."""
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _proc_status(pid: int) -> dict[str, int] | None:
    """RSS (kB), threads and open fds of `pid` from /proc, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "Threads"):
            values[key] = int(rest.split()[0])
    return {"rss_kb": values.get("VmRSS", 0), "threads": values.get("Threads", 0), "fds": fds}


class Soak:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.tmp = Path(tempfile.mkdtemp(prefix="tf-soak-"))
        self.data = self.tmp / "data"
        self.data.mkdir()
        self.store = self.tmp / "store"
        self.config = default_config()
        self.server: NatsServer | None = None
        self.port = -1
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.lifetimes: list[Lifetime] = []
        self.faults: list[Fault] = []
        self.ledger = Ledger()
        self.t0 = time.time()
        self.totals: list[dict[str, Any]] = []
        self.proc_samples: list[dict[str, Any]] = []
        self.probe_samples: list[dict[str, Any]] = []
        self.probe_offsets: dict[str, int] = {}
        self.stop = asyncio.Event()
        self.interrupted = False
        self.rng = random.Random(opts.seed)
        self.waiters: set[asyncio.Task[None]] = set()
        self.batches: set[asyncio.Task[None]] = set()
        self.dead_ids: dict[str, str] = {}
        self.server_rss: list[tuple[float, int]] = []

    def now(self) -> float:
        return time.time() - self.t0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    # -- processes ------------------------------------------------------------------------

    def start_server(self) -> None:
        server = NatsServer(port=self.port, store_dir=self.store, config=self.config)
        server.start()
        self.server, self.port = server, server.port

    def spawn_worker(self, slot: int) -> Lifetime:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFRAME_")}
        env.update(SOAK_DIR=str(self.data), SOAK_NAMESPACE=soak_app.NAMESPACE)
        env["PYTHONUNBUFFERED"] = "1"
        n = sum(1 for lt in self.lifetimes if lt.slot == slot)
        log = self.tmp / f"worker{slot}-{n}.log"
        command = [sys.executable, "-m", "taskframe", "worker", "bench.soak_app:app"]
        command += ["--url", self.url, "--concurrency", str(self.opts.concurrency)]
        command += ["--grace", "10"]
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
        self.procs[slot] = proc
        lifetime = Lifetime(slot, proc.pid, self.now(), str(log))
        self.lifetimes.append(lifetime)
        return lifetime

    def lifetime_of(self, slot: int) -> Lifetime:
        return next(lt for lt in reversed(self.lifetimes) if lt.slot == slot)

    async def wait_ready(self, lifetime: Lifetime, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs[lifetime.slot]
        # Small local files, read a few times a second: not worth a thread hop.
        while READY not in Path(lifetime.log).read_text(errors="replace"):  # noqa: ASYNC240
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(lifetime.log).read_text(errors="replace")[-2000:]  # noqa: ASYNC240
                raise RuntimeError(f"worker {lifetime.pid} did not get ready:\n{tail}")
            await asyncio.sleep(0.1)

    async def wait_exit(self, slot: int, timeout: float, how: str) -> None:
        proc = self.procs[slot]
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

    # -- faults ---------------------------------------------------------------------------

    def fault_plan(self) -> list[tuple[float, str]]:
        """(time, kind) of every fault, kept 10 s apart and out of the first and last 30 s."""
        duration = self.opts.minutes * 60
        plan: list[tuple[float, str]] = []
        for every, kind, offset in (
            (self.opts.kill_every, "kill9", 0.0),
            (self.opts.term_every, "sigterm", 15.0),
            (self.opts.server_every, "server", 5.0),
        ):
            if every <= 0:
                continue
            t = every + offset
            while t < duration - 30:
                plan.append((t, kind))
                t += every
        plan.sort()
        spaced: list[tuple[float, str]] = []
        for t, kind in plan:
            if spaced and t < spaced[-1][0] + 10:
                t = spaced[-1][0] + 10
            if t < duration - 30:
                spaced.append((t, kind))
        return spaced

    async def run_faults(self) -> None:
        victims = self.opts.victims
        turn = 0
        for at, kind in self.fault_plan():
            if await self._sleep_until(at):
                return
            started = self.now()
            if kind == "server":
                target = "nats-server"
                await asyncio.to_thread(self._restart_server)
            else:
                slot = victims[turn % len(victims)]
                turn += 1
                target = f"worker{slot} pid {self.procs[slot].pid}"
                if kind == "kill9":
                    self.procs[slot].kill()
                    await self.wait_exit(slot, 10, "kill9")
                else:
                    self.procs[slot].send_signal(signal.SIGTERM)
                    await self.wait_exit(slot, 30, "sigterm")
                await self.wait_ready(self.spawn_worker(slot))
            self.faults.append(Fault(round(started, 1), kind, target, self.now() - started))
            print(f"[{started:6.0f}s] fault {kind} -> {target}", flush=True)

    def _restart_server(self) -> None:
        assert self.server is not None
        self.server.kill()
        for _ in range(20):  # the port may take a moment to be free again
            try:
                self.start_server()
                return
            except ConfigError:
                time.sleep(0.5)
        raise RuntimeError("nats-server did not come back on its port")

    async def _sleep_until(self, t: float) -> bool:
        """Sleep until run time `t`; True if the run was stopped first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, t - self.now()))
        return self.stop.is_set()

    # -- load -----------------------------------------------------------------------------

    async def produce(self, tf: Client, until: float) -> None:
        """Enqueue the mix at a steady rate in 100 ms ticks, never awaiting the broker inline.

        Each tick's batch runs as its own task, so a server restart delays confirmations
        without slowing the offered rate; once 50 batches (5 s) are unconfirmed the tick
        is skipped instead, so the backlog of coroutines stays bounded.
        """
        tick = 0.1
        credit = dict.fromkeys([*MIX, "event"], 0.0)
        start = time.monotonic()
        n = 0
        while not self.stop.is_set() and self.now() < until:
            n += 1
            delay = start + n * tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:  # the loop fell behind: drop the missed ticks, don't burst
                self.ledger.skipped_ticks += int(-delay / tick)
                start = time.monotonic() - n * tick
            if len(self.batches) >= 50:
                self.ledger.skipped_ticks += 1
                continue
            items: list[tuple[str, taskframe.Task[Any]]] = []
            for kind, share in MIX.items():
                credit[kind] += self.opts.rate * share * tick
                while credit[kind] >= 1:
                    credit[kind] -= 1
                    items.append((kind, self._make(kind)))
            credit["event"] += self.opts.event_rate * tick
            events = int(credit["event"])
            credit["event"] -= events
            batch = asyncio.create_task(self._send(tf, items, events))
            self.batches.add(batch)
            batch.add_done_callback(self.batches.discard)
        if self.batches:
            await asyncio.wait(set(self.batches))

    def _make(self, kind: str) -> taskframe.Task[Any]:
        if kind == "noop":
            return soak_app.Noop()
        if kind == "sleepy":
            return soak_app.Sleepy(ms=self.rng.randint(10, 50))
        if kind == "doubler":
            return soak_app.Doubler(n=self.rng.randint(0, 1_000_000))
        if kind == "flaky":
            return soak_app.Flaky()
        return soak_app.Doomed()

    async def _send(
        self, tf: Client, items: list[tuple[str, taskframe.Task[Any]]], events: int
    ) -> None:
        runs = await asyncio.gather(*(tf.enqueue(t) for _, t in items), return_exceptions=True)
        now = time.time()
        for (kind, task), run in zip(items, runs, strict=True):
            if isinstance(run, BaseException):
                self.ledger.enqueue_failed += 1
                continue
            self.ledger.acked[run.id] = kind
            if kind != "doomed" and self.ledger.done[run.id] == 0:
                self.ledger.acked_at[run.id] = now
            if (
                isinstance(task, soak_app.Doubler)
                and len(self.waiters) < 100
                and self.rng.random() < 0.1
            ):
                waiter = asyncio.create_task(self._check_result(run, task.n * 2))
                self.waiters.add(waiter)
                waiter.add_done_callback(self.waiters.discard)
        ids = await asyncio.gather(
            *(tf.publish(soak_app.Ping(n=i)) for i in range(events)), return_exceptions=True
        )
        for event_id in ids:
            if isinstance(event_id, BaseException):
                self.ledger.publish_failed += 1
                continue
            # A fast subscriber may have been ingested before this confirmation came back.
            seen = self.ledger.event_seen
            missing = {g for g in ("alpha", "beta") if not seen[f"{g} {event_id}"]}
            self.ledger.events[event_id] = missing
            if missing:
                self.ledger.event_at[event_id] = now

    async def _check_result(self, run: TaskRun[Any], expected: int) -> None:
        try:
            value = await run.result(timeout=60)
        except TaskframeError:
            self.ledger.results_timeout += 1
            return
        if value == expected:
            self.ledger.results_ok += 1
        else:
            self.ledger.results_bad += 1

    # -- sampling -------------------------------------------------------------------------

    async def sample_forever(self, tf: Client) -> None:
        while not self.stop.is_set():
            await self.sample(tf)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.opts.sample_every)

    async def sample(self, tf: Client) -> None:
        t = round(self.now(), 2)
        self.ledger.ingest(self.data)
        self._ingest_probes()
        for slot, proc in self.procs.items():
            status = _proc_status(proc.pid)
            if status is not None and proc.poll() is None:
                self.proc_samples.append({"t": t, "slot": slot, "pid": proc.pid, **status})
        server_rss = None
        if self.server is not None and self.server.process is not None:
            found = _proc_status(self.server.process.pid)
            server_rss = found["rss_kb"] if found else None
        dead = None
        with contextlib.suppress(Exception):  # the server may be restarting
            info = await asyncio.wait_for(
                tf.js.stream_info(topology.dead_stream(tf.namespace)), 1.0
            )
            dead = info.state.messages
        led = self.ledger
        self.totals.append(
            {
                "t": t,
                "enqueued": len(led.acked),
                "events": len(led.events),
                "completed": len(led.done),
                "pending": led.pending(),
                "overdue": led.overdue(time.time()),
                "dead": dead,
                "enqueue_failed": led.enqueue_failed,
                "server_rss_kb": server_rss,
                "driver_tasks": len(asyncio.all_tasks()),
            }
        )

    def _ingest_probes(self) -> None:
        for path in sorted(self.data.glob("probe-*.jsonl")):
            for line in _new_lines(path, self.probe_offsets):
                sample = json.loads(line)
                sample["t"] = round(sample["t"] - self.t0, 2)
                self.probe_samples.append(sample)

    # -- end of run -----------------------------------------------------------------------

    async def drain(self, tf: Client) -> float:
        """Wait until every acknowledged task and event is accounted for, or the timeout."""
        started = time.monotonic()
        while time.monotonic() - started < self.opts.drain_timeout:
            self.ledger.ingest(self.data)
            if self.ledger.pending() == 0 and not self.waiters:
                break
            await asyncio.sleep(0.5)
        await self.sample(tf)
        return time.monotonic() - started

    async def read_dead_letters(self, tf: Client) -> None:
        stream = topology.dead_stream(tf.namespace)
        info = await tf.js.stream_info(stream)
        if info.state.messages == 0:
            return
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(Exception):  # a gap: nothing stored at that sequence
                msg = await tf.js.get_msg(stream, seq)
                headers = msg.headers or {}
                task_id = headers.get(wire.ID, "")
                self.dead_ids[task_id] = headers.get(wire.DEAD_REASON, "?")

    async def stop_workers(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for slot in self.procs:
            if self.lifetime_of(slot).end is None:
                await self.wait_exit(slot, 30, "end")

    def kill_everything(self) -> None:
        """Last resort on the way out: nothing this run started may outlive it."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.server is not None:
            self.server.kill()

    async def run(self) -> dict[str, Any]:
        opts = self.opts
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._interrupt)
        try:
            await asyncio.to_thread(self.start_server)
            self.t0 = time.time()
            for slot in range(2):
                await self.wait_ready(self.spawn_worker(slot))
            async with taskframe.connect(self.url, namespace=soak_app.NAMESPACE) as tf:
                print(f"soak: {opts.minutes} min on {self.url}, tmp {self.tmp}", flush=True)
                until = opts.minutes * 60
                sampler = asyncio.create_task(self.sample_forever(tf))
                faults = asyncio.create_task(self.run_faults())
                progress = asyncio.create_task(self._progress())
                await self.produce(tf, until)
                faults.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await faults
                drained = await self.drain(tf) if not self.interrupted else 0.0
                self.stop.set()
                await sampler
                progress.cancel()
                await self.stop_workers()
                await asyncio.sleep(1.0)
                self.ledger.ingest(self.data)
                self._ingest_probes()
                await self.read_dead_letters(tf)
                for waiter in list(self.waiters):
                    waiter.cancel()
            return self.report(drained)
        finally:
            self.kill_everything()

    def _interrupt(self) -> None:
        self.interrupted = True
        self.stop.set()

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(30)
            last = self.totals[-1] if self.totals else {}
            rss = {s["slot"]: s["rss_kb"] // 1024 for s in self.proc_samples[-2:]}
            print(
                f"[{self.now():6.0f}s] enqueued={last.get('enqueued')} "
                f"completed={last.get('completed')} pending={last.get('pending')} "
                f"overdue={last.get('overdue')} dead={last.get('dead')} rss_mb={rss}",
                flush=True,
            )

    # -- analysis -------------------------------------------------------------------------

    def report(self, drained: float) -> dict[str, Any]:
        led = self.ledger
        doomed = {i for i, k in led.acked.items() if k == "doomed"}
        lost = [i for i, k in led.acked.items() if k != "doomed" and led.done[i] == 0]
        lost_events = [
            f"{g} {e}" for e, missing in led.events.items() if missing for g in sorted(missing)
        ]
        doomed_missing = [i for i in doomed if i not in self.dead_ids]
        unexpected_dead = Counter(r for i, r in self.dead_ids.items() if i not in doomed)
        acked_ids = set(led.acked)
        ticks = sorted(led.ticks)
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        duration = self.totals[-1]["t"] if self.totals else 0.0
        checks = {
            "acked_tasks": len(led.acked),
            "acked_by_kind": dict(Counter(led.acked.values())),
            "completed": sum(1 for i in acked_ids if led.done[i] > 0),
            "completed_twice_or_more": sum(1 for i in acked_ids if led.done[i] > 1),
            "completed_not_acked": sum(1 for i in led.done if i not in acked_ids),
            "lost": len(lost),
            "lost_ids": lost[:20],
            "acked_events": len(led.events),
            "event_deliveries_lost": len(lost_events),
            "event_deliveries_lost_ids": lost_events[:20],
            "event_deliveries_repeated": sum(1 for c in led.event_seen.values() if c > 1),
            "dead_letters": len(self.dead_ids),
            "doomed_dead": len(doomed) - len(doomed_missing),
            "doomed_missing": len(doomed_missing),
            "unexpected_dead": dict(unexpected_dead),
            "first_attempt_failures": led.fails,
            "enqueue_failed": led.enqueue_failed,
            "publish_failed": led.publish_failed,
            "skipped_ticks": led.skipped_ticks,
            "results_ok": led.results_ok,
            "results_bad": led.results_bad,
            "results_timeout": led.results_timeout,
            "schedule_ticks": len(ticks),
            "schedule_max_gap_s": round(max(gaps), 2) if gaps else None,
            "drain_s": round(drained, 1),
        }
        checks["passed"] = (
            checks["lost"] == 0
            and checks["event_deliveries_lost"] == 0
            and checks["doomed_missing"] == 0
            and not unexpected_dead
            and led.results_bad == 0
            and not self.interrupted
        )
        trends = [self._trend(lt) for lt in self.lifetimes]
        return {
            "options": {**asdict(self.opts), "out": str(self.opts.out), "render": None},
            "duration_s": duration,
            "interrupted": self.interrupted,
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.t0)),
            "machine": _machine(),
            "checks": checks,
            "faults": [asdict(f) for f in self.faults],
            "lifetimes": [asdict(lt) for lt in self.lifetimes],
            "trends": trends,
            "log_summary": self._log_summary(),
            "samples": {
                "totals": self.totals,
                "proc": self.proc_samples,
                "probe": self.probe_samples,
            },
            "tmp": str(self.tmp),
        }

    def _trend(self, lt: Lifetime) -> dict[str, Any]:
        end = lt.end if lt.end is not None else self.now()
        cut = lt.start + (end - lt.start) / 3
        proc = [s for s in self.proc_samples if s["pid"] == lt.pid and s["t"] >= cut]
        probe = [s for s in self.probe_samples if s["pid"] == lt.pid and s["t"] >= cut]
        rss = _slope([(s["t"], s["rss_kb"] / 1024) for s in proc])
        tasks = _slope([(s["t"], s["tasks"]) for s in probe])
        objects = _slope([(s["t"], s["gc_objects"]) for s in probe])
        fds = _slope([(s["t"], s["fds"]) for s in proc])
        long_enough = end - lt.start >= MIN_TREND_LIFETIME
        growth = long_enough and (
            (rss is not None and rss > RSS_FLAG_MB_PER_MIN)
            or (tasks is not None and tasks > TASKS_FLAG_PER_MIN)
        )
        return {
            "slot": lt.slot,
            "pid": lt.pid,
            "lifetime_s": round(end - lt.start, 1),
            "ended_by": lt.ended_by,
            "samples": len(proc),
            "rss_mb_first": round(proc[0]["rss_kb"] / 1024, 1) if proc else None,
            "rss_mb_last": round(proc[-1]["rss_kb"] / 1024, 1) if proc else None,
            "rss_mb_max": round(max(s["rss_kb"] for s in proc) / 1024, 1) if proc else None,
            "rss_mb_per_min": rss,
            "tasks_min": min((s["tasks"] for s in probe), default=None),
            "tasks_max": max((s["tasks"] for s in probe), default=None),
            "tasks_per_min": tasks,
            "gc_objects_per_min": objects,
            "fds_per_min": fds,
            "verdict": "GROWTH" if growth else ("flat" if long_enough else "too short"),
        }

    def _log_summary(self) -> dict[str, Any]:
        """Warnings and errors in the worker logs, grouped with ids and numbers blanked."""
        levels: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        tracebacks = 0
        pattern = re.compile(r" (WARNING|ERROR|CRITICAL) +(\S+) \[\d+\] (.*)")
        blank = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27}|\b\d+(\.\d+)?\b|\.[0-9a-f]{12,}")
        for lt in self.lifetimes:
            for line in Path(lt.log).read_text(errors="replace").splitlines():
                if line.startswith("Traceback"):
                    tracebacks += 1
                if match := pattern.search(line):
                    levels[match.group(1)] += 1
                    messages[
                        f"{match.group(1)} {match.group(2)}: {blank.sub('#', match.group(3))[:160]}"
                    ] += 1
        return {
            "levels": dict(levels),
            "tracebacks": tracebacks,
            "top": messages.most_common(15),
        }


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of `points` (seconds, value), per minute; None under 5 points."""
    if len(points) < 5:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return round(sxy / sxx * 60, 3)


def _machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": sys.version.split()[0]}


# -- the report ---------------------------------------------------------------------------


def spark(values: list[float | None], lo: float | None = None, hi: float | None = None) -> str:
    """One character per value on an 8-level scale; None (no process) is a space."""
    present = [v for v in values if v is not None]
    if not present:
        return " " * len(values)
    lo = min(present) if lo is None else lo
    hi = max(present) if hi is None else hi
    # A row spans at least 10% of its top value, so noise of 0.1 MB on 50 MB stays flat
    # instead of filling all eight levels.
    span = max(hi - lo, abs(hi) * 0.1) or 1.0
    return "".join(" " if v is None else SPARK[min(7, int((v - lo) / span * 8))] for v in values)


def _buckets(
    samples: list[dict[str, Any]], key: str, width: int, duration: float, scale: float = 1.0
) -> list[float | None]:
    """Mean of `key` per time bucket across the run, None where there is no sample."""
    sums = [0.0] * width
    counts = [0] * width
    for s in samples:
        if s.get(key) is None:
            continue
        i = min(width - 1, int(s["t"] / duration * width))
        sums[i] += s[key] / scale
        counts[i] += 1
    return [sums[i] / counts[i] if counts[i] else None for i in range(width)]


def _rate(totals: list[dict[str, Any]], width: int, duration: float) -> list[float | None]:
    """Completions per second per time bucket."""
    rates = []
    for a, b in itertools.pairwise(totals):
        if b["t"] > a["t"]:
            rates.append({"t": b["t"], "r": (b["completed"] - a["completed"]) / (b["t"] - a["t"])})
    return _buckets(rates, "r", width, duration)


def render(result: dict[str, Any]) -> str:
    opts, checks = result["options"], result["checks"]
    samples = result["samples"]
    duration = max(1.0, result["duration_s"])
    # At least ~1.5 samples per column, so a column is never empty while a process lives.
    width = max(10, min(100, int(duration / (opts["sample_every"] * 1.5))))
    lines = [
        "# Soak: steady load with periodic faults",
        "",
        f"Run {result['started_at']}, {duration / 60:.1f} min of samples on "
        f"{result['machine']['cpus']} x {result['machine']['cpu']}, Python "
        f"{result['machine']['python']}. Command:",
        "",
        "```sh",
        f"python -m bench.soak --minutes {opts['minutes']:g} --out {opts['out']}",
        "```",
        "",
        f"Load: {opts['rate']:g} tasks/s ("
        + ", ".join(f"{k} {v:.1%}" for k, v in MIX.items())
        + f"), {opts['event_rate']:g} events/s to two subscriber groups, a schedule every 1 s; "
        f"2 worker processes with concurrency {opts['concurrency']}. Faults on worker slot(s) "
        f"{opts['victims']}: SIGKILL every {opts['kill_every']:g} s, SIGTERM every "
        f"{opts['term_every']:g} s; nats-server SIGKILL + restart (same port and store) every "
        f"{opts['server_every']:g} s. Slot 0 is never a victim unless listed, so it lives "
        "the whole run.",
        "",
        f"## Ledger: {'PASS' if checks['passed'] else 'FAIL'}",
        "",
        "| check | value |",
        "|---|---|",
    ]
    labels = {
        "acked_tasks": "tasks acknowledged by the server",
        "completed": "acknowledged tasks completed",
        "lost": "**lost** (acknowledged, never completed, not a dead letter)",
        "completed_twice_or_more": "completed more than once (at-least-once redelivery)",
        "completed_not_acked": "completed but the enqueue reported failure",
        "acked_events": "events acknowledged",
        "event_deliveries_lost": "**event deliveries lost** (of 2 per event)",
        "event_deliveries_repeated": "event deliveries repeated",
        "doomed_dead": "intended dead letters stored",
        "doomed_missing": "**intended dead letters missing**",
        "unexpected_dead": "**unexpected dead letters** (by reason)",
        "first_attempt_failures": "Flaky first-attempt failures (retried)",
        "results_ok": "results read back and correct",
        "results_bad": "**results wrong**",
        "results_timeout": "result waits that failed or timed out",
        "enqueue_failed": "enqueues that raised (not counted as acknowledged)",
        "publish_failed": "event publishes that raised",
        "skipped_ticks": "producer ticks skipped (too many unconfirmed)",
        "schedule_ticks": "schedule ticks run (every 1 s)",
        "schedule_max_gap_s": "longest gap between schedule ticks (s)",
        "drain_s": "drain after the load stopped (s)",
    }
    for key, label in labels.items():
        lines.append(f"| {label} | {checks[key]} |")
    lines += [
        "",
        f"## Faults injected: {len(result['faults'])}",
        "",
        "| t (s) | fault | target | back after (s) |",
        "|---|---|---|---|",
    ]
    for f in result["faults"]:
        lines.append(f"| {f['t']:.0f} | {f['kind']} | {f['target']} | {f['recovered_after']:.1f} |")
    lines += [
        "",
        "## Growth trend per worker process",
        "",
        "Least-squares slope over the last 2/3 of each process's lifetime. Flagged GROWTH "
        f"when RSS rises faster than {RSS_FLAG_MB_PER_MIN:g} MB/min or the asyncio task "
        f"count faster than {TASKS_FLAG_PER_MIN:g}/min; lifetimes under "
        f"{MIN_TREND_LIFETIME:.0f} s are mostly warm-up and only reported.",
        "",
        "| slot | pid | lifetime (s) | ended by | RSS MB first → last (max) | RSS MB/min | "
        "asyncio tasks min-max | tasks/min | gc objects/min | fds/min | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tr in result["trends"]:
        lines.append(
            f"| {tr['slot']} | {tr['pid']} | {tr['lifetime_s']:.0f} | {tr['ended_by']} | "
            f"{tr['rss_mb_first']} → {tr['rss_mb_last']} ({tr['rss_mb_max']}) | "
            f"{_fmt(tr['rss_mb_per_min'])} | {tr['tasks_min']}-{tr['tasks_max']} | "
            f"{_fmt(tr['tasks_per_min'])} | {_fmt(tr['gc_objects_per_min'], 0)} | "
            f"{_fmt(tr['fds_per_min'])} | {tr['verdict']} |"
        )
    proc, probe, totals = samples["proc"], samples["probe"], samples["totals"]
    marks = [" "] * width
    for f in result["faults"]:
        marks[min(width - 1, int(f["t"] / duration * width))] = {
            "kill9": "K",
            "sigterm": "T",
            "server": "S",
        }[f["kind"]]
    rows: list[tuple[str, list[float | None]]] = []
    for slot in sorted({s["slot"] for s in proc}):
        slot_proc = [s for s in proc if s["slot"] == slot]
        pids = {s["pid"] for s in slot_proc}
        slot_probe = [s for s in probe if s["pid"] in pids]
        rows.append((f"worker{slot} RSS MB", _buckets(slot_proc, "rss_kb", width, duration, 1024)))
        rows.append((f"worker{slot} tasks", _buckets(slot_probe, "tasks", width, duration)))
    rows.append(("completions/s", _rate(totals, width, duration)))
    rows.append(("pending", _buckets(totals, "pending", width, duration)))
    rows.append(("nats-server RSS MB", _buckets(totals, "server_rss_kb", width, duration, 1024)))
    lines += [
        "",
        "## Over time",
        "",
        f"One column per {duration / width:.1f} s (its mean); each row scaled from its "
        "minimum over max(its range, 10% of its maximum), range shown on the right. "
        "Fault marks: K = worker SIGKILL, T = worker SIGTERM, S = nats-server SIGKILL.",
        "",
        "```",
        f"{'faults':>20} |{''.join(marks)}|",
    ]
    for label, values in rows:
        present = [v for v in values if v is not None]
        span = f"{min(present):.0f}-{max(present):.0f}" if present else "-"
        lines.append(f"{label:>20} |{spark(values)}| {span}")
    lines += ["```", ""]
    logs = result["log_summary"]
    lines += [
        "## Worker logs",
        "",
        f"Levels: {logs['levels']}; tracebacks: {logs['tracebacks']}. Most frequent "
        "warnings and errors (numbers and ids blanked):",
        "",
        "| count | message |",
        "|---|---|",
    ]
    for message, count in logs["top"]:
        lines.append(f"| {count} | `{message.replace('|', '/')}` |")
    lines += [
        "",
        "Raw samples (every 2 s: per-process /proc figures, the in-process probe's task "
        "counts by name and gc object counts, the totals) are in `soak.json`.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    p.add_argument("--rate", type=float, default=400.0, help="tasks per second")
    p.add_argument("--event-rate", type=float, default=20.0, help="events per second")
    p.add_argument("--concurrency", type=int, default=32, help="per worker process")
    p.add_argument("--kill-every", type=float, default=60.0, help="0: never")
    p.add_argument("--term-every", type=float, default=150.0, help="0: never")
    p.add_argument("--server-every", type=float, default=200.0, help="0: never")
    p.add_argument("--victims", default="1", help="worker slots the faults hit, e.g. 1 or 0,1")
    p.add_argument("--sample-every", type=float, default=2.0)
    p.add_argument("--drain-timeout", type=float, default=90.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--render", type=Path, help="only rewrite soak.md beside this soak.json (no run)"
    )
    a = p.parse_args(argv)
    victims = [int(v) for v in a.victims.split(",") if v.strip()]
    if not victims or any(v not in (0, 1) for v in victims):
        p.error("--victims takes worker slots 0 and/or 1")
    if not 0 < a.minutes <= 120:
        p.error("--minutes must be in (0, 120]: the soak is bounded")
    return Options(
        a.minutes,
        a.out,
        a.rate,
        a.event_rate,
        a.concurrency,
        a.kill_every,
        a.term_every,
        a.server_every,
        victims,
        a.sample_every,
        a.drain_timeout,
        a.seed,
        a.render,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.render is not None:
        result = json.loads(opts.render.read_text())
        (opts.render.parent / "soak.md").write_text(render(result))
        return 0
    soak = Soak(opts)
    result = asyncio.run(soak.run())
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "soak.json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    (opts.out / "soak.md").write_text(render(result))
    shutil.rmtree(soak.store, ignore_errors=True)  # keep the logs and ledgers, not the store
    checks = result["checks"]
    print(
        f"soak {'PASSED' if checks['passed'] else 'FAILED'}: acked={checks['acked_tasks']} "
        f"lost={checks['lost']} events_lost={checks['event_deliveries_lost']} "
        f"faults={len(result['faults'])}; verdicts "
        f"{[(t['slot'], t['pid'], t['rss_mb_per_min'], t['verdict']) for t in result['trends']]}"
        f"\nwrote {opts.out}/soak.md and soak.json; logs in {soak.tmp}",
        flush=True,
    )
    return 0 if checks["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
