"""`taskframe cancel`: commands on one task, by its id."""

from __future__ import annotations

from typing import Annotated

import typer

from taskframe._cli_common import Namespace, Url, cli, run_command
from taskframe.client import connect


@cli.command()
def cancel(
    task_id: Annotated[str, typer.Argument(help="The task's id.", metavar="TASK_ID")],
    namespace: Namespace,
    url: Url = None,
) -> None:
    """Cancel a task: it will not run, or its running handler is stopped.

    Exits 1 if the task already finished or is not known.
    """

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            cancelled = await client.cancel(task_id)
        if not cancelled:
            typer.secho(
                f"task {task_id} not cancelled: it already finished, or is not known",
                fg="yellow",
                err=True,
            )
            raise typer.Exit(1)
        typer.echo(f"cancelled {task_id}")

    run_command(main())
