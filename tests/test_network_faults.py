"""Network faults: workers and producers whose connection to nats-server is held or cut.

A worker (`taskframe worker tests.fault_apps:app`, a subprocess) or a producer reaches the
server through `tests.netproxy.NetProxy`, which holds its traffic (blackhole) while both
processes go on: a half-open connection, as a partition leaves it, that nobody notices
until a timeout does, and whose held bytes are delivered when it heals. Each scenario
accounts for its tasks with `tests.ledger.Ledger`, records its figures for docs/faults.md,
and taps what the broker saw: every status record stored in the results bucket
(`BucketTap`) and every ack, nak and term sent for the queue's deliveries (`AckTap`).

The guarantees under test (README, "What happens to a task" and "Exactly-once claims"):
a worker that lost its lease records nothing, settles nothing and starts nothing more;
a cut-off worker does not use up its tasks' attempts; an exactly-once task whose holder
is paused completes once, on another worker, once the holder's claim expires.
"""

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from taskframe import Client, PublishError, TaskState, connect
from taskframe import _topology as topology
from taskframe.testing import NatsServer, eventually
from tests.fault_apps import Once, Work
from tests.faultkit import AckTap, BucketTap, Procs, until_drained
from tests.ledger import Ledger
from tests.netproxy import NetProxy

T = TypeVar("T")
ACK_WAIT = 2.0
# Longer than a feed's silence limit (15 s before 1cf393f), shorter than the server takes to
# drop a client that answers no pings (nats.conf: ping_interval 10 s x ping_max 3).
HALF_OPEN_S = 16.0
ALONE_S = 12.0
DEFAULT_ACK_WAIT = 10.0  # taskframe.settings.Settings.ack_wait
CLAIM_S = 3 * DEFAULT_ACK_WAIT  # a running claim outlives its last renewal by 3 ack_waits
CLAIM_MARGIN_S = 6.0  # redelivery, a busy 2-core box


async def outcome(waiting: Awaitable[T]) -> T | Exception:
    """What `waiting` returned, or the exception it raised: asserted on later, with context."""
    try:
        return await waiting
    except Exception as exc:
        return exc


def after_success(statuses: BucketTap, task_id: str) -> list[tuple[str, int]]:
    """The status records of `task_id` stored after its first `succeeded` one: (state, attempt).

    A final state is final: any record after it is a stale write that overwrote the truth.
    Non-final records are stored beside the keys and cannot overwrite it: not counted.
    """
    writes = [w for w in statuses.writes(task_id) if w.final]
    first = next((n for n, w in enumerate(writes) if w.state == TaskState.SUCCEEDED), len(writes))
    return [(w.state, w.attempt) for w in writes[first + 1 :]]


def held(proxy: NetProxy) -> int:
    """Bytes the proxy still holds, both directions, every connection."""
    return sum(link.up.held + link.down.held for link in proxy.links)


