"""Every name taskframe gives a JetStream object (their configurations: _stream_configs.py).

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
    large bodies             object store TF_<ns>_payloads  one object per body over the
                                                       offload threshold, kept payload_ttl
    flow plans, start marks  KV      TF_<ns>_flows     keys <flow id>, <flow id>.started.<node>
    flow joins               stream  TF_<ns>_JOINS     counters <ns>.joins.<flow id>.<node>

Names only, no I/O: provision.py creates and checks the objects, and _wire.py builds the
subjects messages are published to.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    compression: bool = False
    """Whether the queue's stream stores its messages compressed on disk (s2)."""

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


def payloads_bucket(namespace: str) -> str:
    """The object store bucket name of `namespace`'s large bodies."""
    return f"TF_{namespace}_payloads"


def payloads_stream(namespace: str) -> str:
    """The stream behind the payloads object store bucket."""
    return f"OBJ_{payloads_bucket(namespace)}"


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


def rate_stream(namespace: str) -> str:
    """The counter stream of `namespace`'s rate limits."""
    return f"TF_{namespace}_RATE"


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
