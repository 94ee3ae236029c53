"""A full store: producers hear of it at once, workers drain it by themselves.

nats-server runs with a 2 MB `max_file_store` (or a small memory store, or an account
limit). Producers fill it until the server refuses; the refusal must be a `StoreFullError`
carrying the server's own words, raised well under a second after the call (no retries:
the server answered). Then a real CLI worker (`taskframe worker tests.fault_apps:app`)
must drain the backlog with no operator action, every acknowledged task accounted for by
`tests.ledger`, and enqueueing must work again afterwards.
"""

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js import api

from taskframe import (
    Client,
    ConfigError,
    Event,
    PublishError,
    Settings,
    StoreFullError,
    TaskState,
    connect,
    schedules,
)
from taskframe import _stream_configs as configs
from taskframe import _topology as topology
from taskframe._publish import publish_stored
from taskframe.provision import ensure_shared
from taskframe.testing import NatsServer
from tests.fault_apps import Bulky, BulkyQuiet, Fail, build_app
from tests.faultkit import APP, TASKFRAME, Proc, Procs, until_drained
from tests.ledger import Ledger

PAD = "x" * 1000  # about 1.1 kB stored per task: some 1,800 fill 2 MB
REFUSED_WITHIN = 0.5  # seconds; a refusal takes about 1 ms, the rest is margin for 2 busy cores
BALLAST = b"x" * 65_536


class Filled(Event):
    """An event published into a full store."""

    n: int


def small_server(tmp_path: Path, jetstream: str, extra: str = "") -> NatsServer:
    """A nats-server whose JetStream limits are `jetstream` (nats.conf syntax)."""
    conf = tmp_path / "small.conf"
    conf.write_text(f"jetstream {{ {jetstream} }}\n{extra}")
    return NatsServer(port=-1, store_dir=tmp_path / "store", config=conf)


