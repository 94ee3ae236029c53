"""Data types shared by the orchestrator, the step runner and the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Workload(StrEnum):
    ENQUEUE = "enqueue"
    PROCESS = "process"
    LATENCY = "latency"
    MIXED = "mixed"


class Status(StrEnum):
    OK = "ok"
    ERROR = "error"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class MixedSpec:
    """Mixed workload: every ``slow_every``-th task sleeps ``slow_ms`` (I/O-bound)."""

    concurrency: int = 100
    slow_every: int = 10
    slow_ms: int = 50


def sleep_ms_for(index: int, slow_every: int, slow_ms: int) -> int:
    """The one rule deciding which tasks of a backlog are slow (so all systems agree)."""
    if slow_every > 0 and index % slow_every == 0:
        return slow_ms
    return 0


@dataclass
class StepResult:
    """One measurement: a system running one workload (in one variant)."""

    system: str
    workload: Workload
    variant: str = "default"
    status: Status = Status.OK
    repeat: int = 0
    n: int = 0
    rate: float | None = None  # tasks/s for enqueue, process and mixed
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    elapsed_s: float | None = None
    worker_peak_rss_mb: float | None = None
    worker_processes: int | None = None
    duplicates: int = 0
    setup: str = ""  # how the system was driven (API, pool, concurrency)
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["workload"] = str(self.workload)
        data["status"] = str(self.status)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepResult:
        fields = dict(data)
        fields["workload"] = Workload(fields["workload"])
        fields["status"] = Status(fields["status"])
        return cls(**fields)
