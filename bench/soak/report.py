"""A soak's report: soak.md, tables and ASCII charts from the result soak.json holds."""

from __future__ import annotations

import itertools
from typing import Any

from bench.soak.load import MIX
from bench.soak.trends import MIN_TREND_LIFETIME, RSS_FLAG_MB_PER_MIN, TASKS_FLAG_PER_MIN

SPARK = "▁▂▃▄▅▆▇█"


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
    """soak.md for the result of one run."""
    opts, checks, machine = result["options"], result["checks"], result["machine"]
    samples = result["samples"]
    duration = max(1.0, result["duration_s"])
    # At least ~1.5 samples per column, so a column is never empty while a process lives.
    width = max(10, min(100, int(duration / (opts["sample_every"] * 1.5))))
    lines = [
        "# Soak: steady load with periodic faults",
        "",
        f"Run {result['started_at']}, {duration / 60:.1f} min of samples on "
        f"{machine.get('logical_cpus', machine.get('cpus'))} x "  # (older runs: cpus, cpu)
        f"{machine.get('cpu_model', machine.get('cpu'))}, Python {machine['python']}"
        f"{', ' + machine['nats_server'] if 'nats_server' in machine else ''}. Command:",
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
        "ledger_problems": "problems the fault suite's ledger found (tests/ledger.py)",
        "acked_tasks": "tasks acknowledged by the server",
        "completed": "acknowledged tasks completed",
        "lost": "**lost** (acknowledged, never completed, not a dead letter)",
        "completed_twice_or_more": "completed more than once (at-least-once redelivery)",
        "completed_not_acked": "completed but never confirmed to the producer",
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
        if key in checks:  # a run from before the soak kept its books with tests/ledger.py
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
