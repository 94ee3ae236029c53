"""Reading a soak's samples: does a worker grow (RSS, asyncio tasks, gc objects, fds) over
its lifetime, and what did the workers log."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from bench.soak.processes import Lifetime
from bench.soak.sampling import Samples

RSS_FLAG_MB_PER_MIN = 1.0
TASKS_FLAG_PER_MIN = 1.0
MIN_TREND_LIFETIME = 120.0  # seconds; shorter lifetimes are dominated by warm-up


def trend(lt: Lifetime, samples: Samples, now: float) -> dict[str, Any]:
    """Growth per minute over the last 2/3 of one worker lifetime, and a verdict."""
    end = lt.end if lt.end is not None else now
    cut = lt.start + (end - lt.start) / 3
    proc = [s for s in samples.proc if s["pid"] == lt.pid and s["t"] >= cut]
    probe = [s for s in samples.probe if s["pid"] == lt.pid and s["t"] >= cut]
    rss = slope([(s["t"], s["rss_kb"] / 1024) for s in proc])
    tasks = slope([(s["t"], s["tasks"]) for s in probe])
    objects = slope([(s["t"], s["gc_objects"]) for s in probe])
    fds = slope([(s["t"], s["fds"]) for s in proc])
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


def log_summary(lifetimes: list[Lifetime]) -> dict[str, Any]:
    """Warnings and errors in the worker logs, grouped with ids and numbers blanked."""
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    tracebacks = 0
    pattern = re.compile(r" (WARNING|ERROR|CRITICAL) +(\S+) \[\d+\] (.*)")
    blank = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27}|\b\d+(\.\d+)?\b|\.[0-9a-f]{12,}")
    for lt in lifetimes:
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


def slope(points: list[tuple[float, float]]) -> float | None:
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
