"""What every `taskframe` command module shares: the Typer app, the URL, namespace and app
arguments (`load_app`), and the runner that turns a `TaskframeError` into a message and
exit code 1.

taskframe/cli.py defines the core commands and imports the other command modules
(`_cli_inspect`, `_cli_control`), which register theirs on `cli`.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Annotated, Any

import typer

from taskframe.app import App
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


Namespace = Annotated[str, typer.Option(help="The namespace.", envvar="TASKFRAME_NAMESPACE")]


def run_command(coro: Coroutine[Any, Any, None]) -> None:
    """Run a command's coroutine; a `TaskframeError` is printed and exits with code 1."""
    try:
        asyncio.run(coro)
    except TaskframeError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """Print `rows` under `header`, in columns as wide as their widest value."""
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
