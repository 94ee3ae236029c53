"""The dashboard's guards: the access token (for a non-loopback address) and the CSRF token
every POST form carries. Neither token is ever written into a page or a log."""

from __future__ import annotations

import secrets
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

COOKIE = "taskframe_dashboard"


def same(given: str, expected: str) -> bool:
    """Whether two secrets are equal, in constant time."""
    return secrets.compare_digest(given.encode(), expected.encode())


class TokenGate(BaseHTTPMiddleware):
    """Let a request through only with `Authorization: Bearer <token>` or the cookie that
    `?token=<token>` sets (then redirects to the same address without it)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        super().__init__(app)
        self._token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if not same(given, self._token):
                return PlainTextResponse("wrong token", status_code=401)
            kept = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = URL(str(request.url)).replace(query=urlencode(kept))
            response = RedirectResponse(str(target), status_code=303)
            response.set_cookie(COOKIE, self._token, httponly=True, samesite="strict")
            return response
        bearer = request.headers.get("authorization", "")
        if (bearer.startswith("Bearer ") and same(bearer[7:], self._token)) or same(
            request.cookies.get(COOKIE, ""), self._token
        ):
            return await call_next(request)
        return PlainTextResponse(
            "this dashboard needs its token: open it once with ?token=...",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )


async def checked_form(request: Request) -> dict[str, str]:
    """The fields of a POSTed form, once its CSRF field matches; HTTP 403 otherwise."""
    body = (await request.body()).decode("utf-8", "replace")
    fields = dict(parse_qsl(body))
    if not same(fields.get("csrf", ""), request.app.state.csrf):
        raise HTTPException(403, "missing or wrong CSRF token")
    return fields
