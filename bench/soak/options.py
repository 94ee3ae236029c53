"""The soak's options, from its command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Options:
    """How long, how much load, which faults how often, where to write."""

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


def parse_args(argv: list[str] | None = None) -> Options:
    """Options from `argv` (the command line by default)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="A bounded soak: steady load on 2 worker processes with periodic faults.",
    )
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
