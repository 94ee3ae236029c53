"""Every name taskframe gives a JetStream object, and the configuration it wants for each.

    queue q of namespace ns  stream  TF_<ns>_<q>       WorkQueue, subjects <ns>.tasks.<q>.>
                                                       and <ns>.sched.<q>.> (schedules)
    its worker pool          durable pull consumer "workers" (one per lane: "workers-<lane>")
    dead letters             stream  TF_<ns>_DEAD      Limits, subjects <ns>.dead.>, dead_ttl,
                                                       dead_max_bytes (oldest go first)
    results and status       KV      TF_<ns>_results   one key per task id, TTL result_ttl,
                                                       results_max_bytes (oldest go first);
                                                       non-final status on <ns>.progress.<id>,
                                                       progress reports on <ns>.progress.<id>.report
    cancel requests          stream  TF_<ns>_CANCEL    Limits, subjects <ns>.cancel.<id>, kept
                                                       result_ttl, one message per task id
    exactly-once claims      KV      TF_<ns>_claims    one key per task id, per-message TTLs
    events                   stream  TF_<ns>_EVENTS    Interest, subjects <ns>.events.>
    a subscriber group g     durable pull consumer "group-<g>" on the events stream
    rate-limit counters      stream  TF_<ns>_RATE      counters, subjects <ns>.rate.>
    worker registry          KV      TF_<ns>_workers   one key per running worker, each
                                                       write with a per-message TTL
    flow plans, start marks  KV      TF_<ns>_flows     keys <flow id>, <flow id>.started.<node>
    flow joins               stream  TF_<ns>_JOINS     counters <ns>.joins.<flow id>.<node>

Names and configurations only, no I/O: provision.py creates and checks the objects, and
_wire.py builds the subjects messages are published to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nats.js import api as js_api

from taskframe.settings import Settings

WORKERS = "workers"
DEFAULT_LANE = "default"
DEFAULT_MAX_IN_FLIGHT = 100_000
"""Default cap on tasks held by all of a queue's workers together (max_ack_pending)."""
JOIN_DUPLICATE_WINDOW = 3600.0
"""Seconds a flow's join remembers the members it counted (at most `result_ttl`)."""
META_NAMESPACE = "taskframe.namespace"
META_QUEUE = "taskframe.queue"
META_KIND = "taskframe.kind"


@dataclass(frozen=True, slots=True)
class QueueOptions:
    """How a queue is served by every worker of the namespace."""

    priorities: tuple[str, ...] = ()
    """Lanes, highest first; must contain "default". Empty: one lane, first in first out."""
    max_in_flight: int | None = None
    """Tasks held at once by all workers together, enforced by the server (per lane)."""
    rate_limit: str | None = None
    """Task starts allowed across all workers, e.g. "100/s" or "600/m"."""
    duplicate_window: float | None = None
    """Seconds an idempotency key is remembered; default `Settings.duplicate_window`."""

    @property
    def lanes(self) -> tuple[str, ...]:
        """The lanes to serve, highest priority first."""
        return self.priorities or (DEFAULT_LANE,)


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


def workers_bucket(namespace: str) -> str:
    """The worker registry KV bucket name of `namespace`."""
    return f"TF_{namespace}_workers"


def workers_stream(namespace: str) -> str:
    """The stream behind the worker registry bucket."""
    return f"KV_{workers_bucket(namespace)}"


def worker_subject(namespace: str, worker_id: str) -> str:
    """The subject of one worker's registry record (a KV key)."""
    return f"$KV.{workers_bucket(namespace)}.{worker_id}"


def group_consumer(group: str) -> str:
    """The durable consumer name of subscriber group `group`."""
    return f"group-{group}"


def lane_consumer(lane: str) -> str:
    """The durable consumer name of a queue's priority lane."""
    return WORKERS if lane == DEFAULT_LANE else f"{WORKERS}-{lane}"


def is_lane_consumer(name: str) -> bool:
    """Whether `name` is one of a queue's lane consumers (`workers`, `workers-<lane>`)."""
    return name == WORKERS or name.startswith(f"{WORKERS}-")


def tasks_filter(namespace: str, queue: str) -> str:
    """The subjects of every task of `queue`, all lanes (not its schedules)."""
    return f"{namespace}.tasks.{queue}.>"


