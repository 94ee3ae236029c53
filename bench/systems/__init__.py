"""Registry of benchmarked systems (one module per system, each exposing ``SYSTEM``)."""

from __future__ import annotations

import importlib
import importlib.util

from bench.systems.base import BenchSystem

#: Run order. "taskframe" is optional: its module is written separately and is
#: skipped when absent.
MODULES: dict[str, str] = {
    "raw": "bench.systems.raw_nats",
    "taskframe": "bench.systems.taskframe_system",
    "taskiq": "bench.systems.taskiq_system",
    "arq": "bench.systems.arq_system",
    "saq": "bench.systems.saq_system",
    "celery": "bench.systems.celery_system",
    "dramatiq": "bench.systems.dramatiq_system",
}
OPTIONAL = frozenset({"taskframe"})
REFERENCE = "raw"


class SystemUnavailable(Exception):
    """The system's module is missing or cannot be imported."""


def load(name: str) -> type[BenchSystem]:
    module_name = MODULES[name]
    if importlib.util.find_spec(module_name) is None:
        raise SystemUnavailable(f"module {module_name} not present")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken optional module must not stop the run
        raise SystemUnavailable(f"cannot import {module_name}: {exc!r}") from exc
    system: type[BenchSystem] = module.SYSTEM
    return system
