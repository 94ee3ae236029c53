"""What the broker holds about a flow, read and written for producers and workers alike.

plan          KV TF_<ns>_flows, key <flow id>             the flattened tree (_flow_plan)
start marks   KV TF_<ns>_flows, key <flow id>.started.<n>  "enqueuing", then "enqueued"
flow record   KV TF_<ns>_results, key <flow id>           a status record, task "flow",
                                                          written once: final states only
step records  KV TF_<ns>_results, key <flow id>.<leaf>    each step's own status record
joins         stream TF_<ns>_JOINS, <ns>.joins.<id>.<n>   a counter per group
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

from nats.js import api as js_api
from nats.js.errors import APIError, NotFoundError

from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe._flow_plan import Plan
from taskframe._publish import publish_stored
from taskframe._results import ErrorInfo, TaskState, TaskStatus, parse_record, status_record
from taskframe._retry import answered
from taskframe.errors import PublishError, StreamMissingError
from taskframe.provision import ensure_flows, ensure_stream

if TYPE_CHECKING:
    from taskframe.client import Client

FLOW_TASK = "flow"
"""The task name of a flow's own status record."""
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_BATCH = 2048


async def read_plan(client: Client, flow_id: str) -> Plan | None:
    """The plan of `flow_id`, or None if there is none (not a flow, or expired).

    Not a direct get: one answers nothing at all when no flow was ever enqueued in the
    namespace (no flows bucket), where this is told at once that the stream is missing.
    """
    stream = topology.flows_stream(client.namespace)
    subject = topology.plan_subject(client.namespace, flow_id)
    try:
        msg = await answered(f"plan of {flow_id}", client.js.get_last_msg, stream, subject)
    except NotFoundError:
        return None
    except APIError as exc:
        raise PublishError(f"cannot read the plan of {flow_id}: {exc.description}") from exc
    return Plan.from_json(msg.data) if msg.data else None


async def create(client: Client, subject: str, body: bytes) -> bool:
    """Store `body` on a KV key that has none yet; False if it has one (nothing stored)."""
    try:
        await publish_stored(client.nc, client.settings, subject, body, {EXPECTED_LAST: "0"})
    except StreamMissingError:
        await ensure_flows(client.js, client.settings)
        await ensure_stream(client.js, configs.results_config(client.settings))
        return await create(client, subject, body)
    except PublishError as exc:
        if "wrong last sequence" in str(exc):
            return False
        raise
    return True


async def write_flow_record(
    client: Client,
    flow_id: str,
    state: TaskState,
    *,
    result: Any = None,
    error: ErrorInfo | None = None,
) -> bool:
    """Store the flow's final record unless it has one; False if it had one."""
    record = status_record(
        flow_id, FLOW_TASK, state, 1, result_json=json.dumps(result).encode(), error=error
    )
    return await create(client, topology.result_subject(client.namespace, flow_id), record)


async def step_records(
    client: Client, flow_id: str, *, final: bool = True
) -> dict[int, TaskStatus]:
    """The latest status record of each step of `flow_id` that has one, by leaf: final
    records, or with `final=False` the non-final ones (`running`, `failed`)."""
    found = await _step_bodies(client, flow_id, final)
    return {leaf: parse_record(data) for leaf, data in found.items()}


async def succeeded_steps(client: Client, flow_id: str) -> set[int]:
    """The steps of `flow_id` whose final record says `succeeded` (read without building
    a `TaskStatus` for each: a join of 10,000 members reads them all once)."""
    found = await _step_bodies(client, flow_id, True)
    return {leaf for leaf, data in found.items() if json.loads(data)["state"] == "succeeded"}


async def _step_bodies(client: Client, flow_id: str, final: bool) -> dict[int, bytes]:
    """The last record body on each step's subject, by leaf.

    One ephemeral consumer that delivers the last message of each step's subject: a few
    round trips however many steps the flow has.
    """
    js, ns = client.js, client.namespace
    stream = topology.results_stream(ns)
    subject = topology.result_subject if final else topology.progress_subject
    config = js_api.ConsumerConfig(
        filter_subject=subject(ns, f"{flow_id}.*"),
        deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=js_api.AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    try:
        info = await answered(f"steps of {flow_id}", js.add_consumer, stream, config)
    except NotFoundError:
        return {}
    found: dict[int, bytes] = {}
    try:
        if info.num_pending:
            sub = await js.pull_subscribe_bind(info.name, stream)
            try:
                received = 0
                while received < info.num_pending:
                    batch = min(_BATCH, info.num_pending - received)
                    msgs = await sub.fetch(batch, timeout=client.settings.publish_timeout)
                    received += len(msgs)
                    for msg in msgs:
                        leaf = msg.subject.rpartition(".")[2]
                        if leaf.isdigit() and msg.data:
                            found[int(leaf)] = msg.data
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)
    return found
