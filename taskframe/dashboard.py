"""A web dashboard that reads the broker directly: queues, workers, tasks, dead letters and
schedules, with pause/resume, cancel and replay. Needs the `dashboard` extra
(`pip install 'taskframe[dashboard]'`: starlette, jinja2, uvicorn).

`create_app(client)` (or `create_app(url=..., namespace=...)`) returns a Starlette app to
serve with uvicorn or to mount in a FastAPI or Starlette service; `taskframe dashboard`
serves one. It keeps no state of its own: every page reads the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.templating import Jinja2Templates

from taskframe._dashboard_errors import exception_handlers
from taskframe._dashboard_rates import Rates
from taskframe._dashboard_security import AccessGate
from taskframe._dashboard_views import routes
from taskframe.client import Client, connect
from taskframe.errors import UnreachableError

__all__ = ["create_app"]

_TEMPLATES = Path(__file__).parent / "templates" / "dashboard"


class Broker:
    """The dashboard's connection: the client it was given, or one it opens on first use."""

    def __init__(self, client: Client | None, url: str | None, namespace: str | None) -> None:
        self._client, self._own = client, client is None
        self._url, self._namespace = url, namespace
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        """The connected client (connecting the dashboard's own on first use).

        Raises `UnreachableError` at once while the connection is down (it reconnects by
        itself), rather than letting a page wait for answers that cannot come.
        """
        async with self._lock:
            if self._client is None:
                self._client = await connect(self._url, namespace=self._namespace).open()
        if not self._client.nc.is_connected:
            raise UnreachableError("the dashboard is not connected to NATS (reconnecting)")
        return self._client

    async def close(self) -> None:
        """Close the connection if the dashboard opened it."""
        if self._own and self._client is not None:
            await self._client.close()
            self._client = None


def create_app(
    client: Client | None = None,
    *,
    url: str | None = None,
    namespace: str | None = None,
    token: str | None = None,
    basic_auth: tuple[str, str] | None = None,
) -> Starlette:
    """The dashboard as an ASGI app, on `client` (a connected `Client`, which the caller
    closes) or on a connection of its own to `url` in `namespace` (opened on the first
    request, closed when the app shuts down).

    With `token`, every request needs `Authorization: Bearer <token>`, or `?token=<token>`
    once (which sets a cookie); with `basic_auth=(user, password)`, HTTP basic auth (the
    browser asks). Given both, either lets a request in. Every POST form carries a per-app
    CSRF token; a POST without it gets 403. While the broker cannot be reached, or a
    stream is missing, pages say so (HTTP 503 / 404) and work again once it is back.
    """
    broker = Broker(client, url, namespace)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await broker.close()

    app = Starlette(
        routes=routes(),
        middleware=[Middleware(AccessGate, token=token, basic_auth=basic_auth)]
        if token or basic_auth
        else [],
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    app.state.broker = broker
    app.state.rates = Rates()
    app.state.csrf = secrets.token_urlsafe(32)
    app.state.templates = Jinja2Templates(directory=str(_TEMPLATES))
    return app
