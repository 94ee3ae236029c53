"""Flows: tasks that run after others (chain), beside others (group), or after a group
(chord), with the joins kept on the broker.

    flow = await tf.enqueue(chord(group(*(Square(n=n) for n in range(10))), then=Total()))
    total = await flow.result(timeout=30)       # Total's result; it read the squares with
                                                # `await ctx.members(Square)`, in member order

Every step is an ordinary task: its own queue, retries, dead letter and status record,
under the task id `<flow id>.<step>`. What follows a step is started by the worker that
settles it, before it acks it (_flow_steps.py), so a worker killed at any moment leaves the
step to be redelivered and the flow to go on. The state lives in the broker only: the plan
and start marks in KV `TF_<ns>_flows`, joins as counters in `TF_<ns>_JOINS`, the flow's
final record beside the tasks' in `TF_<ns>_results`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter

from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._flow_plan import Leaf, Plan, leaf_id
from taskframe._flow_records import (
    FLOW_TASK,
    create,
    read_plan,
    step_records,
    write_flow_record,
)
from taskframe._publish import publish_stored
from taskframe._results import ErrorInfo, TaskState, TaskStatus, read_status, status_record
from taskframe.errors import (
    ConfigError,
    FlowFailedError,
    TaskCancelledError,
)
from taskframe.models import Task

if TYPE_CHECKING:
    from taskframe.client import Client

R = TypeVar("R")

__all__ = ["Chain", "Chord", "Flow", "FlowRun", "FlowStatus", "Group", "StepStatus"]


class Flow(Generic[R]):
    """A tree of tasks whose result is an R: made by `chain`, `group` and `chord`."""

    __slots__ = ("steps",)

    def __init__(self, steps: tuple[Task[Any] | Flow[Any], ...]) -> None:
        if not steps:
            raise ConfigError(f"a {type(self).__name__.lower()} needs at least one step")
        for step in steps:
            if isinstance(step, Task) and not type(step).__tf_results__:
                raise ConfigError(
                    f"{type(step).__tf_name__} is declared with results=False: a flow's "
                    "steps keep their results (the next step and `FlowRun.result` read them)"
                )
            if not isinstance(step, Task | Flow):
                raise ConfigError(f"a flow's step is a Task or a flow, not {step!r}")
        self.steps = steps

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.steps)
        return f"{type(self).__name__.lower()}({inner})"


class Chain(Flow[R]):
    """Steps that run one after another, each once the one before it succeeded."""

    __slots__ = ()


class Group(Flow[list[R]]):
    """Members that run at once; its result is their results, in member order."""

    __slots__ = ()


class Chord(Flow[R]):
    """A group, then one callback once every member succeeded (a chain of the two)."""

    __slots__ = ()


def chain(*steps: Task[Any] | Flow[Any]) -> Chain[Any]:
    """Run `steps` one after another; the flow's result is the last step's.

    A step reads the result of the step before it with `ctx.previous(Model)`, or the
    results of a group before it with `ctx.members(Model)`.
    """
    return Chain(steps)


def group(*members: Task[R] | Flow[R]) -> Group[R]:
    """Run `members` at once; the flow's result is the list of their results, in order."""
    return Group(members)


def chord(members: Group[Any], *, then: Task[R] | Flow[R]) -> Chord[R]:
    """Run the group `members`, then `then` exactly once, after every member succeeded.

    `then` reads the members' results with `ctx.members(Model)`, in member order.
    """
    if not isinstance(members, Group):
        raise ConfigError(f"chord() takes a group() of members, not {members!r}")
    return Chord((members, then))


class StepStatus(BaseModel):
    """One step of a flow and its latest status."""

    model_config = ConfigDict(frozen=True)

    step: int
    """Its number in the flow, in the order the steps were written."""
    id: str
    task: str
    state: TaskState | None
    """Its status record's state; None while it has none (waiting for a worker, or for
    the steps before it)."""
    attempt: int = 0
    error: ErrorInfo | None = None


class FlowStatus(BaseModel):
    """A flow's state and every step's."""

    model_config = ConfigDict(frozen=True)

    id: str
    state: TaskState
    """`running` until the flow's final record: `succeeded`, `dead` or `cancelled`."""
    error: ErrorInfo | None = None
    """Why it failed: names the dead step and its error."""
    steps: list[StepStatus]


