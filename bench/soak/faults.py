"""The faults a soak injects, on a plan fixed before it starts: SIGKILL or SIGTERM a victim
worker and start it again, SIGKILL nats-server and start it again on its port and store."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass

from bench.soak.options import Options
from bench.soak.processes import Processes


@dataclass
class Fault:
    """One injected fault and how long until what it hit was back (worker or server)."""

    t: float
    kind: str
    target: str
    recovered_after: float


def plan(opts: Options) -> list[tuple[float, str]]:
    """(time, kind) of every fault, kept 10 s apart and out of the first and last 30 s."""
    duration = opts.minutes * 60
    planned: list[tuple[float, str]] = []
    for every, kind, offset in (
        (opts.kill_every, "kill9", 0.0),
        (opts.term_every, "sigterm", 15.0),
        (opts.server_every, "server", 5.0),
    ):
        if every <= 0:
            continue
        t = every + offset
        while t < duration - 30:
            planned.append((t, kind))
            t += every
    planned.sort()
    spaced: list[tuple[float, str]] = []
    for t, kind in planned:
        if spaced and t < spaced[-1][0] + 10:
            t = spaced[-1][0] + 10
        if t < duration - 30:
            spaced.append((t, kind))
    return spaced


async def inject(
    opts: Options, processes: Processes, stop: asyncio.Event, faults: list[Fault]
) -> None:
    """Inject the planned faults in turn until the plan ends or `stop` is set."""
    turn = 0
    for at, kind in plan(opts):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, at - processes.now()))
        if stop.is_set():
            return
        started = processes.now()
        if kind == "server":
            target = "nats-server"
            await asyncio.to_thread(processes.restart_server)
        else:
            slot = opts.victims[turn % len(opts.victims)]
            turn += 1
            worker = processes.workers[slot]
            target = f"worker{slot} pid {worker.pid}"
            if kind == "kill9":
                worker.kill()
                await processes.wait_exit(slot, 10, "kill9")
            else:
                worker.send_signal(signal.SIGTERM)
                await processes.wait_exit(slot, 30, "sigterm")
            await processes.wait_ready(processes.spawn_worker(slot))
        faults.append(Fault(round(started, 1), kind, target, processes.now() - started))
        print(f"[{started:6.0f}s] fault {kind} -> {target}", flush=True)
