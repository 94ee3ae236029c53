"""The worker registry: every running worker keeps one record in the namespace's KV bucket.

    TF_<ns>_workers  key = the worker's id, value = its record (JSON), each write with a
                     per-message TTL of 2.5 heartbeats, rounded down to whole seconds

A worker writes its record when it is ready and every `worker_heartbeat` seconds after,
and purges it when it exits. A worker that stops writing (killed, frozen, cut off) loses
its record to the server's TTL within three heartbeats; a write half a heartbeat late does
not drop it (docs/server-behaviour.md). Workers with different heartbeats share the
bucket: each write carries its own TTL. The server's clock stamps each write:
`WorkerInfo.last_seen` is that stamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError
from pydantic import BaseModel, ConfigDict, ValidationError

from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._retry import answered
from taskframe.provision import ensure_stream

if TYPE_CHECKING:
    from taskframe._stats import WorkerStats
    from taskframe.client import Client

log = logging.getLogger("taskframe._registry")

_LIVES = 2.5
"""A record's TTL, in heartbeats (rounded down to seconds: more than 1.5, at most 2.5)."""
_PURGE = {"KV-Operation": "PURGE", "Nats-Rollup": "sub", "Nats-TTL": "1s"}


class WorkerInfo(BaseModel):
    """One running worker process, as its latest registry record describes it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    """The worker's id: random, one per `Worker.run()`."""
    namespace: str
    host: str
    pid: int
    queues: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    """The subscriber groups it serves."""
    concurrency: int
    """Tasks it runs at once, per queue (and per group)."""
    running: int = 0
    """Tasks running when it last wrote its record."""
    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    lost: int = 0
    """Deliveries it gave up to another worker (its lease ran out or was taken over)."""
    started: datetime
    last_seen: datetime
    """When the server stored its latest record (the server's clock)."""
    heartbeat: float
    """Seconds between its records; it drops out after about 2.5 of them without one."""
    stopping: bool = False
    """Draining after a stop: it takes no new tasks and exits soon."""


class Registration:
    """A worker's record in the registry: written every heartbeat, purged on exit.

    Args:
        client: the worker's client.
        stats: the worker's counts, read at every write.
        queues, groups, concurrency: what the worker serves, written as they are.
        stopping: set when the worker stops; the record then says so at once.
    """

    def __init__(
        self,
        client: Client,
        stats: WorkerStats,
        queues: list[str],
        groups: list[str],
        concurrency: int,
        stopping: asyncio.Event,
    ) -> None:
        settings = client.settings
        self.id = secrets.token_hex(6)
        self._client = client
        self._stats = stats
        self._stopping = stopping
        self._heartbeat = settings.worker_heartbeat
        self._ttl = f"{math.floor(self._heartbeat * _LIVES)}s"
        self._subject = topology.worker_subject(settings.namespace, self.id)
        self._fixed = {
            "id": self.id,
            "namespace": settings.namespace,
            "host": socket.gethostname(),
            "queues": queues,
            "groups": groups,
            "concurrency": concurrency,
            "heartbeat": self._heartbeat,
        }
        self._started = ""
        self._written = False
        self._failing = False

    def __repr__(self) -> str:
        return f"<Registration {self._subject} every {self._heartbeat:g}s ttl={self._ttl}>"

    def record(self) -> bytes:
        """The record as it stands now."""
        s = self._stats
        self._started = self._started or wire.now_rfc3339()  # when it first wrote one
        return wire.dumps(
            {
                **self._fixed,
                "pid": os.getpid(),
                "running": s.running,
                "succeeded": s.succeeded,
                "retried": s.retried,
                "dead": s.dead,
                "lost": s.lost,
                "started": self._started,
                "stopping": self._stopping.is_set(),
            }
        )

    async def keep(self) -> None:
        """Write the record every heartbeat after `write()` (and at once on stopping), until
        cancelled."""
        while True:
            if self._stopping.is_set():
                await asyncio.sleep(self._heartbeat)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._heartbeat)
            if _cancelling():  # a cancel that met a finished wait was swallowed (3.11)
                raise asyncio.CancelledError
            await self.write()
            if _cancelling():  # or one that met the write's answer
                raise asyncio.CancelledError

    async def write(self) -> None:
        """Write the record now; a failure is logged (once in a row), never raised."""
        js, headers = self._client.js, {"Nats-TTL": self._ttl}
        try:
            try:
                await js.publish(
                    self._subject, self.record(), timeout=self._heartbeat, headers=headers
                )
            except NoStreamResponseError:  # the bucket is gone: deleted, or lost in memory
                await ensure_stream(js, configs.workers_config(self._client.settings))
                await js.publish(
                    self._subject, self.record(), timeout=self._heartbeat, headers=headers
                )
        except Exception as exc:
            if not self._failing:
                log.warning("worker record not written (%r); trying every heartbeat", exc)
            self._failing = True
            return
        if self._failing:
            log.info("worker record written again")
        self._written, self._failing = True, False

    async def remove(self) -> None:
        """Purge the record (it leaves no trace after a second); nothing if never written."""
        if not self._written:
            return
        try:
            timeout = self._client.settings.publish_timeout
            await self._client.js.publish(self._subject, b"", timeout=timeout, headers=_PURGE)
        except Exception as exc:
            log.warning("worker record not removed (%r); it expires within %s", exc, self._ttl)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def worker_infos(js: JetStreamContext, namespace: str) -> list[WorkerInfo]:
    """Every worker whose record is in `namespace`'s registry, by host, pid and id.

    Lists the bucket's keys from the stream's subjects, then reads each record directly
    (no consumer is made). A record that cannot be read is left out with a warning.
    """
    stream = topology.workers_stream(namespace)
    keys = topology.worker_subject(namespace, ">")
    try:
        info = await answered("the worker registry", js.stream_info, stream, subjects_filter=keys)
    except NotFoundError:
        return []
    subjects = sorted(info.state.subjects or {})
    found = await asyncio.gather(*(_read(js, stream, subject) for subject in subjects))
    return sorted((w for w in found if w is not None), key=lambda w: (w.host, w.pid, w.id))


async def _read(js: JetStreamContext, stream: str, subject: str) -> WorkerInfo | None:
    try:
        msg = await answered(f"record {subject}", js.get_last_msg, stream, subject, direct=True)
    except NotFoundError:
        return None  # expired since it was listed
    if not msg.data or (msg.headers or {}).get("KV-Operation"):
        return None  # purged by a worker that stopped
    try:
        record = json.loads(msg.data)
        return WorkerInfo.model_validate({**record, "last_seen": msg.time or datetime.now(UTC)})
    except (ValueError, TypeError, ValidationError) as exc:
        log.warning("worker record %s unreadable, left out: %s", subject, exc)
        return None
