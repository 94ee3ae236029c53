"""Enqueueing a flow: its plan stored, then its first steps (what `Client.enqueue(flow)` does)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import TypeAdapter

from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._flow_plan import CHAIN, GROUP, STEP, Leaf, Node, Plan, leaf_id
from taskframe._flow_records import create
from taskframe._inbound import key_id
from taskframe._publish import check_size, publisher
from taskframe.errors import PublishError, TaskframeError
from taskframe.flows import Flow, FlowRun, Group
from taskframe.models import Task, result_type
from taskframe.provision import ensure_queue

if TYPE_CHECKING:
    from taskframe.client import Client

R = TypeVar("R")


def _flatten(flow: Flow[Any], namespace: str) -> tuple[Plan, list[Task[Any]]]:
    """The plan of `flow` and its tasks by leaf (bodies filled in for later steps)."""
    nodes: list[Node] = []
    leaves: list[Leaf] = []
    tasks: list[Task[Any]] = []

    def add(item: Task[Any] | Flow[Any], parent: int) -> int:
        index = len(nodes)
        if isinstance(item, Task):
            model = type(item)
            subject = wire.task_subject(
                namespace, model.__tf_queue__, model.__tf_name__, model.__tf_priority__
            )
            nodes.append(Node(STEP, parent, leaf=len(leaves)))
            leaves.append(Leaf(index, model.__tf_name__, model.__tf_queue__, subject))
            tasks.append(item)
            return index
        nodes.append(Node(GROUP if isinstance(item, Group) else CHAIN, parent))
        nodes[index].children = [add(step, index) for step in item.steps]
        return index

    add(flow, -1)
    plan = Plan(nodes, leaves, time.time())
    first = set(plan.starts(0))
    for leaf, task in enumerate(tasks):
        if leaf not in first:
            leaves[leaf].body = wire.encode(task).decode()
    return plan, tasks


def _result_type(item: Task[Any] | Flow[Any]) -> Any:
    if isinstance(item, Task):
        return result_type(type(item))
    if isinstance(item, Group):
        kinds = {repr(t): t for t in map(_result_type, item.steps)}
        return list[next(iter(kinds.values()))] if len(kinds) == 1 else list[Any]  # type: ignore[misc]
    return _result_type(item.steps[-1])


async def enqueue_flow(client: Client, flow: Flow[R], key: str | None) -> FlowRun[R]:
    """What `Client.enqueue(flow)` does: store the plan, then enqueue the first steps."""
    ns = client.namespace
    flow_id = key_id(key) if key is not None else wire.new_task_id()
    plan, tasks = _flatten(flow, ns)
    body = plan.to_json()
    subject = topology.plan_subject(ns, flow_id)
    check_size(subject, body, None, client.nc.max_payload)
    duplicate = not await create(client, subject, body)
    first = plan.starts(0)
    for queue in sorted({plan.leaves[leaf].queue for leaf in first}):
        await ensure_queue(client.js, client.settings, queue)
    await _send_all(
        client,
        [
            (plan.leaves[leaf].subject, wire.encode(tasks[leaf]), leaf_id(flow_id, leaf))
            for leaf in first
        ],
        flow_id,
    )
    adapter: TypeAdapter[R] = TypeAdapter(_result_type(flow))
    return FlowRun(client, flow_id, adapter, duplicate=duplicate)


async def _send_all(client: Client, messages: list[tuple[str, bytes, str]], flow_id: str) -> None:
    """Store the first steps, pipelined; ones unconfirmed are sent again with the same ids."""
    sender = publisher(client.nc)
    waiting = messages
    for round_ in range(client.settings.publish_attempts):
        sent = []
        for subject, body, task_id in waiting:
            headers = {wire.MSG_ID: task_id, wire.FLOW: flow_id}
            sent.append(await sender.send(subject, body, headers))
        if sent:
            await asyncio.wait(sent, timeout=client.settings.publish_timeout)
        for future in sent:  # the server answered no: sending again would be refused too
            done = future.done() and not future.cancelled()
            if done and isinstance(refused := future.exception(), TaskframeError):
                raise refused
        waiting = [
            m
            for m, f in zip(waiting, sent, strict=True)
            if not f.done() or f.cancelled() or f.exception() is not None
        ]
        if not waiting:
            return
        sender.abandon()
        await asyncio.sleep(min(2.0, 0.1 * 2**round_))
    raise PublishError(
        f"{len(waiting)} steps of flow {flow_id} were not confirmed stored (enqueue it again "
        "with the same key: its ids make a resend safe)"
    )