@pytest.fixture
def server_2mb(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own whose file store holds 2 MB."""
    server = small_server(tmp_path, "max_file_store: 2MB")
    try:
        yield server.start()
    finally:
        server.signal(signal.SIGCONT)
        server.stop()


def start_worker(procs: Procs, url: str, **env: str) -> Proc:
    """`taskframe worker tests.fault_apps:app` with TASKFRAME_* settings from `env`."""
    return procs.spawn(
        *TASKFRAME, "worker", APP, "--url", url, "--concurrency", "4", ack_wait=5.0, **env
    )


async def fill(
    ledger: Ledger, client: Client, make: type[Bulky] | type[BulkyQuiet]
) -> tuple[StoreFullError, float]:
    """Enqueue one task at a time until the server refuses one: the refusal, its seconds."""
    for _ in range(10_000):  # 2 MB hold fewer than 2,000
        started = time.monotonic()
        try:
            await ledger.enqueue(client, make(pad=PAD))
        except StoreFullError as exc:
            return exc, time.monotonic() - started
    raise AssertionError("the store never filled")


async def fill_with_ballast(client: Client) -> str:
    """Fill the store with a stream of the test's own, which no worker drains; its name."""
    ballast = f"{client.namespace}_ballast"
    await client.js.add_stream(name=ballast, subjects=[f"{client.namespace}.ballast"])
    for _ in range(100):  # 2 MB hold 32
        try:
            await publish_stored(client.nc, client.settings, f"{client.namespace}.ballast", BALLAST)
        except StoreFullError:
            return ballast
    raise AssertionError("the store never filled")


async def fill_fast(client: Client) -> StoreFullError:
    """Enqueue batches until the server refuses (some of) one; that refusal."""
    for _ in range(100):  # 2 MB hold fewer than 2,000; 1 MB of memory fewer than 1,000
        try:
            await client.enqueue_many(Bulky(pad=PAD) for _ in range(100))
        except StoreFullError as exc:
            return exc
    raise AssertionError("the store never filled")


def check_fill(client: Client, refusal: tuple[StoreFullError, float]) -> float:
    """The refusal that ended `fill`: the server's store is full. Its seconds."""
    exc, elapsed = refusal
    check_refusal(exc, StoreFullError.SERVER_FULL, "insufficient resources", elapsed)
    assert exc.stream == topology.queue_stream(client.namespace, "work")
    assert len(exc.task_ids) == 1
    return elapsed


def check_refusal(
    exc: StoreFullError, err_code: int, description: str, elapsed: float | None = None
) -> None:
    """A proper refusal: with the server's codes and words, and at once (when timed)."""
    assert isinstance(exc, PublishError)
    assert (exc.err_code, exc.description) == (err_code, description), exc
    assert exc.code == (400 if err_code == StoreFullError.ACCOUNT_FULL else 503)
    assert description in str(exc)
    if elapsed is not None:
        assert elapsed < REFUSED_WITHIN, f"refused after {elapsed:.3f}s"


async def refusals(client: Client) -> float:
    """Every other way into the full store is refused at once too; the slowest, in seconds."""
    slowest = 0.0
    started = time.monotonic()
    with pytest.raises(StoreFullError) as batch:
        await client.enqueue_many(Bulky(pad=PAD) for _ in range(5))
    slowest = max(slowest, time.monotonic() - started)
    check_refusal(batch.value, StoreFullError.SERVER_FULL, "insufficient resources", slowest)
    assert len(batch.value.task_ids) == 5
    started = time.monotonic()
    with pytest.raises(StoreFullError) as event:
        await client.publish(Filled(n=1))  # creates the events stream first: that still works
    slowest = max(slowest, time.monotonic() - started)
    check_refusal(event.value, StoreFullError.SERVER_FULL, "insufficient resources", slowest)
    return slowest


async def test_full_store_refuses_at_once_and_the_worker_drains_it(
    server_2mb: NatsServer, procs: Procs, namespace: str
) -> None:
    worker = start_worker(procs, server_2mb.url)  # default settings: results kept, no limits
    await worker.wait_log("worker ready")
    async with connect(server_2mb.url, namespace=namespace) as client:
        ledger = Ledger("store full (2 MB), tasks keep results", procs.journal)
        worker.signal(signal.SIGSTOP)  # a worker that cannot keep up: the backlog fills the store
        failing = [(await ledger.enqueue(client, Fail(note=str(i)))).id for i in range(2)]
        try:
            refused_s = check_fill(client, await fill(ledger, client, Bulky))
            slowest = max(refused_s, await refusals(client))
        finally:
            worker.signal(signal.SIGCONT)
        resumed = time.time()

        await until_drained(client, "work")  # nobody purged anything
        drained_s = time.time() - resumed
        await ledger.settle(client)
        done = [i for i in ledger.acknowledged if i not in failing]
        statuses = [await client.status(i) for i in done]
        stored = [s for s in statuses if s is not None and s.state is TaskState.SUCCEEDED]
        assert [s.result for s in stored] == done  # every result stored, none dropped

        again = await ledger.enqueue(client, Bulky(pad=PAD))  # room again, by itself
        assert await again.result(timeout=10) == again.id
        await ledger.settle(client)
        waited = len(re.findall(r"dead letter for \S+ not stored", worker.text()))
        figures = await ledger.figures(
            client,
            recover_s=ledger.first_done_after(resumed),
            note=f"refused within {slowest * 1000:.1f} ms (err_code 10023); drained in "
            f"{drained_s:.1f}s after the worker resumed; {len(stored)} of {len(done)} "
            f"results stored; {waited} dead letter(s) waited for room",
        )
    figures.record()
    figures.check(expect_dead=dict.fromkeys(failing, "failed"))


async def test_full_store_with_fire_and_forget_tasks(
    server_2mb: NatsServer, procs: Procs, namespace: str
) -> None:
    async with connect(server_2mb.url, namespace=namespace) as client:
        ledger = Ledger("store full (2 MB), results=False tasks", procs.journal)
        refused_s = check_fill(client, await fill(ledger, client, BulkyQuiet))
        worker = start_worker(procs, server_2mb.url)  # starts on a full store, default settings
        started = time.time()
        await worker.wait_log("worker ready")
        await until_drained(client, "work")
        drained_s = time.time() - started
        again = await ledger.enqueue(client, BulkyQuiet(pad="again"))
        await ledger.settle(client)
        assert procs.journal.count("done", again.id) == 1
        figures = await ledger.figures(
            client,
            recover_s=ledger.first_done_after(started),
            note=f"refused within {refused_s * 1000:.1f} ms (err_code 10023); a worker "
            f"started on the full store drained it in {drained_s:.1f}s",
        )
    figures.record()
    figures.check()


async def test_dead_letters_wait_for_room_and_are_never_dropped(
    server_2mb: NatsServer, procs: Procs, namespace: str
) -> None:
    worker = start_worker(procs, server_2mb.url)
    await worker.wait_log("worker ready")
    async with connect(server_2mb.url, namespace=namespace) as client:
        ledger = Ledger("store filled by another stream: a dead letter waits", procs.journal)
        worker.signal(signal.SIGSTOP)
        failing = (await ledger.enqueue(client, Fail(note="dies in a full store"))).id
        ballast = await fill_with_ballast(client)
        worker.signal(signal.SIGCONT)

        await worker.wait_log(r"dead letter for \S+ waits for room")  # refused: the task is held
        [held] = [q for q in await client.queues() if q.queue == "work"]
        assert (held.waiting, held.in_flight) == (0, 1)  # held by the worker meanwhile
        freed = time.time()
        await client.js.delete_stream(ballast)  # room comes back, by whatever means
        await until_drained(client, "work")
        recovered_s = time.time() - freed
        status = await client.status(failing)
        assert status is not None
        assert status.state is TaskState.DEAD
        assert status.error is not None
        # Held until room came back, not handed back: it died of its own error, not `lost`.
        assert (status.error.reason, status.error.type) == ("failed", "RuntimeError")
        await ledger.settle(client)

        [letter] = await client.dead_letters()
        await fill_with_ballast(client)
        with pytest.raises(StoreFullError):  # a replay into a full store: the letter stays
            await client.replay(letter)
        assert [d.task_id for d in await client.dead_letters()] == [failing]
        reason = status.error.reason if status.error else None
        figures = await ledger.figures(
            client,
            recover_s=recovered_s,
            note="its dead letter was refused (StoreFullError); the task was held and its letter "
            f"stored (reason {reason!r}) within a second or two of room coming back",
        )
    figures.record()
    figures.check(expect_dead=[failing])


async def test_a_schedule_the_full_store_refuses_does_not_keep_a_worker_from_starting(
    server_2mb: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = build_app(namespace, None)
    app.schedule(task=Bulky(pad="tick"), every=60.0, name="tick")
    async with connect(server_2mb.url, namespace=namespace) as client:
        await fill_fast(client)
        await schedules.reconcile(client, app, ["work"])  # returns: provisioning goes on
    assert "schedule tick on queue work not set" in caplog.text


@pytest.mark.parametrize(
    ("jetstream", "extra", "options", "err_code", "description"),
    [
        pytest.param(
            "max_memory_store: 1MB",
            "",
            {"storage": "memory"},
            StoreFullError.SERVER_FULL,
            "insufficient resources",
            id="memory-store",
        ),
        pytest.param(
            "max_file_store: 64MB",
            "accounts { A: { jetstream: { max_file: 256KB }, users: [{user: a, password: a}] } }",
            {"user": "a", "password": "a"},
            StoreFullError.ACCOUNT_FULL,
            "resource limits exceeded for account",
            id="account-limit",
        ),
    ],
)
async def test_other_full_stores_are_refused_at_once(
    tmp_path: Path,
    jetstream: str,
    extra: str,
    options: dict[str, str],
    err_code: int,
    description: str,
    namespace: str,
) -> None:
    with small_server(tmp_path, jetstream, extra) as server:
        async with connect(server.url, namespace=namespace, **options) as client:
            batch = await fill_fast(client)
            check_refusal(batch, err_code, description)
            assert 0 < len(batch.task_ids) <= 100  # the rest of the batch was stored
            started = time.monotonic()
            with pytest.raises(StoreFullError) as single:
                await client.enqueue(Bulky(pad=PAD))
            check_refusal(single.value, err_code, description, time.monotonic() - started)


async def test_stream_limits_and_other_refusals(client: Client) -> None:
    """A stream's own limit is a `StoreFullError`; any other refusal a `PublishError`; both
    at once."""
    js, ns = client.js, client.namespace
    cases: list[tuple[str, dict[str, int | bool], type[PublishError], str]] = [
        ("msgs", {"max_msgs": 2}, StoreFullError, "maximum messages exceeded"),
        ("bytes", {"max_bytes": 2048}, StoreFullError, "maximum bytes exceeded"),
        (
            "subject",
            {"max_msgs_per_subject": 2, "discard_new_per_subject": True},
            PublishError,
            "maximum messages per subject exceeded",
        ),
        ("size", {"max_msg_size": 600}, PublishError, "message size exceeds maximum allowed"),
    ]
    for name, limits, error, description in cases:
        stream = f"{ns}_probe_{name}"
        config = api.StreamConfig(
            name=stream, subjects=[f"{ns}.probe.{name}"], discard=api.DiscardPolicy.NEW
        )
        await js.add_stream(config, **limits)
        try:
            refused = await refusal(client, f"{ns}.probe.{name}")
            assert type(refused) is error, refused
            assert description in str(refused)
            if isinstance(refused, StoreFullError):
                assert refused.err_code == StoreFullError.STREAM_FULL
                assert refused.stream == stream
        finally:
            await js.delete_stream(stream)


async def refusal(client: Client, subject: str) -> PublishError:
    """Publish 700 bytes to `subject` until refused (at once); the refusal."""
    for _ in range(10):
        started = time.monotonic()
        try:
            await publish_stored(client.nc, client.settings, subject, b"x" * 700)
        except PublishError as exc:
            assert time.monotonic() - started < REFUSED_WITHIN
            return exc
    raise AssertionError(f"{subject} was never refused")


async def test_an_existing_results_bucket_takes_its_limit_in_place(client: Client) -> None:
    js, ns = client.js, client.namespace
    before = configs.results_config(client.settings)
    before.discard, before.max_bytes = api.DiscardPolicy.NEW, None  # as taskframe made it before
    await js.add_stream(before)
    kv = await js.key_value(topology.results_bucket(ns))
    await kv.put("kept", b'{"id": "kept", "task": "Bulky", "state": "succeeded"}')
    name = f"KV_{topology.results_bucket(ns)}"

    limited = Settings(url=client.settings.url, namespace=ns, results_max_bytes=64 * 1024)
    await ensure_shared(js, limited)
    config = (await js.stream_info(name)).config
    assert (config.max_bytes, config.discard) == (64 * 1024, api.DiscardPolicy.OLD)
    status = await client.status("kept")
    assert status is not None
    assert status.state is TaskState.SUCCEEDED  # the same bucket, updated

    await ensure_shared(js, client.settings)  # back to no limit: reservation released
    config = (await js.stream_info(name)).config
    assert (config.max_bytes, config.discard) == (-1, api.DiscardPolicy.OLD)
    claims = configs.claims_config(limited)
    assert (claims.max_bytes, claims.discard) == (-1, api.DiscardPolicy.NEW)  # never dropped

    huge = Settings(url=client.settings.url, namespace=ns, results_max_bytes=2**60)
    with pytest.raises(ConfigError, match="must be reserved out of the server's max_file_store"):
        await ensure_shared(js, huge)
