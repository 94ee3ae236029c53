"""results.json and results.md, including ratios to the raw nats-py reference."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.aggregate import aggregate
from bench.model import Status, StepResult, Workload
from bench.systems import OPTIONAL, REFERENCE

#: Systems whose summary cells also carry their ratio to the reference.
RATIO_IN_SUMMARY = OPTIONAL  # i.e. "taskframe"


@dataclass(frozen=True)
class Metric:
    key: str
    workload: Workload
    attr: str
    higher_is_better: bool


METRICS = (
    Metric("enqueue", Workload.ENQUEUE, "rate", True),
    Metric("process", Workload.PROCESS, "rate", True),
    Metric("latency_p50", Workload.LATENCY, "p50_ms", False),
    Metric("latency_p95", Workload.LATENCY, "p95_ms", False),
    Metric("latency_p99", Workload.LATENCY, "p99_ms", False),
    Metric("mixed", Workload.MIXED, "rate", True),
    Metric("worker_rss", Workload.PROCESS, "worker_peak_rss_mb", False),
)
_BY_KEY = {m.key: m for m in METRICS}
#: Which metric picks the row (variant) shown for a workload; the latency
#: percentiles all come from the variant with the best p50 so they stay coherent.
_ROW_METRIC = {"latency_p95": "latency_p50", "latency_p99": "latency_p50"}


def _value(result: StepResult, metric: Metric) -> float | None:
    value = getattr(result, metric.attr)
    return None if value is None else float(value)


def best_row(results: Iterable[StepResult], system: str, metric: Metric) -> StepResult | None:
    """The system's best successful measurement for ``metric`` (across variants)."""
    rows = [
        r
        for r in results
        if r.system == system
        and r.workload is metric.workload
        and r.status is Status.OK
        and _value(r, metric) is not None
    ]
    if not rows:
        return None
    pick = max if metric.higher_is_better else min
    return pick(rows, key=lambda r: _value(r, metric) or 0.0)


def best_value(results: Sequence[StepResult], system: str, key: str) -> float | None:
    metric = _BY_KEY[key]
    row = best_row(results, system, _BY_KEY[_ROW_METRIC.get(key, key)])
    return None if row is None else _value(row, metric)


def reference_best(results: Sequence[StepResult], key: str) -> float | None:
    """The reference's best figure for one metric, over all its variants."""
    metric = _BY_KEY[key]
    row = best_row(results, REFERENCE, metric)
    return None if row is None else _value(row, metric)


def ratios_to_reference(results: Sequence[StepResult], system: str) -> dict[str, float]:
    """``system``'s figure (as shown in the summary) / the reference's best figure.

    Always value / reference: > 1 is better for throughput, worse for latency
    and memory (the markdown says which way is good).
    """
    out: dict[str, float] = {}
    for metric in METRICS:
        mine = best_value(results, system, metric.key)
        ref = reference_best(results, metric.key)
        if mine is not None and ref:
            out[metric.key] = mine / ref
    return out


# ------------------------------------------------------------------ formatting
def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.startswith("latency"):
        return f"{value:.2f}"
    if key == "worker_rss":
        return f"{value:.0f}"
    return f"{value:,.0f}"


def _cell(results: Sequence[StepResult], system: str, key: str, with_ratio: bool) -> str:
    value = best_value(results, system, key)
    text = _fmt(key, value)
    metric = _BY_KEY[key]
    row = best_row(results, system, _BY_KEY[_ROW_METRIC.get(key, key)])
    if row is not None and row.variant != "default" and key != "worker_rss":
        text += f" ({row.variant})"
    if with_ratio and value is not None:
        ratio = ratios_to_reference(results, system).get(metric.key)
        if ratio is not None:
            text += f" **{ratio:.2f}x raw**"
    return text


def _latency_cell(results: Sequence[StepResult], system: str, with_ratio: bool) -> str:
    parts = [
        _fmt(k, best_value(results, system, k))
        for k in ("latency_p50", "latency_p95", "latency_p99")
    ]
    text = " / ".join(parts)
    row = best_row(results, system, _BY_KEY["latency_p50"])
    if row is not None and row.variant != "default":
        text += f" ({row.variant})"
    if with_ratio and row is not None:
        ratios = ratios_to_reference(results, system)
        rs = [ratios.get(k) for k in ("latency_p50", "latency_p95", "latency_p99")]
        text += " **" + " / ".join("-" if r is None else f"{r:.2f}x" for r in rs) + " raw**"
    return text


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def summary_table(results: Sequence[StepResult], outcomes: Sequence[dict[str, Any]]) -> list[str]:
    header = [
        "System",
        "N",
        "Enqueue (tasks/s)",
        "Process backlog (tasks/s)",
        "Latency p50 / p95 / p99 (ms)",
        "Mixed (tasks/s)",
        "Worker peak RSS (MB)",
    ]
    rows = []
    for outcome in outcomes:
        name = outcome["name"]
        if outcome["status"] == str(Status.NOT_RUN):
            rows.append([name, "-", f"not run: {outcome['reason']}", "", "", "", ""])
            continue
        ratio = name in RATIO_IN_SUMMARY
        rows.append(
            [
                name,
                str(outcome["n"]),
                _cell(results, name, "enqueue", ratio),
                _cell(results, name, "process", ratio),
                _latency_cell(results, name, ratio),
                _cell(results, name, "mixed", ratio),
                _cell(results, name, "worker_rss", ratio),
            ]
        )
    return _table(header, rows)