class FlowRun(Generic[R]):
    """A handle on an enqueued flow: what `Client.enqueue(flow)` returns.

    `FlowRun(client, flow_id)` is a handle on a flow from its id (its result untyped).
    """

    __slots__ = ("_adapter", "_client", "duplicate", "id")

    def __init__(
        self,
        client: Client,
        flow_id: str,
        adapter: TypeAdapter[R] | None = None,
        *,
        duplicate: bool = False,
    ) -> None:
        self._client = client
        self._adapter: TypeAdapter[Any] = adapter or TypeAdapter(Any)
        self.id = flow_id
        self.duplicate = duplicate
        """True when the enqueue carried a key whose flow was enqueued already."""

    def __repr__(self) -> str:
        return f"<FlowRun id={self.id}{' duplicate' if self.duplicate else ''}>"

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the flow to finish and return its result: the last step's (chain), the
        callback's (chord), or the members' in member order (group).

        Raises `FlowFailedError` naming the step that died and its error,
        `TaskCancelledError` if the flow was cancelled, `ResultTimeoutError` after `timeout`.
        """
        status = await self._client.wait(self.id, timeout)
        if status.state is TaskState.CANCELLED:
            raise TaskCancelledError(self.id)
        if status.state is TaskState.DEAD:
            error = status.error or ErrorInfo(type="Unknown", message="")
            step = status.result if isinstance(status.result, dict) else {}
            raise FlowFailedError(
                self.id,
                str(step.get("step", "?")),
                str(step.get("task", "?")),
                error.type,
                error.message,
            )
        plan = await self._plan()
        records = await step_records(self._client, self.id)
        results = {leaf: status.result for leaf, status in records.items()}
        value: R = self._adapter.validate_python(plan.value(0, results))
        return value

    async def status(self) -> FlowStatus:
        """The flow's state and its steps', in the order they were written."""
        plan = await self._plan()
        own = await read_status(self._client.js, self._client.namespace, self.id)
        final = await step_records(self._client, self.id)
        running = await step_records(self._client, self.id, final=False)
        steps = []
        for leaf, step in enumerate(plan.leaves):
            found = final.get(leaf) or running.get(leaf)
            steps.append(_step_status(self.id, leaf, step, found))
        state = own.state if own is not None and own.state.final else TaskState.RUNNING
        return FlowStatus(id=self.id, state=state, error=own.error if own else None, steps=steps)

    async def cancel(self) -> bool:
        """Cancel the flow: no step starts any more, steps waiting are dropped unrun and
        running ones stopped (as `Client.cancel` does). False if it already finished."""
        client = self._client
        if not await write_flow_record(client, self.id, TaskState.CANCELLED):
            return False
        plan = await self._plan()
        final = await step_records(client, self.id)
        for leaf, step in enumerate(plan.leaves):
            if leaf in final:
                continue
            task_id = leaf_id(self.id, leaf)
            subject = topology.cancel_subject(client.namespace, task_id)
            await publish_stored(
                client.nc, client.settings, subject, b"", {wire.MSG_ID: f"cancel-{task_id}"}
            )
            record = status_record(task_id, step.name, TaskState.CANCELLED, 0)
            await create(client, topology.result_subject(client.namespace, task_id), record)
        return True

    async def _plan(self) -> Plan:
        plan = await read_plan(self._client, self.id)
        if plan is None:
            raise ConfigError(f"no flow {self.id} (never enqueued, or its plan expired)")
        return plan


async def flow_named(
    client: Client, task_id: str, status: TaskStatus | None
) -> FlowRun[Any] | None:
    """A handle on the flow `task_id` names, or None if it names none. `status` is the id's
    own record (`Client.status`): a flow has one only once it ended, under the name "flow"."""
    if status is not None and status.task != FLOW_TASK:
        return None
    if await read_plan(client, task_id) is None:
        return None
    return FlowRun(client, task_id)


def _step_status(flow_id: str, leaf: int, step: Leaf, found: TaskStatus | None) -> StepStatus:
    task_id = leaf_id(flow_id, leaf)
    if found is None:
        return StepStatus(step=leaf, id=task_id, task=step.name, state=None)
    return StepStatus(
        step=leaf,
        id=task_id,
        task=step.name,
        state=found.state,
        attempt=found.attempt,
        error=found.error,
    )
