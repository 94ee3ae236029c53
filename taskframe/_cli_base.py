"""The `taskframe` Typer app and what every command module shares.

taskframe/cli.py holds the first commands; each taskframe/_cli_<area>.py registers more on
`cli` from here, and cli.py imports them last (importing cli.py back would be a cycle).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
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
    """Run a command's coroutine; a `TaskframeError` is printed in red and exits 1."""
    try:
        asyncio.run(coro)
    except TaskframeError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Print `rows` under `header`, in columns as wide as their widest value."""
    lines = [header, *rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    for row in lines:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
