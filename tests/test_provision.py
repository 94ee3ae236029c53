"""Provisioning (taskframe.provision): every stream, consumer and bucket an app needs, created
or brought in line, idempotent, and a conflict it cannot resolve is an error naming it."""

import pytest
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from taskframe import App, Client, ConfigError, Context, Event, Task, provision
from taskframe import _topology as topology
from taskframe.testing import eventually, running_worker
from tests.fault_apps import Work, build_app


class Job(Task[str], queue="lanes"):
    n: int


class Charge(Task[None], queue="payments"):
    order: int


class OrderPlaced(Event):
    order: int


async def snapshot(client: Client, stream: str) -> tuple[js_api.StreamConfig, str, int]:
    info = await client.js.stream_info(stream)
    return info.config, str(info.created), info.state.messages


async def exists(client: Client, stream: str) -> bool:
    try:
        await client.js.stream_info(stream)
    except NotFoundError:
        return False
    return True


async def test_provisioning_twice_changes_nothing(client: Client) -> None:
    ns, js = client.namespace, client.js
    app = build_app(ns, None)
    queue = topology.queue_stream(ns, "work")
    streams = [queue, topology.dead_stream(ns), topology.results_stream(ns)]
    await provision(app, client)
    run = await client.enqueue(Work())
    first = [await snapshot(client, s) for s in streams]
    consumer = await js.consumer_info(queue, topology.WORKERS)

    await provision(app, client)
    assert [await snapshot(client, s) for s in streams] == first
    assert first[0][2] == 1  # the task is still there
    assert (await js.consumer_info(queue, topology.WORKERS)).created == consumer.created

    async with running_worker(app, client):  # which provisions again as it starts
        assert await run.result(timeout=10) == run.id
    await provision(app, client)
    after = await js.consumer_info(queue, topology.WORKERS)
    assert after.created == consumer.created
    assert after.config.ack_wait == consumer.config.ack_wait == client.settings.ack_wait
    assert after.delivered.stream_seq == 1  # the consumer kept its place: not recreated
    assert after.ack_floor.stream_seq == 1
    assert [(await snapshot(client, s))[:2] for s in streams] == [f[:2] for f in first]


async def test_provision_creates_a_consumer_per_lane_and_only_what_the_app_uses(
    client: Client,
) -> None:
    ns, js = client.namespace, client.js
    app = App(ns)
    app.queue("lanes", priorities=("high", "default"), max_in_flight=7, rate_limit="5/s")

    @app.handle(Job)
    async def job(task: Job, ctx: Context) -> str:
        return ""

    await provision(app, client)
    stream = topology.queue_stream(ns, "lanes")
    consumers = {c.name: c.config for c in await js.consumers_info(stream)}
    assert set(consumers) == {"workers", "workers-high"}
    assert consumers["workers"].filter_subject == f"{ns}.tasks.lanes.*"
    assert consumers["workers-high"].filter_subject == f"{ns}.tasks.lanes.*.high"
    assert {c.max_ack_pending for c in consumers.values()} == {7}
    assert {c.ack_wait for c in consumers.values()} == {client.settings.ack_wait}
    assert await exists(client, topology.rate_stream(ns))
    assert await exists(client, topology.dead_stream(ns))
    assert await exists(client, topology.results_stream(ns))
    assert not await exists(client, topology.claims_stream(ns))  # no exactly-once handler
    assert not await exists(client, topology.events_stream(ns))  # no subscriber

    @app.handle(Charge, exactly_once=True)
    async def charge(task: Charge, ctx: Context) -> None: ...

    @app.subscribe(OrderPlaced, group="billing")
    async def bill(event: OrderPlaced, ctx: Context) -> None: ...

    await provision(app, client, queues=[], groups=["billing"])  # narrowed: the group only
    assert not await exists(client, topology.queue_stream(ns, "payments"))
    group = await js.consumer_info(topology.events_stream(ns), topology.group_consumer("billing"))
    assert group.config.filter_subject == f"{ns}.events.OrderPlaced"
    await provision(app, client)
    assert await exists(client, topology.queue_stream(ns, "payments"))
    assert await exists(client, topology.claims_stream(ns))


async def test_events_before_any_group_are_not_kept_unless_provisioned(client: Client) -> None:
    got: list[int] = []
    app = App(client.namespace)

    @app.subscribe(OrderPlaced, group="late")
    async def late(event: OrderPlaced, ctx: Context) -> None:
        got.append(event.order)

    await client.publish(OrderPlaced(order=1))  # no group yet: nobody keeps it
    await provision(app, client)  # what `taskframe provision` does before a deploy
    await client.publish(OrderPlaced(order=2))
    async with running_worker(app, client) as worker:
        await eventually(lambda: worker.stats.succeeded == 1, "the kept event to be handled")
    assert got == [2]


@pytest.mark.parametrize(
    ("setting", "conflict"),
    [
        ("retention", {"retention": js_api.RetentionPolicy.LIMITS}),
        ("storage", {"storage": js_api.StorageType.MEMORY}),
    ],
)
async def test_an_immutable_conflict_is_a_config_error_naming_the_setting(
    client: Client, setting: str, conflict: dict[str, object]
) -> None:
    stream = topology.queue_stream(client.namespace, "work")
    await client.js.add_stream(
        js_api.StreamConfig(
            name=stream,
            subjects=[f"{client.namespace}.tasks.work.>"],
            **conflict,  # type: ignore[arg-type]
        )
    )
    app = build_app(client.namespace, None)
    with pytest.raises(ConfigError, match=setting) as direct:
        await provision(app, client)
    assert stream in str(direct.value)
    with pytest.raises(ConfigError, match=setting):
        async with running_worker(app, client):
            pass
    have = (await client.js.stream_info(stream)).config
    assert getattr(have, setting) == conflict[setting]  # reported, never papered over


async def test_a_changed_duplicate_window_is_updated_in_place(client: Client) -> None:
    stream = topology.queue_stream(client.namespace, "work")
    app = build_app(client.namespace, None)
    await provision(app, client, queues=["work"])
    await client.enqueue(Work())
    config, created, messages = await snapshot(client, stream)
    assert config.duplicate_window == client.settings.duplicate_window == 120.0

    app.queue("work", duplicate_window=30.0)
    await provision(app, client, queues=["work"])
    config, created_after, messages_after = await snapshot(client, stream)
    assert config.duplicate_window == 30.0
    assert (created_after, messages_after) == (created, messages) == (created, 1)
