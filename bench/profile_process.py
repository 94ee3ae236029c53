"""Profile taskframe's single-process, no-results processing path (the ``noresults`` variant).

    python -m bench.profile_process --n 20000 --rounds 5 --out bench/results/profile

Starts its own nats-server (as ``python -m bench`` does), then per round: reset and fill
a backlog of N no-op tasks with ``enqueue_many`` (not profiled), start the in-process
worker exactly as the benchmark's ``process/noresults`` step does, and sample the event
loop thread with pyinstrument (``async_mode="disabled"``: every task on the loop, not
just this coroutine) from the first handled task until the N-th. Rounds are combined.

Writes ``profile.txt`` (pyinstrument's call tree) and ``summary.json``, and prints self
time per handled message: by category (nats-py parsing, asyncio scheduling, taskframe,
...) and by function.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from pyinstrument import Profiler
from pyinstrument.frame import Frame

from bench import probe, servers
from bench.model import MixedSpec
from bench.systems.base import Context, WorkerMode
from bench.systems.taskframe_system import NO_RESULTS, TaskframeSystem

REPO_ROOT = Path(__file__).resolve().parent.parent
INTERVAL_S = 0.0001  # 100 us: ~4,000 samples per 20,000-task drain
TIMEOUT_S = 120.0

#: (path fragment, category); the first match wins. Time in C functions (socket reads,
#: epoll, pydantic-core, json) counts towards the Python function that called them.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("/selectors.py", "idle: epoll wait (loop had nothing to run)"),
    ("/nats/protocol/parser.py", "nats-py: protocol parser"),
    ("/nats/aio/client.py", "nats-py: client (dispatch, headers, publish, flusher)"),
    ("/nats/aio/msg.py", "nats-py: Msg (ack, metadata)"),
    ("/nats/aio/subscription.py", "nats-py: subscription"),
    ("/nats/", "nats-py: other"),
    ("/asyncio/base_events.py", "asyncio: event loop (_run_once, call_soon)"),
    ("/asyncio/events.py", "asyncio: event loop (_run_once, call_soon)"),
    ("/asyncio/selector_events.py", "asyncio: socket transport"),
    ("/asyncio/", "asyncio: tasks, futures, queues, locks, timeouts"),
    ("/taskframe/", "taskframe"),
    ("/pydantic", "pydantic"),
    ("/bench/", "bench probe (mark, recorder)"),
)


def category(path: str) -> str:
    for fragment, name in CATEGORIES:
        if fragment in path:
            return name
    return "other (stdlib, ...)"


def walk(frame: Frame) -> Iterator[Frame]:
    yield frame
    for child in frame.children:
        yield from walk(child)


def self_times(root: Frame) -> dict[tuple[str, str, str], float]:
    """Self time (s) per (file, function, category); "[self]" children are part of a frame.

    pyinstrument also records C calls (``<built-in>``): they are listed as functions of
    their own but counted in their caller's category (``epoll.poll`` as idle)."""
    times: dict[tuple[str, str, str], float] = defaultdict(float)
    for frame in walk(root):
        if frame.is_synthetic:
            continue
        path = frame.file_path or "?"
        owner = frame
        while owner.parent is not None and (owner.file_path or "?").startswith("<"):
            owner = owner.parent
        kind = category(owner.file_path or "?")
        if frame.function == "epoll.poll":
            kind = category("/selectors.py")
        times[(path, frame.function, kind)] += frame.total_self_time
    return times


async def profile(n: int, rounds: int) -> tuple[Profiler, int]:
    """Drain ``rounds`` backlogs of ``n`` tasks under one profiler; (profiler, tasks seen)."""
    recorder = probe.Recorder()
    probe.install_in_process(recorder)
    profiler = Profiler(interval=INTERVAL_S, async_mode="disabled")
    handled = 0
    with tempfile.TemporaryDirectory(prefix="tfprofile-") as tmp:
        workdir = Path(tmp)
        async with servers.nats_server(workdir) as nats:
            ctx = Context(
                nats_url=nats.url,
                redis_url="redis://unused/0",
                workdir=workdir,
                repo_root=REPO_ROOT,
                recorder=recorder,
                probe_fifo=workdir / "unused.fifo",
                mixed=MixedSpec(),
            )
            system = TaskframeSystem(ctx)
            await system.open()
            try:
                for round_no in range(rounds):
                    await system.reset()
                    await system.enqueue(n)
                    recorder.reset()
                    async with system.worker(WorkerMode.THROUGHPUT, NO_RESULTS) as worker:
                        await worker.until(recorder.wait_distinct(1, TIMEOUT_S))
                        before = recorder.distinct
                        started = time.perf_counter()
                        profiler.start()
                        await worker.until(recorder.wait_distinct(n, TIMEOUT_S))
                        profiler.stop()
                        took = time.perf_counter() - started
                        left = await system.queued()
                    handled += n - before
                    print(
                        f"round {round_no}: {n - before} tasks in {took:.3f}s under the profiler"
                        f" = {(n - before) / took:,.0f} tasks/s; left in queue {left}"
                    )
            finally:
                await system.close()
    return profiler, handled


def write(profiler: Profiler, handled: int, out: Path) -> None:
    session = profiler.last_session
    assert session is not None
    root = session.root_frame(trim_stem=False)
    assert root is not None
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text(
        profiler.output_text(unicode=True, color=False, show_all=False, timeline=False)
    )
    report(self_times(root), session.duration, handled, out)


Times = dict[tuple[str, str, str], float]


def report(times: Times, duration: float, handled: int, out: Path) -> None:
    per_msg_us = 1e6 / handled
    by_category: dict[str, float] = defaultdict(float)
    for (_, _, kind), seconds in times.items():
        by_category[kind] += seconds
    print(f"\n{handled} tasks, {duration:.3f}s sampled, {duration * per_msg_us:.1f} us/task\n")
    print("| category | us/task | share |\n|---|---|---|")
    for name, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds * per_msg_us:.2f} | {seconds / duration:.1%} |")
    print("\n| function (self time) | file | us/task | share |\n|---|---|---|---|")
    top = sorted(times.items(), key=lambda kv: -kv[1])[:40]
    for (path, function, _), seconds in top:
        short = path.split("site-packages/")[-1].split("/main/")[-1].split("/lib/python3.11/")[-1]
        print(f"| {function} | {short} | {seconds * per_msg_us:.2f} | {seconds / duration:.1%} |")
    taskframe = sorted(
        ((k, v) for k, v in times.items() if "/taskframe/" in k[0]), key=lambda kv: -kv[1]
    )
    print("\n| taskframe function (self time) | file | us/task |\n|---|---|---|")
    for (path, function, _), seconds in taskframe:
        short = path.split("/taskframe/")[-1]
        print(f"| {function} | taskframe/{short} | {seconds * per_msg_us:.2f} |")
    summary = {
        "tasks": handled,
        "sampled_s": duration,
        "us_per_task": duration * per_msg_us,
        "by_category_us": {k: v * per_msg_us for k, v in by_category.items()},
        "by_function_us": {f"{p}:{f}": v * per_msg_us for (p, f, _), v in times.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_process", description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="backlog per round")
    parser.add_argument("--rounds", type=int, default=5, help="drains, profiles combined")
    parser.add_argument("--out", default="bench/results/profile", help="output directory")
    args = parser.parse_args()
    profiler, handled = asyncio.run(profile(args.n, args.rounds))
    write(profiler, handled, Path(args.out))


if __name__ == "__main__":
    main()
