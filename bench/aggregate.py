"""Folding repeated runs of a step into one figure (the median)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace

from bench.model import Status, StepResult


def aggregate(results: Sequence[StepResult]) -> list[StepResult]:
    """One result per (system, workload, variant), in first-seen order.

    Throughput is the median over the successful repeats (all rates are kept
    in ``extra["rates"]``); peak RSS is the maximum; duplicates add up. A key
    with no successful run keeps its first error; failed repeats of an
    otherwise successful key are counted in ``extra["failed_runs"]``.
    """
    groups: dict[tuple[str, str, str], list[StepResult]] = {}
    for result in results:
        groups.setdefault((result.system, result.workload, result.variant), []).append(result)
    folded: list[StepResult] = []
    for runs in groups.values():
        ok = [r for r in runs if r.status is Status.OK]
        if not ok:
            folded.append(runs[0])
            continue
        # For latency (normally one run) keep the run with the median p50.
        ok.sort(key=lambda r: r.rate if r.rate is not None else (r.p50_ms or 0.0))
        middle = ok[(len(ok) - 1) // 2] if ok[0].rate is None else ok[len(ok) // 2]
        rates = [r.rate for r in ok if r.rate is not None]
        rss = [r.worker_peak_rss_mb for r in ok if r.worker_peak_rss_mb is not None]
        merged = replace(
            middle,
            rate=statistics.median(rates) if rates else None,
            worker_peak_rss_mb=max(rss) if rss else None,
            duplicates=sum(r.duplicates for r in ok),
            extra=dict(middle.extra),
        )
        if len(rates) > 1:
            merged.extra["rates"] = [round(r, 1) for r in rates]
        if len(ok) < len(runs):
            merged.extra["failed_runs"] = len(runs) - len(ok)
        folded.append(merged)
    return folded
