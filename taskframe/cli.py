"""The `taskframe` command: run workers and a local server, enqueue, inspect queues."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Annotated

import typer

from taskframe._cli_base import Url, cli
from taskframe._cli_base import run as _run
from taskframe._cli_base import table as _table
from taskframe._cluster import NatsCluster, fixed_specs, free_specs
from taskframe._logs import LogFormat, configure
from taskframe._retry import UNTIL_AVAILABLE
from taskframe._server import NatsServer, default_config
from taskframe._supervisor import announce_ready, supervise
from taskframe.app import App
from taskframe.client import Client, connect
from taskframe.errors import TaskframeError, UnreachableError
from taskframe.provision import provision
from taskframe.schedules import stored_schedules
from taskframe.worker import Worker

log = logging.getLogger("taskframe.cli")

AppRef = Annotated[str, typer.Argument(help="The App, as module:attribute (e.g. shop.worker:app).")]


def load_app(ref: str) -> App:
    """Import `module:attribute` (from the current directory too) and return the App there."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise typer.BadParameter(f"{ref!r} is not module:attribute", param_hint="APP")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        app = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise typer.BadParameter(f"cannot load {ref}: {exc}", param_hint="APP") from exc
    if not isinstance(app, App):
        raise typer.BadParameter(f"{ref} is a {type(app).__name__}, not a taskframe App")
    return app


@cli.command()
def worker(
    app: AppRef,
    queue: Annotated[
        list[str] | None, typer.Option("--queue", "-q", help="Serve only this queue (repeatable).")
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Tasks run at once, per queue.")
    ] = 64,
    processes: Annotated[
        int, typer.Option("--processes", "-p", min=1, help="Worker processes (one per core).")
    ] = 1,
    grace: Annotated[
        float, typer.Option(help="Seconds running tasks get to finish after SIGTERM.")
    ] = 30.0,
    url: Url = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
    log_format: Annotated[
        LogFormat, typer.Option(help="text, or json: one JSON object per line.")
    ] = LogFormat.TEXT,
) -> None:
    """Run a worker for APP until SIGTERM or Ctrl-C, then drain gracefully and exit 0."""
    configure(log_level, log_format)
    the_app = load_app(app)
    if processes > 1:
        command = [sys.executable, "-m", "taskframe", "worker", app, "-c", str(concurrency)]
        command += ["--grace", str(grace), "--log-level", log_level, "--log-format", log_format]
        command += [f"--queue={q}" for q in queue or []]
        command += [f"--url={url}"] if url else []
        raise typer.Exit(supervise(command, processes))

    async def main() -> None:
        client = await _wait_for_server(url, the_app.namespace)
        try:
            running = Worker(the_app, client, queues=queue, concurrency=concurrency, grace=grace)
            ready = asyncio.create_task(running.ready.wait())
            ready.add_done_callback(lambda _: announce_ready())
            try:
                await running.run(handle_signals=True)
            finally:
                ready.cancel()
        finally:
            await client.close()

    _run(main())


async def _wait_for_server(url: str | None, namespace: str) -> Client:
    """Connect, waiting as long as no server answers: a worker may start before its server.

    A refused login or certificate still ends the worker at once: waiting will not help.
    """
    for attempt in itertools.count(1):
        try:
            return await connect(url, namespace=namespace).open()
        except UnreachableError as exc:
            delay = UNTIL_AVAILABLE.delay(attempt)
            log.warning("%s; trying again in %.1fs", exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


@cli.command()
def server(
    port: Annotated[int, typer.Option(help="Client port (-1: any free port).")] = 4222,
    store: Annotated[Path, typer.Option(help="JetStream store directory.")] = Path(
        ".taskframe/nats"
    ),
    config: Annotated[
        Path | None,
        typer.Option(help="nats.conf to load.", show_default="./nats.conf, else the bundled one"),
    ] = None,
    cluster: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Start a local cluster of N nodes instead (n1..nN on client ports PORT.., "
            "route ports 6222.., monitoring 8222..; stores in STORE/../cluster/nI); "
            "use with TASKFRAME_REPLICAS=3.",
        ),
    ] = None,
) -> None:
    """Run the bundled nats-server with JetStream for local development, until Ctrl-C."""
    if cluster is not None:
        _serve_cluster(cluster, port, store)
        return
    conf = config or default_config()
    nats = NatsServer(port=port, store_dir=store, config=conf)
    try:
        nats.start()
    except TaskframeError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"nats-server listening on {nats.url}  (store: {store}, config: {conf or 'none'})")
    typer.echo("Ctrl-C to stop.")
    _serve_until_signal(lambda: nats.running)
    nats.stop()
    typer.echo("nats-server stopped.")