def results_bucket(namespace: str) -> str:
    """The results KV bucket name of `namespace`."""
    return f"TF_{namespace}_results"


def result_subject(namespace: str, task_id: str) -> str:
    """The subject a task's final status record is written to (a KV key)."""
    return f"$KV.{results_bucket(namespace)}.{task_id}"


def results_stream(namespace: str) -> str:
    """The stream behind the results bucket (it also stores the progress subjects)."""
    return f"KV_{results_bucket(namespace)}"


def claims_stream(namespace: str) -> str:
    """The stream behind the claims bucket."""
    return f"KV_{claims_bucket(namespace)}"


def claim_subject(namespace: str, task_id: str) -> str:
    """The subject of a task's exactly-once claim (a KV key)."""
    return f"$KV.{claims_bucket(namespace)}.{task_id}"


def dead_filter(namespace: str, queue: str | None = None, task: str | None = None) -> str:
    """The subjects of a namespace's dead letters, of one queue and task name if given."""
    if queue or task:
        return f"{namespace}.dead.{queue or '*'}.{task or '*'}"
    return f"{namespace}.dead.>"


def rate_subject(namespace: str, name: str, per_seconds: int) -> str:
    """The prefix of the counter subjects of rate limit `name` (one subject per window)."""
    return f"{namespace}.rate.{name}.{per_seconds}"


def next_subject(stream: str, consumer: str) -> str:
    """The JetStream API subject a pull request for `consumer` is published to."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"


def purge_subject(stream: str) -> str:
    """The JetStream API subject that purges `stream` (its reply says how many went)."""
    return f"$JS.API.STREAM.PURGE.{stream}"


def consumer_info_subject(stream: str, consumer: str) -> str:
    """The JetStream API subject that answers with `consumer`'s info."""
    return f"$JS.API.CONSUMER.INFO.{stream}.{consumer}"


def progress_subject(namespace: str, task_id: str) -> str:
    """The subject a task's non-final status (`running`, `failed`) is written to.

    It is stored in the results bucket's stream but outside its keys, so a late non-final
    write (one that sat in a cut connection) can never replace a final record.
    """
    return f"{namespace}.progress.{task_id}"


def report_subject(namespace: str, task_id: str) -> str:
    """The subject a running task's progress report (`Context.progress`) is written to.

    Stored in the results bucket's stream beside the task's status records, outside its
    keys: a report never replaces a status, and is kept as long as one.
    """
    return f"{namespace}.progress.{task_id}.report"


def cancels_stream(namespace: str) -> str:
    """The stream of `namespace`'s cancel requests."""
    return f"TF_{namespace}_CANCEL"


def cancel_subject(namespace: str, task_id: str) -> str:
    """The subject of the cancel request for `task_id`."""
    return f"{namespace}.cancel.{task_id}"


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


def rate_stream(namespace: str) -> str:
    """The counter stream of `namespace`'s rate limits."""
    return f"TF_{namespace}_RATE"


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


def flows_bucket(namespace: str) -> str:
    """The KV bucket of `namespace`'s flow plans and start marks."""
    return f"TF_{namespace}_flows"


def plan_subject(namespace: str, flow_id: str, node: int | None = None) -> str:
    """A flow's plan (a KV key), or the mark that its node `node` was started."""
    marked = "" if node is None else f".started.{node}"
    return f"$KV.{flows_bucket(namespace)}.{flow_id}{marked}"


def joins_stream(namespace: str) -> str:
    """The counter stream of `namespace`'s flow joins."""
    return f"TF_{namespace}_JOINS"


def join_subject(namespace: str, flow_id: str, node: int) -> str:
    """The counter of a flow's group `node`: how many of its members are done."""
    return f"{namespace}.joins.{flow_id}.{node}"


def flows_stream(namespace: str) -> str:
    """The stream behind the flows bucket."""
    return f"KV_{flows_bucket(namespace)}"


def flows_config(settings: Settings) -> js_api.StreamConfig:
    """The flows bucket: as the claims bucket (never dropped for room), kept `result_ttl`."""
    config, bucket = claims_config(settings), flows_bucket(settings.namespace)
    config.name, config.subjects = f"KV_{bucket}", [f"$KV.{bucket}.>"]
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
