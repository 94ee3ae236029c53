"""What the dashboard shows when the broker cannot answer: a page that says so (and tries
again by itself), never a stack trace or a request that hangs."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import nats.errors
from nats.js.errors import NotFoundError
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from taskframe.errors import ConnectError, TaskframeError

View = Callable[[Request], Awaitable[Response]]

log = logging.getLogger("taskframe.dashboard")

# Longer than `answered` takes to give up on an unanswered API call once, shorter than a
# browser's patience: a page whose broker went away mid-request says so within this.
REQUEST_TIMEOUT = 8.0


def bounded(view: View) -> View:
    """`view`, ended with a "broker did not answer" page after `REQUEST_TIMEOUT` seconds."""

    @functools.wraps(view)
    async def run(request: Request) -> Response:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await view(request)
        except TimeoutError as exc:
            raise ConnectError(f"the broker did not answer within {REQUEST_TIMEOUT:g}s") from exc

    return run


def _page(request: Request, status: int, title: str, detail: str) -> Response:
    if "/fragments/" in request.url.path:  # the live refresh shows it in its banner
        return PlainTextResponse(f"{title}: {detail}", status_code=status)
    response: Response = request.app.state.templates.TemplateResponse(
        request,
        "error.html",
        {"title": title, "detail": detail, "retry": status == 503},
        status_code=status,
    )
    return response


async def _unreachable(request: Request, exc: Exception) -> Response:
    log.warning("dashboard page %s: broker unavailable: %s", request.url.path, exc)
    return _page(request, 503, "The broker cannot be reached", str(exc))


async def _missing(request: Request, exc: Exception) -> Response:
    return _page(
        request,
        404,
        "Not on the server",
        f"a stream or consumer this page reads is missing (deleted meanwhile?): {exc}",
    )


async def _refused(request: Request, exc: Exception) -> Response:
    log.warning("dashboard page %s: broker error: %r", request.url.path, exc)
    return _page(request, 502, "The broker refused this request", str(exc))


def exception_handlers() -> Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """The app's handlers: a missing stream is a 404 page, an unreachable broker a 503,
    another error from the broker (or one taskframe raised on its answer) a 502."""
    return {
        NotFoundError: _missing,
        ConnectError: _unreachable,
        nats.errors.ConnectionClosedError: _unreachable,
        nats.errors.NoServersError: _unreachable,
        nats.errors.TimeoutError: _unreachable,
        nats.errors.Error: _refused,
        TaskframeError: _refused,  # a replay the store has no room for, ...
    }
