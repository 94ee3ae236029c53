"""Permission violations and refused logins, reported as errors that say what to do.

A server that denies a publish or a subscription does not answer the request: it sends the
client `-ERR 'Permissions Violation for Publish to "<subject>"'` (nats-py hands that to
the error callback, lowercased) and the request would only time out, after every retry.
`Connection` remembers which requests are in flight and fails the one whose subject was
refused at once, with a `PermissionDeniedError` naming the operation and the remedy:

    permission denied for create stream TF_shop_email: this user may not create
    streams: run `taskframe provision` with an admin user first

Publishes without a reply (acks, pull requests) cannot be told apart; their violations
are logged as errors with the same explanation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from taskframe._tolerant import TolerantClient
from taskframe.errors import ConnectError, PermissionDeniedError, UnreachableError
from taskframe.settings import Settings

__all__ = ["Connection", "Denials", "Violation", "explain", "open_connection", "refusal", "watch"]

_CONNECT_ATTEMPTS = 3

log = logging.getLogger("taskframe._connection")

_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.I)
_DEFAULT_INBOX = "_INBOX"
_ADMIN = "run `taskframe provision` with an admin user first"

# What a refused JetStream API call means, by its verb: (operation, what the user may not do
# and what to do instead). `{0}` is the first token after the verb (a stream name).
_API: dict[str, tuple[str, str]] = {
    "stream.create": ("create stream {0}", f"this user may not create streams: {_ADMIN}"),
    "stream.update": (
        "update stream {0}",
        "this user may not change streams, and stream {0} differs from this client's "
        f"settings: {_ADMIN}, or align the settings with it",
    ),
    "stream.delete": ("delete stream {0}", "only an admin user may delete streams"),
    "stream.purge": (
        "purge stream {0}",
        "only an admin user may purge streams (workers purge to remove a schedule that is "
        f"no longer declared: {_ADMIN})",
    ),
    "stream.info": ("read stream {0}", "this user may not read streams of this namespace"),
    "stream.list": ("list streams", "only an admin user may list every stream"),
    "stream.names": ("list streams", "only an admin user may list every stream"),
    "stream.msg.get": ("read messages of stream {0}", "this user may not read that stream"),
    "direct.get": ("read messages of stream {0}", "this user may not read that stream"),
    "consumer.msg.next": (
        "consume from stream {0}",
        "this user may not consume tasks: run workers with a worker user",
    ),
    "consumer.create": (
        "create a consumer on stream {0}",
        f"this user may not create consumers: run workers with a worker user, or {_ADMIN}",
    ),
    "consumer.durable.create": (
        "create a consumer on stream {0}",
        f"this user may not create consumers: run workers with a worker user, or {_ADMIN}",
    ),
    "consumer.delete": (
        "delete a consumer of stream {0}",
        "this user may not delete consumers (workers delete priority lanes no longer "
        f"declared: {_ADMIN})",
    ),
    "consumer.info": (
        "read a consumer of stream {0}",
        "this user may not read consumers: use a worker or admin user",
    ),
    "consumer.list": (
        "list consumers of stream {0}",
        "this user may not read consumers: use a worker or admin user",
    ),
}


@dataclass(frozen=True, slots=True)
class Violation:
    """One refusal the server reported: `publish` or `subscribe`, and the subject."""

    kind: str
    subject: str
    """As nats-py reports it: lowercased."""

    @classmethod
    def parse(cls, exc: BaseException) -> Violation | None:
        """The violation an error callback received, or None for any other error."""
        match = _VIOLATION.search(str(exc))
        if match is None:
            return None
        kind = "publish" if match.group(1).lower() == "publish" else "subscribe"
        return cls(kind, match.group(2))


def explain(kind: str, subject: str, inbox_prefix: str = _DEFAULT_INBOX) -> PermissionDeniedError:
    """The error to raise for a refused `kind` ("publish"/"subscribe") on `subject`."""
    lower = subject.lower()
    tokens = subject.split(".")
    if kind == "subscribe":
        if lower.startswith(inbox_prefix.lower() + "."):
            return PermissionDeniedError(
                f"subscribe to replies on {subject}",
                f"this user may not subscribe to inbox prefix {inbox_prefix!r}: set "
                "inbox_prefix (TASKFRAME_INBOX_PREFIX) to the one its permissions allow, "
                "e.g. _INBOX_producer or _INBOX_worker",
            )
        return PermissionDeniedError(
            f"subscribe to {subject}", "this user's permissions do not allow that subject"
        )
    if lower.startswith("$js.api."):
        rest = lower[len("$js.api.") :]
        for verb in sorted(_API, key=len, reverse=True):  # longest first: msg.get before info
            if rest == verb or rest.startswith(verb + "."):
                name = tokens[2 + verb.count(".") + 1] if len(tokens) > 3 + verb.count(".") else ""
                operation, detail = _API[verb]
                return PermissionDeniedError(operation.format(name), detail.format(name))
        return PermissionDeniedError(
            f"JetStream API call {subject}", "this user's permissions do not allow it"
        )
    if lower.startswith("$js.ack."):
        return PermissionDeniedError(
            "acknowledge a delivered task", "this user may not settle tasks: use a worker user"
        )
    if lower.startswith("$kv."):
        bucket = tokens[1] if len(tokens) > 1 else "?"
        return PermissionDeniedError(
            f"write to KV bucket {bucket}",
            "only workers may write task status, results and claims",
        )
    return PermissionDeniedError(
        f"publish to {subject}",
        f"this user may not publish there: is {tokens[0]!r} the namespace its permissions "
        "name, and is it a producer or worker of it?",
    )


def refusal(exc: BaseException) -> str | None:
    """Why the server refused a login, in words a user can act on; None if it did not."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the server's TLS certificate is not trusted ({exc.verify_message}): set "
            "tls_ca (TASKFRAME_TLS_CA) to the CA that signed it"
        )
    if isinstance(exc, ssl.SSLError):
        text = str(exc).lower()
        if "certificate required" in text or "handshake failure" in text:
            return (
                "the server requires a client certificate: set tls_cert and tls_key "
                "(TASKFRAME_TLS_CERT, TASKFRAME_TLS_KEY)"
            )
        return f"TLS failed: {exc.reason or exc}"
    text = str(exc).lower()
    if "authorization violation" in text or "authentication" in text:
        # Never echo what was sent: the message may travel to logs.
        return (
            "it rejected the credentials: check the user and password (in the URL or "
            "TASKFRAME_USER/TASKFRAME_PASSWORD), the token (TASKFRAME_TOKEN) or the creds file"
        )
    if "tls" in text and "required" in text:
        return "the server requires TLS: set tls_ca (and a client certificate if it asks)"
    return None