def ratio_table(results: Sequence[StepResult], outcomes: Sequence[dict[str, Any]]) -> list[str]:
    keys = [m.key for m in METRICS]
    rows = []
    for outcome in outcomes:
        name = outcome["name"]
        if name == REFERENCE or outcome["status"] == str(Status.NOT_RUN):
            continue
        ratios = ratios_to_reference(results, name)
        rows.append([name, *(f"{ratios[k]:.2f}" if k in ratios else "-" for k in keys)])
    return _table(["System", *keys], rows)


def detail_table(results: Sequence[StepResult]) -> list[str]:
    header = [
        "System",
        "Workload",
        "Variant",
        "N",
        "tasks/s",
        "p50/p95/p99/max ms",
        "RSS MB (procs)",
        "Setup / error",
    ]
    rows = []
    for r in results:
        if r.status is not Status.OK:
            rows.append([r.system, str(r.workload), r.variant, str(r.n), "ERROR", "", "", r.error])
            continue
        lat = ""
        if r.p50_ms is not None:
            lat = "/".join(
                f"{v:.2f}" for v in (r.p50_ms, r.p95_ms or 0, r.p99_ms or 0, r.max_ms or 0)
            )
        rss = ""
        if r.worker_peak_rss_mb is not None:
            rss = f"{r.worker_peak_rss_mb:.0f} ({r.worker_processes})"
        setup = r.setup + (f"; {r.duplicates} duplicate deliveries" if r.duplicates else "")
        if r.extra.get("left_in_queue"):
            setup += f"; {r.extra['left_in_queue']} tasks still queued/unacked afterwards"
        if r.extra.get("failed_runs"):
            setup += f"; {r.extra['failed_runs']} failed run(s) left out"
        rate = "" if r.rate is None else f"{r.rate:,.0f}"
        rates = r.extra.get("rates")
        if rates:
            rate += f" ({min(rates):,.0f}-{max(rates):,.0f}, {len(rates)} runs)"
        rows.append([r.system, str(r.workload), r.variant, str(r.n), rate, lat, rss, setup])
    return _table(header, rows)


def machine_lines(machine: dict[str, Any]) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    return [
        f"- CPU: {machine['cpu_model']} — {machine['logical_cpus']} logical CPUs"
        f" ({machine['usable_cpus']} usable)",
        f"- RAM: {machine['ram_gib']} GiB; kernel {machine['kernel']}",
        f"- Python {machine['python']} ({machine['python_implementation']})",
        f"- {machine['nats_server']}; {machine['redis_server']}",
        f"- Packages: {packages}",
    ]


def write(out: Path, doc: dict[str, Any]) -> None:
    """Write results.json and results.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results = aggregate([StepResult.from_json(r) for r in doc["results"]])
    doc["aggregated"] = [r.to_json() for r in results]
    outcomes: list[dict[str, Any]] = doc["systems"]
    doc["ratios_to_raw"] = {
        o["name"]: ratios_to_reference(results, o["name"])
        for o in outcomes
        if o["name"] != REFERENCE and o["status"] != str(Status.NOT_RUN)
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")

    settings = doc["settings"]
    lines = [
        "# Task framework benchmark",
        "",
        f"Generated {doc['generated_at']} by `{doc['command']}` in {doc['duration_s']:.0f} s"
        + (" — **quick smoke mode, numbers are not meaningful**" if settings["quick"] else "")
        + ".",
        "",
        "## Machine",
        "",
        *machine_lines(doc["machine"]),
        f"- 1-minute load average: {doc['loadavg_1m']['before']:.2f} before the run,"
        f" {doc['loadavg_1m']['after']:.2f} after (the benchmark itself adds ~1-2)",
        "",
        "## Summary",
        "",
        "Best variant per workload (in parentheses when a system has several). Throughput:"
        f" tasks/s, median of {settings['repeats']} run(s), higher is better; latency and RSS:"
        f" lower is better. Latency uses {settings['latency_samples']} samples; mixed = every"
        f" {settings['mixed']['slow_every']}th task sleeps {settings['mixed']['slow_ms']} ms,"
        f" concurrency {settings['mixed']['concurrency']}. RSS is the worker's peak while"
        " draining the backlog (summed over its processes for multi-process pools).",
        "",
        *summary_table(results, outcomes),
        "",
        "## Ratio to the best raw nats-py figure",
        "",
        "value / raw. Throughput: above 1 beats raw. Latency and RSS: below 1 beats raw.",
        "",
        *ratio_table(results, outcomes),
        "",
        "## All measurements",
        "",
        *detail_table(results),
        "",
    ]
    not_run = [o for o in outcomes if o["status"] != str(Status.OK)]
    if not_run:
        lines += ["## Not run / failed", ""]
        lines += [f"- **{o['name']}** ({o['status']}): {o['reason']}" for o in not_run]
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
