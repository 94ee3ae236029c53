"""The `taskframe` commands that steer a queue: pause, resume, purge."""

from __future__ import annotations

from typing import Annotated

import typer

from taskframe._cli_common import Namespace, Url, cli, run_command
from taskframe.client import connect

Queue = Annotated[str, typer.Argument(help="The queue's name.")]


@cli.command()
def pause(queue: Queue, namespace: Namespace, url: Url = None) -> None:
    """Stop handing QUEUE's tasks to any worker (every lane), until `taskframe resume`.

    The pause is kept by the server: it holds for every worker and across restarts.
    Tasks already running finish; new tasks are still accepted.
    """

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            await client.pause(queue)
        typer.echo(f"paused queue {queue} of namespace {namespace}")

    run_command(main())


@cli.command()
def resume(queue: Queue, namespace: Namespace, url: Url = None) -> None:
    """Hand QUEUE's tasks to workers again."""

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            await client.resume(queue)
        typer.echo(f"resumed queue {queue} of namespace {namespace}")

    run_command(main())


@cli.command()
def purge(
    queue: Queue,
    namespace: Namespace,
    yes: Annotated[bool, typer.Option("--yes", help="Yes, remove them.")] = False,
    url: Url = None,
) -> None:
    """Remove every task waiting in QUEUE (all lanes) and print how many.

    Tasks running or waiting for a retry stay, and so do delayed tasks and periodic
    schedules. Refuses to run without --yes.
    """
    if not yes:
        typer.secho(
            f"purge removes every waiting task of queue {queue}; add --yes to do it",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            removed = await client.purge(queue)
        typer.echo(f"purged {removed} task(s) from queue {queue} of namespace {namespace}")

    run_command(main())