def watch(nc: NATS, subject: str) -> AbstractAsyncContextManager[object]:
    """Inside this block, a refusal of `subject` raises `PermissionDeniedError` at once.

    For replies that do not come through `Connection.request` (pipelined publishes).
    """
    if isinstance(nc, Connection):
        return nc.denials.watch(subject)
    return contextlib.nullcontext()


class _Watch:
    """One request in flight: cancelled as soon as the server refuses its subject."""

    __slots__ = ("_denials", "_subject", "_task", "denied")

    def __init__(self, denials: Denials, subject: str) -> None:
        self._denials = denials
        self._subject = subject
        self._task: asyncio.Task[Any] | None = None
        self.denied: Violation | None = None

    def matches(self, violation: Violation) -> bool:
        """Whether `violation` refused this request (or the inbox its reply comes to)."""
        if violation.kind == "publish":
            return violation.subject == self._subject.lower()
        return violation.subject.startswith(self._denials.inbox_prefix.lower() + ".")

    def trip(self, violation: Violation) -> None:
        """Fail the waiting request now instead of at its timeout."""
        if self.denied is None and self._task is not None:
            self.denied = violation
            self._task.cancel()

    async def __aenter__(self) -> _Watch:
        self._task = asyncio.current_task()
        self._denials.watches.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._denials.watches.discard(self)
        if self.denied is None or self._task is None:
            return
        # As asyncio.timeout does: only our own cancellation becomes the error; one from
        # elsewhere (shutdown) stays a cancellation.
        if self._task.uncancel() == 0 and exc_type in (asyncio.CancelledError, None):
            subject = self._subject if self.denied.kind == "publish" else self.denied.subject
            raise self._denials.error(self.denied.kind, subject) from exc


