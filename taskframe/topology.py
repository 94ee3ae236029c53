"""Names of the JetStream objects taskframe uses, and their idempotent provisioning.

    queue q of namespace ns  stream  TF_<ns>_<q>       WorkQueue, subjects <ns>.tasks.<q>.>
                                                       and <ns>.sched.<q>.> (schedules)
    its worker pool          durable pull consumer "workers" (one per lane: "workers-<lane>")
    dead letters             stream  TF_<ns>_DEAD      Limits, subjects <ns>.dead.>, dead_ttl,
                                                       dead_max_bytes (oldest go first)
    results and status       KV      TF_<ns>_results   one key per task id, TTL result_ttl,
                                                       results_max_bytes (oldest go first)
    exactly-once claims      KV      TF_<ns>_claims    one key per task id, per-message TTLs
    events                   stream  TF_<ns>_EVENTS    Interest, subjects <ns>.events.>
    a subscriber group g     durable pull consumer "group-<g>" on the events stream

Provisioning creates what is missing and updates settings that JetStream can change in
place. A setting it cannot change (say, an existing stream with another retention) is a
`ConfigError` that names the setting, never a silent mismatch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from taskframe.app import DEFAULT_LANE, QueueOptions
from taskframe.errors import ConfigError, ConnectError
from taskframe.settings import Settings

WORKERS = "workers"
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
)
META_NAMESPACE = "taskframe.namespace"
META_QUEUE = "taskframe.queue"
META_KIND = "taskframe.kind"
_API_ATTEMPTS = 4
T = TypeVar("T")
P = ParamSpec("P")


def queue_stream(namespace: str, queue: str) -> str:
    """The stream name of `queue`."""
    return f"TF_{namespace}_{queue}"


def dead_stream(namespace: str) -> str:
    """The dead-letter stream name of `namespace`."""
    return f"TF_{namespace}_DEAD"


def events_stream(namespace: str) -> str:
    """The event stream name of `namespace`."""
    return f"TF_{namespace}_EVENTS"


def claims_bucket(namespace: str) -> str:
    """The exactly-once claims KV bucket name of `namespace`."""
    return f"TF_{namespace}_claims"


def group_consumer(group: str) -> str:
    """The durable consumer name of subscriber group `group`."""
    return f"group-{group}"


def lane_consumer(lane: str) -> str:
    """The durable consumer name of a queue's priority lane."""
    return WORKERS if lane == DEFAULT_LANE else f"{WORKERS}-{lane}"


def results_bucket(namespace: str) -> str:
    """The results KV bucket name of `namespace`."""
    return f"TF_{namespace}_results"


def result_subject(namespace: str, task_id: str) -> str:
    """The subject a task's final status record is written to (a KV key)."""
    return f"$KV.{results_bucket(namespace)}.{task_id}"


def progress_subject(namespace: str, task_id: str) -> str:
    """The subject a task's non-final status (`running`, `failed`) is written to.

    It is stored in the results bucket's stream but outside its keys, so a late non-final
    write (one that sat in a cut connection) can never replace a final record.
    """
    return f"{namespace}.progress.{task_id}"


def _storage(settings: Settings) -> js_api.StorageType:
    return js_api.StorageType.FILE if settings.storage == "file" else js_api.StorageType.MEMORY


def _limit(max_bytes: int) -> int:
    """A size limit as the server reports it back: -1 for none (0 means none too)."""
    return max_bytes if max_bytes > 0 else -1


def queue_config(
    settings: Settings, queue: str, options: QueueOptions | None = None
) -> js_api.StreamConfig:
    """The stream configuration of `queue`: its tasks, and the schedules that enqueue them."""
    ns = settings.namespace
    window = options.duplicate_window if options else None
    return js_api.StreamConfig(
        name=queue_stream(ns, queue),
        subjects=[f"{ns}.tasks.{queue}.>", f"{ns}.sched.{queue}.>"],
        retention=js_api.RetentionPolicy.WORK_QUEUE,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        duplicate_window=window or settings.duplicate_window,
        allow_msg_schedules=True,
        metadata={META_NAMESPACE: ns, META_QUEUE: queue, META_KIND: "queue"},
    )


def events_config(settings: Settings) -> js_api.StreamConfig:
    """The event stream: kept until every subscriber group whose filter matches acked it."""
    ns = settings.namespace
    return js_api.StreamConfig(
        name=events_stream(ns),
        subjects=[f"{ns}.events.>"],
        retention=js_api.RetentionPolicy.INTEREST,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        duplicate_window=settings.duplicate_window,
        metadata={META_NAMESPACE: ns, META_KIND: "events"},
    )


def dead_config(settings: Settings) -> js_api.StreamConfig:
    """The dead-letter stream configuration: at its size limit, the oldest letters go."""
    ns = settings.namespace
    return js_api.StreamConfig(
        name=dead_stream(ns),
        subjects=[f"{ns}.dead.>"],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        max_age=settings.dead_ttl,
        max_bytes=_limit(settings.dead_max_bytes),
        discard=js_api.DiscardPolicy.OLD,
        metadata={META_NAMESPACE: ns, META_KIND: "dead"},
    )


def results_config(settings: Settings) -> js_api.StreamConfig:
    """The stream behind the results KV bucket: what `create_key_value` would make, with a TTL.

    Unlike a default KV bucket it discards old records, not new ones, at its size limit
    (`results_max_bytes`): the newest result always fits within the bucket's own limit.
    """
    bucket = results_bucket(settings.namespace)
    return js_api.StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>", f"{settings.namespace}.progress.>"],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        max_age=settings.result_ttl,
        max_msgs_per_subject=1,
        max_bytes=_limit(settings.results_max_bytes),
        discard=js_api.DiscardPolicy.OLD,
        allow_rollup_hdrs=True,
        deny_delete=True,
        allow_direct=True,
        duplicate_window=min(120.0, settings.result_ttl),
        metadata={META_NAMESPACE: settings.namespace, META_KIND: "results"},
    )


