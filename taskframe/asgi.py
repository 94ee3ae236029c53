"""One taskframe client per Starlette or FastAPI app, opened and closed by its lifespan.
Needs starlette (the `asgi` extra; FastAPI brings it).

    app = FastAPI(lifespan=taskframe.asgi.lifespan("nats://127.0.0.1:4222", namespace="shop"))

    @app.post("/resize")
    async def resize(url: str, tf: Annotated[Client, Depends(taskframe.asgi.get_client)]):
        run = await tf.enqueue(ResizeImage(url=url))
        return {"id": run.id}

The client lives in `app.state.taskframe`; every request shares its one connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from taskframe.client import Client, connect

try:
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "taskframe.asgi needs starlette: pip install 'taskframe[asgi]' (or install fastapi)"
    ) from exc

__all__ = ["get_client", "lifespan"]

STATE_KEY = "taskframe"


def lifespan(
    url: str | Sequence[str] | None = None,
    *,
    namespace: str | None = None,
    **settings: Any,
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A lifespan for `Starlette(lifespan=...)` or `FastAPI(lifespan=...)` that connects one
    `Client` (arguments as `taskframe.connect`) at startup, keeps it in `app.state.taskframe`
    and closes it at shutdown. A server that cannot be reached fails the startup."""

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        async with connect(url, namespace=namespace, **settings) as tf:
            setattr(app.state, STATE_KEY, tf)
            try:
                yield
            finally:
                delattr(app.state, STATE_KEY)

    return run


def get_client(connection: HTTPConnection) -> Client:
    """The app's client, for an endpoint (`Depends(get_client)` in FastAPI, or call it with
    the request in Starlette). Raises `RuntimeError` if the app has no taskframe lifespan."""
    tf = getattr(connection.app.state, STATE_KEY, None)
    if not isinstance(tf, Client):
        raise RuntimeError("no taskframe client: create the app with taskframe.asgi.lifespan")
    return tf