async def test_half_open_connection_the_stale_worker_records_and_settles_nothing(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("half-open connection: stale worker blackholed 16 s", procs.journal)
    ns = client.namespace
    async with NetProxy("127.0.0.1", nats_server.port) as proxy:
        # Pings every 20 s: nats-py must not notice the partition before it heals, so A's
        # connection stays half-open throughout, with nothing on it to tell A anything.
        a = procs.worker(proxy.url, concurrency=2, ack_wait=ACK_WAIT, TASKFRAME_PING_INTERVAL="20")
        await a.wait_log("worker ready")
        async with (
            BucketTap(client, topology.results_bucket(ns), f"{ns}.progress.") as statuses,
            AckTap(client, topology.queue_stream(ns, "work")) as acks,
        ):
            runs = await client.enqueue_many(Work(seconds=3.0) for _ in range(4))
            ledger.acknowledge(*runs)
            ids = [r.id for r in runs]
            # A holds all 4 (2 running, 2 prefetched): B starts only after the cut, so
            # every first delivery is A's and every later one is B's.
            await eventually(
                lambda: len(procs.journal.entries("start", pid=a.pid)) == 2, "A's 2 starts"
            )
            proxy.blackhole()
            cut = time.time()
            b = procs.worker(nats_server.url, concurrency=4, ack_wait=ACK_WAIT)

            def b_finished() -> bool:
                return {e.task_id for e in procs.journal.entries("done", pid=b.pid)} >= set(ids)

            await eventually(b_finished, "B to finish all 4 tasks", timeout=25)
            # The partition lasts a set time; there is no event to wait for.
            await asyncio.sleep(max(0.0, cut + HALF_OPEN_S - time.time()))
            proxy.heal()
            await eventually(lambda: held(proxy) == 0, "A's held bytes to be delivered", timeout=10)
            a.signal(signal.SIGTERM)  # A does everything it was going to do, then exits
            a_exit = await a.wait_exit(timeout=20)
            await statuses.caught_up()
            await client.nc.flush()  # every ack A sent before it exited is in our inbox

        await ledger.settle(client)
        by_b = {e.task_id: e.attempt for e in procs.journal.entries("done", pid=b.pid)}
        succeeded = {i: [w.attempt for w in statuses.writes(i, "succeeded")] for i in ids}
        # Seen after the cut, A's records arrived only with the heal: A was cut off until then.
        stale_records = [w for w in statuses.writes() if w.attempt == 1 and w.at > cut]
        stale_settles = acks.seen(delivered=1)
        late_starts = [e for e in procs.journal.entries("start", pid=a.pid) if e.at > cut]
        figures = await ledger.figures(
            client,
            recover_s=ledger.first_done_after(cut, ids, started_after=True),
            note=f"A held 4 tasks when cut off; B took them over after ack_wait; after the "
            f"heal A's stale status records: {len(stale_records)}, stale acks/naks/terms: "
            f"{len(stale_settles)}, tasks A started after the cut: {len(late_starts)}",
        )
        figures.record()

        assert succeeded == {i: [by_b[i]] for i in ids}, (
            f"succeeded records (their attempts) per task: {succeeded}, B's runs: {by_b}; only "
            "the worker holding the lease may report success, once"
        )
        assert all(attempt >= 2 for attempt in by_b.values())
        after_final = {i: after_success(statuses, i) for i in ids}
        assert not any(after_final.values()), (
            f"status records stored after the task succeeded (state, attempt): {after_final}"
        )
        assert not stale_settles, f"A settled deliveries after its lease ran out: {stale_settles}"
        assert not late_starts, f"A started tasks after it was cut off: {late_starts}"
        assert not [w for w in statuses.writes() if w.state == TaskState.DEAD]
        figures.check()
        for i in ids:
            status = await client.status(i)
            assert status is not None
            assert (status.state, status.attempt) == (TaskState.SUCCEEDED, by_b[i])
        await until_drained(client, "work")
        assert a_exit == 0
        assert b.alive


async def test_the_only_worker_cut_off_uses_up_no_attempts_and_succeeds_once(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("the only worker blackholed 12 s, then healed", procs.journal)
    ns = client.namespace
    async with NetProxy("127.0.0.1", nats_server.port) as proxy:
        a = procs.worker(proxy.url, concurrency=4, ack_wait=ACK_WAIT, TASKFRAME_PING_INTERVAL="20")
        await a.wait_log("worker ready")
        async with BucketTap(client, topology.results_bucket(ns), f"{ns}.progress.") as statuses:
            runs = await client.enqueue_many(Work(seconds=3.0) for _ in range(4))
            ledger.acknowledge(*runs)
            ids = [r.id for r in runs]
            await eventually(
                lambda: len(procs.journal.entries("start", pid=a.pid)) == 4, "A's 4 starts"
            )
            proxy.blackhole()
            cut = time.time()
            await asyncio.sleep(ALONE_S)  # the partition lasts a set time: nothing to wait for
            proxy.heal()
            healed = time.time()
            outcomes = await asyncio.gather(*(outcome(r.result(timeout=30)) for r in runs))
            probe = await ledger.enqueue(client, Work())  # still healthy: new work completes
            probed = await outcome(probe.result(timeout=20))
            a.signal(signal.SIGTERM)
            a_exit = await a.wait_exit(timeout=20)
            await statuses.caught_up()

        await ledger.settle(client)
        starts = Counter(e.task_id for e in procs.journal.entries("start") if e.task_id in ids)
        succeeded = {i: [w.attempt for w in statuses.writes(i, "succeeded")] for i in ids}
        dead_writes = [w for w in statuses.writes() if w.state == TaskState.DEAD]
        figures = await ledger.figures(
            client,
            recover_s=ledger.first_done_after(healed, ids, started_after=True),
            note=f"cut off {ALONE_S:.0f}s with its 4 tasks running; handler runs per task "
            f"{sorted(starts.values())}; succeeded records per task "
            f"{sorted(len(v) for v in succeeded.values())}",
        )
        figures.record()

        assert not figures.dead_reasons, f"dead letters: {figures.dead_reasons}"
        assert not dead_writes, f"tasks reported dead: {dead_writes}"
        assert outcomes == ids, f"results: {outcomes}"
        assert all(len(v) == 1 for v in succeeded.values()), (
            f"succeeded records (their attempts) per task: {succeeded}"
        )
        assert max(starts.values()) <= 2, f"handler runs per task: {dict(starts)}"
        after_final = {i: after_success(statuses, i) for i in ids}
        assert not any(after_final.values()), (
            f"status records stored after the task succeeded (state, attempt): {after_final}"
        )
        figures.check()
        assert probed == probe.id
        await until_drained(client, "work")
        assert a_exit == 0
        assert procs.journal.pids() == {a.pid}
        assert min(e.at for e in procs.journal.entries("start")) < cut


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_exactly_once_task_of_a_paused_holder_completes_once_after_its_claim_expires(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("exactly-once task, holder SIGSTOPped, default settings", procs.journal)
    ns = client.namespace
    a = procs.worker(nats_server.url, concurrency=1, ack_wait=None)  # the defaults: 10 s
    await a.wait_log("worker ready")
    async with (
        BucketTap(client, topology.results_bucket(ns), f"{ns}.progress.") as statuses,
        BucketTap(client, topology.claims_bucket(ns)) as claims,
        AckTap(client, topology.queue_stream(ns, "once")) as acks,
    ):
        run = await ledger.enqueue(client, Once(seconds=3.0))
        await eventually(lambda: procs.journal.entries("start", run.id, pid=a.pid), "A to start it")
        a.signal(signal.SIGSTOP)
        stopped = time.time()
        try:
            b = procs.worker(nats_server.url, concurrency=1, ack_wait=None)
            result = await outcome(run.result(timeout=CLAIM_S + DEFAULT_ACK_WAIT + 20))
        finally:
            a.signal(signal.SIGCONT)
        continued = time.time()
        a.signal(signal.SIGTERM)  # A does everything it was going to do, then exits
        a_exit = await a.wait_exit(timeout=20)
        await statuses.caught_up()
        await claims.caught_up()
        await client.nc.flush()

    await ledger.settle(client)
    # A's claim writes: the claim, and its renewals until it was stopped (seen before
    # SIGCONT, so written before SIGSTOP; none was refused, nobody else wrote the key then).
    renewals = [
        w.at
        for w in claims.writes(run.id)
        if str(w.record.get("owner", "")).endswith(f":{a.pid}") and w.at < continued
    ]
    b_starts = procs.journal.entries("start", run.id, pid=b.pid)
    b_after = b_starts[0].at - max(renewals) if b_starts and renewals else None
    a_finished = bool(procs.journal.entries("done", run.id, pid=a.pid))
    figures = await ledger.figures(
        client,
        recover_s=ledger.first_done_after(stopped, {run.id}, started_after=True),
        note="B started it "
        + ("never" if b_after is None else f"{b_after:.1f}s after A's last claim renewal")
        + f" (claim TTL {CLAIM_S:.0f}s); A's handler "
        + ("finished its sleep" if a_finished else "did not finish")
        + " after SIGCONT",
    )
    figures.record()

    assert not figures.dead_reasons, f"dead letters: {figures.dead_reasons}"
    assert result == run.id, f"result: {result!r}"
    assert renewals, "A never wrote its claim"
    [b_start] = b_starts
    assert b_after is not None
    assert b_after >= CLAIM_S - 1.0, (
        f"B started it {b_after:.1f}s after A's last claim write: A's claim still lived"
    )
    assert b_after <= CLAIM_S + CLAIM_MARGIN_S, (
        f"B started A's task {b_after:.1f}s after A's last claim renewal; the claim expires "
        f"{CLAIM_S:.0f}s after it (allowed {CLAIM_S + CLAIM_MARGIN_S:.0f}s)"
    )
    [by_b] = procs.journal.entries("done", run.id, pid=b.pid)
    assert by_b.attempt == b_start.attempt
    succeeded = [w.attempt for w in statuses.writes(run.id, "succeeded")]
    assert succeeded == [by_b.attempt], f"succeeded records (attempts): {succeeded}"
    assert not after_success(statuses, run.id)
    late = [w for w in statuses.writes(run.id) if w.attempt == 1 and w.at >= continued]
    assert not late, f"A wrote status records after SIGCONT: {late}"
    assert not acks.seen(delivered=1), f"A settled its delivery: {acks.seen(delivered=1)}"
    assert not [w for w in statuses.writes() if w.state == TaskState.DEAD]
    # Not figures.check(exactly_once=True): that counts handler completions, and A's handler
    # may finish its sleep after SIGCONT. What exactly-once forbids is recording or acking
    # that run, or starting the task elsewhere while the holder's claim lives: checked above.
    figures.check()
    status = await run.status()
    assert (status.state, status.attempt) == (TaskState.SUCCEEDED, by_b.attempt)
    bucket = topology.claims_bucket(ns)
    claim = await client.js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{run.id}")
    stored = json.loads(claim.data or b"{}")
    assert stored["state"] == "done"
    assert stored["owner"].endswith(f":{b.pid}"), f"the completed claim: {stored}"
    await until_drained(client, "once")
    assert a_exit == 0
    assert b.alive


async def test_a_blackholed_producer_gets_publish_error_within_its_bound_then_recovers(
    client: Client, nats_server: NatsServer, procs: Procs
) -> None:
    ledger = Ledger("producer's connection blackholed during an enqueue", procs.journal)
    ns = client.namespace
    worker = procs.worker(nats_server.url, concurrency=4)  # direct: only the producer is cut
    await worker.wait_log("worker ready")
    timeout, attempts = 1.0, 3
    # publish_stored: `attempts` waits of `timeout`, with a backoff of 0.1 * 2**n s (at most
    # 2 s) after each: the bound docs/guarantees.md gives is timeout x attempts.
    bound = timeout * attempts + sum(min(2.0, 0.1 * 2**n) for n in range(attempts))
    async with (
        NetProxy("127.0.0.1", nats_server.port) as proxy,
        connect(
            proxy.url,
            namespace=ns,
            publish_timeout=timeout,
            publish_attempts=attempts,
            ping_interval=30.0,  # the client must not notice on its own
        ) as tf,
    ):
        before = await ledger.enqueue(tf, Work(), key="before")
        assert await before.result(timeout=10) == before.id
        proxy.blackhole()
        cut = time.monotonic()
        with pytest.raises(PublishError):
            await ledger.enqueue(tf, Work(), key="during")
        took = time.monotonic() - cut
        proxy.heal()
        healed = time.time()
        after = await ledger.enqueue(tf, Work(), key="after")
        since_heal = time.time() - healed
        assert await after.result(timeout=10) == after.id
        # The unconfirmed publishes were held, not lost: delivered at the heal, they are
        # stored (once: one message id), and enqueueing the key again stores nothing new.
        again = await tf.enqueue(Work(), key="during")
        assert await again.result(timeout=10) == again.id
    await ledger.settle(client)
    info = await client.js.stream_info(topology.queue_stream(ns, "work"))
    figures = await ledger.figures(
        client,
        recover_s=since_heal,
        note=f"enqueue raised PublishError after {took:.1f}s (publish_timeout {timeout:g}s x "
        f"{attempts} attempts + backoff = {bound:.1f}s); its held publishes were stored "
        f"once at the heal (a resend with its key: duplicate={again.duplicate})",
    )
    figures.record()
    figures.check()
    assert took <= bound + 1.0, f"enqueue took {took:.1f}s to fail (bound {bound:.1f}s)"
    assert figures.unknown == 0
    assert figures.acknowledged == 3
    assert figures.duplicated == 0
    assert info.state.last_seq == 3, "a task stored twice (or one not at all)"
    await until_drained(client, "work")
    assert worker.alive
