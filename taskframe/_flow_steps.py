"""A flow's steps on the worker: what follows a step that succeeded, or one that died.

The settler calls `succeeded` before it acks a flow's step, and `died` before it
terminates one. So a worker killed in between leaves the step to be redelivered, and the
redelivery does it again; each part is idempotent:

- the step's record is stored (awaited: what comes next may read it) under its task id;
- in a chain, the next node is started; in a group, the member is counted on the group's
  join counter with a message id naming the member, so a repeat within the counter's
  duplicate window (an hour) is not counted twice. In a flow older than that, a count
  that reaches the group's size is checked against the members' records before the group
  counts as done: a member counted twice (after the window) can make the count reach it
  early, never make the group fire early;
- starting a node takes its start mark (a KV create, "enqueuing") and enqueues its steps
  with their task ids as message ids, then sets the mark "enqueued": a repeat finds the
  mark and enqueues nothing, or (if the first died in between) enqueues the same ids again,
  which the queue's duplicate window drops;
- a node is not started once the flow has a final record (dead, cancelled);
- the root done stores the flow's `succeeded` record; a step dead stores its `dead`
  record, naming the step. Both are created once: the first final record stays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

from nats.js.errors import NotFoundError

from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._enqueue import store_task
from taskframe._flow_plan import CHAIN, Plan, leaf_id, split_leaf_id
from taskframe._flow_records import create, read_plan, succeeded_steps, write_flow_record
from taskframe._publish import publish_stored, publisher, refusal
from taskframe._results import ErrorInfo, TaskState, read_status
from taskframe._retry import answered

if TYPE_CHECKING:
    from taskframe.client import Client

log = logging.getLogger("taskframe.flows")

_INCR = "Nats-Incr"
_DEDUPED = topology.JOIN_DUPLICATE_WINDOW - 600.0
"""A flow younger than this (its join's duplicate window, less a margin for clocks)
cannot have had a member counted twice."""
_PLANS_KEPT = 256
_ENQUEUED = b"enqueued"

Step = tuple[str, int]
"""A flow's step: (flow id, leaf)."""


class FlowSteps:
    """One worker's handle on the flows its steps belong to (their plans cached)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._plans: OrderedDict[str, asyncio.Future[Plan | None]] = OrderedDict()

    @staticmethod
    def step_of(headers: Mapping[str, str] | None, task_id: str) -> Step | None:
        """(flow id, leaf) if the delivery is a flow's step, else None."""
        flow_id = headers.get(wire.FLOW) if headers else None
        parts = split_leaf_id(task_id) if flow_id else None
        return parts if parts is not None and parts[0] == flow_id else None

    async def plan(self, flow_id: str) -> Plan | None:
        """The plan of `flow_id` (None if it has none), read once per worker while it is
        used: the steps of a group that arrive together wait for one read."""
        reading = self._plans.get(flow_id)
        if reading is None:
            reading = self._plans[flow_id] = asyncio.ensure_future(read_plan(self._client, flow_id))
            if len(self._plans) > _PLANS_KEPT:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(flow_id)
        try:
            plan = await asyncio.shield(reading)
        except BaseException:
            if reading.done() and self._plans.get(flow_id) is reading:
                del self._plans[flow_id]  # read again next time
            raise
        if plan is None:
            self._plans.pop(flow_id, None)
        return plan

    async def advance(self, step: Step) -> None:
        """A flow's step succeeded and its record is stored: start what follows it (see the
        module docstring)."""
        client = self._client
        flow_id, leaf = step
        plan = await self.plan(flow_id)
        if plan is None or leaf >= len(plan.leaves):  # expired, or not ours: acked as it is
            log.error(
                "step %d of flow %s is not in a stored plan: nothing follows it", leaf, flow_id
            )
            return
        node = plan.leaves[leaf].node
        while (parent := plan.nodes[node].parent) >= 0:
            up = plan.nodes[parent]
            if up.kind == CHAIN:
                at = up.children.index(node)
                if at + 1 < len(up.children):
                    await self._start(flow_id, plan, up.children[at + 1])
                    return
            elif len(up.children) > 1 and not await self._joined(flow_id, plan, parent, node):
                return
            node = parent
        if await write_flow_record(client, flow_id, TaskState.SUCCEEDED):
            log.info("flow %s succeeded", flow_id)

    async def died(
        self, step: Step, task_id: str, name: str, error: ErrorInfo, reason: str
    ) -> None:
        """A flow's step is dead: the flow fails with its error, and nothing after it starts."""
        flow_id = step[0]
        failed = ErrorInfo(
            type=error.type,
            message=f"step {task_id} ({name}) is dead: {error.type}: {error.message}",
            reason=reason,
        )
        member = {"step": task_id, "task": name}
        if await write_flow_record(
            self._client, flow_id, TaskState.DEAD, result=member, error=failed
        ):
            log.warning("flow %s failed: %s", flow_id, failed.message)

    async def _joined(self, flow_id: str, plan: Plan, group: int, member: int) -> bool:
        """Count `member` done in `group`; True once every member of it is done."""
        ns, js = self._client.namespace, self._client.js
        subject = topology.join_subject(ns, flow_id, group)
        headers = {_INCR: "1", wire.MSG_ID: f"{flow_id}.{group}.{member}"}
        # Asked through the pipelined publisher: nats-py's js.publish and request cost more
        # than the rest of a join.
        reply = await answered(
            f"join {subject}",
            publisher(self._client.nc).ask,
            subject,
            headers,
            self._client.settings.publish_timeout,
        )
        answer = json.loads(reply.data or b"{}")
        if "error" in answer:
            raise refusal(subject, answer["error"], topology.joins_stream(ns))
        if answer.get("val") is not None:
            count = int(answer["val"])
        else:  # counted before (this member's redelivery): read the total
            msg = await answered(
                f"join {subject}", js.get_last_msg, topology.joins_stream(ns), subject
            )
            count = int(json.loads(msg.data or b"{}").get("val", 0))
        if count < len(plan.nodes[group].children):
            return False
        if time.time() - plan.created < _DEDUPED:
            return True  # every count so far fell within the window: none counted twice
        succeeded = await succeeded_steps(self._client, flow_id)
        done = all(leaf in succeeded for leaf in plan.finals(group))
        if not done:
            log.warning("join %s counted %d, but not every member is done yet", subject, count)
        return done

    async def _start(self, flow_id: str, plan: Plan, node: int) -> None:
        """Enqueue the steps that start `node`, once (see the module docstring)."""
        client = self._client
        status = await read_status(client.js, client.namespace, flow_id)
        if status is not None and status.state.final:
            log.info("flow %s is %s: node %d not started", flow_id, status.state.value, node)
            return
        mark = topology.plan_subject(client.namespace, flow_id, node)
        if not await create(client, mark, b"enqueuing"):
            try:
                stream = topology.flows_stream(client.namespace)
                held = await answered(f"mark {mark}", client.js.get_last_msg, stream, mark)
                if held.data == _ENQUEUED:
                    return
            except NotFoundError:
                pass
        for leaf in plan.starts(node):
            step = plan.leaves[leaf]
            task_id = leaf_id(flow_id, leaf)
            headers = {wire.MSG_ID: task_id, wire.FLOW: flow_id}
            body = (step.body or "").encode()
            await store_task(
                client.nc, client.js, client.settings, step.queue, step.subject, body, headers
            )
        await publish_stored(client.nc, client.settings, mark, _ENQUEUED)
