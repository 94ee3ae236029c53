"""`taskframe workers`: the running workers of a namespace, from its worker registry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from taskframe._cli_common import Url, cli, run_command, table
from taskframe._registry import WorkerInfo
from taskframe.client import connect


@cli.command()
def workers(
    namespace: Annotated[str, typer.Option(help="The namespace.", envvar="TASKFRAME_NAMESPACE")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON array, one object per worker.")
    ] = False,
    url: Url = None,
) -> None:
    """Show the running workers: host, pid, queues, tasks running, counts, last seen.

    Each worker rewrites its record every heartbeat (TASKFRAME_WORKER_HEARTBEAT, 5 s) and
    removes it when it stops; a killed worker drops out within three heartbeats.
    """

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            found = await client.workers()
        if as_json:
            typer.echo(json.dumps([w.model_dump(mode="json") for w in found], indent=2))
            return
        table(_HEADER, [_row(w, datetime.now(UTC)) for w in found])
        if not found:
            typer.echo(f"(no running workers in namespace {namespace})")

    run_command(main())


_HEADER = (
    "ID", "HOST", "PID", "QUEUES", "CONCURRENCY", "RUNNING",
    "SUCCEEDED", "RETRIED", "DEAD", "LOST", "STARTED (UTC)", "LAST SEEN",
)  # fmt: skip


def _row(w: WorkerInfo, now: datetime) -> tuple[str, ...]:
    served = ",".join([*w.queues, *(f"group:{g}" for g in w.groups)]) or "-"
    counts = (w.concurrency, w.running, w.succeeded, w.retried, w.dead, w.lost)
    seen = max(0.0, (now - w.last_seen).total_seconds())
    return (
        w.id,
        w.host,
        str(w.pid),
        served + (" (stopping)" if w.stopping else ""),
        *map(str, counts),
        w.started.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        f"{seen:.0f}s ago",
    )