def _serve_cluster(size: int, port: int, store: Path) -> None:
    # The default store is .taskframe/nats; the cluster's nodes go next to it, in
    # .taskframe/cluster/n1.., so a single server's store is never mixed with a node's.
    root = store.parent / "cluster"
    specs = free_specs(size) if port == -1 else fixed_specs(size, (port, 6222, 8222))
    nodes = NatsCluster(size, root=root, specs=specs)
    try:
        nodes.start()
    except TaskframeError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    for spec, node in zip(nodes.specs, nodes.nodes, strict=True):
        typer.echo(f"{spec.name} listening on {node.url}  (store: {node.store_dir})")
    typer.echo(f"cluster of {size} ready; clients use --url {nodes.urls}")
    typer.echo("Ctrl-C to stop.")
    _serve_until_signal(lambda: any(node.running for node in nodes.nodes))
    nodes.stop()
    typer.echo("cluster stopped.")


def _serve_until_signal(alive: Callable[[], bool]) -> None:
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop and alive():
        time.sleep(0.2)


@cli.command()
def enqueue(
    app: AppRef,
    task: Annotated[str, typer.Argument(help="The task name, e.g. ResizeImage.")],
    payload: Annotated[str, typer.Argument(help="The task as JSON.")] = "{}",
    key: Annotated[str | None, typer.Option(help="Idempotency key.")] = None,
    wait: Annotated[
        float | None, typer.Option(help="Wait up to this many seconds for the result.")
    ] = None,
    url: Url = None,
) -> None:
    """Enqueue one task of APP from JSON and print its id (and its result, with --wait)."""
    the_app = load_app(app)
    matches = [h.model for h in the_app.handlers.values() if h.name == task]
    if not matches:
        names = sorted(h.name for h in the_app.handlers.values())
        raise typer.BadParameter(f"{app} has no task {task!r}; it has {names}", param_hint="TASK")
    try:
        model = matches[0].model_validate_json(payload)
    except ValueError as exc:
        raise typer.BadParameter(f"invalid {task}: {exc}", param_hint="PAYLOAD") from exc

    async def main() -> None:
        async with connect(url, namespace=the_app.namespace) as client:
            run = await client.enqueue(model, key=key)
            typer.echo(f"{run.id}{' (duplicate)' if run.duplicate else ''}")
            if wait is not None:
                typer.echo(json.dumps(await run.result(timeout=wait)))

    _run(main())


@cli.command("provision")
def provision_command(app: AppRef, url: Url = None) -> None:
    """Create or update APP's streams, consumers, subscriber groups and schedules.

    Run it ahead of a deploy: events published before a group exists are not kept for it.
    """
    the_app = load_app(app)

    async def main() -> None:
        async with connect(url, namespace=the_app.namespace) as client:
            await provision(the_app, client)
            typer.echo(
                f"provisioned namespace {client.namespace}: queues {sorted(the_app.queues)}, "
                f"groups {sorted(the_app.groups)}, schedules {sorted(the_app.schedules)}"
            )

    _run(main())


@cli.command()
def queues(
    namespace: Annotated[str | None, typer.Option(help="Only this namespace.")] = None,
    url: Url = None,
) -> None:
    """Show every taskframe queue: tasks waiting, in flight, redelivered, dead."""

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            infos = await client.queues(every_namespace=namespace is None)
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
        _table(header, rows)
        if not rows:
            typer.echo("(no taskframe queues on this server)")

    _run(main())


@cli.command()
def dead(
    namespace: Annotated[str, typer.Option(help="The namespace.", envvar="TASKFRAME_NAMESPACE")],
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 50,
    replay: Annotated[
        bool, typer.Option("--replay", help="Enqueue them again (attempt 1) and delete them.")
    ] = False,
    url: Url = None,
) -> None:
    """List dead letters with their reason and error, or replay them onto their queue."""

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            letters = await client.dead_letters(queue=queue, limit=limit)
            for letter in letters:
                if replay:
                    await client.replay(letter)
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
        _table(("SEQ", "QUEUE", "TASK", "ID", "REASON", "ATTEMPTS", "ERROR"), rows)
        if replay:
            typer.echo(f"replayed {len(letters)} task(s)")
        elif not rows:
            typer.echo("(no dead letters)")

    _run(main())


@cli.command("schedules")
def list_schedules(
    namespace: Annotated[str | None, typer.Option(help="Only this namespace.")] = None,
    url: Url = None,
) -> None:
    """Show every periodic schedule the broker holds, with its next fire time."""

    async def main() -> None:
        async with connect(url) as client:
            found = await stored_schedules(client.js, namespace)
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
        _table(header, rows)
        if not rows:
            typer.echo("(no periodic schedules on this server)")

    _run(main())


def main() -> None:
    """Entry point of the `taskframe` console script."""
    cli()


from taskframe import _cli_workers as _cli_workers  # noqa: E402  (registers `workers`)
