"""What a flow's step reads of the steps before it: `Context.previous` and `Context.members`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from taskframe._flow_plan import CHAIN, GROUP, Plan
from taskframe._flow_records import read_plan, step_records
from taskframe._flow_steps import FlowSteps
from taskframe._results import TaskState
from taskframe.errors import ConfigError, PublishError
from taskframe.models import Task, result_adapter

if TYPE_CHECKING:
    from taskframe.client import Client


async def before(
    client: Client,
    headers: Mapping[str, str] | None,
    task_id: str,
    model: type[Task[Any]] | None,
    many: bool,
) -> Any:
    """The result of the node before step `task_id`: one step's (validated as `model`'s
    result), or with `many` a group's members' in member order."""
    step = FlowSteps.step_of(headers, task_id)
    if step is None:
        raise ConfigError(f"task {task_id} is not a step of a flow: nothing comes before it")
    flow_id, leaf = step
    plan = await read_plan(client, flow_id)
    node = None if plan is None else plan.before(leaf)
    if plan is None or node is None:
        raise ConfigError(f"nothing comes before step {task_id} in its flow")
    while plan.nodes[node].kind == CHAIN:
        node = plan.nodes[node].children[-1]
    if many != (plan.nodes[node].kind == GROUP):
        use = "ctx.members()" if not many else "ctx.previous(Model)"
        what = "a group" if not many else "one task"
        raise ConfigError(f"the step before {task_id} is {what}: read it with {use}")
    records = await step_records(client, flow_id)
    results: dict[int, Any] = {}
    for leaf_, status in records.items():
        if status.state is TaskState.SUCCEEDED:
            results[leaf_] = status.result
    parts = plan.nodes[node].children if many else [node]
    if model is not None:
        _check_model(plan, parts, model, task_id)
    try:
        values = [plan.value(part, results) for part in parts]
    except KeyError as exc:
        raise PublishError(f"the result of step {flow_id}.{exc.args[0]} is not stored") from exc
    if model is None:
        return values
    adapter = result_adapter(model)
    return (
        [adapter.validate_python(v) for v in values] if many else adapter.validate_python(values[0])
    )


def _check_model(plan: Plan, parts: list[int], model: type[Task[Any]], task_id: str) -> None:
    for part in parts:
        last = plan.last_step(part)
        name = plan.leaves[last.leaf].name if last is not None else "a group"
        if name != model.__tf_name__:
            raise ConfigError(
                f"step {task_id} reads a {model.__tf_name__} result, but the step before it "
                f"is {name}"
            )