def claims_config(settings: Settings) -> js_api.StreamConfig:
    """The stream behind the claims bucket: per-message TTLs make abandoned claims expire.

    No size limit, and discard new: a claim must never be dropped to make room.
    """
    config = results_config(settings)
    bucket = claims_bucket(settings.namespace)
    config.name = f"KV_{bucket}"
    config.subjects = [f"$KV.{bucket}.>"]
    config.max_age = settings.claim_ttl
    config.max_bytes = -1
    config.discard = js_api.DiscardPolicy.NEW
    config.duplicate_window = min(120.0, settings.claim_ttl)
    config.allow_msg_ttl = True
    config.metadata = {META_NAMESPACE: settings.namespace, META_KIND: "claims"}
    return config


def _consumer(
    settings: Settings, name: str, max_in_flight: int, filters: list[str]
) -> js_api.ConsumerConfig:
    return js_api.ConsumerConfig(
        name=name,
        durable_name=name,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait,
        max_deliver=-1,  # workers count attempts and dead-letter; the server must not drop
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
        max_ack_pending=max_in_flight,
        max_waiting=512,
    )


def lane_configs(
    settings: Settings, queue: str, options: QueueOptions, max_in_flight: int
) -> list[tuple[str, js_api.ConsumerConfig]]:
    """The consumers of `queue`, one per lane, the default lane first.

    Without lanes one consumer takes every task subject, so a task enqueued with a
    priority is still served (first in, first out). With lanes, the default lane takes
    `<ns>.tasks.<q>.<Task>` and lane L takes `<ns>.tasks.<q>.<Task>.L`.
    """
    prefix = f"{settings.namespace}.tasks.{queue}"
    limit = options.max_in_flight or max_in_flight
    if not options.priorities:
        return [(DEFAULT_LANE, _consumer(settings, WORKERS, limit, [f"{prefix}.>"]))]
    lanes = sorted(options.priorities, key=lambda lane: lane != DEFAULT_LANE)
    configs = []
    for lane in lanes:
        subject = f"{prefix}.*" if lane == DEFAULT_LANE else f"{prefix}.*.{lane}"
        configs.append((lane, _consumer(settings, lane_consumer(lane), limit, [subject])))
    return configs


def group_config(
    settings: Settings, group: str, events: Iterable[str], max_in_flight: int
) -> js_api.ConsumerConfig:
    """The durable consumer of subscriber group `group`, filtered to the events it handles."""
    filters = sorted(f"{settings.namespace}.events.{name}" for name in events)
    return _consumer(settings, group_consumer(group), max_in_flight, filters)


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


async def answered(
    what: str, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
) -> T:
    """`call(*args, **kwargs)`, again when JetStream does not answer (a cluster electing a leader).

    In a cluster, a request about a stream that another client is creating at this
    moment, or whose leader is being elected, goes unanswered, or is answered 503
    "JetStream system temporarily unavailable", until the leader is in place: a few
    seconds at most, so a few tries bridge it. A cluster that lost its quorum stays
    unavailable: that ends in `ConnectError`, never in a raw nats-py error.
    """
    for attempt in range(_API_ATTEMPTS):
        try:
            return await call(*args, **kwargs)
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            ServiceUnavailableError,
        ) as exc:
            if attempt == _API_ATTEMPTS - 1:
                raise ConnectError(f"JetStream did not answer about {what}: {exc!r}") from exc
            await asyncio.sleep(0.25 * 2**attempt)
    raise AssertionError("unreachable")


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
    await ensure_stream(js, queue_config(settings, queue, options))


async def ensure_lanes(
    js: JetStreamContext,
    settings: Settings,
    queue: str,
    options: QueueOptions,
    max_in_flight: int,
) -> None:
    """Create or update the consumers of `queue`'s lanes; delete lanes no longer declared.

    Consumers on a WorkQueue stream must not overlap, so stale lanes go first and the
    default lane is updated before new lanes are added.
    """
    stream = queue_stream(settings.namespace, queue)
    wanted = lane_configs(settings, queue, options, max_in_flight)
    names = {config.name for _, config in wanted}
    for info in await answered(f"consumers of {stream}", js.consumers_info, stream):
        if info.name.startswith(f"{WORKERS}-") and info.name not in names:
            await answered(f"consumer {info.name}", js.delete_consumer, stream, info.name)
    for _, config in wanted:
        await ensure_consumer(js, stream, config)


async def queue_streams(
    js: JetStreamContext, namespace: str | None = None
) -> list[tuple[str, str, js_api.StreamInfo]]:
    """(namespace, queue, stream info) of every taskframe queue (of `namespace`, if given)."""
    found = []
    for info in await answered("the streams", js.streams_info):
        meta = info.config.metadata or {}
        ns, queue = meta.get(META_NAMESPACE), meta.get(META_QUEUE)
        if meta.get(META_KIND) != "queue" or ns is None or queue is None:
            continue
        if namespace is None or ns == namespace:
            found.append((ns, queue, info))
    return found


async def ensure_shared(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the namespace's dead-letter stream and results bucket."""
    await ensure_stream(js, dead_config(settings))
    await ensure_stream(js, results_config(settings))
