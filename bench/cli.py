"""Command line: start servers, run every selected system, write the report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import machine, report, servers, systems
from bench.model import MixedSpec, Workload
from bench.runner import RunConfig, Runner

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICK_N = 200
QUICK_SAMPLES = 50
DEFAULT_SAMPLES = 1000
DEFAULT_REPEATS = 3

REDIS_SYSTEMS = {"arq", "saq", "celery", "dramatiq"}


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--systems",
        default=",".join(systems.MODULES),
        help=f"comma-separated subset of: {', '.join(systems.MODULES)} (default: all)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(w.value for w in Workload),
        help="comma-separated subset of: enqueue, process, latency, mixed (default: all)",
    )
    parser.add_argument(
        "--n",
        type=int,
        help="tasks per throughput workload for every system "
        "(default: per-system, 20000 unless the system is slow)",
    )
    parser.add_argument(
        "--n-for",
        action="append",
        default=[],
        metavar="SYSTEM=N",
        help="override N for one system (repeatable)",
    )
    parser.add_argument("--samples", type=int, help=f"latency samples (default {DEFAULT_SAMPLES})")
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"runs of each throughput workload, median reported (default {DEFAULT_REPEATS}; "
        "quick: 1)",
    )
    parser.add_argument("--concurrency", type=int, default=100, help="mixed-workload concurrency")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke mode: N={QUICK_N}, {QUICK_SAMPLES} latency samples",
    )
    parser.add_argument("--out", default="bench/results", help="output directory")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> RunConfig:
    names = tuple(_csv(args.systems))
    unknown = [n for n in names if n not in systems.MODULES]
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(unknown)}")
    overrides: dict[str, int] = {}
    if args.n is not None:
        overrides = dict.fromkeys(names, args.n)
    for item in args.n_for:
        name, _, value = item.partition("=")
        overrides[name] = int(value)
    samples = args.samples or (QUICK_SAMPLES if args.quick else DEFAULT_SAMPLES)
    return RunConfig(
        systems=names,
        workloads=frozenset(Workload(w) for w in _csv(args.workloads)),
        n_override=overrides,
        quick_n=(args.n or QUICK_N) if args.quick else None,
        latency_samples=samples,
        repeats=args.repeat or (1 if args.quick else DEFAULT_REPEATS),
        mixed=MixedSpec(concurrency=args.concurrency),
        out=(REPO_ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out),
        repo_root=REPO_ROOT,
    )


async def run(cfg: RunConfig, command: str) -> int:
    # SIGTERM behaves like Ctrl-C: cancel, so every ``finally`` stops its process.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    started = time.perf_counter()
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="taskframe-bench-"))
    try:
        async with contextlib.AsyncExitStack() as stack:
            nats = await stack.enter_async_context(servers.nats_server(workdir))
            redis_url, redis_version = "", "not started"
            if set(cfg.systems) & REDIS_SYSTEMS:  # the NATS-only systems run without it
                redis = await stack.enter_async_context(servers.redis_server(workdir))
                redis_url, redis_version = redis.url, redis.version
            print(f"{nats.version} at {nats.url}; redis: {redis_version}", file=sys.stderr)
            runner = Runner(cfg, nats.url, redis_url, workdir / "steps")
            outcomes = [await runner.run_system(name) for name in cfg.systems]
            described = machine.describe(nats.version, redis_version)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc: dict[str, Any] = {
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "duration_s": time.perf_counter() - started,
        "machine": described,
        # Other processes competing for the 2 cores skew results: keep a trace.
        "loadavg_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        "settings": {
            "quick": cfg.quick_n is not None,
            "latency_samples": cfg.latency_samples,
            "repeats": cfg.repeats,
            "mixed": asdict(cfg.mixed),
            "workloads": sorted(str(w) for w in cfg.workloads),
        },
        "systems": [
            {
                "name": o.name,
                "status": str(o.status),
                "n": o.n,
                "setup": o.setup,
                "reason": o.reason,
            }
            for o in outcomes
        ],
        "results": [r.to_json() for o in outcomes for r in o.results],
    }
    report.write(cfg.out, doc)
    print(f"wrote {cfg.out / 'results.md'} and results.json", file=sys.stderr)
    print((cfg.out / "results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(run(cfg, command.strip()))
    except (KeyboardInterrupt, asyncio.CancelledError):
        # Servers and children were stopped by the ``finally`` blocks on the way out.
        print("interrupted; no results written", file=sys.stderr)
        return 130
