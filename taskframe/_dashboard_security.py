"""The dashboard's guards: the access gate (a bearer token or basic-auth credentials, needed
on a non-loopback address) and the CSRF token every POST form carries. No token, password
or CSRF value is ever written into a page or a log."""

from __future__ import annotations

import base64
import binascii
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


def parse_basic_auth(credentials: str) -> tuple[str, str]:
    """`user:password` as a pair; a `ValueError` that does not repeat it if either is empty."""
    user, _, password = credentials.partition(":")
    if not user or not password:
        raise ValueError("basic-auth credentials must be USER:PASSWORD, both non-empty")
    return user, password


class AccessGate(BaseHTTPMiddleware):
    """Let a request through only with the token or the basic-auth credentials.

    The token comes as `Authorization: Bearer <token>`, or as the cookie that
    `?token=<token>` sets (then redirects to the same address without it). Credentials
    come as `Authorization: Basic ...`, which a browser asks its user for.
    """

    def __init__(self, app: ASGIApp, token: str | None, basic_auth: tuple[str, str] | None) -> None:
        super().__init__(app)
        self._token, self._basic = token, basic_auth

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = request.query_params.get("token")
        if given is not None and self._token is not None:
            if not same(given, self._token):
                return PlainTextResponse("wrong token", status_code=401)
            kept = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = URL(str(request.url)).replace(query=urlencode(kept))
            response = RedirectResponse(str(target), status_code=303)
            response.set_cookie(COOKIE, self._token, httponly=True, samesite="strict")
            return response
        if self._admits(request):
            return await call_next(request)
        if self._basic is not None:
            return PlainTextResponse(
                "this dashboard needs its user name and password",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="taskframe", charset="UTF-8"'},
            )
        return PlainTextResponse(
            "this dashboard needs its token: open it once with ?token=...",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _admits(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if self._token is not None and (
            (scheme.lower() == "bearer" and same(value, self._token))
            or same(request.cookies.get(COOKIE, ""), self._token)
        ):
            return True
        if self._basic is not None and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            # Both compared, whichever differs: the time taken does not tell which.
            good_user, good_password = same(user, self._basic[0]), same(password, self._basic[1])
            return good_user and good_password
        return False


async def checked_form(request: Request) -> dict[str, str]:
    """The fields of a POSTed form, once its CSRF field matches; HTTP 403 otherwise."""
    body = (await request.body()).decode("utf-8", "replace")
    fields = dict(parse_qsl(body))
    if not same(fields.get("csrf", ""), request.app.state.csrf):
        raise HTTPException(403, "missing or wrong CSRF token")
    return fields
