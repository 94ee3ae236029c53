"""Message bodies on the wire: compressed over one size, kept in the Object Store over another.

Tasks, events and status records are encoded here, and decoded here when read. A body
larger than `Settings.compress_over` is compressed with zstd (`Tf-Encoding: zstd`), kept
only if that makes it smaller. A body still larger than `Settings.offload_over` (or than
what the server's max_payload leaves room for) is stored as an object in the namespace's
payloads bucket `TF_<ns>_payloads`, and the message carries the object's name
(`Tf-Payload`) and an empty body: a claim check. Decoding undoes both, in reverse.

Lifetimes (docs/wire-format.md, "Large bodies"): a task's object is deleted by the worker
that ran it, once the server confirmed its ack; every other object (a result's, an
event's, which many groups read, a dead letter's, one whose producer died before
publishing) is removed by the bucket's `payload_ttl`.
"""

from __future__ import annotations

import functools
import io
import logging
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import DigestMismatchError, NotFoundError
from nats.js.object_store import ObjectStore

from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._publish import check_size
from taskframe.errors import ConfigError, ConnectError, PayloadError, PublishError
from taskframe.provision import ensure_stream

if TYPE_CHECKING:
    from taskframe.client import Client

log = logging.getLogger("taskframe.payloads")

ZSTD = "zstd"
ROOM = 16 * 1024
"""Bytes under the server's max_payload left for headers (a dead letter adds its own)."""
_EXTRA = "the `compression` extra (pip install 'taskframe[compression]')"
_ensured: weakref.WeakSet[NATS] = weakref.WeakSet()  # connections that made sure of the bucket
_local = threading.local()


@functools.cache
def _zstd() -> Any:
    """The `zstandard` module; ImportError when the extra is not installed."""
    import zstandard

    return zstandard


def compress(body: bytes, headers: dict[str, str], compress_over: int) -> bytes:
    """`body` compressed, and `Tf-Encoding` set, if it is over `compress_over` bytes (0:
    never) and compressing makes it smaller; else `body` as it is.

    Raises `ConfigError` naming the extra when `zstandard` is not installed.
    """
    if not compress_over or len(body) <= compress_over:
        return body
    try:
        packed: bytes = _compressor().compress(body)
    except ImportError as exc:
        raise ConfigError(f"compress_over={compress_over} needs {_EXTRA}") from exc
    if len(packed) >= len(body):
        return body
    headers[wire.ENCODING] = ZSTD
    return packed


def _compressor() -> Any:
    """This thread's compressor: one may not be used by two threads at once."""
    found = getattr(_local, "compressor", None)
    if found is None:
        found = _local.compressor = _zstd().ZstdCompressor(level=3)
    return found


def limit(client: Client) -> int:
    """The largest body `client` sends in the message itself."""
    if not client.settings.offload_over:
        return sys.maxsize  # never offloaded: `check_size` refuses what does not fit
    return min(client.settings.offload_over, client.nc.max_payload - ROOM)


async def offload(client: Client, body: bytes, headers: dict[str, str]) -> bytes:
    """`body` stored as an object and `Tf-Payload` set, if it is over `limit`; the message's
    body is then empty. Raises `PublishError` if the object could not be stored."""
    if len(body) <= limit(client):
        return body
    name = wire.new_task_id()
    try:
        await _put(client, name, body)
    except (nats.errors.Error, TimeoutError):
        _ensured.discard(client.nc)  # the bucket may have been deleted since: once more
        try:
            await _put(client, name, body)
        except (nats.errors.Error, TimeoutError) as exc:
            raise PublishError(f"body of {len(body)} bytes not stored: {exc!r}") from exc
    headers[wire.PAYLOAD] = name
    return b""


async def _put(client: Client, name: str, body: bytes) -> None:
    if client.nc not in _ensured:
        await ensure_stream(client.js, configs.payloads_config(client.settings))
        _ensured.add(client.nc)
    await _store(client.js, client.namespace).put(name, body)


