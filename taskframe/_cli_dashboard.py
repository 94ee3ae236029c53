"""`taskframe dashboard`: serve the web dashboard (the `dashboard` extra) with uvicorn."""

from __future__ import annotations

import ipaddress
from typing import Annotated, NoReturn

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
    basic_auth: Annotated[
        str | None,
        typer.Option(
            "--basic-auth",
            help="USER:PASSWORD for HTTP basic auth (the browser asks for them); instead of "
            "or with --token.",
            envvar="TASKFRAME_DASHBOARD_BASIC_AUTH",
            show_envvar=True,
        ),
    ] = None,
    url: Url = None,
) -> None:
    """Serve the web dashboard: queues, workers, tasks, dead letters, schedules.

    Needs `pip install 'taskframe[dashboard]'`. Listens on 127.0.0.1 unless told otherwise;
    another address needs --token or --basic-auth.
    """
    if not is_loopback(host) and not (token or basic_auth):
        _fail(
            f"refusing to serve the dashboard on {host}, which is not a loopback address, "
            "without --token or --basic-auth (or TASKFRAME_DASHBOARD_TOKEN / _BASIC_AUTH)"
        )
    try:
        import uvicorn

        from taskframe._dashboard_security import parse_basic_auth
        from taskframe.dashboard import create_app
    except ImportError as exc:
        typer.secho(
            f"error: the dashboard needs its extra: pip install 'taskframe[dashboard]' ({exc})",
            fg="red",
            err=True,
        )
        raise typer.Exit(1) from exc
    try:
        credentials = parse_basic_auth(basic_auth) if basic_auth else None
    except ValueError as exc:
        _fail(str(exc))
    app = create_app(url=url, namespace=namespace, token=token, basic_auth=credentials)
    typer.echo(f"taskframe dashboard on http://{host}:{port}/", err=True)
    # No access log: a first request may carry ?token= in its query string.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)
