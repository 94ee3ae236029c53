import logging

import pytest
from nats.js import api as js_api

from taskframe import Client, ConfigError
from taskframe._topology import WORKERS, dead_stream, queue_stream, results_bucket
from taskframe.provision import ensure_consumer, ensure_queue, ensure_shared
from taskframe.testing import running_worker
from tests.fault_apps import Work, build_app


async def snapshot(client: Client, stream: str) -> tuple[js_api.StreamConfig, str, int]:
    info = await client.js.stream_info(stream)
    return info.config, str(info.created), info.state.messages


async def test_provisioning_twice_changes_nothing(client: Client) -> None:
    js, settings, ns = client.js, client.settings, client.namespace
    streams = [queue_stream(ns, "work"), dead_stream(ns), f"KV_{results_bucket(ns)}"]
    await ensure_shared(js, settings)
    await ensure_queue(js, settings, "work")
    run = await client.enqueue(Work())
    first = [await snapshot(client, s) for s in streams]

    await ensure_shared(js, settings)
    await ensure_queue(js, settings, "work")
    assert [await snapshot(client, s) for s in streams] == first
    assert first[0][2] == 1  # the task is still there

    async with running_worker(build_app(ns, None), client):
        assert await run.result(timeout=10) == run.id
        consumer = await js.consumer_info(streams[0], WORKERS)
    assert consumer.delivered.stream_seq == 1
    again = await ensure_consumer(js, streams[0], consumer.config)
    await ensure_consumer(js, streams[0], consumer.config)
    async with running_worker(build_app(ns, None), client):
        after = await js.consumer_info(streams[0], WORKERS)
    assert again.created == after.created == consumer.created
    assert after.config.ack_wait == consumer.config.ack_wait == settings.ack_wait
    assert after.delivered.stream_seq == 1  # the consumer kept its place: not recreated
    assert after.ack_floor.stream_seq == 1
    assert [(await snapshot(client, s))[:2] for s in streams] == [f[:2] for f in first]


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
    stream = queue_stream(client.namespace, "work")
    await client.js.add_stream(
        js_api.StreamConfig(
            name=stream,
            subjects=[f"{client.namespace}.tasks.work.>"],
            **conflict,  # type: ignore[arg-type]
        )
    )
    with pytest.raises(ConfigError, match=setting) as direct:
        await ensure_queue(client.js, client.settings, "work")
    assert stream in str(direct.value)
    with pytest.raises(ConfigError, match=setting):
        async with running_worker(build_app(client.namespace, None), client):
            pass
    have = (await client.js.stream_info(stream)).config
    assert getattr(have, setting) == conflict[setting]  # reported, never papered over


async def test_a_changed_duplicate_window_is_updated_in_place(client: Client) -> None:
    stream = queue_stream(client.namespace, "work")
    await ensure_queue(client.js, client.settings, "work")
    await client.enqueue(Work())
    config, created, messages = await snapshot(client, stream)
    assert config.duplicate_window == client.settings.duplicate_window == 120.0

    shorter = client.settings.model_copy(update={"duplicate_window": 30.0})
    await ensure_queue(client.js, shorter, "work")
    config, created_after, messages_after = await snapshot(client, stream)
    assert config.duplicate_window == 30.0
    assert (created_after, messages_after) == (created, messages) == (created, 1)


async def test_a_consumer_deleted_under_a_running_worker_is_recreated(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    stream = queue_stream(client.namespace, "work")
    caplog.set_level(logging.WARNING, logger="taskframe")
    async with running_worker(build_app(client.namespace, None), client):
        first = await client.enqueue(Work())
        assert await first.result(timeout=10) == first.id
        before = await client.js.consumer_info(stream, WORKERS)

        await client.js.delete_consumer(stream, WORKERS)
        later = [await client.enqueue(Work()) for _ in range(3)]
        assert [await r.result(timeout=20) for r in later] == [r.id for r in later]
        after = await client.js.consumer_info(stream, WORKERS)
    assert after.created != before.created
    assert after.config.ack_wait == before.config.ack_wait
    assert any("consumer" in r.getMessage() and r.name == "taskframe._pull" for r in caplog.records)
