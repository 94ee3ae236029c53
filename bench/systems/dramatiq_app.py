"""Dramatiq broker and actor used by the benchmark (imported by the worker CLI).

The broker URL comes from the environment so the worker and the producer talk
to the run's own redis-server; there is deliberately no fallback address.
"""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.probe import mark

BROKER_ENV = "BENCH_DRAMATIQ_BROKER"
QUEUE = "bench"

broker = RedisBroker(url=os.environ[BROKER_ENV])  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench_task", queue_name=QUEUE, max_retries=0)
def bench_task(index: int, sleep_ms: int) -> None:
    if sleep_ms:
        time.sleep(sleep_ms / 1000)  # dramatiq actors run in threads; I/O-bound sleep
    mark(index)
