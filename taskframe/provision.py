"""Provisioning: create every stream, consumer and bucket an app needs, or check them.

Provisioning creates what is missing and updates settings that JetStream can change in
place. A setting it cannot change (say, an existing stream with another retention) is a
`ConfigError` that names the setting, never a silent mismatch. Safe to run from many
processes at once: `taskframe provision`, and every worker when it starts.

    await provision(app, client)             # what `taskframe provision module:app` does
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe import schedules
from taskframe._ratelimit import RateLimit, RateLimiter
from taskframe._retry import answered
from taskframe._topology import QueueOptions
from taskframe.errors import ConfigError
from taskframe.settings import Settings

if TYPE_CHECKING:
    from taskframe.app import App
    from taskframe.client import Client

_CANNOT_RESERVE = (10047, 10028)  # "insufficient storage / memory resources available"
_IMMUTABLE = ("retention", "storage")
_COMPARED = (
    "subjects",
    "num_replicas",
    "duplicate_window",
    "max_age",
    "max_msgs_per_subject",
    "max_bytes",
    "discard",
    "allow_msg_schedules",
    "allow_msg_ttl",
    "compression",
)


async def provision(
    app: App,
    client: Client,
    *,
    queues: Iterable[str] | None = None,
    groups: Iterable[str] | None = None,
) -> None:
    """Create or update everything `app` needs: its queues' streams and consumers (one per
    lane), its subscriber groups, the namespace's dead letters, results, worker registry,
    flows, payloads bucket, claims and rate counters, and its periodic schedules. `queues`
    and `groups` narrow it down.

    Raises `ConfigError` for a setting that conflicts with what exists, `ConnectError` if
    JetStream does not answer.
    """
    js, settings = client.js, client.settings
    queues = sorted(app.queues if queues is None else queues)
    groups = sorted(app.groups if groups is None else groups)
    await ensure_shared(js, settings)
    await ensure_flows(js, settings)  # made here too: a producer or worker may not create them
    if settings.offload_over:
        await ensure_stream(js, configs.payloads_config(settings))
    if any(h.exactly_once for (queue, _), h in app.handlers.items() if queue in queues):
        await ensure_stream(js, configs.claims_config(settings))
    for queue in queues:
        options = app.options(queue)
        await ensure_queue(js, settings, queue, options)
        await ensure_lanes(js, settings, queue, options, topology.DEFAULT_MAX_IN_FLIGHT)
        if options.rate_limit:
            limit = RateLimit.parse(options.rate_limit)
            await RateLimiter(js, settings, queue, limit).ensure()
    await schedules.reconcile(client, app, queues)
    if groups:
        await ensure_stream(js, configs.events_config(settings))
    for group in groups:
        events = [name for (g, name) in app.subscribers if g == group]
        config = configs.group_config(settings, group, events, topology.DEFAULT_MAX_IN_FLIGHT)
        await ensure_consumer(js, topology.events_stream(settings.namespace), config)


def _differences(
    have: js_api.StreamConfig, want: js_api.StreamConfig, fields: tuple[str, ...]
) -> list[str]:
    diffs = []
    for name in fields:
        ours: Any = getattr(want, name)
        theirs: Any = getattr(have, name)
        if ours is None or (name == "duplicate_window" and not ours):
            continue  # unset (nats-py's default duplicate_window is 0): the server picks
        if isinstance(ours, float) and isinstance(theirs, float | int):
            if abs(ours - theirs) > 1e-6:
                diffs.append(f"{name}={theirs!r} (taskframe wants {ours!r})")
        elif ours != theirs:
            diffs.append(f"{name}={theirs!r} (taskframe wants {ours!r})")
    return diffs


async def ensure_stream(js: JetStreamContext, want: js_api.StreamConfig) -> None:
    """Create the stream `want`, or bring an existing one in line with it."""
    assert want.name is not None
    await answered(f"stream {want.name}", _ensure_stream, js, want)


async def _ensure_stream(js: JetStreamContext, want: js_api.StreamConfig) -> None:
    assert want.name is not None
    try:
        info = await js.stream_info(want.name)
    except NotFoundError:
        try:
            await js.add_stream(want)
        except ServiceUnavailableError:
            raise  # not a refusal of the config: answered() tries again
        except APIError as exc:
            raise ConfigError(f"cannot create stream {want.name}: {_why(want, exc)}") from exc
        return
    have = info.config
    fixed = _differences(have, want, _IMMUTABLE)
    if fixed:
        raise ConfigError(
            f"stream {want.name} exists with {', '.join(fixed)}; these cannot be changed in "
            "place: delete the stream or use another namespace"
        )
    if _differences(have, want, _COMPARED):
        try:
            await js.update_stream(want)
        except ServiceUnavailableError:
            raise
        except APIError as exc:
            diffs = ", ".join(_differences(have, want, _COMPARED))
            raise ConfigError(
                f"cannot update stream {want.name} ({diffs}): {_why(want, exc)}"
            ) from exc


def _why(want: js_api.StreamConfig, exc: APIError) -> str:
    """The server's reason for refusing `want`, with what to do when it cannot reserve it."""
    if exc.err_code in _CANNOT_RESERVE and (want.max_bytes or 0) > 0:
        return (
            f"{exc.description}: its max_bytes of {want.max_bytes} must be reserved out of the "
            "server's max_file_store (max_memory_store for memory storage), and less than "
            "that is unreserved (lower results_max_bytes / dead_max_bytes, or raise the limit)"
        )
    return str(exc.description)


