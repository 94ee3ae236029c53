"""The configuration taskframe wants for each JetStream object it names in _topology.py.

Configurations only, no I/O: provision.py creates and checks the objects.
"""

from __future__ import annotations

from collections.abc import Iterable

from nats.js import api as js_api

from taskframe._topology import (
    DEFAULT_LANE,
    JOIN_DUPLICATE_WINDOW,
    META_KIND,
    META_NAMESPACE,
    META_QUEUE,
    WORKERS,
    QueueOptions,
    cancels_stream,
    claims_bucket,
    dead_stream,
    events_stream,
    flows_bucket,
    flows_stream,
    group_consumer,
    joins_stream,
    lane_consumer,
    payloads_bucket,
    payloads_stream,
    queue_stream,
    rate_stream,
    results_bucket,
    tasks_filter,
    workers_bucket,
    workers_stream,
)
from taskframe.settings import Settings


def cancels_config(settings: Settings) -> js_api.StreamConfig:
    """The cancel requests: one per task id, kept `result_ttl` (as long as a task's record)."""
    ns = settings.namespace
    return js_api.StreamConfig(
        name=cancels_stream(ns),
        subjects=[f"{ns}.cancel.>"],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        max_age=settings.result_ttl,
        max_msgs_per_subject=1,
        discard=js_api.DiscardPolicy.OLD,
        duplicate_window=min(120.0, settings.result_ttl),
        metadata={META_NAMESPACE: ns, META_KIND: "cancel"},
    )


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
        subjects=[tasks_filter(ns, queue), f"{ns}.sched.{queue}.>"],
        retention=js_api.RetentionPolicy.WORK_QUEUE,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        duplicate_window=window or settings.duplicate_window,
        allow_msg_schedules=True,
        compression=js_api.StoreCompression.S2
        if options and options.compression
        else js_api.StoreCompression.NONE,
        metadata={META_NAMESPACE: ns, META_QUEUE: queue, META_KIND: "queue"},
    )


def payloads_config(settings: Settings) -> js_api.StreamConfig:
    """The stream behind the payloads bucket, laid out as nats-py's `create_object_store`
    makes it (chunks and meta subjects), with `payload_ttl` as the backstop that removes an
    object nobody deleted."""
    bucket = payloads_bucket(settings.namespace)
    config = js_api.StreamConfig(
        name=payloads_stream(settings.namespace),
        subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
    )
    config.retention, config.storage = js_api.RetentionPolicy.LIMITS, _storage(settings)
    config.num_replicas, config.max_age = settings.replicas, settings.payload_ttl
    config.discard = js_api.DiscardPolicy.NEW  # a full bucket refuses an object, drops none
    config.allow_rollup_hdrs = config.allow_direct = True  # what the object store API uses
    config.metadata = {META_NAMESPACE: settings.namespace, META_KIND: "payloads"}
    return config


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
        allow_batched=True,  # a worker's records go in fast-ingest batches (_batching.py)
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


def workers_config(settings: Settings) -> js_api.StreamConfig:
    """The stream behind the worker registry: one record per worker, kept by its TTL.

    Every record carries a per-message TTL of 2.5 of its worker's heartbeats (whole seconds),
    so the bucket needs no max_age, and workers with different heartbeats can share it.
    Storage follows `settings.storage` like every other bucket: in memory, a lone server's
    restart would remove the bucket itself, and a worker may lack the right to re-create it.
    """
    bucket = workers_bucket(settings.namespace)
    return js_api.StreamConfig(
        name=workers_stream(settings.namespace),
        subjects=[f"$KV.{bucket}.>"],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=_storage(settings),
        num_replicas=settings.replicas,
        max_msgs_per_subject=1,
        discard=js_api.DiscardPolicy.OLD,
        allow_rollup_hdrs=True,
        allow_direct=True,
        allow_msg_ttl=True,
        metadata={META_NAMESPACE: settings.namespace, META_KIND: "workers"},
    )


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
    prefix = tasks_filter(settings.namespace, queue).removesuffix(".>")
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


def rate_config(settings: Settings, max_age: float) -> js_api.StreamConfig:
    """The counter stream configuration, keeping counters for `max_age` seconds."""
    ns = settings.namespace
    file = settings.storage == "file"
    return js_api.StreamConfig(
        name=rate_stream(ns),
        subjects=[f"{ns}.rate.>"],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE if file else js_api.StorageType.MEMORY,
        num_replicas=settings.replicas,
        max_age=max_age,
        max_msgs_per_subject=1,  # the last increment holds the total
        allow_msg_counter=True,
        metadata={META_NAMESPACE: ns, META_KIND: "rate"},
    )


def flows_config(settings: Settings) -> js_api.StreamConfig:
    """The flows bucket: as the claims bucket (never dropped for room), kept `result_ttl`."""
    config, bucket = claims_config(settings), flows_bucket(settings.namespace)
    config.name, config.subjects = flows_stream(settings.namespace), [f"$KV.{bucket}.>"]
    config.max_age, config.duplicate_window = settings.result_ttl, min(120.0, settings.result_ttl)
    config.metadata = {META_NAMESPACE: settings.namespace, META_KIND: "flows"}
    return config


def joins_config(settings: Settings) -> js_api.StreamConfig:
    """The join counters, kept `result_ttl`; a member's count is deduplicated for an hour."""
    ns, config = settings.namespace, rate_config(settings, settings.result_ttl)
    config.name, config.subjects = joins_stream(ns), [f"{ns}.joins.>"]
    config.duplicate_window = min(JOIN_DUPLICATE_WINDOW, settings.result_ttl)
    config.metadata = {META_NAMESPACE: ns, META_KIND: "joins"}
    return config
