"""Settings: every default in one place, overridable by arguments or TASKFRAME_* variables.

Durability, in the words our guarantees page uses:
    storage="memory"  tasks live in the server's memory: lost if the server stops.
    storage="file"    tasks are written to disk before the enqueue returns: they survive a
                      server crash or restart (fsync policy: see `docs/guarantees.md`).
    replicas=3        (with file storage, in a 3-node cluster) every task is stored on three
                      servers before the enqueue returns: it survives losing one machine.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from taskframe.errors import ConfigError
from taskframe.models import check_token

DEFAULT_URL = "nats://127.0.0.1:4222"
_ENV_PREFIX = "TASKFRAME_"


class Settings(BaseModel):
    """Connection and JetStream settings shared by producers and workers.

    Durations are float seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = DEFAULT_URL
    """One or more NATS URLs, comma-separated. Credentials may be given in the URL."""
    namespace: str = "default"
    """Prefix of every subject, stream and bucket taskframe creates."""
    creds: str | None = None
    """Path to a NATS credentials (.creds) file."""
    user: str | None = None
    """User name to log in with (instead of credentials in the URL)."""
    password: SecretStr | None = None
    """Password of `user`; shown as ********** in reprs."""
    token: SecretStr | None = None
    """Authentication token, for servers configured with one."""
    tls_ca: str | None = None
    """Path to the CA certificate(s) that signed the server's certificate; turns TLS on."""
    tls_cert: str | None = None
    """Path to this client's certificate, for servers that require one (mutual TLS)."""
    tls_key: str | None = None
    """Path to the private key of `tls_cert`."""
    inbox_prefix: str | None = None
    """Subject prefix of this client's reply inboxes (e.g. `_INBOX_worker`); default `_INBOX`."""
    storage: Literal["file", "memory"] = "file"
    """Where streams keep messages: on disk (survives a restart) or in memory."""
    replicas: int = Field(default=1, ge=1, le=5)
    """Copies of every stream and bucket across a cluster (1 on a single server)."""
    ack_wait: float = Field(default=10.0, gt=0)
    """Seconds a worker may hold a task without a heartbeat before it is redelivered."""
    duplicate_window: float = Field(default=120.0, gt=0)
    """Seconds during which an enqueue with the same key is reported as a duplicate."""
    result_ttl: float = Field(default=86_400.0, gt=0)
    """Seconds a task's status and result are kept."""
    dead_ttl: float = Field(default=14 * 86_400.0, gt=0)
    """Seconds a dead letter is kept."""
    results_max_bytes: int = Field(default=-1, ge=-1)
    """Bytes the results bucket may hold (-1: no limit); beyond it the oldest records go.

    JetStream reserves the size out of the server's store when the bucket is created: the
    sum of all reservations on a server must fit in its `max_file_store` (or
    `max_memory_store`). A reservation does not keep room free at write time: a server
    whose store other streams filled refuses results too (see `docs/guarantees.md`)."""
    dead_max_bytes: int = Field(default=-1, ge=-1)
    """Bytes the dead-letter stream may hold (-1: no limit); beyond it the oldest letters go.

    Reserved out of the server's store like `results_max_bytes`."""
    claim_ttl: float = Field(default=7 * 86_400.0, gt=0)
    """Seconds an exactly-once task's completion is remembered (it never runs again)."""
    ping_interval: float = Field(default=10.0, gt=0)
    """Seconds between the client's pings; three unanswered pings mark the server dead and
    start a failover, so a stalled server is left after about three intervals."""
    publish_timeout: float = Field(default=5.0, gt=0)
    """Seconds to wait for the server to confirm one stored message before retrying it."""
    publish_attempts: int = Field(default=4, ge=1)
    """How many times an unconfirmed publish is sent (with the same message id) before failing."""
    compress_over: int = Field(default=0, ge=0)
    """Bodies of tasks, events and results larger than this many bytes are sent compressed
    (zstd, header `Tf-Encoding`); 0: never. Needs the `compression` extra wherever such
    bodies are written or read."""
    offload_over: int = Field(default=512 * 1024, ge=0)
    """Bodies larger than this many bytes (once compressed) are stored in the namespace's
    payloads bucket and the message carries a reference (header `Tf-Payload`); never more
    than the server's max_payload less 16 KiB. 0: never (an enqueue over max_payload then
    raises `PayloadTooLargeError`)."""
    payload_ttl: float = Field(default=14 * 86_400.0, gt=0)
    """Seconds an object in the payloads bucket is kept at most: a task's is deleted once
    it is acked, this removes the rest (results, events, dead letters' bodies, a producer's
    that died before publishing). Keep it above `dead_ttl`, `result_ttl` and any delay."""
    worker_heartbeat: float = Field(default=5.0, ge=1.0)
    """Seconds between a worker's writes of its registry record; a worker that stops writing
    (killed, frozen, cut off) drops out of `Client.workers()` within three of them."""

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Settings from TASKFRAME_<FIELD> variables, with `overrides` that are not None on top."""
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = os.environ.get(_ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            settings = cls.model_validate(values)
        except ValueError as exc:
            raise ConfigError(f"invalid settings: {exc}") from exc
        check_token("namespace", settings.namespace)
        return settings

    @property
    def servers(self) -> list[str]:
        """The URLs in `url`, split on commas."""
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @property
    def safe_url(self) -> str:
        """`url` without any credentials it carries, for logs and reprs."""
        return ",".join(_without_credentials(u) for u in self.servers)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # A URL may carry a password; SecretStr already hides `password` and `token`.
        for name, value in super().__repr_args__():
            yield name, self.safe_url if name == "url" else value

    def connect_options(self) -> dict[str, Any]:
        """The authentication, TLS and inbox options of nats-py's `connect()`."""
        options: dict[str, Any] = {}
        if self.creds:
            options["user_credentials"] = self.creds
        if self.user:
            options["user"] = self.user
        if self.password is not None:
            options["password"] = self.password.get_secret_value()
        if self.token is not None:
            options["token"] = self.token.get_secret_value()
        if self.tls_ca or self.tls_cert:
            options["tls"] = self._tls_context()
        if self.inbox_prefix:
            options["inbox_prefix"] = self.inbox_prefix
        return options

    def _tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files: {exc}") from exc
        return context


def _without_credentials(url: str) -> str:
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}"
