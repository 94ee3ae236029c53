"""`taskframe schema`: the contracts of an app's namespace, for producers in any language."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from taskframe._cli_common import AppRef, cli, load_app
from taskframe.schema import write_schemas


@cli.command()
def schema(
    app: AppRef,
    out: Annotated[Path, typer.Option(help="The directory to write into.")] = Path("schema"),
    version: Annotated[str, typer.Option(help="info.version of the AsyncAPI document.")] = "1.0.0",
) -> None:
    """Write JSON Schema of APP's tasks, results, events and status records, and AsyncAPI 3.0.

    Files: tasks/<queue>/<Task>.json, results/<queue>/<Task>.json, events/<Event>.json,
    status.json and asyncapi.json (channels are subjects, messages the models with their
    headers). The rules they cannot say are in docs/wire-format.md.
    """
    written = write_schemas(load_app(app), out, version)
    for path in written:
        typer.echo(str(path))
