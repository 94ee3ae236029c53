"""What every dashboard view needs: the broker's client, a page rendered, a number read."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from taskframe.client import Client


async def client_of(request: Request) -> Client:
    """The connected client of the app serving `request`."""
    client: Client = await request.app.state.broker.client()
    return client


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    """Template `name` with `context` (and the app's CSRF token for its forms)."""
    context.setdefault("csrf", request.app.state.csrf)
    response: Response = request.app.state.templates.TemplateResponse(
        request, name, context, status_code=status_code
    )
    return response


def number(text: str | None, default: int) -> int:
    """A non-negative whole number from a query parameter, `default` if none or not one."""
    try:
        return max(0, int(text)) if text else default
    except ValueError:
        return default