async def ensure_consumer(
    js: JetStreamContext, stream: str, want: js_api.ConsumerConfig
) -> js_api.ConsumerInfo:
    """Create the durable consumer `want`, or update it in place (the server's create-or-update)."""
    try:
        return await answered(f"consumer {want.name} on {stream}", js.add_consumer, stream, want)
    except APIError as exc:
        raise ConfigError(
            f"cannot create consumer {want.name} on {stream}: {exc.description}"
        ) from exc


async def ensure_queue(
    js: JetStreamContext, settings: Settings, queue: str, options: QueueOptions | None = None
) -> None:
    """Create or update the stream of `queue`."""
    await ensure_stream(js, configs.queue_config(settings, queue, options))


async def ensure_lanes(
    js: JetStreamContext,
    settings: Settings,
    queue: str,
    options: QueueOptions,
    max_in_flight: int,
) -> None:
    """Create or update the consumers of `queue`'s lanes; delete lanes no longer declared.

    Consumers on a WorkQueue stream must not overlap, so stale lanes go first and the
    default lane is updated before new lanes are added. A paused queue stays paused.
    """
    stream = topology.queue_stream(settings.namespace, queue)
    wanted = configs.lane_configs(settings, queue, options, max_in_flight)
    names = {config.name for _, config in wanted}
    have = [
        info
        for info in await answered(f"consumers of {stream}", js.consumers_info, stream)
        if topology.is_lane_consumer(info.name)
    ]
    for info in have:
        if info.name != topology.WORKERS and info.name not in names:
            await answered(f"consumer {info.name}", js.delete_consumer, stream, info.name)
    # An update without `pause_until` keeps a consumer's pause; a lane added to a paused
    # queue is paused with the others.
    pauses = [info.config.pause_until for info in have if info.paused]
    for _, config in wanted:
        if pauses and len(pauses) == len(have) and config.name not in {i.name for i in have}:
            config.pause_until = pauses[0]
        await ensure_consumer(js, stream, config)


async def ensure_shared(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the namespace's dead-letter stream, results bucket, cancel requests
    and worker registry."""
    await ensure_stream(js, configs.dead_config(settings))
    await ensure_stream(js, configs.results_config(settings))
    await ensure_stream(js, configs.cancels_config(settings))
    await ensure_stream(js, configs.workers_config(settings))


async def ensure_flows(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the namespace's flow plans bucket and join counters."""
    await ensure_stream(js, configs.flows_config(settings))
    await ensure_stream(js, configs.joins_config(settings))
