"""The `taskframe` command: run workers and a local server, enqueue, provision.

The commands that inspect the broker (queues, dead, schedules, status) are in
_cli_inspect.py, those that steer a queue (pause, resume, purge) in _cli_control.py; both
register on the same `cli`, imported at the end of this module.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from taskframe._cli_common import AppRef, Url, cli, load_app, run_command
from taskframe._cluster import NatsCluster, fixed_specs, free_specs
from taskframe._logs import LogFormat, configure
from taskframe._recycle import serve
from taskframe._retry import UNTIL_AVAILABLE
from taskframe._server import NatsServer, default_config
from taskframe._supervisor import RECYCLED, Supervisor, supervise
from taskframe.client import Client, connect
from taskframe.errors import TaskframeError, UnreachableError
from taskframe.provision import provision
from taskframe.worker import Worker

log = logging.getLogger("taskframe.cli")


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
    max_tasks: Annotated[
        int | None,
        typer.Option(
            "--max-tasks-per-process",
            min=1,
            help="Replace a worker process once it has started this many tasks.",
        ),
    ] = None,
    max_memory_mb: Annotated[
        int | None,
        typer.Option(
            min=1, help="Replace a worker process once its memory (RSS) is above this many MiB."
        ),
    ] = None,
    url: Url = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Serve Prometheus metrics at /metrics on this port."),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Where /metrics listens.")] = "127.0.0.1",
    metrics_child: Annotated[bool, typer.Option(hidden=True)] = False,
    log_format: Annotated[
        LogFormat, typer.Option(help="text, or json: one JSON object per line.")
    ] = LogFormat.TEXT,
) -> None:
    """Run a worker for APP until SIGTERM or Ctrl-C, then drain gracefully and exit 0."""
    configure(log_level, log_format)
    the_app = load_app(app)
    metrics = _metrics() if metrics_port is not None or metrics_child else None
    supervisor = Supervisor()  # recycling needs one: then even a single process gets one
    if not supervisor.present and (processes > 1 or max_tasks or max_memory_mb):
        command = [sys.executable, "-m", "taskframe", "worker", app, "-c", str(concurrency)]
        command += ["--grace", str(grace), "--log-level", log_level, "--log-format", log_format]
        command += [f"--queue={q}" for q in queue or []]
        command += [f"--url={url}"] if url else []
        command += [f"--max-tasks-per-process={max_tasks}"] if max_tasks else []
        command += [f"--max-memory-mb={max_memory_mb}"] if max_memory_mb else []
        if metrics is None or metrics_port is None:
            raise typer.Exit(supervise(command, processes))
        try:
            served = metrics.PoolMetrics(url, the_app.namespace, metrics_port, metrics_host)
        except TaskframeError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(1) from exc
        try:
            raise typer.Exit(supervise([*command, "--metrics-child"], processes, served.exited))
        finally:
            served.close()
    registry = None
    if metrics is not None:  # a pool's child writes for its supervisor, registered nowhere
        registry = None if metrics_child else metrics.CollectorRegistry()
        the_app.add_hook(metrics.Metrics(registry))
    why: str | None = None

    async def main() -> None:
        nonlocal why
        client = await _wait_for_server(url, the_app.namespace)
        stop_serving = None
        if metrics is not None and registry is not None and metrics_port is not None:
            stop_serving = metrics.serve_worker(registry, client, metrics_port, metrics_host)
        try:
            running = Worker(
                the_app, client, queues=queue, concurrency=concurrency, grace=grace,
                max_tasks=max_tasks,
            )  # fmt: skip
            why = await serve(running, supervisor, max_memory_mb)
        finally:
            if stop_serving is not None:
                await asyncio.to_thread(stop_serving)
            await client.close()

    run_command(main())
    if why is not None:
        raise typer.Exit(RECYCLED)


def _metrics() -> Any:
    """taskframe.metrics, or a clear error if its extra is not installed."""
    try:
        from taskframe import metrics
    except TaskframeError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    return metrics


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
    key: Annotated[str | None, typer.Option(help="Idempotency key, which is the task id.")] = None,
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

    run_command(main())


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

    run_command(main())


def main() -> None:
    """Entry point of the `taskframe` console script."""
    cli()


from taskframe import _cli_control as _cli_control  # noqa: E402  (registers its commands)
from taskframe import _cli_dashboard as _cli_dashboard  # noqa: E402  (registers `dashboard`)
from taskframe import _cli_inspect as _cli_inspect  # noqa: E402
from taskframe import _cli_relay as _cli_relay  # noqa: E402  (registers `relay`)
from taskframe import _cli_schema as _cli_schema  # noqa: E402  (registers `schema`)
from taskframe import _cli_tasks as _cli_tasks  # noqa: E402
from taskframe import _cli_workers as _cli_workers  # noqa: E402  (registers `workers`)
