"""The `taskframe` commands that show what the broker holds: queues, dead letters,
schedules and one task's status. Each prints a table, or with `--json` JSON whose fields
are named as the models' fields (`QueueInfo`, `DeadLetter`, `StoredSchedule`,
`TaskStatus`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from taskframe._cli_common import Namespace, Url, cli, run_command, table
from taskframe._results import TaskState, TaskStatus
from taskframe.client import connect
from taskframe.flows import FlowStatus, flow_named
from taskframe.schedules import stored_schedules

Json = Annotated[bool, typer.Option("--json", help="Print one JSON document instead.")]


@cli.command()
def queues(
    namespace: Annotated[str | None, typer.Option(help="Only this namespace.")] = None,
    as_json: Json = False,
    url: Url = None,
) -> None:
    """Show every taskframe queue: tasks waiting, in flight, redelivered, dead."""

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            infos = await client.queues(every_namespace=namespace is None)
        if as_json:
            _json(infos)
            return
        header = ("NAMESPACE", "QUEUE", "WAITING", "IN FLIGHT", "REDELIVERED", "DEAD", "PAUSED")
        rows = [
            (
                q.namespace,
                q.queue,
                *map(str, (q.waiting, q.in_flight, q.redelivered, q.dead)),
                "yes" if q.paused else "no",
            )
            for q in infos
        ]
        table(header, rows)
        if not rows:
            typer.echo("(no taskframe queues on this server)")

    run_command(main())


@cli.command()
def dead(
    namespace: Namespace,
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    task: Annotated[str | None, typer.Option(help="Only this task name.")] = None,
    reason: Annotated[
        str | None,
        typer.Option(help="Only this reason: failed, rejected, invalid, unknown-task, lost."),
    ] = None,
    task_id: Annotated[str | None, typer.Option("--id", help="Only this task id.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 50,
    replay: Annotated[
        bool, typer.Option("--replay", help="Enqueue them again (attempt 1) and delete them.")
    ] = False,
    as_json: Json = False,
    url: Url = None,
) -> None:
    """List dead letters with their reason and error, or replay them onto their queue.

    The filters apply to both: `--replay --task Resize` replays only Resize tasks.
    """

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            letters = await client.dead_letters(
                queue=queue, task=task, reason=reason, task_id=task_id, limit=limit
            )
            for letter in letters:
                if replay:
                    await client.replay(letter)
        if as_json:
            _json(letters)
            return
        rows = [
            (
                str(d.seq),
                d.original_subject.split(".")[2] if d.original_subject.count(".") > 2 else "?",
                d.subject.rsplit(".", 1)[-1],
                d.task_id,
                d.reason,
                str(d.attempts),
                f"{d.error_type}: {d.error}"[:80],
            )
            for d in letters
        ]
        table(("SEQ", "QUEUE", "TASK", "ID", "REASON", "ATTEMPTS", "ERROR"), rows)
        if replay:
            typer.echo(f"replayed {len(letters)} task(s)")
        elif not rows:
            typer.echo("(no dead letters)")

    run_command(main())


@cli.command("schedules")
def list_schedules(
    namespace: Annotated[str | None, typer.Option(help="Only this namespace.")] = None,
    as_json: Json = False,
    url: Url = None,
) -> None:
    """Show every periodic schedule the broker holds, with its next fire time."""

    async def main() -> None:
        async with connect(url) as client:
            found = await stored_schedules(client.js, namespace)
        if as_json:
            _json(found)
            return
        header = ("NAMESPACE", "QUEUE", "NAME", "TASK", "SCHEDULE", "NEXT FIRE (UTC)")
        rows = [
            (
                s.namespace,
                s.queue,
                s.name,
                s.task,
                s.expression + (f" ({s.time_zone})" if s.time_zone else ""),
                s.next_fire.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if s.next_fire else "?",
            )
            for s in found
        ]
        table(header, rows)
        if not rows:
            typer.echo("(no periodic schedules on this server)")

    run_command(main())


@cli.command()
def status(
    task_id: Annotated[str, typer.Argument(help="The task id `enqueue` printed.")],
    namespace: Namespace,
    as_json: Json = False,
    url: Url = None,
) -> None:
    """Show one task's state, attempt, last update, error and result (exit 1: no record);
    for a flow's id, the flow's state and each step's."""

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            found = await client.status(task_id)
            progress = await client.progress(task_id)
            run = await flow_named(client, task_id, found)
            flow = await run.status() if run is not None else None
        if flow is not None:
            _show_flow(flow, as_json)
            return
        if found is None and progress is not None:  # running, before its first status record
            found = TaskStatus(
                id=task_id,
                task="?",
                state=TaskState.RUNNING,
                attempt=progress.attempt,
                updated_at=progress.updated_at,
            )
        if found is None:
            typer.secho(
                f"no status record for task {task_id} in namespace {namespace}: no worker "
                "picked it up yet, its record expired (result_ttl), its task keeps no "
                "results, or it was never enqueued",
                fg="red",
                err=True,
            )
            raise typer.Exit(1)
        if as_json:
            shown = found.model_dump(mode="json")
            shown["progress"] = progress.model_dump(mode="json") if progress else None
            typer.echo(json.dumps(shown))
            return
        error = found.error
        rows = [
            ("id", found.id),
            ("task", found.task),
            ("state", found.state.value),
            ("attempt", str(found.attempt)),
            ("updated", found.updated_at or "?"),
            ("error", f"{error.type}: {error.message}" if error else "-"),
            ("result", json.dumps(found.result)),
        ]
        if progress is not None:
            total = f"/{progress.total:g}" if progress.total is not None else ""
            note = f" ({progress.note})" if progress.note else ""
            rows.append(("progress", f"{progress.done:g}{total}{note}"))
        for name, value in rows:
            typer.echo(f"{name.upper():<8} {value}")

    run_command(main())


def _show_flow(flow: FlowStatus, as_json: bool) -> None:
    """A flow's state, then one row per step (`taskframe status FLOW_ID`)."""
    if as_json:
        typer.echo(flow.model_dump_json())
        return
    typer.echo(f"FLOW     {flow.id}\nSTATE    {flow.state.value}")
    if flow.error is not None:
        typer.echo(f"ERROR    {flow.error.type}: {flow.error.message}")
    rows = [
        (
            str(s.step),
            s.id,
            s.task,
            s.state.value if s.state else "pending",
            str(s.attempt),
            f"{s.error.type}: {s.error.message}" if s.error else "-",
        )
        for s in flow.steps
    ]
    table(("STEP", "ID", "TASK", "STATE", "ATTEMPT", "ERROR"), rows)


def _json(items: Sequence[Any]) -> None:
    """Print dataclass instances as one JSON array of objects."""
    typer.echo(json.dumps([dataclasses.asdict(item) for item in items], default=_plain))


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):  # a dead letter's body: the task's JSON, as text
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
