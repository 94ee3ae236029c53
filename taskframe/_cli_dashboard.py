"""`taskframe dashboard`: serve the web dashboard (the `dashboard` extra) with uvicorn."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from taskframe._cli_common import Url, cli


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli.command()
def dashboard(
    namespace: Annotated[
        str | None, typer.Option(help="The namespace.", envvar="TASKFRAME_NAMESPACE")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    token: Annotated[
        str | None,
        typer.Option(
            help="Required on a non-loopback host: every request must send "
            "`Authorization: Bearer TOKEN` (or open the dashboard once with ?token=TOKEN).",
            envvar="TASKFRAME_DASHBOARD_TOKEN",
            show_envvar=True,
        ),
    ] = None,
    url: Url = None,
) -> None:
    """Serve the web dashboard: queues, workers, tasks, dead letters, schedules.

    Needs `pip install 'taskframe[dashboard]'`. Listens on 127.0.0.1 unless told otherwise;
    another address needs --token.
    """
    if not is_loopback(host) and not token:
        typer.secho(
            f"error: refusing to serve the dashboard on {host}, which is not a loopback "
            "address, without --token (or TASKFRAME_DASHBOARD_TOKEN)",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    try:
        import uvicorn

        from taskframe.dashboard import create_app
    except ImportError as exc:
        typer.secho(
            f"error: the dashboard needs its extra: pip install 'taskframe[dashboard]' ({exc})",
            fg="red",
            err=True,
        )
        raise typer.Exit(1) from exc
    app = create_app(url=url, namespace=namespace, token=token)
    typer.echo(f"taskframe dashboard on http://{host}:{port}/", err=True)
    # No access log: a first request may carry ?token= in its query string.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
