"""A worker's credit (taskframe._credit.Credit): how many tasks it takes from a shared queue.

By default the prefetch adapts: short tasks get a deep pipeline (what the worker settles in
`HORIZON` seconds), long ones no more than `min(concurrency, 64)` waiting, so other workers
are not starved of a queue's tasks.
"""

import asyncio
import time

from taskframe import Client
from taskframe._credit import Credit
from taskframe._pull import Feed, _Request
from taskframe.testing import eventually
from tests.apps import Add, Slow, build
from tests.conftest import Workers


def test_an_adaptive_credit_grows_while_tasks_are_short_and_shrinks_when_they_stop() -> None:
    credit = Credit(4, 16, slots=2, most=100)
    assert (credit.capacity, credit.limit) == (4, 20)
    credit.held = 1000
    time.sleep(0.12)
    for _ in range(1000):  # ~8,000 a second: 0.1 s of them is more than `most`
        credit.finished()
    credit.adapt()
    assert (credit.capacity, credit.limit, credit.min_batch) == (100, 116, 25)
    time.sleep(0.12)  # nothing settled since
    credit.adapt()
    assert (credit.capacity, credit.limit) == (4, 20)


def test_a_fixed_credit_does_not_adapt() -> None:
    credit = Credit(4, 16, slots=2)
    credit.held = 1000
    time.sleep(0.12)
    for _ in range(1000):
        credit.finished()
    credit.adapt()
    assert credit.capacity == 4


def test_messages_awaiting_a_confirmation_leave_the_capacity_but_not_the_limit() -> None:
    credit = Credit(4, 2)
    credit.held = 4
    assert credit.free() == 0
    credit.awaiting()
    credit.awaiting()
    assert credit.free() == 2  # two runners free: two more may come
    credit.held = 6
    credit.awaiting()
    assert credit.free() == 0  # the limit: capacity + 2
    credit.finished(confirming=True)
    assert (credit.held, credit.confirming, credit.free()) == (5, 2, 1)


async def test_long_tasks_are_shared_between_workers_with_the_default_prefetch(
    client: Client, workers: Workers
) -> None:
    calls: list[str] = []
    app = build(client.namespace, calls)
    runs = await client.enqueue_many(Slow(seconds=0.2) for _ in range(24))
    async with workers(app, 2, concurrency=2, queues=["slow"]) as running:
        await asyncio.gather(*(run.result(timeout=20) for run in runs))
        await eventually(lambda: sum(w.stats.succeeded for w in running) == 24, "24 acks")
        shares = sorted(w.stats.succeeded for w in running)
    # Each worker holds at most 2 running + 2 waiting: the second gets a fair share even
    # though the first started with all 24 waiting. A prefetch grown for short tasks would
    # have let the first take them all.
    assert shares[0] >= 8, shares


async def test_short_tasks_grow_the_prefetch(client: Client, workers: Workers) -> None:
    app = build(client.namespace)
    runs = await client.enqueue_many(Add(a=i, b=0) for i in range(5000))
    async with workers(app, 1, queues=["math"]) as [worker]:
        floor = worker.concurrency + worker.prefetch
        await eventually(
            lambda: worker._pools[0].credit.capacity > floor, "a deeper prefetch", interval=0.01
        )
        await asyncio.gather(*(run.result(timeout=30) for run in runs[-10:]))


async def test_a_request_whose_end_never_came_does_not_age_later_deliveries(
    client: Client,
) -> None:
    # A frozen server or a leader change can swallow a request's 408: the feed must not go
    # on starting every later delivery's lease when that request was sent (long ago), or it
    # would drop them all as stale, one redelivery after another.
    async def recover() -> None:
        return None

    ack_wait = 2.0
    feed = Feed(client.nc, "S", "c", Credit(4, 4), lambda m, s: None, recover, ack_wait)
    now = time.monotonic()
    feed._heard = now
    feed._inbox.requests.extend([_Request(5, now - 30.0), _Request(3, now - 0.2)])
    feed._pending = 8
    assert feed._lease_start() == now - 0.2  # the live request; the lost one is forgotten
    assert feed._pending == 3
    feed._inbox.requests.clear()
    assert feed._lease_start() == now - 1.5 * (ack_wait / 2)  # the oldest a live one could be


async def test_a_late_answer_on_a_given_up_inbox_is_still_taken_with_its_own_requests_lease(
    client: Client,
) -> None:
    # A connection that heals, or a consumer leader that lost its quorum, may answer a
    # request after the feed gave up on it; a delivery to an inbox nobody hears any more is
    # lost, yet the server counts it as a delivery.
    async def recover() -> None:
        return None

    got: list[tuple[bytes, float]] = []
    feed = Feed(
        client.nc, "S", "c", Credit(4, 4), lambda m, s: got.append((m.data, s)), recover, 2.0
    )
    await feed.start()
    sent = time.monotonic() - 0.5
    old = feed._inbox
    old.requests.append(_Request(2, sent))
    feed.reset(new_inbox=True, check=False)  # as when the server went silent
    await feed._start_over()
    assert feed._inbox is not old
    assert feed._retired == [old]
    assert old.until == sent + 2.0

    await client.nc.publish(old.subject, b"late", reply="late.ack")
    await eventually(lambda: got, "the late delivery")
    assert got == [(b"late", sent)]  # its lease started when its own request was sent
    assert feed.credit.held == 1

    old.until = time.monotonic()  # past: anything its requests bring now is stale
    await feed._forget_retired()
    assert feed._retired == []
    await feed.close()