class Denials:
    """The permission violations of one connection, and the requests they fail."""

    def __init__(self, inbox_prefix: str | None = None) -> None:
        self.inbox_prefix = inbox_prefix or _DEFAULT_INBOX
        self.watches: set[_Watch] = set()

    def error(self, kind: str, subject: str) -> PermissionDeniedError:
        """The error for a refused `kind` on `subject`, as explained to the user."""
        return explain(kind, subject, self.inbox_prefix)

    def watch(self, subject: str) -> _Watch:
        """A context for one request on `subject`: a refusal of it raises inside at once."""
        return _Watch(self, subject)

    def record(self, exc: BaseException) -> bool:
        """Handle an error the server reported; True if it was a permission violation."""
        violation = Violation.parse(exc)
        if violation is None:
            return False
        matched = [w for w in self.watches if w.matches(violation)]
        for watch in matched:
            watch.trip(violation)
        if not matched:  # nobody waits for an answer (an ack, a pull): this is the report
            log.error("%s", self.error(violation.kind, violation.subject))
        return True


class Connection(TolerantClient):
    """A nats-py client whose requests fail at once with `PermissionDeniedError` when refused.

    It is a `TolerantClient`: its read loop survives any message the server delivers.
    """

    def __init__(self, inbox_prefix: str | None = None) -> None:
        super().__init__()
        self.denials = Denials(inbox_prefix)

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        """A request that raises `PermissionDeniedError` as soon as the server refuses it."""
        async with self.denials.watch(subject):
            return await super().request(subject, payload, timeout, old_style, headers)

    async def check_inbox(self) -> None:
        """Raise `PermissionDeniedError` now if this user may not receive replies.

        Without that permission every request would time out; one round trip tells.
        """
        async with self.denials.watch(""):
            sub = await self.subscribe(self.new_inbox())
            # Twice: a PONG still owed for an earlier PING (the handshake's, a keepalive)
            # may answer the first flush before the server's refusal of the SUB arrives.
            await self.flush()
            await self.flush()
        await sub.unsubscribe()


async def open_connection(
    settings: Settings, reconnected: Callable[[], Awaitable[None]]
) -> Connection:
    """Connect to NATS as `settings` say; after a lost connection, reconnect forever.

    Raises `UnreachableError` (a `ConnectError`) if no server answers, `ConnectError` if
    one refuses the login or TLS, and `PermissionDeniedError` if the user may not receive
    replies on its inbox prefix. `reconnected` is awaited after every reconnect.
    """
    options = settings.connect_options()
    nc = Connection(options.get("inbox_prefix"))
    refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    connected = False

    async def on_error(exc: Exception) -> None:
        if nc.denials.record(exc):
            return
        reason = refusal(exc) if not nc.is_connected else None
        if reason is not None and not refused.done():
            refused.set_result(reason)
        # Refused before the first connection: the UnreachableError will say it once.
        quiet = reason is None and not connected and isinstance(exc, OSError)
        log.log(logging.DEBUG if quiet else logging.WARNING, "nats error: %r", exc)

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnect() -> None:
        url = nc.connected_url
        # Not `netloc`: it carries the user and password of a URL with credentials.
        if url is not None:
            log.info("reconnected to NATS at %s:%s", url.hostname, url.port)
        await reconnected()

    connecting = asyncio.ensure_future(
        nc.connect(
            servers=settings.servers,
            name=f"taskframe:{settings.namespace}",
            max_reconnect_attempts=_CONNECT_ATTEMPTS,
            reconnect_time_wait=1,
            connect_timeout=5,
            ping_interval=settings.ping_interval,  # type: ignore[arg-type]
            max_outstanding_pings=3,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            **options,
        )
    )
    # A refused login or certificate will not succeed on the next try: say so at once
    # rather than after every attempt (nats-py even hangs on some TLS failures).
    either: set[asyncio.Future[Any]] = {connecting, refused}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if refused.done() and not connecting.done():
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await nc.close()
        raise ConnectError(
            f"NATS at {settings.safe_url} refused the connection: {refused.result()}"
        )
    try:
        connecting.result()
    except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
        reason = f": {refused.result()}" if refused.done() else ""
        raise UnreachableError(
            f"cannot reach NATS at {settings.safe_url}: {exc!r}{reason} "
            "(is a server running? `taskframe server` starts one)"
        ) from exc
    # Only the first connection gives up; once connected, reconnect forever (nats-py's
    # default would give up after 60 tries and leave a worker idle for good).
    nc.options["max_reconnect_attempts"] = -1
    connected = True
    try:
        await nc.check_inbox()
    except PermissionDeniedError:
        await nc.close()
        raise
    return nc
