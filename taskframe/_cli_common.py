"""What every `taskframe` command module shares: the Typer app, the URL option, and
how a command runs its coroutine. Command modules (cli.py, _cli_<area>.py) import it,
so none imports another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any

import typer

from taskframe.errors import TaskframeError
from taskframe.settings import DEFAULT_URL

cli = typer.Typer(
    name="taskframe",
    help="Typed, asyncio-native tasks on NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Url = Annotated[
    str | None,
    typer.Option(
        help=f"NATS URL(s), comma-separated; may carry credentials. Default: {DEFAULT_URL}.",
        envvar="TASKFRAME_URL",
        show_envvar=True,
    ),
]


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a command's coroutine; a taskframe error is printed, and exits 1."""
    try:
        asyncio.run(coro)
    except TaskframeError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
