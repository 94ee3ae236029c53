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

from taskframe._dashboard_security import TokenGate
from taskframe._dashboard_views import routes
from taskframe.client import Client, connect

__all__ = ["create_app"]

_TEMPLATES = Path(__file__).parent / "templates" / "dashboard"


class Broker:
    """The dashboard's connection: the client it was given, or one it opens on first use."""

    def __init__(self, client: Client | None, url: str | None, namespace: str | None) -> None:
        self._client, self._own = client, client is None
        self._url, self._namespace = url, namespace
        self._lock = asyncio.Lock()

    async def client(self) -> Client:
        """The connected client (connecting the dashboard's own on first use)."""
        async with self._lock:
            if self._client is None:
                self._client = await connect(self._url, namespace=self._namespace).open()
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
) -> Starlette:
    """The dashboard as an ASGI app, on `client` (a connected `Client`, which the caller
    closes) or on a connection of its own to `url` in `namespace` (opened on the first
    request, closed when the app shuts down).

    With `token`, every request needs `Authorization: Bearer <token>`, or `?token=<token>`
    once (which sets a cookie). Every POST form carries a per-app CSRF token; a POST
    without it gets 403.
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
        middleware=[Middleware(TokenGate, token=token)] if token else [],
        lifespan=lifespan,
    )
    app.state.broker = broker
    app.state.csrf = secrets.token_urlsafe(32)
    app.state.templates = Jinja2Templates(directory=str(_TEMPLATES))
    return app