def oversize(client: Client, size: int) -> bool:
    """Whether a body of `size` bytes is compressed or offloaded by `encode`."""
    return size > limit(client) or 0 < client.settings.compress_over < size


async def encode(client: Client, subject: str, body: bytes, headers: dict[str, str]) -> bytes:
    """`body` as sent on `subject`: compressed, then offloaded, as each threshold says.

    Raises `PayloadTooLargeError` if the headers alone leave no room for it.
    """
    body = await offload(client, compress(body, headers, client.settings.compress_over), headers)
    check_size(subject, body, headers, client.nc.max_payload)
    return body


def _store(js: JetStreamContext, namespace: str) -> ObjectStore:
    bucket = topology.payloads_bucket(namespace)
    return ObjectStore(name=bucket, stream=topology.payloads_stream(namespace), js=js)


def encoded(headers: dict[str, str] | None) -> bool:
    """Whether a message with `headers` has a body that `decode` must read."""
    return headers is not None and (wire.PAYLOAD in headers or wire.ENCODING in headers)


async def decode(
    js: JetStreamContext, namespace: str, headers: dict[str, str] | None, body: bytes
) -> bytes:
    """The body a message with `headers` and `body` stands for: fetched from the payloads
    bucket, decompressed.

    Raises `PayloadError` if it cannot be read (the object is gone, the encoding is
    unknown or corrupt, the `compression` extra is missing) and `ConnectError` if
    JetStream did not answer (worth trying again).
    """
    if not headers:
        return body
    name = headers.get(wire.PAYLOAD)
    if name:
        body = await _fetch(js, namespace, name)
    encoding = headers.get(wire.ENCODING)
    if encoding is None:
        return body
    if encoding != ZSTD:
        raise PayloadError(f"unknown {wire.ENCODING} {encoding!r}: only {ZSTD!r} is read")
    return unpack(body)


def unpack(body: bytes) -> bytes:
    """A zstd-compressed body decompressed; `PayloadError` if it cannot be."""
    try:
        data: bytes = _zstd().ZstdDecompressor().decompress(body)
    except ImportError as exc:
        raise PayloadError(f"a body compressed with zstd needs {_EXTRA}") from exc
    except _zstd().ZstdError as exc:
        raise PayloadError(f"corrupt zstd body: {exc}") from exc
    return data


async def _fetch(js: JetStreamContext, namespace: str, name: str) -> bytes:
    bucket = topology.payloads_bucket(namespace)
    out = io.BytesIO()
    try:
        await _store(js, namespace).get(name, writeinto=out)
    except NotFoundError as exc:
        raise PayloadError(
            f"body object {name!r} is not in bucket {bucket}: deleted, or expired (payload_ttl)"
        ) from exc
    except DigestMismatchError as exc:
        raise PayloadError(f"body object {name!r} in {bucket} fails its digest") from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise ConnectError(f"body object {name!r} not read from {bucket}: {exc!r}") from exc
    return out.getvalue()


async def ack_and_delete(client: Client, msg: Msg) -> None:
    """Ack a task whose body is an object, then delete the object once the server has
    confirmed the ack: a task whose ack went unconfirmed may run again, and needs it."""
    try:  # an ack with a reply subject: the server answers once it applied it
        await client.nc.request(msg.reply, b"", timeout=client.settings.publish_timeout)
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("ack on %s unconfirmed (%r): its body object stays", msg.subject, exc)
        return
    await delete(client.js, client.namespace, (msg.headers or {})[wire.PAYLOAD])


async def delete(js: JetStreamContext, namespace: str, name: str) -> None:
    """Delete the object `name`; what fails is left to the bucket's `payload_ttl`."""
    try:
        await _store(js, namespace).delete(name)
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("body object %s not deleted (%r): payload_ttl removes it", name, exc)
