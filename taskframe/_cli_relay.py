"""`taskframe relay`: send the committed rows of a database's outbox table to the broker."""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer

from taskframe._cli_common import Namespace, Url, cli, run_command
from taskframe.client import connect


@cli.command()
def relay(
    db: Annotated[
        str,
        typer.Option(help="SQLAlchemy URL of the outbox's database.", envvar="TASKFRAME_OUTBOX_DB"),
    ],
    namespace: Namespace,
    url: Url = None,
    batch: Annotated[int, typer.Option(min=1, help="Rows sent per pass.")] = 500,
    poll_interval: Annotated[
        float, typer.Option(min=0.01, help="Seconds between looks when no NOTIFY wakes it.")
    ] = 1.0,
    listen: Annotated[
        bool, typer.Option(help="On PostgreSQL, wake on the table's NOTIFY trigger.")
    ] = True,
    create_table: Annotated[
        bool, typer.Option(help="Create the outbox table first if it is missing.")
    ] = False,
) -> None:
    """Send the outbox's committed tasks and events, in order, until SIGTERM or SIGINT.

    Needs the `outbox` extra. Several relays may run on one PostgreSQL table; on SQLite,
    run one.
    """
    from taskframe import outbox

    if create_table:
        outbox.create_table(db)

    async def main() -> None:
        async with connect(url, namespace=namespace) as client:
            relay = outbox.Relay(
                client, db, batch=batch, poll_interval=poll_interval, listen=listen
            )
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, relay.stop)
            typer.echo(f"relay started: {relay!r}")
            await relay.run()
            typer.echo(f"relay stopped after sending {relay.sent} row(s)")

    run_command(main())
