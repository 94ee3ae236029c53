"""Celery application used by the benchmark (imported by the worker subprocess).

The broker URL comes from the environment so the worker and the producer talk
to the run's own redis-server; there is deliberately no fallback address.
"""

from __future__ import annotations

import os
import time

from celery import Celery  # type: ignore[import-untyped]

from bench.probe import mark

BROKER_ENV = "BENCH_CELERY_BROKER"
QUEUE = "bench"

app = Celery("bench", broker=os.environ[BROKER_ENV])
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,  # no result backend: nothing in the benchmark reads results
    worker_send_task_events=False,
    broker_connection_retry_on_startup=False,
    worker_hijack_root_logger=False,
)


@app.task(name="bench_task")  # type: ignore[untyped-decorator]
def bench_task(index: int, sleep_ms: int) -> None:
    if sleep_ms:
        time.sleep(sleep_ms / 1000)  # celery tasks are sync; I/O-bound sleep
    mark(index)
